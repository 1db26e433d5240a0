"""Checkpoints that load anywhere: a quickstart-recipe checkpoint loads with one call in a fresh Python process into a
model ready to forecast; a ZeRO checkpoint directory says how to consolidate it, and that command works; a trained
model carries its fields, statistics, grid and lead times and maps other data onto them by name, or refuses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_seqpar.weather.data.era5 import ERA5DataModule
from lightning_seqpar.weather.data.synthetic import write_synthetic_era5
from lightning_seqpar.weather.forecast import ForecastModule
from lightning_seqpar.weather.forecast_checkpoint import DataMismatchError, ShardedCheckpointError
from tests.dist_utils import REPO_ROOT

FIELDS = ["2m_temperature", "geopotential_500", "temperature_850"]
OUT_FIELDS = ["geopotential_500", "2m_temperature"]


class ChannelMixer(nn.Module):
    """A network that reads its input channels by position (a 1x1 convolution), as most networks do: only the
    module's mapping by name keeps a reordered datamodule from feeding it the wrong rows."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "out_channels": out_channels}
        self.mix = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, lead_time_hours, variables, out_variables):  # [B, V, H, W] -> [B, V_out, H, W]
        return self.mix(x) * (1 + lead_time_hours.view(-1, 1, 1, 1) / 100)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("era5") / "tiny.zarr"
    return write_synthetic_era5(path, years=[2000, 2001], step_hours=24, grid=(8, 16), progress=False)


def _dm(store, **kwargs) -> ERA5DataModule:
    args = dict(variables=FIELDS, out_variables=OUT_FIELDS, lead_time_hours=24, train_years="2000", val_years="2001",
                test_years="2001", batch_size=4)
    return ERA5DataModule(str(store), **{**args, **kwargs})


def _trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, **kwargs)


