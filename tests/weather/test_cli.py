"""The `seqpar` command: fit/test on an auto-written tiny synthetic store, data -> model links, config errors,
recipes."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from lightning_seqpar.weather.cli import SeqParCLI, SyntheticData, main
from lightning_seqpar.weather.cli_checks import ConfigError, resolve_checkpoint
from lightning_seqpar.weather.data.era5 import ERA5DataModule
from lightning_seqpar.weather.data.synthetic import write_synthetic_era5
from lightning_seqpar.weather.forecast import ForecastModule

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

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
            "class_path": "lightning_seqpar.weather.models.ClimaX",
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


def test_fit_writes_store_then_test_and_predict_use_the_last_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths resolve here
    config = write_config(tmp_path, TINY)
    main(["fit", "--config", str(config)])
    printed = capsys.readouterr()
    assert "val RMSE (physical units), model vs persistence:" in printed.out
    assert "| geopotential_500 | 24h |" in printed.out  # the run ends with its skill against persistence
    assert "seqpar: run written to runs/lightning_logs/version_0" in printed.out
    assert (tmp_path / "data/tiny.zarr").is_dir()
    version = tmp_path / "runs/lightning_logs/version_0"
    assert (version / "config.yaml").is_file()
    checkpoint = version / "checkpoints/epoch=0-step=3.ckpt"  # TINY keeps Lightning's default ModelCheckpoint
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.var_embed"].shape == (1, 3, 32)  # three linked fields
    assert state["model.pos_embed"].shape == (1, 4 * 8, 32)  # linked 8 x 16 grid in 2 x 2 patches

    main(["test", "--config", str(config), "--ckpt_path", "last"])
    assert (
        f"seqpar: --ckpt_path last -> runs/lightning_logs/version_0/checkpoints/{checkpoint.name}"
        in capsys.readouterr().err
    )
    figures = tmp_path / "runs/lightning_logs/version_1"  # the test run's own directory
    assert (figures / "forecast_map.png").is_file() and (figures / "rmse_by_lead_time.png").is_file()

    main(["predict", "--config", str(config), "--ckpt_path", "last", "--trainer.limit_predict_batches", "2"])
    assert (
        f"version_0/checkpoints/{checkpoint.name}" in capsys.readouterr().err
    )  # a run without checkpoints is not "latest"
    forecasts = xr.open_dataset(tmp_path / "runs/lightning_logs/version_2/forecasts.nc")
    assert forecasts.attrs["Conventions"] == "CF-1.8"
    z500 = forecasts["geopotential_500"]  # [T, K, H, W], physical units from the store
    assert z500.dims == ("time", "prediction_timedelta", "latitude", "longitude") and z500.shape == (8, 1, 8, 16)
    assert z500.attrs["units"] == "m**2 s**-2" and 40_000 < float(z500.mean()) < 70_000
    assert forecasts["time"].attrs["standard_name"] == "forecast_reference_time"
    assert forecasts["prediction_timedelta"].values[0] == np.timedelta64(24, "h")
    assert (forecasts["valid_time"].values[:, 0] == forecasts["time"].values + np.timedelta64(24, "h")).all()
    assert forecasts["time"].values[0] == np.datetime64("2001-01-01T00:00")  # the test year, in time order
    assert forecasts["latitude"].attrs["units"] == "degrees_north"


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
    assert printed["model"]["model"]["class_path"] == "lightning_seqpar.weather.models.ClimaX"
    assert not str(printed["data"]["path"]).startswith("/"), "recipes use relative paths"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """The TINY store (8 x 16, 2000-2001, daily), written once for the checks below."""
    path = tmp_path_factory.mktemp("store") / "tiny.zarr"
    write_synthetic_era5(path, years=[2000, 2001], step_hours=24, grid=(8, 16), progress=False)
    return path


def _rejected(tmp_path, capsys, config: dict, *extra: str) -> str:
    """Runs `seqpar fit` expecting an error before anything launches; returns what it printed."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_config(tmp_path, config)), *extra])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_mistyped_data_path_is_an_error_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = _rejected(tmp_path, capsys, TINY, "--data.path", "data/tiny-typo.zarr")
    assert "seqpar fit: error: --data.path: no ERA5 store at 'data/tiny-typo.zarr'" in err
    assert "reading --data.path data/tiny-typo.zarr as your data" in err
    assert not (tmp_path / "data").exists()  # neither at the typo nor at synthetic_data.path


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"data": {"out_variables": ["geopotential_300"]}},
            r"--data.out_variables: .*'geopotential_300'.*\(null, the default",
        ),
        (
            {"data": {"train_years": "1980"}},
            r"--data.train_years: train_years \[1980\] not in .* has years \[2000, 2001\]",
        ),
        ({"data": {"lead_time_hours": 6}}, r"--data.lead_time_hours: 6 h is not a multiple of the 24 h time step"),
        ({"data": {"variables": ["t2m", "z_700"]}}, r"--data.variables: 'z_700' asks for level 700"),
        (
            {"model": {"loss_weights": {"t2m": 2.0}}},
            r"--model.loss_weights names \['t2m'\], which are not output fields",
        ),
        (
            {"trainer": {"strategy": "seqpar_ulyses"}},
            r"--trainer.strategy: 'seqpar_ulyses' is not a registered strategy; "
            r"did you mean 'seqpar_ulysses'.*seqpar_lss, seqpar_ring",
        ),
        (
            {"trainer": {"devices": 8, "strategy": "seqpar"}},
            r"--trainer.devices: Ulysses attention splits the model's 2 heads "
            r"over the 8 ranks.*--trainer.devices 2 or fewer",
        ),
    ],
)
def test_bad_options_are_named_before_launch(tmp_path, monkeypatch, capsys, tiny_store, change, expected):
    monkeypatch.chdir(tmp_path)
    config = {**TINY, "synthetic_data": None}
    for section, values in change.items():
        config[section] = dict(config[section], **values)
    config["data"] = dict(config["data"], path=str(tiny_store))
    err = _rejected(tmp_path, capsys, config)
    assert re.search(expected, err), err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()  # one line, no process started


