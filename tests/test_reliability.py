"""Faults and bad steps: a killed rank fails the job fast and a relaunch resumes to the same weights; non-finite
steps are handled alike on every rank; checkpoints record the layout they were written with."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from tests.dist_utils import REPO_ROOT, free_port, run_distributed

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(1200)]


def _torchrun(out_dir, extra_env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO_ROOT / "tests" / "scripts" / "fault_train.py"), str(out_dir)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory):
    clean = tmp_path_factory.mktemp("clean")
    proc, _ = _torchrun(clean)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(clean / "final_weights.pt")


@pytest.mark.parametrize("zero_stage", [0, 3], ids=["ddp", "zero3"])
def test_killed_rank_fails_fast_and_relaunch_resumes_to_the_same_weights(tmp_path, uninterrupted_weights, zero_stage):
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    env = {"FAULT_ZERO_STAGE": str(zero_stage), "DS_ACCELERATOR": "cpu"}

    # Rank 1 dies in the middle of epoch 2 (global step 6 of 8); the job must end, not hang.
    proc, elapsed = _torchrun(
        interrupted, {**env, "FAULT_KILL_RANK": "1", "FAULT_KILL_STEP": "6", "FAULT_TIMEOUT": "30"}
    )
    assert proc.returncode != 0
    assert elapsed < 120, f"the job took {elapsed:.0f} s to fail after a rank died"
    log = proc.stdout + proc.stderr
    assert "rank      : 1" in log or "local_rank: 1" in log, log[-3000:]  # torchrun's report names the failed rank
    assert "exitcode  : 17" in log
    assert (interrupted / "last.ckpt").exists() and not (interrupted / "final_weights.pt").exists()

    # The same command again resumes from the epoch-1 checkpoint and reaches the uninterrupted weights
    # (bit for bit with DDP; within the ZeRO contract's 1e-5, as ZeRO sums gradients in another order).
    proc, _ = _torchrun(interrupted, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(interrupted / "final_weights.pt")
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if zero_stage == 0 else {"rtol": 1e-5, "atol": 1e-6}
    for key, expected in uninterrupted_weights.items():
        torch.testing.assert_close(got[key], expected, **tolerance)
    if zero_stage == 0:
        checkpoint = torch.load(interrupted / "last.ckpt", weights_only=False)
        assert checkpoint["seqpar"] == {"world_size": 2, "sequence_parallel_size": 2, "data_parallel_size": 1,
                                        "pipeline_parallel_size": 1, "tensor_parallel_size": 1,
                                        "attention": "ulysses"}
    else:
        assert (interrupted / "last.ckpt").is_dir()  # DeepSpeed's sharded checkpoint


def nonfinite_worker(policies: list[str]) -> dict:
    return {policy: _train_with_a_nan(policy) for policy in policies}


def _train_with_a_nan(policy: str) -> dict:
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader, Subset

    from lightning_seqpar import SeqParStrategy
    from tests.models import RandomTokens, RegressionModule

    seed_everything(3)
    data = RandomTokens(size=8)
    data.x[5] = float("nan")  # one sample: only the data-parallel rank that draws it sees a NaN loss
    module = RegressionModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=SeqParStrategy(sequence_parallel_size=1, on_nonfinite=policy, timeout=300),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    error = None
    try:
        trainer.fit(module, DataLoader(Subset(data, range(8)), batch_size=2))
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    after = module.state_dict()
    return {
        "error": error,
        "finite": all(torch.isfinite(v).all().item() for v in after.values()),
        "weights": {k: v.clone() for k, v in after.items()},
        "moved": any(not torch.equal(before[k], after[k]) for k in before),
        "seen": module.seen,
    }


POLICIES = ["skip", "stop", "raise"]


@pytest.fixture(scope="module")
def nonfinite_runs():
    return run_distributed("tests.test_reliability:nonfinite_worker", 2, policies=POLICIES)


@pytest.mark.parametrize("policy", POLICIES)
def test_nonfinite_policy_is_the_same_on_every_rank(nonfinite_runs, policy):
    ranks = [r[policy] for r in nonfinite_runs]
    nan_rank = next(r for r, res in enumerate(ranks) if any(5 in batch for batch in res["seen"]))
    for res in ranks:
        assert res["finite"], "a non-finite step reached the weights"
    for key in ranks[0]["weights"]:
        torch.testing.assert_close(ranks[0]["weights"][key], ranks[1]["weights"][key])  # no rank diverged
    if policy == "raise":
        assert all(
            r["error"] and r["error"].startswith("NonFiniteStepError") and "on_nonfinite='skip'" in r["error"]
            for r in ranks
        )
    else:
        assert all(r["error"] is None for r in ranks)
    if policy == "stop":
        # Both ranks stopped at the step where the NaN appeared on one of them.
        stop_at = len(ranks[nan_rank]["seen"])
        assert all(len(r["seen"]) == stop_at for r in ranks)
    if policy == "skip":
        assert all(len(r["seen"]) == 2 for r in ranks) and ranks[0]["moved"]


def test_strategy_rejects_unknown_policy():
    from lightning_seqpar import SeqParStrategy

    with pytest.raises(ValueError, match="on_nonfinite must be one of raise, skip, stop, ignore, got 'zero'"):
        SeqParStrategy(on_nonfinite="zero")


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    """The strategy writes through Lightning's checkpoint IO, which saves into a temporary file and moves it over
    the old one only when complete: a crash half-way through leaves the previous checkpoint intact."""
    import fsspec.implementations.local as local

    from lightning_seqpar import SeqParStrategy

    io = SeqParStrategy().checkpoint_io
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)

    real_write = local.LocalFileOpener.write

    def crash_half_way(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError("simulated crash while writing the checkpoint")

    monkeypatch.setattr(local.LocalFileOpener, "write", crash_half_way)
    with pytest.raises(OSError, match="simulated crash"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    previous = torch.load(path)
    assert previous["step"] == 1 and torch.equal(previous["weights"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left beside it
