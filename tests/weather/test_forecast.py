"""ForecastModule: latitude-weighted loss, parameter groups, warmup + cosine schedule, fit/test/predict on a tiny
store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_seqpar.weather.data.era5 import ERA5DataModule
from lightning_seqpar.weather.data.synthetic import write_synthetic_era5
from lightning_seqpar.weather.forecast import ForecastModule, latitude_weighted_mse, warmup_cosine
from lightning_seqpar.weather.models import ClimaX

FIELDS = ["2m_temperature", "geopotential_500", "temperature_850"]
OUT_FIELDS = ["geopotential_500", "2m_temperature"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("era5") / "tiny.zarr"
    return write_synthetic_era5(path, years=[2000, 2001], step_hours=24, grid=(8, 16), progress=False)


def datamodule(store, **kwargs) -> ERA5DataModule:
    args = dict(variables=FIELDS, out_variables=OUT_FIELDS, lead_time_hours=[24, 48], train_years="2000",
                val_years="2001", test_years="2001", batch_size=4)
    return ERA5DataModule(str(store), **{**args, **kwargs})


def tiny_climax(variables=FIELDS, img_size=(8, 16)) -> ClimaX:
    return ClimaX(variables, img_size, patch_size=2, embed_dim=32, depth=1, decoder_depth=1, num_heads=2)


def test_latitude_weighted_mse_matches_formula():
    lat = np.array([-60.0, 0.0, 60.0])
    w = np.cos(np.deg2rad(lat)) / np.cos(np.deg2rad(lat)).mean()
    pred, target = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    expected = ((pred - target).square() * torch.tensor(w, dtype=torch.float32).view(-1, 1)).mean()
    assert torch.allclose(latitude_weighted_mse(pred, target, torch.tensor(w)), expected)
    assert math.isclose(w.mean(), 1.0)
    field_weights = torch.tensor([0.5, 1.0, 1.5])
    weighted = latitude_weighted_mse(pred, target, torch.tensor(w), field_weights)
    per_field = [latitude_weighted_mse(pred[:, i], target[:, i], torch.tensor(w)) for i in range(3)]
    assert torch.allclose(weighted, sum(f * e for f, e in zip(field_weights, per_field)) / 3)


def test_warmup_cosine_values():
    values = [warmup_cosine(step, warmup_steps=4, max_steps=14, min_lr_ratio=0.1) for step in range(16)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert values[14] == pytest.approx(0.1) and values[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_parameter_groups_exclude_embeddings_norms_and_biases():
    module = ForecastModule(tiny_climax(), weight_decay=0.05, warmup_steps=2, max_steps=10)
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert {
        "pos_embed",
        "var_embed",
        "var_agg.query",
        "token_embed.bias",
        "norm.weight",
        "blocks.0.attn.qkv.bias",
    } <= no_decay_names
    assert {"token_embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.0.weight"} <= decay_names
    assert len(no_decay_names) + len(decay_names) == len(list(module.model.parameters()))


def test_optimizer_schedule_steps_per_optimizer_step():
    module = ForecastModule(tiny_climax(), lr=1e-3, warmup_steps=2, max_steps=6, betas=(0.9, 0.95))
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.95)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [1e-3 * warmup_cosine(s, 2, 6) for s in range(7)]
    assert lrs == pytest.approx(expected)
    assert lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_setup_without_datamodule_is_a_clear_error(tmp_path):
    trainer = Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False)
    loader = torch.utils.data.DataLoader([{"input": torch.zeros(3, 8, 16)}])
    with pytest.raises(RuntimeError, match="reads .* from trainer.datamodule"):
        trainer.fit(ForecastModule(tiny_climax()), train_dataloaders=loader)


def test_fit_then_test_logs_skill_and_writes_figures(store, tmp_path):
    torch.manual_seed(0)
    dm = datamodule(store)
    module = ForecastModule(tiny_climax(), warmup_steps=1, max_steps=3, residual=True)
    trainer = Trainer(
        default_root_dir=tmp_path, max_steps=3, val_check_interval=3, limit_val_batches=2, limit_test_batches=3,
        logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    assert {"val/loss", "val/rmse/2m_temperature/24h", "val/persistence/rmse/geopotential_500/24h"} <= set(logged)
    results = trainer.test(module, datamodule=dm)[0]
    # Test batches are lead-major: the first 3 batches of 4 samples all have the 24 h lead.
    for key in ("test/rmse/geopotential_500/24h", "test/acc/2m_temperature/24h",
                "test/persistence/rmse/2m_temperature/24h", "test/persistence/acc/geopotential_500/24h",
                "test/climatology/rmse/2m_temperature/24h"):
        assert np.isfinite(results[key]), key
    log_dir = trainer.logger.log_dir
    for name in ("forecast_map.png", "rmse_by_lead_time.png"):
        png = Path(log_dir, name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


class ZeroChange(nn.Module):
    """Predicts no change, so a residual forecast is persistence."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x, lead_time_hours, variables, out_variables):
        return x.new_zeros(x.shape[0], len(out_variables), *x.shape[2:])


def test_predict_returns_physical_forecasts(store, tmp_path):
    dm = datamodule(store)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, limit_predict_batches=1)
    module = ForecastModule(ZeroChange(), residual=True)
    (out,) = trainer.predict(module, datamodule=dm)
    assert out["forecast"].shape == (4, 2, 8, 16)
    truth = dm.store.read(OUT_FIELDS, out["index"].numpy())  # [B, V_out, H, W], physical
    assert np.allclose(out["forecast"].numpy(), truth, rtol=1e-5, atol=1e-2)


def test_residual_needs_outputs_among_inputs(store, tmp_path):
    dm = datamodule(store, variables=["2m_temperature"], out_variables=["geopotential_500"])
    trainer = Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"output fields \['geopotential_500'\] are not inputs"):
        trainer.fit(ForecastModule(tiny_climax(["2m_temperature", "geopotential_500"]), residual=True), datamodule=dm)


def test_loss_weights_must_name_output_fields(store, tmp_path):
    trainer = Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False)
    module = ForecastModule(tiny_climax(), loss_weights={"temperature_850": 2.0})
    with pytest.raises(ValueError, match=r"loss_weights names \['temperature_850'\], which are not output fields"):
        trainer.fit(module, datamodule=datamodule(store))
