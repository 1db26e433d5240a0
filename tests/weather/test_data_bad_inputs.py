"""Bad data inputs: each gives an error that says what is wrong, where and what to do, and leaves no partial output."""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from lightning_seqpar.weather.data import ERA5DataModule, StatisticsCacheError, StoreReadError, write_synthetic_era5
from lightning_seqpar.weather.data import stats as stats_module
from lightning_seqpar.weather.data import synthetic as synthetic_module

GRID = (8, 16)
FIELDS = ["2m_temperature", "geopotential_500", "temperature_850"]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# Two daily years of 8 x 16 points: 731 times in zarr chunks of 256 times, so chunk 1 holds times 256-511,
# the end of 2000 (train) and the start of 2001 (val).


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zarr") / "era5.zarr"
    return write_synthetic_era5(path, years=[2000, 2001], step_hours=24, grid=GRID, progress=False)


@pytest.fixture(scope="module")
def netcdf_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("netcdf") / "era5"
    return write_synthetic_era5(path, years=[2000, 2001], step_hours=24, grid=GRID, format="netcdf", progress=False)


def make_dm(path, tmp_path, **kwargs) -> ERA5DataModule:
    kwargs = {"variables": FIELDS, "lead_time_hours": 24, "train_years": [2000], "val_years": [2001],
              "stats_path": str(tmp_path / "stats.nc"), **kwargs}
    return ERA5DataModule(str(path), **kwargs)


