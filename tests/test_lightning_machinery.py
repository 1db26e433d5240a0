"""Lightning's own machinery under SeqParStrategy: every decision Lightning takes through ``reduce_boolean_decision``,
``broadcast`` and ``barrier`` (ModelCheckpoint's top-k and file-exists checks, EarlyStopping, the learning-rate
finder) equals the decision of a single-device run, and activation checkpointing in every mode trains as without it
on every engine path (DDP, ZeRO 1/2/3, pipeline stages).

Two launches keep the runtime low: 2 processes (sp = 2) and 4 processes (sp 2 x dp 2); each loops over the
configurations. The single-device references run in the pytest process on the same global batches.
"""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch import Callback

from tests.dist_utils import run_distributed

# lr 0.01 makes the validation loss fall, then rise (1.340, 1.251, 1.264, 1.334 on one device at batch 2): the best
# checkpoint is neither the first nor the last, so "keep the first" (Lightning's decision under sp > 1) is caught.
SEED, BATCH, SAMPLES, VAL_SAMPLES, LR = 3, 2, 16, 8, 0.01
DS_ENV = {"DS_ACCELERATOR": "cpu"}
CHECKPOINTING = (True, "save_attention", "offload")
GRID_STEPS = 3

# Read once: Lightning's environment deletes WORLD_SIZE when a Trainer tears down.
_WORLD = int(os.environ.get("WORLD_SIZE", 1))


def _data(batch_size: int, reference: bool = False):
    """Train and validation loaders over fixed samples. For the single-device ``reference`` the train loader draws the
    permutation Lightning's DistributedSampler draws, so that its batch k is the union of the data-parallel ranks'
    batches k."""
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from tests.models import RandomTokens

    train, val = Subset(RandomTokens(), range(SAMPLES)), Subset(RandomTokens(seed=1), range(VAL_SAMPLES))
    sampler = None if not reference else DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    return DataLoader(train, batch_size=batch_size, sampler=sampler), DataLoader(val, batch_size=batch_size)


