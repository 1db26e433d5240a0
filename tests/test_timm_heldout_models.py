"""Real timm ViT variants under SeqParStrategy on 2 gloo ranks against single-process training (parameters after 3
SGD-with-momentum steps within relative error 1e-5, fp32), and the windowed SAM ViT refused by name.

The variants no other test uses: relative position biases built inside the attention (``VisionTransformerRelPos``,
``Beit(use_rel_pos_bias=True)``: the bias reaches SDPA as ``attn_mask``), ``Eva`` with rotary embeddings and no class
token at 16 tokens (its rope table ``[16, 16]`` has as many columns as tokens), register tokens with a MAP (attention
pooling) head, 3 heads with ``attention="hybrid"`` (its mesh; torch 2.11's ``DeviceMesh._unflatten`` refused the
``sp`` name). Skipped where timm cannot be imported (PyPI's torchvision, which timm needs, loads with PyPI's torch,
not with the CPU build CI installs); run under torch 2.11 with timm 1.0.29:
``PYTHONPATH=$PWD /work/t211/bin/python -m pytest tests/test_timm_heldout_models.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import Dataset

from tests.dist_utils import run_distributed
from tests.models import timm_imports

SEED, STEPS, BATCH, WORLD = 7, 3, 2, 2
COMMON = "img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5"
CASES = {  # name -> (constructor, attention, tokens in the region)
    "vit_relpos_mlp": (f"VisionTransformerRelPos({COMMON}, class_token=True, global_pool='token')", "ring", 17),
    "beit_relpos": (f"Beit({COMMON}, use_rel_pos_bias=True)", "auto", 17),
    "eva_rope_no_class_token": (
        f"Eva({COMMON}, class_token=False, global_pool='avg', use_rot_pos_emb=True, ref_feat_shape=(4, 4))", "auto", 16
    ),
    "vit_registers_map_head": (f"VisionTransformer({COMMON}, reg_tokens=4, global_pool='map')", "lss", 21),
    "vit_3heads_hybrid": ("VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3,"
                          " num_classes=5)", "hybrid", 17),
}


def build(name: str) -> nn.Module:
    import timm.models as models

    model = eval(CASES[name][0], vars(models))  # noqa: S307 - constructors written above
    for module in model.modules():  # RelPosMlp has dropout in its bias MLP: off, to compare with one process
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


class Images(Dataset):
    def __init__(self, size: int = 12) -> None:
        self.x = torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"index": i, "x": self.x[i]}


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    features = model.forward_features(x)  # [B, L, D]; the head's small init would hide the blocks' gradients
    logits = model.forward_head(features)
    return (features * torch.linspace(-1, 1, features.shape[-1])).sum(-1).square().mean() / features.shape[-1] + (
        10 * (logits * torch.linspace(-1, 1, logits.shape[-1])).sum(-1).square().mean())


class Module(LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.model, self.seen = build(name), []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return loss_of(self.model, batch["x"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.002, momentum=0.9)


def worker() -> dict:
    import os

    import timm
    import torch.distributed as dist
    from lightning.pytorch import Trainer, seed_everything
    from timm.models import VisionTransformerSAM
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy, UnsupportedAttentionError, apply_sequence_parallel, infer_plan

    environment, results = dict(os.environ), {"versions": {"torch": torch.__version__, "timm": timm.__version__}}
    for name, (_, attention, _) in CASES.items():
        os.environ.clear()
        os.environ.update(environment)  # Lightning's teardown deletes WORLD_SIZE
        seed_everything(SEED)
        module = Module(name)
        trainer = Trainer(
            accelerator="cpu", devices=WORLD, max_steps=STEPS, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            strategy=SeqParStrategy(sequence_parallel_size=WORLD, attention=attention, timeout=300),
        )
        trainer.fit(module, DataLoader(Images(), batch_size=BATCH))
        results[name] = {"final": {k: v.detach().clone() for k, v in module.state_dict().items()},
                         "seen": module.seen, "attention": trainer.strategy.attention}
    sam = VisionTransformerSAM(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, window_size=2,
                               global_attn_indexes=(1,), use_rel_pos=False, neck_chans=16, global_pool="avg",
                               num_classes=5)
    applied = apply_sequence_parallel(sam, infer_plan(sam), dist.group.WORLD)
    try:
        sam(torch.randn(1, 3, 32, 32))
        results["sam"] = "no error"
    except UnsupportedAttentionError as error:
        results["sam"] = str(error)
    applied.remove()
    return results


def reference(name: str, batches: list[list[int]]) -> dict:
    from lightning.pytorch import seed_everything

    seed_everything(SEED)
    module, data = Module(name), Images()
    optimizer = module.configure_optimizers()
    for indices in batches:
        optimizer.zero_grad()
        loss_of(module.model, data.x[indices]).backward()
        optimizer.step()
    return module.state_dict()


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not timm_imports(), reason="timm (with torchvision) does not import here")
def test_timm_heldout_variants_train_equal_to_one_process():
    per_rank = run_distributed("tests.test_timm_heldout_models:worker", WORLD, timeout=1100)
    print("versions:", per_rank[0]["versions"])
    for name in CASES:
        want = reference(name, per_rank[0][name]["seen"])
        for rank, ranks in enumerate(per_rank):
            got = ranks[name]["final"]
            error = max((got[k] - v).norm().item() / max(v.norm().item(), 1e-3)
                        for k, v in want.items() if v.is_floating_point())
            assert math.isfinite(error) and error < 1e-5, f"{name} rank {rank}: relative error {error:.2e}"
        print(f"{name}: attention {per_rank[0][name]['attention']}, worst relative error {error:.1e}")
    assert "attends over 4 tokens per call" in per_rank[0]["sam"] and "SAM" in per_rank[0]["sam"], per_rank[0]["sam"]
