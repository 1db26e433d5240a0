"""What the test figures show: every field with units and dates on a 2:1 globe with coastlines, and RMSE skill against
persistence that stays readable next to climatology; the bundled land-sea mask; the forecast file's CF layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from matplotlib.contour import ContourSet

from lightning_seqpar.weather.forecast_io import (
    _write_netcdf,
    display_units,
    field_long_name,
    field_units,
    forecasts_dataset,
    land_sea_mask,
)
from lightning_seqpar.weather.landmask import bundled_land_sea_mask
from lightning_seqpar.weather.plots import forecast_map_figure, rmse_figure

LAT = -87.1875 + 5.625 * np.arange(32)  # WeatherBench 5.625 deg cell centres
LON = 5.625 * np.arange(64)
CONSTANTS = (
    Path(__file__).resolve().parents[1]
    / "data/era5-sample/weatherbench_5.625deg_wxbtool/constants/constants_5.625deg.nc"
)


def _map(fields=("2m_temperature", "geopotential_500"), units=("K", "m**2 s**-2")):
    rng = np.random.default_rng(0)
    truth = rng.normal(280.0, 10.0, (len(fields), 32, 64))
    land = (bundled_land_sea_mask(LAT, LON), LAT, LON)
    return forecast_map_figure(truth + 1.0, truth, LAT, LON, list(fields), list(units), "2002-01-01T00:00", 6.0, land,
                               title="ClimaX forecast")


def test_forecast_map_draws_every_field_with_units_dates_and_the_whole_globe():
    fig = _map()
    fig.canvas.draw()
    assert fig.get_suptitle() == "ClimaX forecast from 2002-01-01 00:00 UTC, valid 2002-01-01 06:00 UTC (+6 h)"
    maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert [ax.get_title() for ax in maps] == [
        "2m temperature: truth", "2m temperature: forecast", "forecast - truth (RMSE 1 K)",
        "geopotential at 500 hPa: truth", "geopotential at 500 hPa: forecast", "forecast - truth (RMSE 1 m² s⁻²)"]
    # one shared bar for truth and forecast, one for the error, per field: none repeated
    assert [ax.get_ylabel() for ax in bars] == ["2m temperature [K]", "error [K]",
                                                "geopotential at 500 hPa [m² s⁻²]", "error [m² s⁻²]"]
    for ax in maps:
        assert ax.get_xlim() == pytest.approx((-2.8125, 357.1875))  # whole cells: 360 deg, not 354.4
        assert ax.get_ylim() == pytest.approx((-90.0, 90.0))
        box = ax.get_window_extent()
        assert box.width / box.height == pytest.approx(2.0, rel=0.02)  # the globe is 2:1
        assert any(isinstance(c, ContourSet) for c in ax.get_children())  # coastlines
    assert maps[0].get_xticklabels()[1].get_text() == "60°E" and maps[0].get_yticklabels()[0].get_text() == "90°S"


def test_forecast_map_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must both be \[V=1, H=32, W=64\], with 1 units"):
        forecast_map_figure(np.zeros((1, 32, 63)), np.zeros((1, 32, 63)), LAT, LON, ["t2m"], ["K"], "2002-01-01", 6.0)


RMSE_ONE_LEAD = {
    "2m_temperature": {"model": {6.0: 0.91}, "persistence": {6.0: 4.96}, "climatology": {6.0: 6.1}},
    "geopotential_500": {"climatology": {6.0: 1100.0}, "model": {6.0: 356.0}, "persistence": {6.0: 376.0}},
}


def test_rmse_with_one_lead_time_is_a_bar_chart_with_skill_against_persistence():
    fig = rmse_figure(RMSE_ONE_LEAD, {"2m_temperature": "K", "geopotential_500": "m**2 s**-2"})
    t2m, z500 = fig.axes
    assert t2m.get_title() == "2m temperature, +6 h" and t2m.get_ylabel() == "RMSE [K]"
    assert z500.get_ylabel() == "RMSE [m² s⁻²]"
    assert [label.get_text() for label in z500.get_xticklabels()] == ["model", "persistence", "climatology"]
    heights = [bar.get_height() for bar in z500.patches]
    # model and persistence set the axis: 356 vs 376 stays distinguishable; climatology is clipped and labelled
    assert heights[:2] == [356.0, 376.0] and z500.get_ylim()[1] == pytest.approx(376.0 * 1.25)
    assert heights[2] == z500.get_ylim()[1]
    texts = [t.get_text() for t in z500.texts]
    assert "1,100 ↑" in texts and "model RMSE 5% below persistence" in texts
    assert "model RMSE 82% below persistence" in [t.get_text() for t in t2m.texts]
    assert not fig.legends  # the bars are labelled on the axis


def test_rmse_with_several_lead_times_is_lines_with_a_legend_of_what_is_drawn():
    rmse = {
        "2m_temperature": {
            "model": {6.0: 1.0, 24.0: 2.0, 72.0: 3.0},
            "persistence": {6.0: 4.0, 24.0: 5.0, 72.0: 6.0},
            "climatology": {6.0: 40.0, 24.0: 41.0, 72.0: 42.0},
        }
    }
    fig = rmse_figure(rmse, {"2m_temperature": "K"})
    [ax] = fig.axes
    assert list(ax.get_xticks()) == [6.0, 24.0, 72.0] and ax.get_xlabel() == "lead time [h]"
    assert ax.get_ylim()[1] == pytest.approx(6.0 * 1.25)
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["model", "persistence", "climatology"]
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert [h.get_linestyle() for h in legend.legend_handles] == [
        styles["model"],
        styles["persistence"],
        styles["climatology"],
    ]
    assert "climatology off scale: 40 to 42" in [t.get_text() for t in ax.texts]


def test_rmse_figure_needs_values():
    with pytest.raises(ValueError, match="no RMSE values"):
        rmse_figure({})


def test_bundled_land_sea_mask_is_era5s():
    lsm = xr.open_dataset(CONSTANTS)["lsm"]  # [32, 64], latitude ascending
    assert np.abs(bundled_land_sea_mask(lsm["lat"].values, lsm["lon"].values) - lsm.values).max() < 1 / 30 + 1e-6
    mask = bundled_land_sea_mask(np.array([-80.0, 0.0, 10.0]), np.array([20.0, 340.0, -10.0]))  # [3, 3]
    assert mask[0, 0] > 0.9  # Antarctica
    assert mask[1, 1] < 0.1 and mask[1, 2] == mask[1, 1]  # Atlantic; -10 deg E is 350 deg E
    assert mask[2, 0] > 0.9  # Chad


class _StoreModule:
    """What field_units and land_sea_mask read: a datamodule with a store."""

    def __init__(self, path):
        from lightning_seqpar.weather.data.store import ERA5Store

        self.store = ERA5Store(str(path))


def test_units_come_from_the_store_else_from_era5(tmp_path):
    ds = xr.open_dataset(CONSTANTS).rename(lat="latitude", lon="longitude")
    time = np.array(["2000-01-01T00", "2000-01-01T06"], "datetime64[ns]")
    store = xr.Dataset(
        {
            "t2m": (("time", "latitude", "longitude"), np.zeros((2, 32, 64), np.float32)),
            "u_component_of_wind": (
                ("time", "latitude", "longitude"),
                np.zeros((2, 32, 64), np.float32),
                {"units": "knots"},
            ),
            "lsm": ds["lsm"],
        },
        coords={"time": time, "latitude": ds["latitude"], "longitude": ds["longitude"]},
    )
    store.to_netcdf(tmp_path / "store.nc")
    dm = _StoreModule(tmp_path / "store.nc")
    assert field_units(dm, "2m_temperature") == "K"  # no attribute: ERA5's
    assert field_units(dm, "u_component_of_wind") == "knots"  # the store's own
    assert field_units(None, "geopotential_500") == "m**2 s**-2" and display_units("m s**-1") == "m s⁻¹"
    assert field_long_name("10m_u_component_of_wind") == "10m u component of wind"
    # the store harmonises ERA5's short name lsm to WeatherBench2's land_sea_mask
    (mask, lat, lon), source = land_sea_mask(dm, LAT, LON)
    assert source == "the store's 'land_sea_mask'" and mask.shape == (32, 64)
    _, source = land_sea_mask(None, LAT, LON)
    assert source == "ERA5's 5.625 deg mask (bundled)"


def test_forecast_file_follows_cf_conventions(tmp_path):
    init = np.array(["2002-01-01T00", "2002-01-01T06"], "datetime64[ns]")
    forecast = np.arange(2 * 2 * 1 * 32 * 64, dtype=np.float32).reshape(2, 2, 1, 32, 64)  # [T, K, V, H, W]
    _write_netcdf(
        forecasts_dataset(forecast, init, np.array([6.0, 24.0]), ["2m_temperature"], LAT, LON, {"2m_temperature": "K"}),
        tmp_path / "f.nc",
    )
    raw = xr.open_dataset(tmp_path / "f.nc", decode_times=False, decode_timedelta=False)
    assert (
        raw["time"].attrs["units"] == "hours since 1970-01-01" and raw["prediction_timedelta"].attrs["units"] == "hours"
    )
    assert raw["prediction_timedelta"].attrs["standard_name"] == "forecast_period"
    ds = xr.open_dataset(tmp_path / "f.nc", decode_timedelta=True)
    assert ds.attrs["Conventions"] == "CF-1.8"
    assert ds["valid_time"].values[1, 1] == np.datetime64("2002-01-02T06:00")
    assert ds["2m_temperature"].attrs == {"units": "K", "long_name": "forecast of 2m temperature"}
    np.testing.assert_array_equal(ds["2m_temperature"].values, forecast[:, :, 0])
