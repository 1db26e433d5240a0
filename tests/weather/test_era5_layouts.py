"""ERA5 as people download it: current CDS NetCDF, ERA5/ERA5T mixes, fixed NaN masks, WeatherBench v1 folders, GRIB
without its extra, files that disagree; each on small files written here in the shape (dims, attributes) of the real
ones."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from lightning_seqpar.weather.data import ERA5DataModule, ERA5Store, StoreReadError

LAT_DESC = np.array([67.5, 22.5, -22.5, -67.5])  # the CDS writes latitude north to south
LON = np.arange(8) * 45.0
TIMES = pd.date_range("2024-06-01", periods=8, freq="D")
CDS_ATTRS = {
    "GRIB_centre": "ecmf",
    "GRIB_centreDescription": "European Centre for Medium-Range Weather Forecasts",
    "GRIB_subCentre": 0,
    "Conventions": "CF-1.7",
    "institution": "European Centre for Medium-Range Weather Forecasts",
    "history": '2024-10-01T10:00 GRIB to CDM+CF via cfgrib-0.9.14.1/ecCodes-2.36.0 with {"source": "data.grib"}',
}


def field(seed: int, shape: tuple[int, ...], offset: float) -> np.ndarray:
    return (offset + np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def cds_single_levels(expver: list[str] | None = None) -> xr.Dataset:
    """``t2m(valid_time, latitude, longitude)`` as the current CDS writes it (coords ``number``, ``expver``)."""
    t2m = xr.DataArray(
        field(0, (8, 4, 8), 288.0),
        dims=("valid_time", "latitude", "longitude"),
        attrs={
            "GRIB_paramId": 167,
            "GRIB_shortName": "2t",
            "units": "K",
            "long_name": "2 metre temperature",
            "standard_name": "unknown",
        },
    )
    coords = {"number": 0, "valid_time": TIMES, "latitude": LAT_DESC, "longitude": LON,
              "expver": ("valid_time", np.array(expver or ["0001"] * 8))}
    return xr.Dataset({"t2m": t2m}, coords=coords, attrs=CDS_ATTRS)


def cds_pressure_levels() -> xr.Dataset:
    """``z(valid_time, pressure_level, latitude, longitude)``, levels as requested (850 before 500)."""
    z = xr.DataArray(
        field(1, (8, 2, 4, 8), 0.0) * 500 + np.array([14_000.0, 55_000.0])[None, :, None, None],
        dims=("valid_time", "pressure_level", "latitude", "longitude"),
        attrs={"GRIB_paramId": 129, "GRIB_shortName": "z", "units": "m**2 s**-2", "long_name": "Geopotential"},
    )
    coords = {"number": 0, "valid_time": TIMES, "pressure_level": np.array([850.0, 500.0]), "latitude": LAT_DESC,
              "longitude": LON, "expver": ("valid_time", np.array(["0001"] * 8))}
    ds = xr.Dataset({"z": z.astype(np.float32)}, coords=coords, attrs=CDS_ATTRS)
    ds["pressure_level"].attrs = {"units": "hPa", "long_name": "pressure", "positive": "down"}
    return ds


def dm_for(path, tmp_path, variables, **kwargs) -> ERA5DataModule:
    kwargs = {
        "lead_time_hours": 24,
        "train_years": [2024],
        "normalize": False,
        "stats_path": str(tmp_path / "stats.nc"),
        **kwargs,
    }
    return ERA5DataModule(str(path), variables, **kwargs)


# --- 1. current CDS NetCDF ---


def test_current_cds_single_and_pressure_level_files(tmp_path, caplog):
    sfc, pl = cds_single_levels(["0001"] * 6 + ["0005"] * 2), cds_pressure_levels()
    sfc.to_netcdf(tmp_path / "data_stream-oper_stepType-instant.nc")
    pl.to_netcdf(tmp_path / "pressure_levels.nc")
    with caplog.at_level(logging.INFO):
        dm = dm_for(tmp_path, tmp_path, ["t2m", "z_500", "z_850"])
        assert dm.variables == ["2m_temperature", "geopotential_500", "geopotential_850"]
    assert "2 of 8 times of " in caplog.text and "are ERA5T (expver ['0005'])" in caplog.text
    assert dm.grid_shape == (4, 8) and dm.latitudes.tolist() == sorted(LAT_DESC) and dm.time_step_hours == 24
    dm.setup("fit")
    sample = dm.datasets["train"][3]
    np.testing.assert_array_equal(sample["input"][0].numpy(), sfc["t2m"].values[3, ::-1])
    np.testing.assert_array_equal(sample["input"][1].numpy(), pl["z"].values[3, 1, ::-1])  # 500 hPa is position 1
    np.testing.assert_array_equal(sample["input"][2].numpy(), pl["z"].values[3, 0, ::-1])
    np.testing.assert_array_equal(sample["target"][0].numpy(), sfc["t2m"].values[4, ::-1])
    # keep_first once gave a KeyError on such a pair of files: now they are simply two sources of different fields
    again = dm_for(tmp_path, tmp_path / "k", ["t2m", "z_500"], duplicate_times="keep_first")
    again.setup("fit")
    torch.testing.assert_close(again.datasets["train"][3]["input"], sample["input"][:2])


def test_current_cds_invariant_fields_as_static_channels(tmp_path):
    cds_single_levels().to_netcdf(tmp_path / "t2m.nc")
    invariant = cds_single_levels().isel(valid_time=[0]).drop_vars("t2m")  # the CDS gives them one time
    invariant["lsm"] = (("valid_time", "latitude", "longitude"), (field(5, (1, 4, 8), 0) > 0).astype(np.float32))
    invariant["z"] = (("valid_time", "latitude", "longitude"), field(6, (1, 4, 8), 3000.0))
    invariant.to_netcdf(tmp_path / "invariant.nc")
    dm = dm_for(tmp_path, tmp_path, ["t2m"], static_variables=["land_sea_mask", "geopotential_at_surface", "latitude"])
    dm.setup("fit")
    assert len(dm.store.times) == 8  # the one-time invariant file does not shrink the time axis
    sample = dm.datasets["train"][0]["input"]  # [1 + 3, H, W], not normalised here
    np.testing.assert_array_equal(sample[1].numpy(), invariant["lsm"].values[0, ::-1])
    np.testing.assert_array_equal(sample[2].numpy(), invariant["z"].values[0, ::-1])
    np.testing.assert_array_equal(sample[3].numpy()[:, 0], np.sort(LAT_DESC).astype(np.float32))
    with pytest.raises(KeyError, match="'2m_temperature' varies in time in .* list it under variables"):
        dm_for(tmp_path, tmp_path, ["t2m"], static_variables=["2m_temperature"]).variables


def test_current_cds_zip_download_is_named(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "download.nc", "w") as archive:
        archive.writestr("data_stream-oper_stepType-instant.nc", b"CDF")
    with pytest.raises(StoreReadError, match=r"download.nc' of ERA5 store .* is a zip archive, not NetCDF .* unzip it"):
        ERA5Store(str(tmp_path / "download.nc"))


# --- 2. ERA5 and ERA5T in one file (expver as a dimension) ---


def test_era5_and_era5t_are_merged_preferring_final_era5(tmp_path, caplog):
    values = field(2, (8, 2, 4, 8), 280.0)  # [time, expver, lat, lon]
    values[6:, 0] = np.nan  # final ERA5 (expver 1) ends at day 6
    values[:5, 1] = np.nan  # ERA5T (expver 5) starts at day 5: day 5 is in both, and ERA5 wins
    ds = xr.Dataset({"t2m": (("time", "expver", "latitude", "longitude"), values)},
                    coords={"time": TIMES, "expver": [1, 5], "latitude": LAT_DESC, "longitude": LON})
    ds.to_netcdf(tmp_path / "mixed.nc")
    with caplog.at_level(logging.INFO):
        dm = dm_for(tmp_path / "mixed.nc", tmp_path, ["t2m"])
        dm.setup("fit")
    assert "expver=['1', '5']; they are merged per time, preferring final ERA5 (expver 1)" in caplog.text
    expected = np.where(np.isnan(values[:, 0]), values[:, 1], values[:, 0])[:, ::-1]  # [time, lat, lon]
    got = np.stack(
        [dm.datasets["train"][i]["input"][0].numpy() for i in range(7)] + [dm.datasets["train"][6]["target"][0].numpy()]
    )
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(got[5], values[5, 0, ::-1]) and not np.array_equal(got[5], values[5, 1, ::-1])
    np.testing.assert_allclose(dm.mean["2m_temperature"], expected.astype(np.float64).mean(), rtol=1e-6)


# --- 3. a field with a fixed NaN mask ---


def sst_dataset(land: np.ndarray) -> xr.Dataset:
    sst = field(3, (8, 4, 8), 290.0)
    sst[:, land] = np.nan
    ds = cds_single_levels()
    ds["sst"] = (("valid_time", "latitude", "longitude"), sst, {"units": "K", "GRIB_shortName": "sst"})
    return ds


LAND = np.zeros((4, 8), bool)
LAND[1, 2:5] = LAND[2, 3] = True  # north to south, as written


def test_fixed_nan_mask_is_refused_with_the_option_that_fills_it(tmp_path):
    sst_dataset(LAND).to_netcdf(tmp_path / "sst.nc")
    with pytest.raises(
        ValueError,
        match=r"NaN in variable 'sea_surface_temperature' at time 2024-06-01T00:00: it is NaN on "
        r"the same 4 of 32 grid cells at every time read.* pass masked_variables=\['sea_surface_temperature'\]",
    ):
        dm_for(tmp_path / "sst.nc", tmp_path, ["t2m", "sst"], normalize=True).setup("fit")


def test_masked_field_is_filled_with_a_mask_channel_and_left_out_of_statistics(tmp_path):
    ds = sst_dataset(LAND)
    ds.to_netcdf(tmp_path / "sst.nc")
    dm = dm_for(tmp_path / "sst.nc", tmp_path, ["t2m", "sst"], masked_variables=["sst"], normalize=True)
    dm.setup("fit")
    assert dm.variables == ["2m_temperature", "sea_surface_temperature", "sea_surface_temperature_mask"]
    land = LAND[::-1].copy()  # latitude ascending
    sst = ds["sst"].values[:, ::-1].astype(np.float64)
    assert dm.mean["sea_surface_temperature"] == pytest.approx(np.nanmean(sst), rel=1e-9)
    assert dm.std["sea_surface_temperature"] == pytest.approx(np.nanstd(sst), rel=1e-6)
    sample = dm.datasets["train"][2]
    assert (
        sample["input"].shape == (3, 4, 8)
        and torch.isfinite(sample["input"]).all()
        and torch.isfinite(sample["target"]).all()
    )
    assert (sample["input"][1][torch.from_numpy(land)] == 0).all()  # filled with the train mean: 0 once normalised
    np.testing.assert_array_equal(sample["input"][2].numpy(), (~land).astype(np.float32))
    expected = (sst[2] - dm.mean["sea_surface_temperature"]) / dm.std["sea_surface_temperature"]
    np.testing.assert_allclose(sample["input"][1].numpy()[~land], expected[~land], atol=1e-4)
    np.testing.assert_array_equal(dm.out_valid_mask, np.stack([np.ones((4, 8)), ~land]).astype(np.float32))
    assert np.isfinite(dm.climatology).all()


def test_nan_outside_the_mask_is_still_an_error(tmp_path):
    ds = sst_dataset(LAND)
    ds["sst"][5, 0, 0] = np.nan  # a hole at one time, not land
    ds.to_netcdf(tmp_path / "sst.nc")
    with pytest.raises(
        ValueError, match=r"NaN in variable 'sea_surface_temperature' at time 2024-06-06T00:00; fill or drop"
    ):
        dm_for(tmp_path / "sst.nc", tmp_path, ["sst"], masked_variables=["sst"]).setup("fit")


def test_mask_is_left_out_of_loss_and_metrics():
    from lightning_seqpar.weather.forecast import latitude_weighted_mse
    from lightning_seqpar.weather.metrics import LatitudeWeightedACC, LatitudeWeightedRMSE, latitude_weights

    lat = np.array([-67.5, -22.5, 22.5, 67.5])
    target = torch.randn(3, 2, 4, 8, dtype=torch.float64)
    pred = target + 0.1 * torch.randn_like(target)
    valid = torch.ones(2, 4, 8)
    valid[1, 1:3, 2:5] = 0
    spoiled = pred.clone()
    spoiled[:, 1, 1:3, 2:5] += 1000.0  # anything on masked cells must not count
    w = latitude_weights(lat)[:, None].expand(4, 8) * valid[1].double()  # [H, W]
    expected = ((w * (pred[:, 1] - target[:, 1]) ** 2).sum(dim=(1, 2)) / w.sum()).sqrt().mean()
    for forecast in (pred, spoiled):
        rmse = LatitudeWeightedRMSE(["a", "b"], lat, [6], valid_mask=valid)
        rmse.update(forecast, target, 6.0)
        assert float(rmse.compute()["rmse/b/6h"]) == pytest.approx(float(expected), rel=1e-6)
        acc = LatitudeWeightedACC(["a", "b"], lat, [6], climatology=np.zeros((2, 4, 8)), valid_mask=valid)
        acc.update(forecast, target, 6.0)
        assert float(acc.compute()["acc/b/6h"]) > 0.99
    full = latitude_weighted_mse(pred, target, latitude_weights(lat))
    assert float(
        latitude_weighted_mse(pred, target, latitude_weights(lat), valid_mask=torch.ones(2, 4, 8))
    ) == pytest.approx(float(full))
    masked = [float(latitude_weighted_mse(f, target, latitude_weights(lat), valid_mask=valid)) for f in (pred, spoiled)]
    assert masked[0] == pytest.approx(masked[1]) and masked[0] != pytest.approx(float(full))
    unmasked = LatitudeWeightedRMSE(["a", "b"], lat, [6])
    unmasked.update(spoiled, target, 6.0)
    assert float(unmasked.compute()["rmse/b/6h"]) > 100  # without the mask the spoiled cells do count


def test_forecast_module_takes_the_mask_from_the_datamodule(tmp_path):
    from types import SimpleNamespace

    from lightning_seqpar.weather.forecast import ForecastModule
    from lightning_seqpar.weather.models import ClimaX

    sst_dataset(LAND).to_netcdf(tmp_path / "sst.nc")
    dm = dm_for(
        tmp_path / "sst.nc", tmp_path, ["t2m", "sst"], masked_variables=["sst"], normalize=True, val_years=[2024]
    )
    with pytest.warns(UserWarning, match="share years"):
        dm.setup("fit")
    model = ClimaX(dm.variables, dm.grid_shape, patch_size=2, embed_dim=16, depth=1, num_heads=2, decoder_depth=0)
    module = ForecastModule(model, residual=True)
    module.trainer = SimpleNamespace(datamodule=dm)
    module.setup("fit")
    torch.testing.assert_close(module.valid_mask, torch.from_numpy(dm.out_valid_mask))
    module.log = lambda *args, **kwargs: None  # no Trainer to log to
    batch = next(iter(dm.val_dataloader()))
    loss = module.training_step(batch, 0)
    spoiled = dict(batch, target=batch["target"].clone())
    spoiled["target"][:, 1][:, torch.from_numpy(LAND[::-1].copy())] += 100.0  # land cells of sst
    torch.testing.assert_close(module.training_step(spoiled, 0), loss)
    module._evaluate(spoiled, "val")
    assert float(module.skill["val"].metrics["model_rmse"].compute()["val/rmse/sea_surface_temperature/24h"]) < 10.0


# --- 4. WeatherBench v1: one folder per variable, yearly files, a constants file ---


def write_weatherbench_v1(root, years=(1979, 1980)) -> dict:
    """``<root>/<variable>/<variable>_<year>_5.625deg.nc`` with WeatherBench v1 names and a constants file."""
    lat, lon = np.linspace(-67.5, 67.5, 4), np.arange(8) * 45.0
    written = {}
    for year in years:
        time = pd.date_range(f"{year}-01-01", f"{year}-01-11", freq="D", inclusive="left")
        t2m = xr.Dataset({"t2m": (("time", "lat", "lon"), field(year, (10, 4, 8), 280.0))},
                         coords={"time": time, "lat": lat, "lon": lon})
        z500 = xr.Dataset({"z": (("time", "lat", "lon"), field(year + 1, (10, 4, 8), 54_000.0))},
                          coords={"time": time, "lat": lat, "lon": lon, "level": np.int32(500)})
        for name, ds, stem in (
            ("2m_temperature", t2m, "2m_temperature"),
            ("geopotential_500", z500, "geopotential_500hPa"),
        ):
            (root / name).mkdir(parents=True, exist_ok=True)
            ds.to_netcdf(root / name / f"{stem}_{year}_5.625deg.nc")
            written.setdefault(name, []).append(ds)
    constants = xr.Dataset(
        {
            "orography": (("lat", "lon"), field(7, (4, 8), 500.0)),
            "lsm": (("lat", "lon"), (field(8, (4, 8), 0) > 0).astype(np.float32)),
            "slt": (("lat", "lon"), np.ones((4, 8), np.float32)),
            "lat2d": (("lat", "lon"), np.repeat(lat[:, None], 8, 1)),
            "lon2d": (("lat", "lon"), np.repeat(lon[None, :], 4, 0)),
        },
        coords={"lat": lat, "lon": lon},
        attrs={"Conventions": "CF-1.6"},
    )
    (root / "constants").mkdir()
    constants.to_netcdf(root / "constants" / "constants_5.625deg.nc")
    written["constants"] = constants
    return written


def test_weatherbench_v1_root_with_constants_as_static_channels(tmp_path):
    data = write_weatherbench_v1(tmp_path / "wb")
    dm = dm_for(tmp_path / "wb", tmp_path, ["2m_temperature", "geopotential_500"], train_years=[1979], val_years=[1980],
                static_variables=["land_sea_mask", "orography", "lat2d"], normalize=True)
    assert dm.variables == ["2m_temperature", "geopotential_500", "land_sea_mask", "orography", "lat2d"]
    dm.setup("fit")
    sample = dm.datasets["val"][4]
    assert sample["input"].shape == (5, 4, 8) and int(sample["index"]) == 14
    raw = data["geopotential_500"][1]["z"].values[4]
    np.testing.assert_allclose(
        sample["input"][1].numpy() * dm.std["geopotential_500"] + dm.mean["geopotential_500"], raw, rtol=1e-6
    )
    orography = data["constants"]["orography"].values.astype(np.float64)
    np.testing.assert_allclose(
        sample["input"][3].numpy(), (orography - orography.mean()) / orography.std(), rtol=1e-5, atol=1e-6
    )
    assert dm.static_mean["orography"] == pytest.approx(float(orography.mean()))
    torch.testing.assert_close(sample["input"][2:], dm.datasets["train"][0]["input"][2:])  # static: the same every time
    assert sample["target"].shape == (2, 4, 8)


def test_weatherbench_v1_errors_name_what_to_do(tmp_path):
    write_weatherbench_v1(tmp_path / "wb")
    with pytest.raises(ValueError, match=r"constants_5.625deg.nc' has no time-dependent variable .* static fields "
                       r"\['land_sea_mask', 'lat2d', 'lon2d', 'orography', 'soil_type'\]: add the folders"):
        ERA5Store(str(tmp_path / "wb" / "constants" / "constants_5.625deg.nc"))
    with pytest.raises(
        KeyError, match=r"static field 'sea_ice' not in .* it has \['land_sea_mask', .*'latitude', 'longitude'\]"
    ):
        dm_for(tmp_path / "wb", tmp_path, ["t2m"], static_variables=["sea_ice"]).variables
    with pytest.raises(KeyError, match=r"variable 'orography' not in .* static fields \(for static_variables\)"):
        dm_for(tmp_path / "wb", tmp_path, ["orography"]).variables
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"matches no NetCDF .* one folder down \(WeatherBench v1 layout.* holds \['sub'\]"
    ):
        ERA5Store(str(tmp_path / "empty"))


def test_years_from_file_names_for_relabelled_yearly_files(tmp_path):
    ds = xr.Dataset(
        {"t2m": (("time", "lat", "lon"), field(9, (5, 4, 8), 280.0))},
        coords={"time": pd.date_range("2000-01-01", periods=5, freq="7D"), "lat": np.linspace(-60, 60, 4), "lon": LON},
    )
    for year in (1980, 1981):
        (ds + (year - 1980)).to_netcdf(tmp_path / f"2m_temperature_{year}_5.625deg.nc")
    with pytest.raises(
        ValueError,
        match=r"5 times of .*1981_5.625deg.nc.* already in an earlier file .* the file names give "
        r"years \[1980, 1981\] but their times fall in \[2000\]: .* years_from_file_names=True",
    ):
        ERA5Store(str(tmp_path))
    store = ERA5Store(str(tmp_path), years_from_file_names=True)
    assert (
        str(store.times[0])[:10] == "1980-01-01"
        and str(store.times[5])[:10] == "1981-01-01"
        and store.step_hours == 168
    )
    np.testing.assert_array_equal(store.read(["t2m"], np.array([6]))[0, 0], ds["t2m"].values[1] + 1)


# --- 5. GRIB without the `grib` extra ---


def test_grib_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cfgrib", None)  # import cfgrib now raises ImportError
    (tmp_path / "era5.grib").write_bytes(b"GRIB" + bytes(100))
    (tmp_path / "download").write_bytes(b"GRIB" + bytes(100))  # no extension: recognised by its first bytes
    for name in ("era5.grib", "download"):
        with pytest.raises(
            StoreReadError,
            match=rf"{name}' of ERA5 store .* is GRIB, and reading GRIB needs the optional "
            r"extra `grib` .* not installed: pip install 'lightning-seqpar\[grib\]'",
        ):
            ERA5Store(str(tmp_path / name))


# --- 6. files of one store that disagree ---


def test_files_on_other_grids_are_refused_naming_both_files(tmp_path):
    cds_single_levels().to_netcdf(tmp_path / "a.nc")
    other = cds_single_levels().assign_coords(valid_time=TIMES + pd.Timedelta(days=8))
    other.assign_coords(latitude=LAT_DESC + 1.0).to_netcdf(tmp_path / "b.nc")
    with pytest.raises(
        ValueError,
        match=r"files '.*a.nc' and '.*b.nc' of store .* disagree on 'latitude': 4 values -67.5 .. "
        r"67.5 .* against 4 values -66.5 .. 68.5.* regrid the odd file",
    ):
        ERA5Store(str(tmp_path))
    other.assign_coords(latitude=LAT_DESC).to_netcdf(tmp_path / "b.nc")
    other["t2m"].attrs["units"] = "degC"
    other.to_netcdf(tmp_path / "b.nc")
    with pytest.raises(ValueError, match=r"disagree on 'units of 2m_temperature': 'K' against 'degC'"):
        ERA5Store(str(tmp_path))


def test_later_files_are_read_by_their_own_coordinates(tmp_path):
    first = cds_pressure_levels()
    second = first.assign_coords(valid_time=TIMES + pd.Timedelta(days=8))
    second = second.isel(pressure_level=[1, 0])  # levels 500, 850: the other order
    second = second.assign_coords(longitude=((second["longitude"] + 180) % 360) - 180).sortby("longitude")  # -180..180
    first.to_netcdf(tmp_path / "a.nc")
    second.to_netcdf(tmp_path / "b.nc")
    store = ERA5Store(str(tmp_path))
    assert store.longitudes.tolist() == LON.tolist() and len(store.times) == 16
    got = store.read(["z_500", "z_850"], np.array([2, 10]))  # [T, V, H, W]
    np.testing.assert_array_equal(got[0, 0], first["z"].values[2, 1, ::-1])
    in_0_360 = second["z"].assign_coords(longitude=second["longitude"] % 360).sortby("longitude")
    assert in_0_360["longitude"].values.tolist() == LON.tolist()
    np.testing.assert_array_equal(got[1, 0], in_0_360.sel(pressure_level=500).values[2, ::-1])
    np.testing.assert_array_equal(got[1, 1], in_0_360.sel(pressure_level=850).values[2, ::-1])


# --- issue 24: reads that cost what they read (multi-time zarr chunks) ---


def write_chunked_zarr(path, time_chunk: int):
    time = pd.date_range("2001-01-01", periods=128, freq="D")
    ds = xr.Dataset({"2m_temperature": (("time", "latitude", "longitude"), field(11, (128, 4, 8), 280.0))},
                    coords={"time": time, "latitude": np.linspace(-60, 60, 4), "longitude": LON})
    ds.to_zarr(path, encoding={"2m_temperature": {"chunks": (time_chunk, 4, 8)}}, zarr_format=2, consolidated=True)
    return ds


def count_chunk_reads(monkeypatch) -> list[str]:
    """Every key zarr reads from a local store, in order (the chunk files of the arrays among them)."""
    import zarr.storage

    keys, original = [], zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):
        keys.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    return keys


def test_samples_sharing_a_time_chunk_decode_it_once(tmp_path, monkeypatch):
    ds = write_chunked_zarr(tmp_path / "era5.zarr", time_chunk=32)
    keys = count_chunk_reads(monkeypatch)
    dm = dm_for(tmp_path / "era5.zarr", tmp_path, ["t2m"], train_years=[2001])
    dm.setup("fit")
    train = dm.datasets["train"]
    keys.clear()
    order = np.random.default_rng(0).permutation(len(train))  # an epoch in random order
    samples = [train[int(n)] for n in order]
    chunk_reads = [k for k in keys if k.startswith("2m_temperature/") and not k.endswith((".zarray", ".zattrs"))]
    assert len(chunk_reads) == 4 and dm.store.chunk_cache.decodes == 4  # 128 times in 4 chunks, each read once
    for n, sample in zip(order, samples):
        np.testing.assert_array_equal(sample["target"][0].numpy(), ds["2m_temperature"].values[int(n) + 1])
    uncached = dm_for(tmp_path / "era5.zarr", tmp_path, ["t2m"], train_years=[2001], chunk_cache_mb=0)
    uncached.setup("fit")
    keys.clear()
    for n in order[:10]:
        uncached.datasets["train"][int(n)]
    assert len([k for k in keys if k.startswith("2m_temperature/") and not k.endswith((".zarray", ".zattrs"))]) >= 10


def test_chunks_too_large_for_the_cache_warn_with_the_rechunk_command(tmp_path):
    from lightning_seqpar.weather.data import rechunk_time

    ds = write_chunked_zarr(tmp_path / "era5.zarr", time_chunk=64)
    dm = dm_for(
        tmp_path / "era5.zarr", tmp_path, ["t2m"], train_years=[2001], chunk_cache_mb=0.01
    )  # 10 KiB < 2 x 8 KiB
    with pytest.warns(
        UserWarning,
        match=r"2m_temperature in '.*era5.zarr' is stored in chunks of 64 times .* about 64 times "
        r"over. Rechunk it to one time per chunk: python -m lightning_seqpar.weather.data.chunks .*era5.zarr "
        r".*era5-time1.zarr",
    ):
        dm.setup("fit")
        dm.datasets["train"][0]
    rechunk_time(str(tmp_path / "era5.zarr"), str(tmp_path / "era5-time1.zarr"))
    copy = xr.open_zarr(tmp_path / "era5-time1.zarr", chunks=None)
    assert copy["2m_temperature"].encoding["chunks"] == (1, 4, 8)
    np.testing.assert_array_equal(copy["2m_temperature"].values, ds["2m_temperature"].values)
