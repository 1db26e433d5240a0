"""TILES tiling: exact stitching, the halo at the poles and across the dateline, the tiled loss, the tiled dataset."""

from __future__ import annotations

import pytest
import torch

from lightning_seqpar.weather.metrics import latitude_weights
from lightning_seqpar.weather.tiles import TiledDataset, TileLayout, run_tiled, tiled_mse


@pytest.mark.parametrize(("grid", "tiles", "halo"), [((32, 64), 3, 2), ((33, 65), 4, 3), ((7, 11), 2, 0), ((32, 64), 1, 0), ((5, 9), 5, 6)])
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
    assert torch.equal(first[0, 0], first[0, 2]) and torch.equal(first[0, 1], first[0, 2])  # rows beyond the pole repeat it
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
    samples = [{"input": f[:3], "target": f[3:], "lead_time_hours": torch.tensor(6.0), "index": torch.tensor(i)} for i, f in enumerate(fields)]
    dataset = TiledDataset(samples, layout)
    assert len(dataset) == 3 * 4
    item = dataset[6]  # sample 1, tile 2
    assert int(item["tile"]) == 2 and int(item["index"]) == 1
    assert torch.equal(item["input"], layout.split(fields[1:2, :3])[2])
    assert torch.equal(item["target"], layout.split(fields[1:2, 3:])[2])