def _trainer(root: str, strategy, devices: int, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", devices=devices, strategy=strategy, default_root_dir=root, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, **kwargs)


class ValLossRecorder(Callback):
    """Records ``val_loss`` after every validation (not the sanity check)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.losses.append(float(trainer.callback_metrics["val_loss"]))


def _decision_runs(root: str, strategy_factory, devices: int, batch_size: int, reference: bool) -> dict:
    """The callbacks under test, each in the run that exercises it; returns what each decided."""
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from tests.models import RegressionModule

    out: dict = {}
    ckpt_dir = os.path.join(root, "checkpoints")
    for run in ("first", "again"):  # the second run finds the first one's files: names get a version suffix
        seed_everything(SEED)
        best = ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", mode="min", save_top_k=1, save_last=True)
        worst = ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", mode="max", save_top_k=2, filename="max-{step}")
        module, record = RegressionModule(lr=LR), ValLossRecorder()
        trainer = _trainer(
            root, strategy_factory(), devices, max_steps=8, val_check_interval=2, callbacks=[best, worst, record]
        )
        trainer.fit(module, *_data(batch_size, reference))
        out[run] = {
            "seen": module.seen,
            "best_path": os.path.basename(best.best_model_path),
            "best_score": float(best.best_model_score),
            "last_path": os.path.basename(best.last_model_path),
            "top2": sorted((os.path.basename(p), float(v)) for p, v in worst.best_k_models.items()),
            "val_losses": record.losses,
        }
        trainer.strategy.barrier()
        out[run]["files"] = sorted(os.listdir(ckpt_dir))

    # EarlyStopping: stops at the first check whose val_loss does not improve (step 6 here).
    seed_everything(SEED)
    stop = EarlyStopping(monitor="val_loss", mode="min", patience=1)
    module = RegressionModule(lr=LR)
    trainer = _trainer(
        root,
        strategy_factory(),
        devices,
        max_steps=16,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        callbacks=[stop],
        enable_checkpointing=False,
    )
    trainer.fit(module, *_data(batch_size, reference))
    out["early_stopping"] = {"global_step": trainer.global_step, "stopped_epoch": stop.stopped_epoch,
                             "best_score": float(stop.best_score), "wait_count": stop.wait_count}

    # The learning-rate finder: losses on rank 0, results broadcast to every rank, the model restored from its
    # checkpoint.
    try:
        out["lr_find"] = _lr_find(root, strategy_factory, devices, batch_size, reference)
    except Exception as e:  # noqa: BLE001
        out["lr_find"] = f"{type(e).__name__}: {e}"
    return out


def _lr_find(root, strategy_factory, devices, batch_size, reference):
    from lightning.pytorch import seed_everything
    from lightning.pytorch.tuner import Tuner

    from tests.models import RegressionModule

    seed_everything(SEED)
    module = RegressionModule(lr=LR)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(root, strategy_factory(), devices, max_steps=8, enable_checkpointing=False)
    finder = Tuner(trainer).lr_find(
        module,
        train_dataloaders=_data(batch_size, reference)[0],
        min_lr=1e-3,
        max_lr=1.0,
        num_training=6,
        early_stop_threshold=None,
        update_attr=False,
    )
    return {"lr": list(finder.results["lr"]), "loss": list(finder.results["loss"]),
            "restored": all(torch.equal(before[k], v) for k, v in module.state_dict().items())}


def _checkpointing_grid(root: str) -> dict:
    """Every activation-checkpointing mode on every engine path (2 ranks): losses and final weights of 3 steps."""
    from lightning.pytorch import seed_everything

    from lightning_seqpar import SeqParStrategy
    from tests.models import LossRecorder, RegressionModule
    from tests.test_deepspeed import PipelineRegression

    engines = {  # name: (strategy keyword arguments, module class)
        "ddp": ({"sequence_parallel_size": 2}, RegressionModule),
        "zero1": ({"sequence_parallel_size": 2, "zero_stage": 1}, RegressionModule),
        "zero2": ({"sequence_parallel_size": 2, "zero_stage": 2}, RegressionModule),
        "zero3": ({"sequence_parallel_size": 2, "zero_stage": 3}, RegressionModule),
        "pipeline": ({"sequence_parallel_size": 1, "pipeline_stages": 2}, PipelineRegression),
    }
    out = {}
    for engine, (kwargs, make_module) in engines.items():
        for mode in CHECKPOINTING:
            seed_everything(SEED)
            module, record = make_module(), LossRecorder()
            strategy = SeqParStrategy(activation_checkpointing=mode, timeout=300, **kwargs)
            trainer = _trainer(
                root, strategy, _WORLD, max_steps=GRID_STEPS, enable_checkpointing=False, callbacks=[record]
            )
            try:
                trainer.fit(module, _data(BATCH)[0])
            except Exception as e:  # noqa: BLE001  reported by the test, with the configuration
                out[engine, mode] = f"{type(e).__name__}: {e}"
                continue
            state = trainer.strategy.full_state_dict() if trainer.strategy.uses_deepspeed else module.state_dict()
            out[engine, mode] = {"losses": record.losses, "seen": module.seen, "state": state}
    return out


def world2_worker(tmp: str) -> dict:
    """sp = 2: the decisions on the DDP and ZeRO-3 paths, then the activation-checkpointing grid."""
    return {"decisions": _decisions(tmp), "checkpointing": _checkpointing_grid(os.path.join(tmp, "grid"))}


def world4_worker(tmp: str) -> dict:
    """sp 2 x dp 2: the decisions on the DDP and ZeRO-3 paths."""
    return {"decisions": _decisions(tmp)}


def _decisions(tmp: str) -> dict:
    from lightning_seqpar import SeqParStrategy

    out = {}
    for zero in (0, 3):
        root = os.path.join(tmp, f"zero{zero}")
        out[zero] = _decision_runs(
            root,
            lambda zero=zero: SeqParStrategy(sequence_parallel_size=2, zero_stage=zero, timeout=300),
            _WORLD,
            BATCH,
            reference=False,
        )
    return out


# --- the tests ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_distributed("tests.test_lightning_machinery:world2_worker", 2, timeout=600, env=DS_ENV,
                           tmp=str(tmp_path_factory.mktemp("world2")))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_distributed("tests.test_lightning_machinery:world4_worker", 4, timeout=600, env=DS_ENV,
                           tmp=str(tmp_path_factory.mktemp("world4")))


def _reference(tmp_path, data_parallel: int) -> dict:
    """The decisions of one device on the same global batches (batch size x the data-parallel ranks)."""
    return _decision_runs(str(tmp_path), lambda: "auto", 1, BATCH * data_parallel, reference=True)


def _check_decisions(per_rank: list[dict], reference: dict, data_parallel: int) -> None:
    for zero in (0, 3):
        for run in ("first", "again"):
            # The ranks' batches k together are the single device's batch k: the same global batches.
            steps = zip(*(r["decisions"][zero][run]["seen"] for r in per_rank), strict=True)
            assert [sorted(set(sum(step, []))) for step in steps] == [sorted(b) for b in reference[run]["seen"]]
        for rank, result in enumerate(per_rank):
            got = result["decisions"][zero]
            where = f"ZeRO {zero}, rank {rank} of {len(per_rank)}"
            for run in ("first", "again"):
                mine, ref = got[run], reference[run]
                # The same validation losses as the single device: what follows is a decision.
                torch.testing.assert_close(
                    torch.tensor(mine["val_losses"]), torch.tensor(ref["val_losses"]), rtol=1e-5, atol=0
                )
                for key in ("best_path", "last_path", "files"):
                    assert mine[key] == ref[key], (
                        f"{where}, {run} run: ModelCheckpoint {key} {mine[key]} != one device's {ref[key]}"
                    )
                assert [name for name, _ in mine["top2"]] == [name for name, _ in ref["top2"]], (
                    f"{where}: top-2 {mine['top2']}"
                )
                assert abs(mine["best_score"] - ref["best_score"]) <= 1e-5 * ref["best_score"]
            es, ref_es = got["early_stopping"], reference["early_stopping"]
            assert (es["global_step"], es["stopped_epoch"], es["wait_count"]) == (
                ref_es["global_step"],
                ref_es["stopped_epoch"],
                ref_es["wait_count"],
            ), f"{where}: EarlyStopping {es} != {ref_es}"
            if zero == 0 and data_parallel == 1:
                # One data-parallel replica: rank 0's losses are the global batch's, as on one device.
                lr = got["lr_find"]
                assert lr["restored"], f"{where}: lr_find did not restore the initial weights"
                torch.testing.assert_close(
                    torch.tensor(lr["loss"]), torch.tensor(reference["lr_find"]["loss"]), rtol=1e-5, atol=0
                )
            elif zero == 0:
                # Several replicas: the finder measures rank 0's losses (as under plain DDP) and broadcasts them.
                assert got["lr_find"] == per_rank[0]["decisions"][zero]["lr_find"]
            else:
                assert "learning-rate finder" in got["lr_find"] and "zero_stage=0" in got["lr_find"], got["lr_find"]


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_decisions_equal_one_device_at_sp2(world2, tmp_path):
    _check_decisions(world2, _reference(tmp_path, 1), data_parallel=1)


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_decisions_equal_one_device_at_sp2_dp2(world4, tmp_path):
    _check_decisions(world4, _reference(tmp_path, 2), data_parallel=2)


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ["ddp", "zero1", "zero2", "zero3", "pipeline"])
@pytest.mark.parametrize("mode", CHECKPOINTING)
def test_activation_checkpointing_on_every_engine(world2, engine, mode):
    from tests.models import RandomTokens, RegressionModule
    from tests.reference import train_single_process
    from tests.test_deepspeed import PipelineRegression

    runs = [r["checkpointing"][engine, mode] for r in world2]
    for rank, run in enumerate(runs):
        assert isinstance(run, dict), f"activation_checkpointing={mode!r} on {engine}, rank {rank}: {run}"
    single = train_single_process(PipelineRegression if engine == "pipeline" else RegressionModule, runs[0]["seen"],
                                  RandomTokens(), SEED)
    losses, reference = single.losses, single.state
    for rank, run in enumerate(runs):
        assert len(run["losses"]) == GRID_STEPS
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
        for key, expected in reference.items():
            if key.startswith("samples"):
                continue
            error = (run["state"][key].float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-6)
            assert error < 1e-5, f"activation_checkpointing={mode!r} on {engine}, rank {rank}: {key} off by {error:.2e}"
