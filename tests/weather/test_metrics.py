"""Latitude-weighted RMSE / ACC against an independent NumPy reference, state additivity, key format and baselines."""

import numpy as np
import pytest
import torch

from lightning_seqpar.weather.data import ERA5DataModule, write_synthetic_era5
from lightning_seqpar.weather.metrics import (
    LatitudeWeightedACC,
    LatitudeWeightedRMSE,
    climatology_forecast,
    evaluate_baselines,
    latitude_weights,
    persistence_forecast,
)

VARIABLES = ["2m_temperature", "geopotential_500"]
LATS = np.linspace(-87.1875, 87.1875, 8)
MEAN, STD = np.array([280.0, 54000.0]), np.array([15.0, 3000.0])


def reference_rmse(f, o, lat):
    """Per-sample sqrt of the cos-weighted spatial mean of squared error, averaged over samples; f, o: [N, H, W]."""
    w = np.cos(np.deg2rad(lat))
    w = w / w.mean()
    return np.mean([np.sqrt(np.mean(w[:, None] * (fi - oi) ** 2)) for fi, oi in zip(f, o)])


def reference_acc(f, o, clim, lat):
    w = np.cos(np.deg2rad(lat))
    w = (w / w.mean())[:, None]
    scores = []
    for fi, oi in zip(f, o):
        a, b = fi - clim, oi - clim
        a, b = a - np.mean(w * a), b - np.mean(w * b)
        scores.append(np.sum(w * a * b) / np.sqrt(np.sum(w * a * a) * np.sum(w * b * b)))
    return np.mean(scores)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    preds = torch.randn(6, 2, 8, 16, generator=gen)
    target = 0.6 * preds + 0.8 * torch.randn(6, 2, 8, 16, generator=gen)
    leads = torch.tensor([6.0, 6.0, 24.0, 6.0, 24.0, 24.0])
    return preds, target, leads


def test_latitude_weights_have_mean_one():
    w = latitude_weights(LATS)
    assert w.shape == (8,) and float(w.mean()) == pytest.approx(1.0)
    assert float(w[0]) < float(w[3])


def test_rmse_matches_numpy_per_variable_and_lead(batch):
    preds, target, leads = batch
    metric = LatitudeWeightedRMSE(VARIABLES, LATS, [6, 24], mean=MEAN, std=STD, prefix="val/")
    metric.update(preds[:3], target[:3], leads[:3])
    metric.update(preds[3:], target[3:], leads[3:])
    result = metric.compute()
    assert sorted(result) == sorted(f"val/rmse/{v}/{h}h" for v in VARIABLES for h in (6, 24))
    f = preds.double().numpy() * STD[None, :, None, None] + MEAN[None, :, None, None]
    o = target.double().numpy() * STD[None, :, None, None] + MEAN[None, :, None, None]
    for v, name in enumerate(VARIABLES):
        for hours in (6, 24):
            rows = leads.numpy() == hours
            expected = reference_rmse(f[rows, v], o[rows, v], LATS)
            assert float(result[f"val/rmse/{name}/{hours}h"]) == pytest.approx(expected, rel=1e-5)


def test_acc_matches_numpy(batch):
    preds, target, leads = batch
    clim = np.random.default_rng(1).normal(size=(2, 8, 16))
    metric = LatitudeWeightedACC(VARIABLES, LATS, [6, 24], climatology=clim)
    metric.update(preds, target, leads)
    result = metric.compute()
    for v, name in enumerate(VARIABLES):
        rows = leads.numpy() == 24
        expected = reference_acc(preds.double().numpy()[rows, v], target.double().numpy()[rows, v], clim[v], LATS)
        assert float(result[f"acc/{name}/24h"]) == pytest.approx(expected, rel=1e-5)
    perfect = LatitudeWeightedACC(VARIABLES, LATS, [6], climatology=clim)
    perfect.update(target, target, 6.0)
    assert all(float(v) == pytest.approx(1.0) for v in perfect.compute().values())


