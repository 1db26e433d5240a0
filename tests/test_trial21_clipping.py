"""Gradient clipping (``Trainer(gradient_clip_val=...)``) with tensor parallelism and FSDP2 x tensor parallelism,
through the strategy line, against one process clipping the whole model's gradients.

Faults this guards (found by a new user's trial): torch's ``clip_grad_norm_`` refused the mix of the split projections
(DTensors) and the plain parameters on the DDP engine ("got mixed torch.Tensor and DTensor"), and the two meshes of
FSDP2 x tp ("All operands in aten.stack.default must have the same mesh"); clipping by value clamped each ``tp``
rank's partial sum of a sequence-parallel norm's gradient instead of the gradient (relative error 0.74 after 3
steps). CPU, gloo, 2 ranks, the bundled-Block ViT (13 tokens), 2 samples per step, SGD with momentum, 3 steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed

STEPS, BATCH, TOLERANCE = 3, 2, 1e-5
CASES = [  # (strategy arguments, gradient_clip_val, gradient_clip_algorithm)
    ({"tensor_parallel_size": 2, "sequence_parallel_size": 1}, 0.05, "norm"),
    ({"tensor_parallel_size": 2, "sequence_parallel_size": 1}, 0.01, "value"),
    ({"fsdp": True, "tensor_parallel_size": 2, "sequence_parallel_size": 1}, 0.05, "norm"),
    ({"fsdp": True, "tensor_parallel_size": 2, "sequence_parallel_size": 1}, 0.01, "value"),
]


def clipping_worker() -> list[dict]:
    """Fit each case of :data:`CASES` on this rank; return the samples seen and the whole trained weights."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy
    from tests.test_tensor_parallel_strategy import TensorParallelModule
    from tests.tp_workers import dataset

    torch.set_num_threads(1)
    results = []
    for arguments, clip, algorithm in CASES:
        module = TensorParallelModule()
        trainer = Trainer(accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          gradient_clip_val=clip, gradient_clip_algorithm=algorithm,
                          strategy=SeqParStrategy(timeout=300, process_group_backend="gloo", **arguments))
        trainer.fit(module, DataLoader(dataset("block"), batch_size=BATCH))
        results.append({"seen": module.seen, "final": trainer.strategy.full_state_dict()})
    return results


def clipped_reference(batches, clip, algorithm):
    """One process, the whole model: ``torch.nn.utils``'s clipping before each SGD step (None: no clipping)."""
    from tests.test_tensor_parallel_strategy import TensorParallelModule
    from tests.tp_workers import dataset

    data, module = dataset("block"), TensorParallelModule()
    optimizer = module.configure_optimizers()
    for indices in batches:
        optimizer.zero_grad()
        F.mse_loss(module.model(data.x[indices]), data.y[indices]).backward()
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        elif algorithm == "value":
            torch.nn.utils.clip_grad_value_(module.parameters(), clip)
        optimizer.step()
    return module.state_dict()


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_gradient_clipping_with_tensor_parallelism_equals_one_process():
    from tests.test_tensor_parallel import max_rel_error

    per_rank = run_distributed("tests.test_trial21_clipping:clipping_worker", 2, timeout=800)
    for i, (arguments, clip, algorithm) in enumerate(CASES):
        ranks = [r[i] for r in per_rank]
        assert ranks[0]["seen"] == ranks[1]["seen"]  # dp 1: both tp ranks see every sample
        batches = ranks[0]["seen"]
        reference = clipped_reference(batches, clip, algorithm)
        unclipped, _ = max_rel_error(clipped_reference(batches, clip, None), reference)
        assert unclipped > 1e-3, f"{arguments}: clipping at {clip} changed nothing; the test would not see a fault"
        for rank, r in enumerate(ranks):
            err, key = max_rel_error(r["final"], reference)
            assert err < TOLERANCE, f"{arguments} {algorithm} clipping, rank {rank}: {key} off by {err:.2e}"