def test_files_repeating_times_name_the_option(tmp_path, monkeypatch, capsys, tiny_store):
    monkeypatch.chdir(tmp_path)
    year = xr.open_zarr(tiny_store).sel(time="2000").load()
    for name in ("a.nc", "b.nc"):  # two copies of one year, as in a re-downloaded folder
        year.to_netcdf(tmp_path / name)
    config = {**TINY, "synthetic_data": None, "data": dict(TINY["data"], path=str(tmp_path / "*.nc"))}
    err = _rejected(tmp_path, capsys, config)
    assert "--data.duplicate_times:" in err and "--data.duplicate_times keep_first" in err


def test_your_data_recipe_needs_only_the_path_and_the_fields(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mine"
    write_synthetic_era5(store, years=[2000, 2001, 2002], step_hours=24, grid=(8, 16), format="netcdf", progress=False)
    cli = SeqParCLI(
        ForecastModule,
        ERA5DataModule,
        subclass_mode_model=False,
        run=False,
        args=[
            "--config",
            str(RECIPES / "your_data.yaml"),
            "--data.path",
            str(store),
            "--data.variables",
            "[t2m,z_500]",
        ],
    )
    dm = cli.datamodule
    assert dm.lead_times_hours == [24]  # one time step of the store
    assert dm.out_variables == dm.variables == ["2m_temperature", "geopotential_500"]
    assert dm.split_years["val"] == dm.split_years["test"] == [2002]
    assert dm.split_indices("train").size == 731 and dm.split_years["train"] == [2000, 2001]  # the other years
    assert cli.model.model.img_size == (8, 16)


def test_ckpt_path_last_is_the_latest_run_that_saved_one(tmp_path):
    def run(name: str, *files: str) -> None:
        directory = tmp_path / "lightning_logs" / name / "checkpoints"
        directory.mkdir(parents=True)
        for file in files:
            (directory / file).write_bytes(b"")

    run("version_2", "last.ckpt")
    run("version_10", "epoch=0-step=3.ckpt", "last.ckpt")  # 10 > 2: numeric, not alphabetical
    run("version_11")  # a later test run saves no checkpoint
    assert resolve_checkpoint("last", tmp_path) == tmp_path / "lightning_logs/version_10/checkpoints/last.ckpt"
    run("version_12", "epoch=1-step=6.ckpt")  # without save_last: the run's newest checkpoint
    assert (
        resolve_checkpoint("last", tmp_path) == tmp_path / "lightning_logs/version_12/checkpoints/epoch=1-step=6.ckpt"
    )
    with pytest.raises(
        ConfigError, match=r"--ckpt_path last: no run under .*elsewhere.* saved a checkpoint.*--ckpt_path PATH"
    ):
        resolve_checkpoint("last", tmp_path / "elsewhere")


def test_ckpt_path_best_is_what_the_latest_runs_model_checkpoint_recorded(tmp_path):
    directory = tmp_path / "lightning_logs/version_0/checkpoints"
    directory.mkdir(parents=True)
    best = directory / "epoch=3-step=40.ckpt"
    best.write_bytes(b"")
    torch.save(
        {"callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": {"best_model_path": str(best)}}},
        directory / "last.ckpt",
    )
    assert resolve_checkpoint("best", tmp_path) == best
    best.unlink()
    with pytest.raises(
        ConfigError, match=r"--ckpt_path best: .*last.ckpt records no best checkpoint that still exists"
    ):
        resolve_checkpoint("best", tmp_path)


