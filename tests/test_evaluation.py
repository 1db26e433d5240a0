"""Evaluation counts every sample once, and the ranks of a sequence-parallel group see the same batches.

One launch of 4 processes (dp 2 x sp 2) validates, tests and predicts datasets of 5, 7, 3 and 1 samples (uneven
last batches, a rank with fewer batches, a rank with none) and compares the logged loss, a per-step synced
value, torchmetrics metrics and the bundled latitude-weighted RMSE/ACC with single-process values computed on
the same weights; predictions gathered over the data-parallel ranks equal one process's, in dataset order.
One launch of 2 processes (sp 2) checks that user samplers keyed to the global rank are re-keyed or refused,
and that loaders of different lengths or contents on the two ranks of an SP group raise an error naming them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics

from tests.dist_utils import run_distributed
from tests.models import TOKENS, RandomTokens, RegressionModule

SIZES = ((5, 1), (7, 3), (3, 2), (1, 1))  # (samples, batch size)
LATITUDES = np.linspace(-60.0, 60.0, TOKENS)
_WORLD = int(os.environ.get("WORLD_SIZE", 1))


class EvalModule(RegressionModule):
    """Logs a mean, a sum and a per-step synced value, and updates torchmetrics and the bundled weather metrics."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_seqpar.weather.metrics import LatitudeWeightedACC, LatitudeWeightedRMSE

        self.mse, self.count = torchmetrics.MeanSquaredError(), torchmetrics.SumMetric()
        self.rmse = LatitudeWeightedRMSE(["f"], LATITUDES, [6.0])
        self.acc = LatitudeWeightedACC(["f"], LATITUDES, [6.0], climatology=torch.zeros(1, TOKENS, 3))
        self.results: dict[str, float] = {}

    def _evaluate(self, batch, stage):
        pred = self.model(batch["x"])  # [B, L, 3]: one field on an L x 3 grid
        batch_size = len(pred)
        self.log(f"{stage}_loss", F.mse_loss(pred, batch["y"]), sync_dist=True, batch_size=batch_size)
        self.log(f"{stage}_samples", float(batch_size), reduce_fx="sum", sync_dist=True)
        self.log(f"{stage}_loss_step", F.mse_loss(pred, batch["y"]), on_step=True, on_epoch=False, sync_dist=True)
        self.mse.update(pred, batch["y"])
        self.count.update(torch.tensor(float(batch_size)))
        lead = torch.full((batch_size,), 6.0)
        self.rmse.update(pred[:, None], batch["y"][:, None], lead)
        self.acc.update(pred[:, None], batch["y"][:, None], lead)

    def _finish(self, stage):
        values = {"mse": self.mse.compute(), "count": self.count.compute(), **self.rmse.compute(), **self.acc.compute()}
        self.results = {k: float(v) for k, v in values.items()}
        # An epoch-end value each rank contributes (after a padding step on some ranks): must not be neutralised.
        self.log(
            f"{stage}_epoch_sum", values["count"] / self.trainer.strategy.topology.dp, reduce_fx="sum", sync_dist=True
        )
        for metric in (self.mse, self.count, self.rmse, self.acc):
            metric.reset()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self):
        self._finish("val")

    def on_test_epoch_end(self):
        self._finish("test")


def single_process_values(state: dict, n: int) -> dict:
    """What one process computes over the first ``n`` samples of RandomTokens."""
    module = EvalModule()
    module.load_state_dict(state)
    data = RandomTokens(size=n)
    with torch.no_grad():
        pred = module.model(data.x)
    lead = torch.full((n,), 6.0)
    module.rmse.update(pred[:, None], data.y[:, None], lead)
    module.acc.update(pred[:, None], data.y[:, None], lead)
    per_sample = ((pred - data.y) ** 2).mean(dim=(1, 2))
    return {
        "loss": per_sample.mean().item(),
        "samples": float(n),
        "epoch_sum": float(n),
        "mse": F.mse_loss(pred, data.y).item(),
        "count": float(n),
        **{k: float(v) for k, v in {**module.rmse.compute(), **module.acc.compute()}.items()},
        "predictions": pred,
    }


def evaluation_worker(tmp: str) -> dict:
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    out: dict = {}
    for n, batch_size in SIZES:
        seed_everything(0)
        module = EvalModule()
        out[(n, "state")] = {k: v.clone() for k, v in module.state_dict().items()}
        for stage in ("validate", "test", "predict"):
            trainer = Trainer(
                accelerator="cpu",
                devices=_WORLD,
                strategy=SeqParStrategy(sequence_parallel_size=2, timeout=300),
                default_root_dir=tmp,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            loader = DataLoader(RandomTokens(size=n), batch_size=batch_size)
            if stage == "predict":
                predictions = trainer.predict(module, loader)
                gathered = trainer.strategy.gather_predictions(predictions)
                out[(n, stage)] = torch.cat(gathered) if gathered else None
            else:
                getattr(trainer, stage)(module, loader, verbose=False)
                prefix = "val" if stage == "validate" else "test"
                logged = {k.removeprefix(f"{prefix}_"): float(v) for k, v in trainer.callback_metrics.items()}
                out[(n, stage)] = {**module.results, **logged}
    return out


@pytest.fixture(scope="module")
def evaluation_runs(tmp_path_factory):
    return run_distributed(
        "tests.test_evaluation:evaluation_worker", 4, timeout=500, tmp=str(tmp_path_factory.mktemp("eval"))
    )


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("n,batch_size", SIZES)
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validation_and_test_count_every_sample_once(evaluation_runs, n, batch_size, stage):
    expected = single_process_values(evaluation_runs[0][(n, "state")], n)
    for rank, r in enumerate(evaluation_runs):
        got = r[(n, stage)]
        assert got["samples"] == expected["samples"] and got["count"] == expected["count"], (rank, got)
        for key in ("loss", "epoch_sum", "mse", "rmse/f/6h", "acc/f/6h"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), (rank, key, got[key], expected[key])


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", [n for n, _ in SIZES])
def test_predictions_gathered_in_sample_order(evaluation_runs, n):
    expected = single_process_values(evaluation_runs[0][(n, "state")], n)["predictions"]
    for r in evaluation_runs:
        torch.testing.assert_close(r[(n, "predict")], expected, rtol=1e-5, atol=1e-6)


# --- unit tests of the shards (no processes) -------------------------------------------------------------------


@pytest.mark.parametrize("n,dp,batch_size", [(5, 2, 1), (7, 2, 3), (1, 2, 1), (0, 2, 2), (9, 4, 2), (3, 4, 2)])
def test_eval_shards_cover_every_sample_once_with_equal_step_counts(n, dp, batch_size):
    from torch.utils.data import DistributedSampler

    from lightning_seqpar.sampling import EvalShardBatchSampler

    data = list(range(n))
    samplers = [
        EvalShardBatchSampler(
            DistributedSampler(data, num_replicas=dp, rank=r, shuffle=False), n, batch_size, False, dp, r, pad=True
        )
        for r in range(dp)
    ]
    real = [index for s in samplers for batch, pad in zip(s, s.padding) if not pad for index in batch]
    assert real == data  # rank order is sample order
    assert len({len(s) for s in samplers}) == 1  # every rank runs the same number of steps
    assert all(len(list(s)) == len(s) == len(s.padding) for s in samplers)
