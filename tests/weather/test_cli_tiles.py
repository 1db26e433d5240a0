"""TILES from the `seqpar` command: the model is built for one tile with its halo (ERA5DataModule.model_grid_shape),
a short fit validates on stitched whole fields, and a model built for the wrong grid is named at setup."""

from __future__ import annotations

import pytest

from lightning_seqpar.weather.cli import SeqParCLI, main
from lightning_seqpar.weather.data.era5 import ERA5DataModule
from lightning_seqpar.weather.forecast import ForecastModule
from lightning_seqpar.weather.models import ClimaX
from lightning_seqpar.weather.tiles import TileLayout
from tests.weather.test_cli import TINY, plain_argv, write_config  # noqa: F401 - plain_argv is an autouse fixture

# 8 x 16 grid in 3 x 3 tiles (3 divides neither side) with a halo of 1
TILED = dict(TINY, data=dict(TINY["data"], tiles=3, tile_halo=1), model=dict(TINY["model"], tiles=3, tile_halo=1))


def test_the_command_builds_the_model_for_one_tile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = SeqParCLI(ForecastModule, ERA5DataModule, subclass_mode_model=False, run=False,
                    args=["--config", str(write_config(tmp_path, TILED))])
    layout = TileLayout((8, 16), 3, 1)
    assert cli.datamodule.model_grid_shape == tuple(layout.tile_shape)
    assert cli.model.model.img_size == tuple(layout.tile_shape) != (8, 16)


def test_tiled_fit_from_the_command_validates_on_stitched_fields(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(write_config(tmp_path, TILED))])
    out = capsys.readouterr().out
    assert "val RMSE (physical units), model vs persistence" in out and "geopotential_500" in out


def test_model_built_for_the_whole_grid_is_named_at_setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = SeqParCLI(ForecastModule, ERA5DataModule, subclass_mode_model=False, run=False,
                    args=["--config", str(write_config(tmp_path, TILED))])
    dm = cli.datamodule
    dm.setup("fit")
    whole = ClimaX(cli.model.model.default_variables, (8, 16), patch_size=2, embed_dim=32, depth=1,
                   decoder_depth=1, num_heads=2)
    module = ForecastModule(whole, tiles=3, tile_halo=1, residual=True)

    class Trainer:  # what setup reads
        datamodule = dm

    module._trainer = Trainer()
    with pytest.raises(ValueError, match=r"built for a \(8, 16\) grid but with TILES it sees tiles of"):
        module.setup("fit")