def _predict(module, dm, tmp_path) -> dict[str, torch.Tensor]:
    """Physical forecasts of the first two test batches, by store time index and field name."""
    outputs = _trainer(tmp_path, limit_predict_batches=2).predict(module, datamodule=dm)
    forecast = torch.cat([o["forecast"] for o in outputs])  # [N, V_out, H, W]
    return {f: forecast[:, i] for i, f in enumerate(dm.out_variables)}


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A ChannelMixer forecaster trained 2 steps on FIELDS -> OUT_FIELDS, its checkpoint and its forecasts."""
    tmp = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    module = ForecastModule(ChannelMixer(len(FIELDS), len(OUT_FIELDS)), warmup_steps=1, max_steps=2, residual=True)
    trainer = _trainer(tmp, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=_dm(store))
    path = tmp / "trained.ckpt"
    trainer.save_checkpoint(path)
    return path, _predict(module, _dm(store), tmp)


def test_checkpoint_carries_the_trained_data(trained, store):
    path, _ = trained
    record = torch.load(path, weights_only=True)["forecast_data"]  # plain types: loads with weights_only
    dm = _dm(store)
    assert record["variables"] == FIELDS and record["out_variables"] == OUT_FIELDS
    assert record["lead_times_hours"] == [24.0]
    assert np.allclose(record["latitudes"], dm.latitudes) and len(record["longitudes"]) == 16
    assert record["mean"] == {f: dm.mean[f] for f in FIELDS} and record["std"] == {f: dm.std[f] for f in FIELDS}
    assert record["climatology"].shape == (2, 8, 16)


@pytest.mark.parametrize(
    "change",
    [
        {"variables": ["temperature_850", "2m_temperature", "geopotential_500"]},  # inputs in another order
        {"out_variables": ["2m_temperature"]},  # a subset of the outputs, another position
        {"train_years": "2001"},  # other normalisation statistics
        {"normalize": False},  # physical units
        {"variables": ["temperature_850", "t2m", "z_500"], "out_variables": ["t2m", "z_500"]},  # short names, reordered
    ],
)
def test_other_data_is_mapped_by_name(trained, store, tmp_path, change):
    path, expected = trained
    module = ForecastModule.load_from_checkpoint(path)
    got = _predict(module, _dm(store, **change), tmp_path)
    for field, forecast in got.items():
        torch.testing.assert_close(forecast, expected[field], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"variables": ["2m_temperature", "geopotential_500"]}, r"\(missing: \['temperature_850'\]\)"),
        ({"variables": [*FIELDS, "10m_u_component_of_wind"]}, r"\(not trained on: \['10m_u_component_of_wind'\]\)"),
        (
            {"out_variables": ["temperature_850"]},
            r"output fields \['temperature_850'\], which the model does not forecast",
        ),
    ],
)
def test_unmappable_data_is_refused_naming_the_difference(trained, store, tmp_path, change, message):
    module = ForecastModule.load_from_checkpoint(trained[0])
    with pytest.raises(DataMismatchError, match=message):
        _trainer(tmp_path, limit_predict_batches=1).predict(module, datamodule=_dm(store, **change))


def test_other_grid_is_refused(trained, tmp_path):
    other = write_synthetic_era5(
        tmp_path / "coarse.zarr", years=[2000, 2001], step_hours=24, grid=(4, 8), progress=False
    )
    module = ForecastModule.load_from_checkpoint(trained[0])
    with pytest.raises(
        DataMismatchError, match=r"the data's latitudes \(4 from .*are not the grid the model was trained on \(8 from"
    ):
        _trainer(tmp_path, limit_predict_batches=1).predict(module, datamodule=_dm(other))


def test_resuming_with_other_fields_is_refused(trained, store, tmp_path):
    module = ForecastModule(ChannelMixer(2, 2), warmup_steps=1, max_steps=3)
    dm = _dm(
        store, variables=["2m_temperature", "geopotential_500"], out_variables=["geopotential_500", "2m_temperature"]
    )
    with pytest.raises(DataMismatchError, match=r"\(missing: \['temperature_850'\]\)"):
        _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, datamodule=dm, ckpt_path=trained[0])


def test_unseen_lead_time_warns(trained, store, tmp_path):
    module = ForecastModule.load_from_checkpoint(trained[0])
    with pytest.warns(UserWarning, match=r"lead times \[48.0\] h were not trained on"):
        _trainer(tmp_path, limit_predict_batches=1).predict(module, datamodule=_dm(store, lead_time_hours=48))


def test_loaded_module_forecasts_without_a_datamodule(trained, store):
    path, expected = trained
    module = ForecastModule.load_from_checkpoint(path)
    dm = _dm(store)
    dm.setup("predict")
    index = dm.datasets["test"].init_indices[:8]
    fields = torch.from_numpy(dm.store.read(FIELDS, index))  # [8, V, H, W], physical
    forecast = module.forecast(fields, 24.0)
    for i, field in enumerate(OUT_FIELDS):
        torch.testing.assert_close(forecast[:, i], expected[field], rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match=r"fields must be \[B, 3, H, W\]"):
        module.forecast(fields[:, :2], 24.0)


def test_model_without_a_config_is_not_recorded_and_must_be_passed(store, tmp_path):
    class Plain(ChannelMixer):
        def __init__(self):
            super().__init__(3, 2)
            del self.config

    module = ForecastModule(Plain())
    assert "model" not in module.hparams
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=_dm(store))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    loaded = ForecastModule.load_from_checkpoint(tmp_path / "plain.ckpt", model=Plain())
    torch.testing.assert_close(loaded.model.mix.weight, module.model.mix.weight)


def test_forward_before_the_fields_are_known_is_a_clear_error():
    module = ForecastModule(ChannelMixer(3, 2))
    with pytest.raises(RuntimeError, match="does not know its fields yet"):
        module({"input": torch.zeros(1, 3, 8, 16), "lead_time_hours": torch.zeros(1)})


def test_checkpoint_from_an_unimported_module_is_refused():
    from lightning_seqpar.weather.forecast_checkpoint import build_model

    with pytest.raises(ValueError, match="module 'evil_package', which is not imported"):
        build_model({"class_path": "evil_package.Net", "init_args": {}})


# --- the bundled recipe, and a ZeRO checkpoint directory, loaded in a fresh Python process ---------------------

RECIPE = REPO_ROOT / "recipes" / "quickstart.yaml"
# The quickstart on a smaller store and for 2 steps; everything the CLI links from the data stays as in the recipe.
RECIPE_OVERRIDES = [
    "--synthetic_data.grid",
    "[16, 32]",
    "--synthetic_data.years",
    "[2000, 2001]",
    "--synthetic_data.step_hours",
    "24",
    "--data.lead_time_hours",
    "24",
    "--data.train_years",
    "2000",
    "--data.val_years",
    "2001",
    "--data.test_years",
    "2001",
    "--data.batch_size",
    "2",
    "--trainer.max_steps",
    "2",
    "--trainer.val_check_interval",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.devices",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]
# With validation: DeepSpeed's precision conversion must leave the float64 metric states alone.
ZERO_OVERRIDES = ["--trainer.strategy", "seqpar_zero1"]


def fresh_process_check(file_checkpoint: str, zero_directory: str, store: str) -> dict:
    """Run in a new interpreter: load both checkpoints with one call each, as a user would, and forecast."""
    import shlex

    from lightning_seqpar.weather.forecast import ForecastModule as Module
    from lightning_seqpar.weather.forecast_checkpoint import ShardedCheckpointError as Sharded
    from lightning_seqpar.weather.models import ClimaX

    def forecast_error(path: str) -> float:
        """|module.forecast - the same forecast built by hand from the checkpoint's parts|, physical units."""
        module = Module.load_from_checkpoint(path)
        checkpoint = torch.load(path, weights_only=True)
        data, config = checkpoint["forecast_data"], checkpoint["hyper_parameters"]["model"]
        net = ClimaX(**config["init_args"])
        net.load_state_dict(
            {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        )
        dm = ERA5DataModule(store, variables=data["variables"], out_variables=data["out_variables"], lead_time_hours=24)
        fields = torch.from_numpy(dm.store.read(data["variables"], np.array([3, 40])))  # [2, V, H, W], physical
        mean = torch.tensor([data["mean"][f] for f in data["variables"]]).view(-1, 1, 1)
        std = torch.tensor([data["std"][f] for f in data["variables"]]).view(-1, 1, 1)
        x = (fields - mean) / std
        out = [data["variables"].index(f) for f in data["out_variables"]]
        with torch.no_grad():
            pred = (
                net(x, torch.full((2,), 24.0), data["variables"], data["out_variables"]) + x[:, out]
            )  # residual recipe
        by_hand = pred * std[out] + mean[out]
        return float((module.forecast(fields, 24.0) - by_hand).abs().max() / by_hand.abs().max())

    result = {"file_error": forecast_error(file_checkpoint)}
    try:
        Module.load_from_checkpoint(zero_directory)
        result["directory_error"] = None
    except Sharded as e:
        result["directory_error"] = str(e)
        command = next(line.strip() for line in str(e).splitlines() if line.strip().startswith("python -m "))
        argv = shlex.split(command)
        subprocess.run([sys.executable, *argv[1:]], check=True, capture_output=True)
        result["consolidated_error"] = forecast_error(argv[-1])
    return result


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_recipe_checkpoints_load_in_plain_python(tmp_path, monkeypatch):
    from lightning_seqpar.weather.cli import main

    monkeypatch.setattr(sys, "argv", ["seqpar"])
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths resolve here
    main(["fit", "--config", str(RECIPE), *RECIPE_OVERRIDES, "--trainer.strategy", "auto"])
    file_checkpoint = (
        tmp_path / "runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt"
    )  # each run its own version_N
    store = tmp_path / "data/synthetic-era5.zarr"
    # The ZeRO path (a directory of shards), in its own process and folder; the store is the one written above.
    zero_root = tmp_path / "zero"
    zero_root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "lightning_seqpar.weather.cli", "fit", "--config", str(RECIPE), *RECIPE_OVERRIDES,
         *ZERO_OVERRIDES, "--data.path", str(store)],
        cwd=zero_root, env=env, capture_output=True, text=True, timeout=500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    zero_directory = zero_root / "runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt"
    assert zero_directory.is_dir()

    code = ("import json, sys; from tests.weather.test_checkpoint_portability import fresh_process_check;"
            " print(json.dumps(fresh_process_check(*sys.argv[1:])))")
    check = subprocess.run([sys.executable, "-c", code, str(file_checkpoint), str(zero_directory), str(store)],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert result["file_error"] < 1e-5
    assert "is a directory: a sharded checkpoint written by SeqParStrategy with DeepSpeed" in result["directory_error"]
    assert result["consolidated_error"] < 1e-5


def test_a_checkpoint_directory_names_the_consolidation_command(tmp_path):
    directory = tmp_path / "epoch=0-step=2.ckpt"
    directory.mkdir()
    with pytest.raises(
        ShardedCheckpointError,
        match=r"a sharded checkpoint written by SeqParStrategy with DeepSpeed .*\n"
        r"    python -m lightning_seqpar.consolidate '.*/epoch=0-step=2.ckpt' '.*/epoch=0-step=2-consolidated.ckpt'",
    ):
        ForecastModule.load_from_checkpoint(directory)
