"""Save on one layout, resume on another: the next steps equal single-process training on the same global batches.

One launch of 2 processes (sp 2) trains 2 steps and saves, for the DDP path and ZeRO 1/2/3 with SGD(momentum) and
AdamW (and one ZeRO-2 checkpoint that a ZeRO-3 run resumes). One launch of 4 processes resumes each on sp 4 (same
global batch of 4) and on dp 2 x sp 2 (2 samples per rank): steps 3 and 4 must see the samples an uninterrupted
run sees (the mid-epoch position, carried over in samples) and give the losses and weights of single-process
training over the 4 global batches (which an uninterrupted run on either layout equals, tests/test_deepspeed.py).
Combinations that cannot move (ZeRO -> DDP path) fail with a command, which is run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback

from tests.dist_utils import REPO_ROOT, run_distributed
from tests.models import LossRecorder, RandomTokens, RegressionModule

SEED, GLOBAL_BATCH = 5, 4
DS_ENV = {"DS_ACCELERATOR": "cpu"}
ENGINES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
CASES = [(engine, opt) for engine in ENGINES for opt in ("sgd", "adamw")]
_WORLD = int(os.environ.get("WORLD_SIZE", 1))


class OptimizerModule(RegressionModule):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.optimizer_name = optimizer

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            # eps 1e-4: the key slice of qkv.bias gets no gradient (attention ignores it), only reduction noise of
            # 1e-10 that Adam with eps 1e-8 blows up to a full-size step (3e-3 apart between any two gradient
            # reduction orders, an uninterrupted run included); with 1e-4 that noise moves nothing.
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1, eps=1e-4)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class SaveAtStep(Callback):
    """Writes a checkpoint in the middle of the epoch (after optimizer step ``step``), as ModelCheckpoint would."""

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not os.path.exists(self.path):
            trainer.save_checkpoint(self.path)


def _fit(tmp, sp, stage, module, batch_size, max_steps, ckpt_path=None, callbacks=()):
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    record = LossRecorder()
    trainer = Trainer(
        accelerator="cpu",
        devices=_WORLD,
        strategy=SeqParStrategy(sequence_parallel_size=sp, zero_stage=stage, timeout=300),
        default_root_dir=tmp,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_steps=max_steps,
        callbacks=[record, *callbacks],
    )
    trainer.fit(module, DataLoader(RandomTokens(size=32), batch_size=batch_size), ckpt_path=ckpt_path)
    return trainer, record.losses


def save_worker(tmp: str, cases: list | None = None) -> dict:
    from lightning.pytorch import seed_everything

    out = {}
    for engine, opt in cases or [*CASES, ("zero2_to_zero3", "sgd")]:
        seed_everything(SEED)
        module = OptimizerModule(opt)
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        path = os.path.join(tmp, f"{engine}-{opt}.ckpt")
        _fit(tmp, 2, ENGINES.get(engine, 2), module, GLOBAL_BATCH, 3, callbacks=[SaveAtStep(path, 2)])
        out[(engine, opt)] = {"initial": initial, "seen": module.seen[:2], "path": path}
    return out


def resume_worker(tmp: str, saved: dict, cases: list | None = None) -> dict:
    from lightning.pytorch import seed_everything

    from lightning_seqpar.deepspeed_engine import DeepSpeedConfigError

    out = {}
    for engine, opt in cases or [*CASES, ("zero2_to_zero3", "sgd")]:
        stage = ENGINES.get(engine, 3)
        for layout, sp in (("sp4", 4), ("dp2xsp2", 2)):
            seed_everything(SEED)  # the same seed (the sampler's order uses it), but other RNG state:
            torch.manual_seed(123)  # everything else that matters must come from the checkpoint
            module = OptimizerModule(opt)
            trainer, losses = _fit(
                tmp, sp, stage, module, GLOBAL_BATCH * sp // 4, 4, ckpt_path=saved[(engine, opt)]["path"]
            )
            out[(engine, opt, layout)] = {
                "seen": module.seen,
                "losses": losses,
                "final": trainer.strategy.full_state_dict()
                if stage
                else {k: v.clone() for k, v in module.state_dict().items()},
                "dp_rank": trainer.strategy.topology.dp_rank,
                "global_step": trainer.global_step,
            }
    try:
        _fit(tmp, 4, 0, OptimizerModule(), 4, 3, ckpt_path=saved[("zero2", "sgd")]["path"])
        out["to_ddp"] = None
    except DeepSpeedConfigError as e:
        out["to_ddp"] = str(e)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("relayout"))
    saved = run_distributed("tests.test_relayout:save_worker", 2, timeout=600, env=DS_ENV, tmp=tmp)[0]
    resumed = run_distributed("tests.test_relayout:resume_worker", 4, timeout=900, env=DS_ENV, tmp=tmp,
                              saved={k: {"path": v["path"]} for k, v in saved.items()})
    return saved, resumed


def _reference(opt, initial, global_batches):
    """One process, from the saved initial weights, with the same optimizer: (losses, state dict)."""
    from tests.reference import train_single_process

    single = train_single_process(lambda: OptimizerModule(opt), global_batches, RandomTokens(size=32), seed=None,
                                  initial_state=initial)
    return single.losses, single.state


@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("engine,opt", [*CASES, ("zero2_to_zero3", "sgd")])
@pytest.mark.parametrize("layout", ["sp4", "dp2xsp2"])
def test_resume_on_another_layout_continues_exactly(runs, engine, opt, layout):
    saved, resumed = runs
    first = saved[(engine, opt)]
    ranks = [r[(engine, opt, layout)] for r in resumed]
    assert all(r["global_step"] == 4 for r in ranks)
    # Steps 3 and 4: each data-parallel rank's batches, joined in rank order, are the next samples of the epoch.
    by_dp = {r["dp_rank"]: r for r in ranks}
    later = [sorted(i for r in by_dp.values() for i in r["seen"][step]) for step in range(2)]
    order = list(torch.utils.data.DistributedSampler(range(32), num_replicas=1, rank=0, shuffle=True, seed=SEED))
    assert [sorted(b) for b in first["seen"]] + later == [sorted(order[i:i + 4]) for i in range(0, 16, 4)]
    losses, expected = _reference(opt, first["initial"], [*first["seen"], *later])
    got_losses = [sum(r["losses"][step] for r in by_dp.values()) / len(by_dp) for step in range(2)]
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(losses[2:]), rtol=1e-5, atol=0)
    for r in ranks:
        for key, value in expected.items():
            if not key.startswith("samples"):
                torch.testing.assert_close(
                    r["final"][key], value, rtol=2e-5, atol=1e-6, msg=f"{engine} {opt} {layout} {key}"
                )


@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
def test_unsupported_move_gives_a_command_that_works(runs, tmp_path):
    saved, resumed = runs
    message = resumed[0]["to_ddp"]
    assert message is not None and "python -m lightning_seqpar.consolidate" in message, message
    command = re.search(r"python -m lightning_seqpar\.consolidate (\S+) weights\.pt", message)
    assert command, message
    directory = shlex.split(command.group(1))[0]
    subprocess.run(
        [sys.executable, "-m", "lightning_seqpar.consolidate", directory, str(tmp_path / "weights.pt")],
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **DS_ENV},
        capture_output=True,
    )
    module = OptimizerModule()
    module.load_state_dict(torch.load(tmp_path / "weights.pt")["state_dict"])
    _, expected = _reference("sgd", saved[("zero2", "sgd")]["initial"], saved[("zero2", "sgd")]["seen"])
    for key, value in expected.items():
        if not key.startswith("samples"):
            torch.testing.assert_close(module.state_dict()[key], value, rtol=2e-5, atol=1e-6)
