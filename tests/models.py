"""Small models and a LightningModule used by the strategy tests: the project's own attentions (fused qkv + SDPA,
separate projections + SDPA, softmax written by hand), torch.nn.TransformerEncoder and Hugging Face's ViT.

None of these imitates a third-party library: the real timm, Hugging Face and torch models are tested in
tests/test_third_party_models.py (CPU) and tests/gpu/test_gpu_third_party.py (GPU, with timm)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.utils.data import Dataset

TOKENS, IN_DIM, WIDTH, HEADS, OUT_DIM = 13, 6, 32, 4, 3


class FusedQKVAttention(nn.Module):
    """One fused qkv Linear, a LayerNorm on the queries, SDPA, an output projection (the project's own test
    attention; the model key "timm_vit" is a historic name, the real timm is tested in tests/gpu)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class SeparateProjectionAttention(nn.Module):
    """An attention class no adapter knows (separate q/k/v Linears) that calls SDPA: handled by interception."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.h = num_heads
        self.to_q, self.to_k, self.to_v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (f(x).view(B, N, self.h, C // self.h).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class ManualSoftmaxAttention(SeparateProjectionAttention):
    """Computes softmax(QK^T)V by hand with matmul: the strategy intercepts the two products."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (f(x).view(B, N, self.h, C // self.h).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        attn = (q @ k.transpose(-1, -2) / math.sqrt(C // self.h)).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, attention: type[nn.Module]) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attention(dim, HEADS)
        self.norm2, self.mlp = (
            nn.LayerNorm(dim),
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding and position embedding before the blocks, a norm and head after them."""

    def __init__(self, attention: type[nn.Module] = FusedQKVAttention, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(IN_DIM, WIDTH)
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS, WIDTH) * 0.1)
        self.blocks = nn.ModuleList(Block(WIDTH, attention) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, OUT_DIM)

    def forward(self, x):  # [B, L, IN_DIM] -> [B, L, OUT_DIM]
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class TorchEncoderModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_DIM, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, OUT_DIM)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)))


class HuggingFaceViT(nn.Module):
    """transformers' ViTModel (attention through SDPA) on 24x24 images: 9 patches + CLS = 10 tokens."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(
            hidden_size=WIDTH,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            intermediate_size=2 * WIDTH,
            image_size=24,
            patch_size=8,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.head = nn.Linear(WIDTH, OUT_DIM)

    def forward(self, x):  # [B, 3, 24, 24] -> [B, 10, OUT_DIM]
        return self.head(self.vit(pixel_values=x).last_hidden_state)


class HuggingFaceDinov2(nn.Module):
    """transformers' Dinov2Model on 24x24 images (10 tokens): blocks with layer scales (``layer_scale1/2.lambda1``,
    initialised to 0.5), norms ``norm1/2`` and ``mlp.fc1/fc2``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        config = Dinov2Config(
            hidden_size=WIDTH,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            mlp_ratio=2,
            image_size=24,
            patch_size=8,
            layerscale_value=0.5,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.dinov2 = Dinov2Model(config)
        with torch.no_grad():  # layer scales that differ per channel, so a wrong split or sum shows
            for name, p in self.dinov2.named_parameters():
                if name.endswith("lambda1"):
                    p.uniform_(0.2, 0.8)
        self.head = nn.Linear(WIDTH, OUT_DIM)

    def forward(self, x):  # [B, 3, 24, 24] -> [B, 10, OUT_DIM]
        return self.head(self.dinov2(pixel_values=x).last_hidden_state)


class HandWrittenAttention(nn.Module):
    """Pre-norm, bias-free fused projection, softmax(Q K^T) V written by hand (no SDPA call to intercept)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm, self.attend, self.dropout = nn.LayerNorm(dim), nn.Softmax(dim=-1), nn.Dropout(0.0)
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        x = self.norm(x)
        B, N, C = x.shape
        q, k, v = (t.view(B, N, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = self.dropout(self.attend(q @ k.transpose(-1, -2) * self.scale))
        return self.to_out((attn @ v).transpose(1, 2).reshape(B, N, C))


class ContainerBlocksTransformer(nn.Module):
    """Blocks that are ModuleList([attention, feed-forward]) pairs the owner loops over (never called themselves)."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    HandWrittenAttention(dim, HEADS),
                    nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
                ]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class ContainerBlocksViT(nn.Module):
    """Patches + CLS token -> the transformer -> mean pool -> head, on 24x24 images (10 tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_patch = nn.Linear(3 * 8 * 8, WIDTH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, WIDTH))
        self.pos_embedding = nn.Parameter(torch.randn(1, 10, WIDTH))
        self.transformer = ContainerBlocksTransformer(WIDTH, depth=2)
        self.head = nn.Linear(WIDTH, OUT_DIM)

    def forward(self, img):  # [B, 3, 24, 24] -> [B, OUT_DIM]
        B = img.shape[0]
        patches = img.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(B, 9, 3 * 8 * 8)
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.to_patch(patches)], dim=1) + self.pos_embedding
        return self.head(self.transformer(x).mean(dim=1))


class SmallClimaX(nn.Module):
    """The bundled ClimaX (its own sequence_parallel_plan: shard after patchify, sliced pos_embed, gather after the
    head) on a 12 x 20 grid with patch 4: 3 x 5 = 15 tokens, 3 fields."""

    FIELDS = ["t2m", "z500", "t850"]

    def __init__(self) -> None:
        super().__init__()
        from lightning_seqpar.weather.models import ClimaX

        self.climax = ClimaX(self.FIELDS, (12, 20), patch_size=4, embed_dim=WIDTH, depth=2, decoder_depth=1,
                             num_heads=HEADS, drop_path=0.0)

    def forward(self, x):  # [B, 3, 12, 20] -> [B, 3, 12, 20]
        lead = torch.full((x.shape[0],), 6.0, device=x.device)
        return self.climax(x, lead, self.FIELDS, self.FIELDS)


def build_model(name: str) -> nn.Module:
    return {
        "timm_vit": lambda: TinyViT(FusedQKVAttention),  # historic name: the project's own fused-qkv attention
        "torch_encoder": TorchEncoderModel,
        "sdpa_vit": lambda: TinyViT(SeparateProjectionAttention),
        "manual_vit": lambda: TinyViT(ManualSoftmaxAttention),
        "hf_vit": HuggingFaceViT,
        "hf_dinov2": HuggingFaceDinov2,
        "container_vit": ContainerBlocksViT,
        "climax": SmallClimaX,
    }[name]()


def build_dataset(name: str) -> Dataset:
    """Images for the third-party ViTs, tokens for the others."""
    if name in ("hf_vit", "hf_dinov2"):
        return RandomTokens(x_shape=(3, 24, 24), y_shape=(10, OUT_DIM))
    if name == "container_vit":
        return RandomTokens(x_shape=(3, 24, 24), y_shape=(OUT_DIM,))
    if name == "climax":
        return RandomTokens(x_shape=(3, 12, 20), y_shape=(3, 12, 20))
    return RandomTokens()


class RandomTokens(Dataset):
    """Deterministic samples: index, tokens [L, IN_DIM], targets [L, OUT_DIM]."""

    def __init__(self, size: int = 64, seed: int = 0, x_shape=(TOKENS, IN_DIM), y_shape=(TOKENS, OUT_DIM)) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, *x_shape, generator=g)
        self.y = torch.randn(size, *y_shape, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"index": i, "x": self.x[i], "y": self.y[i]}


