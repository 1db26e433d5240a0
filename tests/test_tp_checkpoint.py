"""Full checkpoints of tensor-parallel training on the DDP engine: the optimizer state is saved whole, in the
single-device layout and keyed by parameter name, and resumes at another tensor-parallel size.

CPU, gloo, 2 ranks, the bundled-Block ViT of tests/tp_workers.py (its fused qkv is split by head, so its weights and
optimizer state are stored with permuted rows while split), SGD with momentum. Saved after 2 steps at
``tensor_parallel_size=2``; the checkpoint's momentum buffers must equal single-process training's after the same 2
steps (whole tensors, original row order), and a third step resumed at tp 2, and at tp 1 x sp 2 (no tensor
parallelism), must end where single-process training on the same three global batches ends (the contract's 1e-5).
A checkpoint saved without tensor parallelism (the optimizer's own numbering) resumes at tp 2 the same way. A model
with a parameter that never gets a gradient (no optimizer state for it in the checkpoint), on the DDP engine and on
FSDP2, and plain SGD (no tensor state at all) resume the same way.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.dist_utils import run_distributed
from tests.test_tensor_parallel_strategy import BATCH, TOLERANCE, TensorParallelModule


class MomentumModule(TensorParallelModule):
    """SGD with momentum (the momentum buffers are the optimizer state). Not AdamW: the key third of a fused qkv bias
    has an exactly-zero true gradient, which AdamW steps by rounding noise divided by its own size, so two correct
    runs differ there (docs/tensor-parallel.md, Tests)."""


class UnusedParameterModule(MomentumModule):
    """With a parameter that never gets a gradient (as a mask token used only when masking): the checkpoint holds no
    optimizer state for it, which the resume must accept (a new user's trial found both engines refusing it)."""

    def __init__(self) -> None:
        super().__init__()
        self.model.mask_token = nn.Parameter(torch.zeros(4))


class PlainSGDModule(UnusedParameterModule):
    """SGD without momentum: no tensor state at all (torch's full-state loader failed: "Expected device to be set")."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


FIRST_STEPS = 2
# (layout of the saving fit, layout of the resuming fit, module)
RUNS = [
    ({"tensor_parallel_size": 2}, {"tensor_parallel_size": 2}, MomentumModule),
    ({"tensor_parallel_size": 2}, {"sequence_parallel_size": 2, "attention": "ulysses"}, MomentumModule),
    ({"sequence_parallel_size": 2, "attention": "ulysses"}, {"tensor_parallel_size": 2}, MomentumModule),
    ({"tensor_parallel_size": 2}, {"tensor_parallel_size": 2}, UnusedParameterModule),
    ({"tensor_parallel_size": 2}, {"tensor_parallel_size": 2}, PlainSGDModule),
    ({"fsdp": True, "tensor_parallel_size": 2}, {"fsdp": True, "tensor_parallel_size": 2}, UnusedParameterModule),
]


def worker(directory: str) -> list[dict]:
    import os

    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy
    from tests.tp_workers import dataset

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    results = []
    for i, (saving, resuming, make_module) in enumerate(RUNS):
        path = os.path.join(directory, f"run{i}.ckpt")
        seen = []
        for config, steps, ckpt in ((saving, FIRST_STEPS, None), (resuming, FIRST_STEPS + 1, path)):
            module = make_module()
            trainer = Trainer(accelerator="cpu", devices=world, max_steps=steps, logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                              strategy=SeqParStrategy(timeout=300, **config))
            trainer.fit(module, DataLoader(dataset("block"), batch_size=BATCH), ckpt_path=ckpt)
            if ckpt is None:
                trainer.save_checkpoint(path)
            seen.append(module.seen)
        results.append({"seen": seen, "final": trainer.strategy.full_state_dict(), "path": path,
                        "global_step": trainer.global_step})
    return results


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_tensor_parallel_checkpoints_hold_the_optimizer_state_and_resume_at_another_layout(tmp_path):
    from tests.reference import train_single_process
    from tests.test_tensor_parallel import max_rel_error
    from tests.tp_workers import dataset

    per_rank = run_distributed("tests.test_tp_checkpoint:worker", 2, timeout=840, directory=str(tmp_path))
    for i, (saving, resuming, make_module) in enumerate(RUNS):
        runs = [r[i] for r in per_rank]
        assert runs[0]["global_step"] == FIRST_STEPS + 1
        assert all(r["seen"] == runs[0]["seen"] for r in runs)  # dp = 1: both ranks saw the same samples
        batches = runs[0]["seen"][0] + runs[0]["seen"][1][-1:]  # the 2 saved steps, then the resumed one
        reference = train_single_process(make_module, batches, dataset("block"), seed=None)
        for rank, r in enumerate(runs):
            err, key = max_rel_error(r["final"], reference.state)
            assert err < TOLERANCE, f"{saving} -> {resuming}, rank {rank}: {key} off by {err:.2e} after the resume"
        if saving.get("tensor_parallel_size", 1) > 1 and make_module is MomentumModule:
            # The saved momentum buffers: whole tensors, original rows, keyed by name, equal to single-process
            # training's after the same two steps.
            saved = torch.load(runs[0]["path"], weights_only=False)["optimizer_states"][0]
            module, data = MomentumModule(), dataset("block")
            optimizer = module.configure_optimizers()
            for indices in batches[:FIRST_STEPS]:
                optimizer.zero_grad()
                F.mse_loss(module.model(data.x[indices]), data.y[indices]).backward()
                optimizer.step()
            want = {f"{name}.{k}": v for name, p in module.named_parameters()
                    for k, v in optimizer.state[p].items() if k != "step"}
            got = {f"{name}.{k}": v for name, entry in saved["state"].items() for k, v in entry.items() if k != "step"}
            err, key = max_rel_error(got, want)
            assert len(got) == len(want) and err < TOLERANCE, f"saved momentum differs at {key} by {err:.2e}"
