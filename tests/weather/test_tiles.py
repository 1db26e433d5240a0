"""TILES tiling: exact stitching, the halo at the poles and across the dateline, the tiled loss, the tiled dataset."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_seqpar.weather.metrics import latitude_weights
from lightning_seqpar.weather.tiles import TiledDataset, TileLayout, run_tiled, tiled_mse


@pytest.mark.parametrize(
    ("grid", "tiles", "halo"), [((32, 64), 3, 2), ((33, 65), 4, 3), ((7, 11), 2, 0), ((32, 64), 1, 0), ((5, 9), 5, 6)]
)
@pytest.mark.filterwarnings("ignore:TILES. halo=6:UserWarning")  # (5, 9) with halo 6: wider than the grid, still exact
def test_identity_model_stitches_back_exactly(grid, tiles, halo):
    layout = TileLayout(grid, tiles, halo)
    x = torch.randn(2, 3, *grid)
    tiled = layout.split(x)
    assert tiled.shape == (2 * tiles * tiles, 3, *layout.tile_shape)
    assert torch.equal(layout.stitch(tiled), x)
    assert torch.equal(run_tiled(lambda t, lead: t[:, :2], x, torch.zeros(2), layout, max_tiles_per_call=4), x[:, :2])


def test_cores_partition_the_grid():
    layout = TileLayout((32, 64), 3, 2)
    assert layout.tile_shape == (11 + 4, 22 + 4)
    covered = torch.zeros(32, 64, dtype=torch.int64)
    for r0, rows, c0, cols in layout.cores:
        covered[r0 : r0 + rows, c0 : c0 + cols] += 1
    assert bool((covered == 1).all())
    assert layout.core_mask.sum() == 32 * 64


def test_halo_wraps_longitude_and_repeats_the_pole_rows():
    layout = TileLayout((8, 12), 2, 2)
    x = torch.arange(8 * 12.0).reshape(1, 8, 12)
    first = layout.tile(x, 0)  # core rows 0-3, columns 0-5: the halo crosses the south pole and the dateline
    assert torch.equal(first[0, 2:6, 2:8], x[0, 0:4, 0:6])  # the core
    assert torch.equal(first[0, 2:6, 0:2], x[0, 0:4, 10:12])  # west halo = easternmost columns (periodic)
    assert torch.equal(first[0, 0], first[0, 2]) and torch.equal(
        first[0, 1], first[0, 2]
    )  # rows beyond the pole repeat it
    last = layout.tile(x, 3)  # core rows 4-7, columns 6-11
    assert torch.equal(last[0, 2:6, 8:10], x[0, 4:8, 0:2])  # east halo wraps to the westernmost columns
    assert torch.equal(last[0, 7], x[0, 7, torch.arange(4, 14) % 12])  # beyond the north pole: last row repeated
    assert torch.equal(layout.split(x[None])[3], last)


def test_layout_errors():
    with pytest.raises(ValueError, match="tiles \\(per axis\\) must be >= 1"):
        TileLayout((8, 8), 0)
    with pytest.raises(ValueError, match="halo must be >= 0"):
        TileLayout((8, 8), 2, -1)
    with pytest.raises(ValueError, match="9 tiles per axis do not fit a 8 x 16 grid"):
        TileLayout((8, 16), 9)
    with pytest.raises(ValueError, match="got a field of shape"):
        TileLayout((8, 16), 2).split(torch.zeros(1, 1, 8, 15))
    with pytest.raises(ValueError, match="stitch expects"):
        TileLayout((8, 16), 2).stitch(torch.zeros(3, 1, 8, 12))


@pytest.mark.parametrize(("grid", "tiles", "halo", "window", "max_halo"),
                         [((5, 9), 5, 6, (13, 14), 2), ((32, 64), 1, 1, (34, 66), 0), ((8, 16), 2, 3, (10, 14), 2)])
def test_a_halo_wider_than_the_grid_warns_with_the_largest_that_fits(grid, tiles, halo, window, max_halo):
    with pytest.warns(UserWarning, match=f"halo={halo} makes every tile a {window[0]} x {window[1]} window") as record:
        layout = TileLayout(grid, tiles, halo)
    assert layout.max_halo == max_halo and f"use halo <= {max_halo}" in str(record[0].message)
    assert layout.tile_shape == window
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = TileLayout(grid, tiles, max_halo)  # the largest halo the message names fits: no warning
    assert fits.tile_shape[0] <= grid[0] and fits.tile_shape[1] <= grid[1]


def test_tiled_loss_of_all_tiles_equals_the_whole_field_loss():
    from lightning_seqpar.weather.forecast import latitude_weighted_mse

    grid = (16, 24)
    layout = TileLayout(grid, 3, 2)
    lat = latitude_weights(torch.linspace(-84.375, 84.375, grid[0]).numpy()).float()
    pred, target = torch.randn(2, 2, *grid), torch.randn(2, 2, *grid)
    valid = (torch.rand(2, *grid) > 0.2).float()
    field_weights = torch.tensor([0.5, 1.5])
    tiles = torch.arange(layout.num_tiles).repeat(2)  # [B*T]
    weights = TiledDataset.cell_weights(layout, lat, tiles, valid)
    tiled = tiled_mse(layout.split(pred), layout.split(target), weights, field_weights)
    whole = latitude_weighted_mse(pred, target, lat, field_weights, valid)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-7)
    # The halos weigh nothing: changing the prediction there leaves the loss unchanged.
    spoiled = layout.split(pred) + 10.0 * (1 - layout.core_mask.repeat(2, 1, 1)[:, None])
    torch.testing.assert_close(tiled_mse(spoiled, layout.split(target), weights, field_weights), tiled)


def test_tiled_dataset_yields_every_tile_of_every_sample():
    layout = TileLayout((6, 10), 2, 1)
    fields = torch.randn(3, 4, 6, 10)
    samples = [
        {"input": f[:3], "target": f[3:], "lead_time_hours": torch.tensor(6.0), "index": torch.tensor(i)}
        for i, f in enumerate(fields)
    ]
    dataset = TiledDataset(samples, layout)
    assert len(dataset) == 3 * 4
    item = dataset[6]  # sample 1, tile 2
    assert int(item["tile"]) == 2 and int(item["index"]) == 1
    assert torch.equal(item["input"], layout.split(fields[1:2, :3])[2])
    assert torch.equal(item["target"], layout.split(fields[1:2, 3:])[2])


# --- the hooks in ERA5DataModule and ForecastModule ---


class Copy(torch.nn.Module):
    """Forecasts each output field as its input field (persistence without the residual path): an identity model."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, lead_time_hours, variables, out_variables):
        return x[:, [list(variables).index(f) for f in out_variables]] + 0 * self.unused


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from lightning_seqpar.weather.data.synthetic import write_synthetic_era5

    path = tmp_path_factory.mktemp("era5") / "tiny.zarr"
    return write_synthetic_era5(path, years=[2000, 2001], step_hours=24, grid=(8, 16), progress=False)