def leftovers(directory: Path) -> list[str]:
    """Names in ``directory`` that a failed write may have left: temporary, partial or moved-aside files."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- stores with damaged files ---


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_zarr_chunk_names_variable_time_and_store(zarr_store, tmp_path, damage):
    store = shutil.copytree(zarr_store, tmp_path / "era5.zarr")
    chunk = store / "geopotential" / "1.0.0.0"  # times 256-511, both levels
    data = chunk.read_bytes()
    if damage == "garbage":  # the blosc header survives, the compressed body does not: the codec fails
        chunk.write_bytes(data[:16] + np.random.default_rng(0).bytes(len(data) - 16))
        detail = "time chunk 1: RuntimeError: error during blosc decompression"
    else:  # blosc alone would decode the missing half from whatever memory follows the buffer
        chunk.write_bytes(data[: len(data) // 2])
        detail = rf"chunk file '.*1.0.0.0' holds {len(data) // 2} bytes but its blosc header says {len(data)}"
    dm = make_dm(store, tmp_path, normalize=False)
    dm.setup("validate")
    assert dm.datasets["val"][200]["input"].shape == (3, *GRID)  # times 566-567 sit in chunk 2: still readable
    with pytest.raises(StoreReadError, match=r"cannot read variable 'geopotential_500' at time index 366 "
                       rf"\(2001-01-01T00:00\) of ERA5 store '.*era5.zarr': {detail}.*; the data there is truncated or "
                       "corrupt .* regenerate the store again, or choose years that avoid that time"):
        dm.datasets["val"][0]
    with pytest.raises(StoreReadError, match=r"'geopotential_500' at time index 256 \(2000-09-13T00:00\)"):
        make_dm(store, tmp_path).prepare_data()  # the statistics pass reads the same chunk
    assert not (tmp_path / "stats.nc").exists() and leftovers(tmp_path) == []


def test_missing_zarr_chunk_reads_as_nan_and_is_named(zarr_store, tmp_path):
    store = shutil.copytree(zarr_store, tmp_path / "era5.zarr")
    (store / "temperature" / "2.0.0.0").unlink()  # zarr fills a missing chunk with the fill value, NaN
    dm = make_dm(store, tmp_path, normalize=False)
    dm.setup("validate")
    with pytest.raises(ValueError, match="NaN in variable 'temperature_850' at time 2001-05-27T00:00 of .*era5.zarr"):
        dm.datasets["val"][145]  # its target is time 512, the first of chunk 2


@pytest.mark.parametrize("damage", ["truncated", "not_netcdf"])
def test_damaged_netcdf_file_is_named_on_open(netcdf_store, tmp_path, damage):
    store = shutil.copytree(netcdf_store, tmp_path / "era5")
    bad = store / "era5_2001.nc"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        reason = r"OSError: \[Errno -101\] NetCDF: HDF error"
    else:  # a download that saved the server's error page
        bad.write_text("<html><body>403 Forbidden</body></html>\n")
        reason = "ValueError: did not find a match in any of xarray's currently installed IO backends"
    dm = make_dm(store, tmp_path)
    with pytest.raises(StoreReadError, match=rf"cannot open '.*era5_2001.nc' of ERA5 store '.*era5' \({reason}.*\); "
                       "the file is truncated, corrupt or not NetCDF/zarr/GRIB .* download or regenerate it"):
        dm.prepare_data()
    assert not (tmp_path / "stats.nc").exists()


# --- the statistics cache ---


def test_chosen_stats_path_that_cannot_be_written_fails_before_computing(zarr_store, tmp_path, monkeypatch):
    blocker = tmp_path / "read-only"
    blocker.write_text("")  # a file where the directory should be: unwritable even for root
    monkeypatch.setattr(stats_module, "compute_statistics", lambda *a, **k: pytest.fail("computed before the check"))
    dm = make_dm(zarr_store, tmp_path, stats_path=str(blocker / "stats.nc"))
    with pytest.raises(StatisticsCacheError, match=r"stats_path '.*read-only/stats.nc' does not exist and cannot be "
                       r"written \(.*\); point stats_path at a writable file, .* or leave stats_path unset"):
        dm.setup("fit")


def test_crash_while_writing_statistics_leaves_no_partial_file(zarr_store, tmp_path, monkeypatch):
    def disk_full(self, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89HDF\r\n\x1a\n half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", disk_full)
    with pytest.raises(StatisticsCacheError, match=r"stats_path '.*stats.nc' does not exist and cannot be written "
                       r"\(\[Errno 28\] No space left on device\)"):
        make_dm(zarr_store, tmp_path).prepare_data()
    assert not (tmp_path / "stats.nc").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    make_dm(zarr_store, tmp_path).prepare_data()
    assert xr.open_dataset(tmp_path / "stats.nc").sizes["field"] == 3


@pytest.mark.parametrize("damage", ["truncated", "not_netcdf"])
def test_damaged_statistics_file_is_recomputed(zarr_store, tmp_path, damage):
    first = make_dm(zarr_store, tmp_path)
    first.prepare_data()
    stats_file = tmp_path / "stats.nc"
    data = stats_file.read_bytes()
    stats_file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a NetCDF file\n")
    again = make_dm(zarr_store, tmp_path)
    with pytest.warns(
        UserWarning, match=r"statistics file .*stats.nc is unreadable \(.*\); recomputing it .* delete it"
    ):
        again.prepare_data()
    assert again.mean == first.mean
    np.testing.assert_array_equal(again.climatology, first.climatology)
    assert xr.open_dataset(stats_file).sizes["field"] == 3 and leftovers(tmp_path) == []


# --- the synthetic writer ---


def interrupt_second_year(monkeypatch):
    original, calls = synthetic_module.make_year, []

    def make_year(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the store
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic_module, "make_year", make_year)


@pytest.mark.parametrize("format", ["zarr", "netcdf"])
def test_interrupted_synthetic_write_leaves_nothing(tmp_path, monkeypatch, format):
    interrupt_second_year(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_era5(
            tmp_path / "era5.zarr", years=[2000, 2001], step_hours=24, grid=GRID, format=format, progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_synthetic_store_is_replaced_only_when_asked_and_only_when_whole(tmp_path, monkeypatch):
    path = write_synthetic_era5(tmp_path / "era5.zarr", years=[2000], step_hours=24, grid=GRID, progress=False)
    with pytest.raises(
        FileExistsError, match="era5.zarr already exists; pass overwrite=True .* or choose another path"
    ):
        write_synthetic_era5(path, years=[2000, 2001], step_hours=24, grid=GRID, progress=False)
    interrupt_second_year(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_era5(path, years=[2000, 2001], step_hours=24, grid=GRID, overwrite=True, progress=False)
    assert xr.open_zarr(path).sizes["time"] == 366 and leftovers(tmp_path) == []  # the old store, untouched
    monkeypatch.undo()
    write_synthetic_era5(path, years=[2000, 2001], step_hours=24, grid=GRID, overwrite=True, progress=False)
    assert xr.open_zarr(path).sizes["time"] == 731 and leftovers(tmp_path) == []


# --- recipes ---


def test_recipe_with_a_misspelt_data_key_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from lightning_seqpar.weather.cli import main

    monkeypatch.setattr(sys, "argv", ["seqpar"])  # LightningCLI warns about pytest's own arguments
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text((RECIPES / "quickstart.yaml").read_text().replace("train_years:", "train_yeras:"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 2
    assert "Group 'data' does not accept option 'train_yeras'" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["quickstart.yaml"]  # no store written for a bad config
