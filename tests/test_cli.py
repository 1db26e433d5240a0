"""The `seqpar` command: fit/test on an auto-written tiny synthetic store, data -> model links, config errors, recipes."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_seqpar.cli import SeqParCLI, SyntheticData, main
from lightning_seqpar.data.era5 import ERA5DataModule
from lightning_seqpar.forecast import ForecastModule

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TINY = {
    "seed_everything": 0,
    "synthetic_data": {"path": "data/tiny.zarr", "grid": [8, 16], "years": [2000, 2001], "step_hours": 24},
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 3,
        "val_check_interval": 3,
        "limit_val_batches": 1,
        "limit_test_batches": 2,
        "enable_progress_bar": False,
        "default_root_dir": "runs",
    },
    "model": {
        "model": {
            "class_path": "lightning_seqpar.models.ClimaX",
            "init_args": {"patch_size": 2, "embed_dim": 32, "depth": 1, "decoder_depth": 1, "num_heads": 2},
        },
        "warmup_steps": 1,
        "residual": True,
    },
    "data": {
        "path": "data/tiny.zarr",
        "variables": ["t2m", "z_500", "temperature_850"],  # short names: the links see canonical ones
        "out_variables": ["z_500"],
        "lead_time_hours": 24,
        "train_years": "2000",
        "val_years": "2001",
        "test_years": "2001",
        "batch_size": 4,
    },
}


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI warns when pytest's own arguments sit in sys.argv next to `args=`."""
    monkeypatch.setattr(sys, "argv", ["seqpar"])


def write_config(directory: Path, config: dict) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_writes_store_then_test_writes_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths resolve here
    config = write_config(tmp_path, TINY)
    main(["fit", "--config", str(config)])
    printed = capsys.readouterr().out
    assert "val RMSE (physical units), model vs persistence:" in printed
    assert "| geopotential_500 | 24h |" in printed  # the run ends with its skill against persistence
    assert (tmp_path / "data/tiny.zarr").is_dir()
    version = tmp_path / "runs/lightning_logs/version_0"
    assert (version / "config.yaml").is_file()
    checkpoint = version / "checkpoints/epoch=0-step=3.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.var_embed"].shape == (1, 3, 32)  # three linked fields
    assert state["model.pos_embed"].shape == (1, 4 * 8, 32)  # linked 8 x 16 grid in 2 x 2 patches

    main(["test", "--config", str(config), "--ckpt_path", str(checkpoint)])
    figures = tmp_path / "runs/lightning_logs/version_1"
    assert (figures / "forecast_map.png").is_file() and (figures / "rmse_by_lead_time.png").is_file()


def test_links_give_the_model_the_data_fields_and_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = dict(TINY, data=dict(TINY["data"], out_variables=["t2m", "10m_u_component_of_wind"]),
                  model=dict(TINY["model"], residual=False))  # an output that is not an input: no residual
    cli = SeqParCLI(ForecastModule, ERA5DataModule, subclass_mode_model=False, run=False,
                    args=["--config", str(write_config(tmp_path, config))])
    model = cli.model.model
    # Outputs that are not inputs are appended to the fields the model knows.
    assert model.default_variables == ["2m_temperature", "geopotential_500", "temperature_850",
                                       "10m_u_component_of_wind"]
    assert model.img_size == (8, 16) and model.num_patches == 32


def test_typo_in_config_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = dict(TINY, trainer=dict(TINY["trainer"], max_stepz=3))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_config(tmp_path, config))])
    assert exit_info.value.code != 0
    assert "max_stepz" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing was written before the config was valid


def test_synthetic_data_options_are_typed():
    spec = SyntheticData(grid=(16, 32), years=[2010, 2011])
    assert spec.step_hours == 6 and spec.levels == [500, 850]


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipes_are_valid_configs(recipe, capsys):
    from lightning_seqpar import SeqParStrategy

    text = (RECIPES / recipe).read_text()
    if "zero_stage:" in text and "zero_stage" not in inspect.signature(SeqParStrategy).parameters:
        pytest.xfail("SeqParStrategy has no zero_stage argument yet: the ZeRO wiring has not landed")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(RECIPES / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"]["class_path"] == "lightning_seqpar.models.ClimaX"
    assert not str(printed["data"]["path"]).startswith("/"), "recipes use relative paths"