class LossRecorder(Callback):
    """Records the loss of every training batch (``outputs["loss"]``), for loss-curve comparisons."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


class RegressionModule(LightningModule):
    """MSE on the full (gathered) output; SGD with momentum (not scale invariant, unlike Adam)."""

    def __init__(self, model_name: str = "timm_vit", lr: float = 0.05) -> None:
        super().__init__()
        self.model = build_model(model_name)
        self.lr = lr
        self.seen: list[list[int]] = []
        self.samples = torchmetrics.SumMetric()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        loss = F.mse_loss(self.model(batch["x"]), batch["y"])
        self.log("train_loss", loss, sync_dist=True)
        self.log("samples_in_step", float(len(batch["x"])), reduce_fx="sum", sync_dist=True)
        self.samples.update(torch.tensor(float(len(batch["x"]))))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = F.mse_loss(self.model(batch["x"]), batch["y"])
        self.log("val_loss", loss, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self.model(batch["x"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def train_reference(
    model_name: str, seed: int, global_batches: list[list[int]], dataset: RandomTokens, lr: float = 0.05
):
    """Single-process training of ``RegressionModule(model_name, lr)`` on the given global batches: the ground truth of
    the contract (the state dict of :func:`tests.reference.train_single_process`)."""
    from tests.reference import train_single_process

    return train_single_process(lambda: RegressionModule(model_name, lr), global_batches, dataset, seed).state


def timm_imports() -> bool:
    """Whether the real timm ViT imports here (PyPI's torchvision, which timm needs, loads with PyPI's torch, not
    with the CPU build CI installs): the timm tests skip where it does not."""
    import importlib

    try:
        importlib.import_module("timm.models.vision_transformer")
    except Exception:  # noqa: BLE001 - timm or its torchvision missing or unloadable: skip
        return False
    return True