def tiled_datamodule(store, **kwargs):
    from lightning_seqpar.weather.data.era5 import ERA5DataModule

    args = dict(
        variables=["2m_temperature", "geopotential_500"],
        out_variables=["geopotential_500"],
        lead_time_hours=24,
        train_years="2000",
        val_years="2001",
        batch_size=4,
        tiles=3,
        tile_halo=2,
    )
    return ERA5DataModule(str(store), **{**args, **kwargs})


def test_stitched_identity_model_scores_exactly_as_persistence(store, tmp_path):
    """An 8 x 16 grid in 3 x 3 tiles (neither axis divides): the stitched fields of an identity model are the input."""
    from lightning.pytorch import Trainer

    from lightning_seqpar.weather.forecast import ForecastModule

    dm = tiled_datamodule(store)
    module = ForecastModule(Copy(), tiles=3, tile_halo=2)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, limit_val_batches=3)
    (metrics,) = trainer.validate(module, datamodule=dm)
    model_rmse = {k: v for k, v in metrics.items() if k.startswith("val/rmse/")}
    assert model_rmse and all(v > 0 for v in model_rmse.values())
    for key, value in model_rmse.items():
        assert value == metrics[key.replace("val/", "val/persistence/")], key


def test_fit_on_tiles_and_validate_on_stitched_fields(store, tmp_path):
    from lightning.pytorch import Callback, Trainer

    from lightning_seqpar.weather.forecast import ForecastModule
    from lightning_seqpar.weather.models import ClimaX

    torch.manual_seed(0)
    dm = tiled_datamodule(store, tiles=2, tile_halo=1)
    dm.setup("fit")
    layout = dm.tile_layout
    assert len(dm.datasets["train"]) == 4 * len(dm.datasets["train"].dataset)
    shapes = []

    class Shapes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            shapes.append((tuple(batch["input"].shape[-2:]), "tile" in batch))

    model = ClimaX(dm.variables, layout.tile_shape, patch_size=2, embed_dim=32, depth=1, decoder_depth=1, num_heads=2)
    module = ForecastModule(model, warmup_steps=1, max_steps=2, tiles=2, tile_halo=1)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, callbacks=[Shapes()])
    trainer.fit(module, datamodule=dm)
    assert shapes == [(layout.tile_shape, True)] * 2  # training sees tiles
    assert torch.isfinite(trainer.callback_metrics["val/rmse/geopotential_500/24h"])  # scored on stitched fields


def test_datamodule_and_module_must_tile_alike(store, tmp_path):
    from lightning.pytorch import Trainer

    from lightning_seqpar.weather.forecast import ForecastModule

    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, limit_val_batches=1)
    with pytest.raises(
        ValueError, match="the datamodule cuts training samples into .* but the ForecastModule tiles as None"
    ):
        trainer.validate(ForecastModule(Copy()), datamodule=tiled_datamodule(store))