def test_more_cpu_processes_than_cores_is_a_warning():
    from lightning_seqpar.weather.cli_checks import check_strategy

    [note] = check_strategy({"accelerator": "cpu", "devices": 512, "strategy": "ddp"}, {})
    assert re.match(
        r"--trainer.devices 512 starts 512 processes on \d+ CPU cores: .* --trainer.devices \d+ or fewer", note
    )
    assert check_strategy({"accelerator": "cpu", "devices": 1, "strategy": "auto"}, {}) == []


def test_recipes_give_each_run_its_own_directory():
    for recipe in RECIPES.glob("*.yaml"):
        text = recipe.read_text()
        assert "dirpath:" not in text, f"{recipe.name}: a fixed checkpoint directory mixes the runs"
        assert ("synthetic_data:" not in text) or "  path: " in text.split("synthetic_data:")[1].split("\n")[1]


def test_help_says_what_the_command_does(capsys):
    from lightning.pytorch.strategies import StrategyRegistry

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("recipes/", "quickstart.yaml", "your_data.yaml", "lightning_logs/version_N", "forecasts.nc",
                     "forecast_map.png", "--ckpt_path last", "--data.path", "--trainer.devices"):
        assert expected in text
    for name in (n for n in StrategyRegistry.available_strategies() if n.startswith("seqpar")):
        assert name in text  # read from the registry, so all nine and no more


def test_failure_records_pick_the_first_rank(tmp_path, monkeypatch, capsys):
    from lightning_seqpar import failures

    monkeypatch.setenv(failures.FAILURE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    failures.record_failure(ValueError("train_years [1980] not in store"), when=100.0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    failures.record_failure(RuntimeError("Connection closed by peer"), when=101.0)
    first = failures.first_failure(tmp_path)
    assert first["rank"] == 0 and first["summary"] == "ValueError: train_years [1980] not in store"
    # rank 1 lost its peer after rank 0 failed: one line, not a second traceback
    assert failures.report_failure(RuntimeError("Connection closed by peer")) == 1
    assert capsys.readouterr().err == "[rank 1] stopped after rank 0 failed: RuntimeError: Connection closed by peer\n"


def test_ci_runs_the_readme_commands_verbatim():
    readme = (RECIPES.parent / "README.md").read_text()
    ci = (RECIPES.parent / ".ci" / "run").read_text()
    tests = readme.split("## Tests (install and run the test suite)")[1].split("```bash\n")[1].split("\n```")[0]
    assert tests.strip() in ci.splitlines()
    assert "`.ci/run` runs exactly this line" in readme


@pytest.mark.parametrize("page", ["README.md", "docs/index.md", "docs/recipes.md"])
def test_docs_name_every_registered_strategy(page):
    from lightning.pytorch.strategies import StrategyRegistry

    text = (RECIPES.parent / page).read_text()
    missing = [n for n in StrategyRegistry.available_strategies() if n.startswith("seqpar") and f"`{n}`" not in text]
    assert not missing, f"{page} does not name {missing}"
