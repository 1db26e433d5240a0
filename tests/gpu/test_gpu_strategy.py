"""SeqParStrategy on one GPU with NCCL: training equals the plain single-process loop (fp32), and bf16-mixed training
runs.

fp32 on the GPU runs in full precision (TF32 off) and must match the reference within relative error 1e-4
(kernels differ between the two runs only in summation order); bf16-mixed must give finite, decreasing losses.
"""

from __future__ import annotations

import pytest
import torch

from tests.models import RandomTokens, RegressionModule, train_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SEED, STEPS, BATCH = 1234, 3, 2


def _fit(model_name: str, precision: str, attention: str = "ulysses", checkpointing: bool = False, steps: int = STEPS,
         compile_blocks: bool = False):
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    seed_everything(SEED)
    module = RegressionModule(model_name)
    trainer = Trainer(
        accelerator="gpu", devices=1, precision=precision, max_steps=steps, logger=False,
        strategy=SeqParStrategy(sequence_parallel_size=1, attention=attention, activation_checkpointing=checkpointing,
                                compile_blocks=compile_blocks, process_group_backend="nccl", timeout=120),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(RandomTokens(), batch_size=BATCH, shuffle=False))
    return module, trainer


@pytest.mark.parametrize("model_name,attention,checkpointing,compile_blocks", [
    ("timm_vit", "ulysses", False, False), ("timm_vit", "lss", True, False), ("torch_encoder", "ulysses", False, False),
    ("sdpa_vit", "lss", False, False), ("timm_vit", "ulysses", False, True), ("sdpa_vit", "lss", True, True),
])
def test_fp32_training_equals_single_process(model_name, attention, checkpointing, compile_blocks):
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        module, trainer = _fit(model_name, "32-true", attention, checkpointing, compile_blocks=compile_blocks)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    assert trainer.strategy.topology is not None and trainer.strategy.topology.sp == 1
    reference = train_reference(model_name, SEED, [m for m in module.seen], RandomTokens())
    for key, value in reference.items():
        got = module.state_dict()[key].cpu()
        err = ((got - value).norm() / value.norm().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{model_name}/{attention}: {key} off by relative error {err:.2e}"


def test_bf16_mixed_training_runs():
    module, trainer = _fit("timm_vit", "bf16-mixed", steps=20)
    loss = trainer.callback_metrics["train_loss"]
    assert torch.isfinite(loss)
    assert trainer.global_step == 20