def test_states_are_additive_sums(batch):
    """Two metrics fed halves, with states summed as dist_reduce_fx='sum' does, equal one metric fed all."""
    preds, target, leads = batch
    whole, first, second = (LatitudeWeightedRMSE(VARIABLES, LATS, [6, 24]) for _ in range(3))
    whole.update(preds, target, leads)
    first.update(preds[::2], target[::2], leads[::2])
    second.update(preds[1::2], target[1::2], leads[1::2])
    assert whole._reductions["total"] is not None and whole._defaults["count"].dtype == torch.float64
    first.total += second.total
    first.count += second.count
    for key, value in whole.compute().items():
        torch.testing.assert_close(first.compute()[key], value)


def test_process_group_is_passed_through():
    sentinel = object()
    metric = LatitudeWeightedRMSE(VARIABLES, LATS, [6], process_group=sentinel)
    assert metric.process_group is sentinel


def test_unseen_leads_are_left_out(batch):
    preds, target, _ = batch
    metric = LatitudeWeightedRMSE(VARIABLES, LATS, [6, 24])
    metric.update(preds, target, torch.full((6,), 6.0))
    assert sorted(metric.compute()) == ["rmse/2m_temperature/6h", "rmse/geopotential_500/6h"]


def test_errors(batch):
    preds, target, leads = batch
    metric = LatitudeWeightedRMSE(VARIABLES, LATS, [6])
    with pytest.raises(ValueError, match=r"lead times \[24.0\] h are not among lead_times_hours \[6.0\]"):
        metric.update(preds, target, leads)
    with pytest.raises(ValueError, match=r"expects preds and target of shape \[B, V=2, H=8, W\], got \(6, 1, 8, 16\)"):
        metric.update(preds[:, :1], target[:, :1], 6.0)
    with pytest.raises(ValueError, match="give both mean and std"):
        LatitudeWeightedRMSE(VARIABLES, LATS, [6], mean=MEAN)
    with pytest.raises(ValueError, match="std has 3 entries but there are 2 variables"):
        LatitudeWeightedRMSE(VARIABLES, LATS, [6], mean=MEAN, std=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"climatology must be \[V=2, H=8, W\]"):
        LatitudeWeightedACC(VARIABLES, LATS, [6], climatology=np.zeros((8, 16)))
    with pytest.raises(ValueError, match="needs variables and lead_times_hours"):
        LatitudeWeightedRMSE(VARIABLES, LATS, [])
    with pytest.raises(ValueError, match=r"persistence needs every output among the inputs; \['u'\]"):
        persistence_forecast({"input": preds}, VARIABLES, ["u"])


def test_baselines_on_synthetic_data(tmp_path):
    store = write_synthetic_era5(tmp_path / "era5.zarr", years=[2000, 2001], step_hours=6, grid=(8, 16), progress=False)
    dm = ERA5DataModule(str(store), ["2m_temperature", "geopotential_500"], lead_time_hours=[6, 24],
                        train_years=[2000], val_years=[2001], batch_size=32)
    dm.setup("fit")
    result = evaluate_baselines(dm, max_batches=2)
    assert float(result["persistence/rmse/geopotential_500/6h"]) > 50.0  # the field moves
    assert float(result["persistence/acc/geopotential_500/6h"]) > 0.5
    assert float(result["climatology/rmse/geopotential_500/6h"]) > float(result["persistence/rmse/geopotential_500/6h"])
    assert not any(key.startswith("climatology/acc") for key in result)
    batch = next(iter(dm.val_dataloader()))
    clim = torch.zeros(2, 8, 16)
    assert climatology_forecast(batch, clim).shape == batch["target"].shape
    physical = torch.as_tensor(dm.climatology)
    assert physical.shape == (2, 8, 16) and 250 < float(physical[0].mean()) < 300
