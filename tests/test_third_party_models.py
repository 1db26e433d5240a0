"""Real third-party ViTs under SeqParStrategy on the CPU (gloo): Hugging Face transformers ViT, ViTMAE, Dinov2 and
Dinov2
with register tokens, torch.nn.TransformerEncoder (causal), each trained with the default attention="auto" on
sequence_parallel_size=4 and compared with single-process training (parameters after 3 SGD-with-momentum steps within
relative error 1e-5, fp32), with a check that each rank's attention saw only its share of the tokens.

Held-out shapes on purpose: 31, 19, 21, 17 and 23 tokens (none divisible by 4), class and register tokens, 2, 3 and 5
heads (2 and 3 < 4 make "auto" choose hybrid Ulysses x ring, 5 gives uneven Ulysses head shards). The real timm is
tested on the GPU machine (tests/gpu/test_gpu_third_party.py): PyPI's torchvision does not load with the CPU torch here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import Dataset

from tests.dist_utils import run_distributed

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(600)]

SEED, STEPS, BATCH, WORLD = 4321, 3, 2, 4
# model name -> (tokens in the sharded region, attention "auto" must choose)
MODELS = {
    "hf_vit_3heads": (31, "hybrid"),
    "hf_vitmae": (19, "ulysses"),
    "hf_dinov2_registers_5heads": (21, "ulysses"),
    "hf_dinov2_2heads": (17, "hybrid"),
    "hf_vit_eager": (31, "ulysses"),
    "torch_encoder_causal_3heads": (17, "hybrid"),
    "rope_blocks": (23, "ulysses"),
}


def third_party_versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


class TorchCausalEncoder(nn.Module):
    """torch.nn.TransformerEncoder, 3 heads, causal (``is_causal=True`` with the mask torch asks for as its hint)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 24)
        layer = nn.TransformerEncoderLayer(24, 3, 48, dropout=0.0, batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(24, 3)

    def forward(self, x):  # [B, 17, 6] -> [B, 17, 3]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.head(self.encoder(self.embed(x), mask=mask, is_causal=True))


class RopeBlock(nn.Module):
    """A block that receives a rotary table ``rope`` [L, d] besides its tokens, as timm's Eva blocks do."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.norm, self.qkv, self.proj = (
            heads,
            nn.LayerNorm(dim),
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
        )

    def forward(self, x, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        sin, cos = rope.chunk(2, dim=-1)  # [N, d] each

        def rotate(t):  # [B, H, N, d]
            t1, t2 = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        out = F.scaled_dot_product_attention(rotate(q), rotate(k), v)  # [B, H, N, d]
        return x + self.proj(out.transpose(1, 2).reshape(B, N, C))


class RopeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.blocks, self.head = (
            nn.Linear(6, 32),
            nn.ModuleList(RopeBlock() for _ in range(2)),
            nn.Linear(32, 3),
        )

    def rope_table(self, n: int, device=None) -> torch.Tensor:  # [n, 2 d]: sin and cos of 4 frequencies, duplicated
        angles = (
            torch.arange(n, dtype=torch.float32, device=device)[:, None] * torch.logspace(0, -2, 4, device=device)[None]
        )
        return torch.cat([angles.sin().repeat(1, 2), angles.cos().repeat(1, 2)], dim=-1)

    def forward(self, x, rope=None):  # [B, 23, 6] -> [B, 23, 3]
        rope = self.rope_table(x.shape[1], x.device) if rope is None else rope
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.head(x)


def build(name: str) -> nn.Module:
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        ViTConfig,
        ViTMAEConfig,
        ViTMAEForPreTraining,
        ViTModel,
    )

    quiet = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if name == "hf_vit_3heads":  # 20 x 24 image, patch 4: 30 patches + CLS = 31 tokens
        return ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48,
                                  image_size=(20, 24), patch_size=4, **quiet), add_pooling_layer=False)
    if name == "hf_vit_eager":  # attn_implementation="eager": softmax(Q K^T) V written by hand, no SDPA call
        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                           image_size=(20, 24), patch_size=4, **quiet)
        config._attn_implementation = "eager"
        return ViTModel(config, add_pooling_layer=False)
    if name == "hf_vitmae":  # 24 x 24, patch 4: 36 patches, half masked at random, + CLS = 19 tokens
        return ViTMAEForPreTraining(
            ViTMAEConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                image_size=24,
                patch_size=4,
                decoder_hidden_size=16,
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
                decoder_intermediate_size=32,
                mask_ratio=0.5,
                **quiet,
            )
        )
    if name == "hf_dinov2_registers_5heads":  # 28 x 28, patch 7: 16 patches + CLS + 4 registers = 21 tokens
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            hidden_size=40, num_hidden_layers=2, num_attention_heads=5, mlp_ratio=2, image_size=28, patch_size=7,
            num_register_tokens=4, layerscale_value=0.5, **quiet))
        model.embeddings.mask_token.requires_grad_(
            False
        )  # used only with bool_masked_pos; DDP wants every parameter used
        return model
    if name == "hf_dinov2_2heads":  # 28 x 28, patch 7: 16 patches + CLS = 17 tokens; 2 heads < 4 ranks
        model = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                         image_size=28, patch_size=7, layerscale_value=0.5, **quiet))
        model.embeddings.mask_token.requires_grad_(False)
        return model
    if name == "torch_encoder_causal_3heads":
        return TorchCausalEncoder()
    return RopeModel()


class Samples(Dataset):
    def __init__(self, name: str, size: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        shape = {
            "hf_vit_3heads": (3, 20, 24),
            "hf_vit_eager": (3, 20, 24),
            "hf_vitmae": (3, 24, 24),
            "hf_dinov2_registers_5heads": (3, 28, 28),
            "hf_dinov2_2heads": (3, 28, 28),
            "torch_encoder_causal_3heads": (17, 6),
            "rope_blocks": (23, 6),
        }[name]
        self.x = torch.randn(size, *shape, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"index": i, "x": self.x[i]}


def model_loss(name: str, model: nn.Module, x: torch.Tensor, noise: torch.Tensor | None = None):
    """The training loss, and ViTMAE's ``ids_restore`` (the permutation its random masking drew)."""
    if name == "hf_vitmae":
        out = model(pixel_values=x, noise=noise)
        return out.loss, out.ids_restore
    if name.startswith("hf_"):
        hidden = model(pixel_values=x).last_hidden_state  # [B, L, D]
        return (hidden * torch.linspace(-1, 1, hidden.shape[-1], device=hidden.device)).sum(-1).square().mean(), None
    return model(x).square().mean(), None


class ThirdPartyModule(LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.model = name, build(name)
        self.seen: list[list[int]] = []
        self.masks: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        loss, permutation = model_loss(self.name, self.model, batch["x"])
        if permutation is not None:
            self.masks.append(permutation.detach().cpu())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def worker(names: list[str]) -> dict:
    import os

    from lightning.pytorch import Callback, Trainer, seed_everything
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy, UnsupportedAttentionError

    rank = int(os.environ["RANK"])

    class DesyncRandomState(Callback):
        """Ranks that draw different random numbers after Lightning's seeding (setup_distributed re-seeds every rank
        alike) and before the plan is applied: the strategy must hand the whole group rank 0's stream, or ViTMAE's
        masks would differ between the token shards of one sample."""

        def setup(self, trainer, pl_module, stage):
            torch.manual_seed(777 + rank)

    class TokensPerRank(Callback):
        """Tokens each attention module receives, recorded after setup (so after the shard point's hook)."""

        def on_train_start(self, trainer, pl_module):
            self.tokens: set[int] = set()
            for path, role in trainer.strategy.applied_plan.resolved:
                if role.kind in ("attention", "sdpa"):
                    pl_module.get_submodule(path).register_forward_pre_hook(
                        lambda m, args, kwargs: self.tokens.add(
                            (args[0] if args else next(iter(kwargs.values()))).shape[1]
                        ),
                        with_kwargs=True,
                    )

    results = {}
    for name in names:
        seed_everything(SEED)
        module = ThirdPartyModule(name)
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        tokens = TokensPerRank()
        trainer = Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy=SeqParStrategy(sequence_parallel_size=WORLD, timeout=300),
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[DesyncRandomState(), tokens],
        )
        trainer.fit(module, DataLoader(Samples(name), batch_size=BATCH))
        results[name] = {
            "initial": initial, "final": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "seen": module.seen, "masks": module.masks, "tokens": sorted(tokens.tokens),
            "attention": trainer.strategy.attention,
        }
        if name == "rope_blocks":  # per-token arguments that cannot follow the shards are refused by name
            from lightning_seqpar import apply_sequence_parallel, infer_plan

            model = RopeModel()
            applied = apply_sequence_parallel(model, infer_plan(model), trainer.strategy.topology.sequence_group)
            errors = []
            # Tables that skip one and two prefix tokens.
            for rope in (model.rope_table(22), model.rope_table(21)):
                try:
                    model(torch.randn(1, 23, 6), rope=rope)
                except UnsupportedAttentionError as error:
                    errors.append(str(error))
                applied.runtime.exit()
            applied.remove()
            results[name]["errors"] = errors
    return results


def train_reference(name: str, batches: list[list[int]], permutations: list[torch.Tensor]) -> dict:
    """Single-process training on the same batches; ViTMAE replays the masks the group drew (noise whose argsort is
    the drawn shuffle: ``argsort(ids_restore) = ids_shuffle``)."""
    from lightning.pytorch import seed_everything

    seed_everything(SEED)
    module = ThirdPartyModule(name)
    data = Samples(name)
    optimizer = module.configure_optimizers()
    for step, indices in enumerate(batches):
        optimizer.zero_grad()
        noise = permutations[step].float() if permutations else None
        loss, _ = model_loss(name, module.model, data.x[indices], noise)
        loss.backward()
        optimizer.step()
    return module.state_dict()


def _max_rel_error(got: dict, want: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for key, value in want.items():
        if not value.is_floating_point():
            continue
        diff, scale = (got[key] - value).norm().item(), value.norm().item()
        err = diff / scale if scale >= 1e-3 else (0.0 if diff <= 1e-7 else math.inf)
        if err > worst:
            worst, where = err, key
    return worst, where


def test_third_party_models_train_equal_to_one_device():
    print("versions:", third_party_versions())
    per_rank = run_distributed("tests.test_third_party_models:worker", WORLD, timeout=560, names=list(MODELS))
    for name, (length, kind) in MODELS.items():
        ranks = [r[name] for r in per_rank]
        assert all(r["attention"] == kind for r in ranks), (
            f"{name}: attention='auto' chose {ranks[0]['attention']}, not {kind}"
        )
        # Tokens really are sharded: each rank's attention saw its ceil/floor share of the L tokens, never all.
        assert sum(r["tokens"][0] for r in ranks) == length and all(r["tokens"] == [r["tokens"][0]] for r in ranks), (
            f"{name}: tokens per rank {[r['tokens'] for r in ranks]} do not split {length} tokens")
        assert all(r["seen"] == ranks[0]["seen"] for r in ranks)
        for r in ranks[1:]:  # ViTMAE: every rank drew the same random mask
            assert len(r["masks"]) == len(ranks[0]["masks"]) == (STEPS if name == "hf_vitmae" else 0)
            assert all(torch.equal(a, b) for a, b in zip(r["masks"], ranks[0]["masks"])), (
                f"{name}: masks differ between ranks"
            )
        reference = train_reference(name, ranks[0]["seen"], ranks[0]["masks"])
        for rank, r in enumerate(ranks):
            err, key = _max_rel_error(r["final"], reference)
            assert err < 1e-5, f"{name} rank {rank}: {key} off by relative error {err:.2e}"
            moved, _ = _max_rel_error(r["final"], r["initial"])
            assert moved > 1e-3, f"{name}: training did not change the parameters"
        print(f"{name}: {length} tokens, attention='auto' -> {ranks[0]['attention']}, worst relative error {err:.1e}")
    errors = per_rank[0]["rope_blocks"]["errors"]
    assert len(errors) == 2
    assert "blocks.0 argument 'rope'" in errors[0] and "skips 1 prefix (class/register) token(s)" in errors[0]
    assert "blocks.0 argument 'rope'" in errors[1] and "skips 2 prefix (class/register) token(s)" in errors[1]
