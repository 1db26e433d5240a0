"""The synthetic ERA5 writer: WeatherBench2 layout, physical magnitudes, determinism, learnable dynamics, and its
CLI."""

import runpy
import sys

import numpy as np
import pytest
import xarray as xr

from lightning_seqpar.weather.data.synthetic import (
    DAMPING_DAYS,
    EARTH_RADIUS_M,
    eastward_shift,
    iter_synthetic_years,
    main,
    write_synthetic_era5,
    zonal_wind,
)

GRID = (16, 32)


@pytest.fixture(scope="module")
def year():
    return next(iter_synthetic_years(years=[2000], step_hours=6, grid=GRID, seed=3))


def test_weatherbench2_layout_and_units(year):
    assert dict(year.sizes) == {"time": 1464, "level": 2, "latitude": 16, "longitude": 32}
    assert year["geopotential"].dims == ("time", "level", "latitude", "longitude")
    assert year["2m_temperature"].dims == ("time", "latitude", "longitude")
    assert year["level"].values.tolist() == [500, 850]
    lat = year["latitude"].values
    assert np.all(np.diff(lat) > 0) and lat[0] == pytest.approx(-84.375)
    assert np.diff(year["time"].values)[0] == np.timedelta64(6, "h")
    assert year["geopotential"].attrs["units"] == "m**2 s**-2" and year["2m_temperature"].attrs["units"] == "K"
    assert all(year[v].dtype == np.float32 for v in year.data_vars)


def test_physical_magnitudes(year):
    z = year["geopotential"]
    assert 40_000 < float(z.sel(level=500).min()) and float(z.sel(level=500).max()) < 65_000
    assert 8_000 < float(z.sel(level=850).min()) and float(z.sel(level=850).max()) < 20_000
    assert 200 < float(year["2m_temperature"].min()) and float(year["2m_temperature"].max()) < 330
    assert float(abs(year["10m_u_component_of_wind"]).max()) < 40


def test_deterministic_given_seed():
    a = next(iter_synthetic_years(years=[2000], step_hours=24, grid=(8, 16), seed=1))
    b = next(iter_synthetic_years(years=[2000], step_hours=24, grid=(8, 16), seed=1))
    c = next(iter_synthetic_years(years=[2000], step_hours=24, grid=(8, 16), seed=2))
    xr.testing.assert_identical(a, b)
    assert not np.allclose(a["geopotential"].values, c["geopotential"].values)


def test_advection_operator_beats_persistence(year):
    """The anomaly (field minus its zonal mean) at t+1 is the eastward-shifted, damped anomaly at t, plus small
    noise."""
    z = year["geopotential"].sel(level=500).values.astype(np.float64)  # [T, H, W]
    anomaly = z - z.mean(axis=2, keepdims=True)
    lat = year["latitude"].values
    cells = (
        zonal_wind(lat, 500)
        * 6
        * 3600
        / (EARTH_RADIUS_M * np.maximum(np.cos(np.deg2rad(lat)), 0.2))
        / (2 * np.pi / GRID[1])
    )
    damping = np.exp(-6 / (24 * DAMPING_DAYS))
    predicted = np.stack([damping * eastward_shift(a, cells) for a in anomaly[:-1]])
    model_rmse = np.sqrt(np.mean((predicted - anomaly[1:]) ** 2))
    persistence_rmse = np.sqrt(np.mean((anomaly[:-1] - anomaly[1:]) ** 2))
    assert persistence_rmse > 100.0  # m^2/s^2: the field moves
    assert model_rmse < 0.5 * persistence_rmse


def test_eastward_shift_moves_east():
    row = np.zeros((1, 16))
    row[0, 3] = 1.0
    np.testing.assert_allclose(eastward_shift(row, np.array([2.0])), np.roll(row, 2, axis=1), atol=1e-12)


def test_diurnal_cycle_follows_local_solar_time(year):
    t2m = year["2m_temperature"]
    equator = t2m.isel(latitude=[7, 8]).mean("latitude")
    zonal_anomaly = equator - equator.mean("longitude")
    for hour in (0, 12):
        warmest = float(zonal_anomaly.sel(time=t2m["time"].dt.hour == hour).mean("time").idxmax("longitude"))
        expected = ((14 - hour) * 15.0) % 360.0  # where the local time is 14:00
        assert min(abs(warmest - expected), 360 - abs(warmest - expected)) <= 30.0


def test_seasonal_cycle_opposite_in_the_hemispheres(year):
    t2m = year["2m_temperature"]
    north, south = (
        t2m.sel(latitude=slice(40, 70)).mean(("latitude", "longitude")),
        t2m.sel(latitude=slice(-70, -40)).mean(("latitude", "longitude")),
    )
    july, january = t2m["time"].dt.month == 7, t2m["time"].dt.month == 1
    assert float(north[july].mean() - north[january].mean()) > 10.0
    assert float(south[january].mean() - south[july].mean()) > 10.0


def test_weather_carries_over_between_years():
    first, second = iter_synthetic_years(years=[2000, 2001], step_hours=24, grid=(8, 16))
    z = xr.concat([first, second], "time")["geopotential"].sel(level=500).values
    jump = np.abs(z[366] - z[365]).mean()
    typical = np.abs(np.diff(z[300:366], axis=0)).mean()
    assert jump < 2 * typical


def test_writer_errors(tmp_path):
    with pytest.raises(ValueError, match="step_hours=5 must divide 24"):
        next(iter_synthetic_years(step_hours=5))
    with pytest.raises(ValueError, match=r"levels \[700\] not supported; choose a non-empty subset of \[500, 850\]"):
        next(iter_synthetic_years(levels=[700]))
    with pytest.raises(ValueError, match=r"years must be consecutive, got \[2000, 2002\]"):
        next(iter_synthetic_years(years=[2000, 2002]))
    with pytest.raises(ValueError, match=r"grid \(2, 4\) too small"):
        next(iter_synthetic_years(grid=(2, 4)))
    with pytest.raises(ValueError, match="format='grib' not supported"):
        write_synthetic_era5(tmp_path / "x", format="grib")


def test_cli_writes_zarr_and_netcdf(tmp_path, capsys):
    assert main([str(tmp_path / "s.zarr"), "--years", "2000", "--step-hours", "24", "--grid", "8", "16"]) == 0
    assert "wrote 2000 (366 steps)" in capsys.readouterr().err
    ds = xr.open_zarr(tmp_path / "s.zarr")
    assert ds.sizes["time"] == 366 and ds.sizes["latitude"] == 8
    assert main([str(tmp_path / "s.zarr"), "--years", "2000", "--quiet"]) == 2
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main([str(tmp_path / "nc"), "--years", "2000-2001", "--step-hours", "24", "--grid", "8", "16",
                 "--format", "netcdf", "--latitude-order", "descending", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "nc").iterdir()) == ["era5_2000.nc", "era5_2001.nc"]
    assert xr.open_dataset(tmp_path / "nc" / "era5_2001.nc")["latitude"].values[0] > 0


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # this test module imported it already
def test_module_runs_with_help(monkeypatch, capsys):
    """``python -m lightning_seqpar.weather.data.synthetic --help``, run in this process to skip a second interpreter
    start."""
    monkeypatch.setattr(sys, "argv", ["synthetic", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_seqpar.weather.data.synthetic", run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "WeatherBench2 layout" in out and "--step-hours" in out
