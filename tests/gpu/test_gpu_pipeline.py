"""Pipeline stages on two GPUs with NCCL: 2 stages, the module's own steps (no pipeline methods), fp32 with TF32 off,
against single-process CPU fp32 training; the real timm ViT where timm imports (the GPU image has it). Skipped with
fewer than 2 GPUs; run on the GPU machine, not in CI:

    NCCL_NVLS_ENABLE=0 python -m pytest -m gpu tests/gpu/test_gpu_pipeline.py

Tolerance: every parameter within relative error 1e-4 after 3 SGD-with-momentum steps (summation order only), and
the validation loss within 1e-5 relative of the reference model's on the same samples. The step time of 2 stages
against ZeRO-3 is benchmarks/bench_pipeline.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.timeout(600),
]

SEED, STEPS, BATCH, MICRO, VAL = 1234, 3, 4, 2, 12
TOLERANCE = 1e-4
NAMES = ["timm_vit", "climax", "hf_vit", "real_timm"]


def _timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # noqa: BLE001 - torchvision mismatches raise RuntimeError on import
        return False
    return True


def _module(name: str):
    from tests.test_pipeline import EvalRegression

    module = EvalRegression("timm_vit" if name == "real_timm" else name)
    if name == "real_timm":
        from timm.models.vision_transformer import VisionTransformer

        # [B, L=13 tokens, 6] is not an image: a 2-D grid of 1 x 13 "patches" of 1 x 6 pixels, no class token.
        module.model = RealTimm(
            VisionTransformer(
                img_size=(1, 13 * 6),
                patch_size=(1, 6),
                in_chans=1,
                embed_dim=32,
                depth=4,
                num_heads=4,
                num_classes=0,
                global_pool="",
                class_token=False,
            )
        )
    return module


class RealTimm(torch.nn.Module):
    """timm's VisionTransformer on [B, L, 6] tokens: [B, 1, 1, L*6] image -> [B, L, 32] features -> [B, L, 3]."""

    def __init__(self, vit) -> None:
        super().__init__()
        self.vit, self.out = vit, torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.vit.forward_features(x.reshape(x.shape[0], 1, 1, -1)))


def gpu_worker(tmp: str, names: list[str]) -> dict:
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader, Subset

    from lightning_seqpar import SeqParStrategy
    from tests.models import build_dataset

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = {}
    for name in names:
        seed_everything(SEED)
        module = _module(name)
        data = build_dataset("timm_vit" if name == "real_timm" else name)
        strategy = SeqParStrategy(
            sequence_parallel_size=1, pipeline_stages=2, micro_batches=MICRO, process_group_backend="nccl", timeout=120
        )
        trainer = Trainer(
            accelerator="gpu",
            devices=2,
            strategy=strategy,
            max_steps=STEPS,
            logger=False,
            default_root_dir=tmp,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, DataLoader(data, batch_size=BATCH))
        full = trainer.strategy.full_state_dict()
        val = trainer.validate(module, DataLoader(Subset(data, range(VAL)), batch_size=BATCH), verbose=False)[0]
        out[name] = {"seen": module.seen, "full": full, "validate": val}
    return out


def test_two_stages_on_two_gpus_equal_one_process(tmp_path):
    from tests.models import build_dataset
    from tests.test_pipeline import _global_batches, _max_rel_error

    names = [n for n in NAMES if n != "real_timm" or _timm_available()]
    runs = run_distributed("tests.gpu.test_gpu_pipeline:gpu_worker", 2, timeout=500, env={"NCCL_NVLS_ENABLE": "0"},
                           tmp=str(tmp_path), names=names)
    import functools

    from tests.reference import train_single_process

    for name in names:
        data = build_dataset("timm_vit" if name == "real_timm" else name)
        single = train_single_process(
            functools.partial(_module, name), _global_batches(runs[0][name]["seen"]), data, SEED
        )
        module = single.module
        reference = {k: v for k, v in single.state.items() if k.startswith("model.")}
        with torch.no_grad():
            mse = F.mse_loss(module.model.eval()(data.x[:VAL]), data.y[:VAL]).item()
        for rank, r in enumerate(runs):
            err, key = _max_rel_error({k: r[name]["full"][k] for k in reference}, reference)
            assert err < TOLERANCE, f"{name} rank {rank}: {key} off by relative error {err:.2e}"
            assert r[name]["validate"]["val_samples"] == VAL
            assert r[name]["validate"]["val_loss"] == pytest.approx(mse, rel=1e-5), f"{name} rank {rank}"
