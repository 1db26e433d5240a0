"""ERA5DataModule on real ERA5 files shipped in tests/data/era5-sample (see its SOURCE.md): WeatherBench 5.625 deg t2m
and an ensemble GRIB."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from lightning_seqpar.weather.data import ERA5DataModule
from lightning_seqpar.weather.metrics import evaluate_baselines

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "era5-sample"
T2M_DIR = SAMPLE / "weatherbench_5.625deg_wxbtool" / "2m_temperature"
T2M_1980 = T2M_DIR / "2m_temperature_1980_5.625deg.nc"
CONSTANTS = SAMPLE / "weatherbench_5.625deg_wxbtool" / "constants" / "constants_5.625deg.nc"
GRIB = SAMPLE / "global_3deg_ensemble_cfgrib" / "era5-levels-members.grib"
WEEK = 168


def weekly_dm(path, tmp_path, **kwargs):
    kwargs = {"variables": ["t2m"], "lead_time_hours": WEEK, "train_years": [2000], "batch_size": 8,
              "stats_path": str(tmp_path / "stats.nc"), **kwargs}
    return ERA5DataModule(str(path), **kwargs)


def test_weatherbench_t2m_file_reads(tmp_path):
    dm = weekly_dm(T2M_1980, tmp_path)
    assert dm.variables == ["2m_temperature"] and dm.grid_shape == (32, 64)
    assert dm.latitudes[0] == pytest.approx(-87.1875) and np.all(np.diff(dm.latitudes) > 0)
    assert dm.longitudes[-1] == pytest.approx(354.375)
    assert dm.time_step_hours == WEEK and dm.store.levels == []
    dm.setup("fit")
    assert 270 < dm.mean["2m_temperature"] < 285 and 10 < dm.std["2m_temperature"] < 30
    climatology = dm.climatology  # [1, 32, 64] K
    assert (
        climatology.shape == (1, 32, 64) and climatology[0, 16].mean() > climatology[0, 1].mean() + 20
    )  # tropics warmer than the pole
    train = dm.datasets["train"]
    assert len(train) == 52
    sample = train[0]
    assert sample["input"].shape == (1, 32, 64) and float(sample["lead_time_hours"]) == WEEK
    assert abs(float(sample["input"].mean())) < 1.0 and torch.isfinite(sample["target"]).all()


def test_weekly_autocorrelation_makes_persistence_skilful(tmp_path):
    dm = weekly_dm(T2M_1980, tmp_path, val_years=[2000], batch_size=16)
    with pytest.warns(UserWarning, match=r"train and val splits share years \[2000\]; val scores will be optimistic"):
        dm.setup("fit")
    result = evaluate_baselines(dm)
    assert 0.5 < float(result["persistence/rmse/2m_temperature/168h"]) < 10.0  # K
    assert float(result["persistence/acc/2m_temperature/168h"]) > 0.3


def test_statistics_written_once(tmp_path):
    weekly_dm(T2M_1980, tmp_path).setup("fit")
    stamp = os.stat(tmp_path / "stats.nc").st_mtime_ns
    weekly_dm(T2M_1980, tmp_path).setup("fit")
    assert os.stat(tmp_path / "stats.nc").st_mtime_ns == stamp


def test_shared_time_axis_across_files_is_an_error(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"53 times of .*1981_5.625deg.nc.* already in an earlier file .* duplicate_times="
        r"'keep_first'; the file names give years \[1980, 1981, 1982\] but their times fall in \[2000\]",
    ):
        weekly_dm(T2M_DIR, tmp_path).grid_shape
    dm = weekly_dm(T2M_DIR, tmp_path, duplicate_times="keep_first")
    dm.setup("fit")
    assert len(dm.store.times) == 53
    np.testing.assert_array_equal(
        dm.store.read(["t2m"], np.array([52]))[0, 0], xr.open_dataset(T2M_1980)["t2m"].values[52].astype(np.float32)
    )


def test_missing_variable_lists_what_exists(tmp_path):
    with pytest.raises(KeyError, match=r"variable 'geopotential_500' not in .* it has \['2m_temperature'\]"):
        weekly_dm(T2M_1980, tmp_path, variables=["geopotential_500"]).setup("fit")


def test_daily_lead_on_weekly_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"lead_time_hours=24 is not a multiple .* \(168 h\); use e.g. 168"):
        weekly_dm(T2M_1980, tmp_path, lead_time_hours=24).setup("fit")


def test_constants_file_has_no_time(tmp_path):
    with pytest.raises(ValueError, match=r"has no time-dependent variable .* static fields \['land_sea_mask', 'lat2d', "
                       r"'lon2d', 'orography', 'soil_type'\]: add the folders"):
        weekly_dm(CONSTANTS, tmp_path).grid_shape


def test_weatherbench_root_with_constants_as_static_inputs(tmp_path):
    """The layout of recipes/era5_sample_5.625deg.yaml: the root folder, years from the file names, static constants."""
    dm = weekly_dm(T2M_DIR.parent, tmp_path, train_years="1980-1981", val_years=[1982], years_from_file_names=True,
                   static_variables=["land_sea_mask", "orography", "lat2d"])
    assert dm.variables == ["2m_temperature", "land_sea_mask", "orography", "lat2d"]
    assert np.unique(dm.store.years).tolist() == [1980, 1981, 1982] and len(dm.store.times) == 159
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 104 and len(dm.datasets["val"]) == 52  # no pair across the year boundaries
    sample = dm.datasets["val"][0]
    assert sample["input"].shape == (4, 32, 64) and str(dm.store.times[int(sample["index"])])[:10] == "1982-01-01"
    raw = xr.open_dataset(T2M_DIR / "2m_temperature_1982_5.625deg.nc")["t2m"].values[0]
    np.testing.assert_allclose(
        sample["input"][0].numpy() * dm.std["2m_temperature"] + dm.mean["2m_temperature"], raw, rtol=1e-5
    )
    lsm = xr.open_dataset(CONSTANTS)["lsm"].values.astype(np.float64)
    np.testing.assert_allclose(sample["input"][1].numpy(), (lsm - lsm.mean()) / lsm.std(), atol=1e-5)


def test_grib_ensemble(tmp_path):
    pytest.importorskip("cfgrib", reason="reading GRIB needs the optional extra `grib` (cfgrib, eccodes)")
    before = sorted(os.listdir(GRIB.parent))
    with pytest.raises(ValueError, match=r"has dims .*'number'.* select_index=\{'number': 0\}"):
        ERA5DataModule(str(GRIB), ["z_500"]).variables
    dm = ERA5DataModule(
        str(GRIB),
        ["z_500", "t_850"],
        lead_time_hours=12,
        train_years=[2017],
        select_index={"number": 0},
        normalize=False,
        stats_path=str(tmp_path / "stats.nc"),
    )
    assert dm.variables == ["geopotential_500", "temperature_850"] and dm.grid_shape == (61, 120)
    assert dm.latitudes[0] == -90.0 and dm.latitudes[-1] == 90.0 and dm.time_step_hours == 12
    dm.setup("fit")
    sample = dm.datasets["train"][0]
    z500 = sample["input"][0]
    assert 46_000 < float(z500.min()) < 47_500 and 57_500 < float(z500.max()) < 58_500  # m^2/s^2, SOURCE.md
    assert float(z500[-1].mean()) < float(z500[30].mean())  # lower heights at the north pole than at the equator
    assert 230 < float(sample["input"][1].mean()) < 290  # K
    assert sorted(os.listdir(GRIB.parent)) == before  # no cfgrib index file left next to the data


def test_recipe_data_section_reads_the_sample(tmp_path):
    """recipes/era5_sample_5.625deg.yaml's data section, as the README's `seqpar fit` command gives it."""
    import yaml

    repo = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((repo / "recipes" / "era5_sample_5.625deg.yaml").read_text())["data"]
    data.update(path=str(repo / data["path"]), stats_path=str(tmp_path / "stats.nc"))
    dm = ERA5DataModule(**data)
    assert dm.variables == ["2m_temperature", "land_sea_mask", "orography", "lat2d"] and dm.out_variables == [
        "2m_temperature"
    ]
    dm.setup("test")
    assert len(dm.datasets["test"]) == 52 and dm.datasets["test"][51]["input"].shape == (4, 32, 64)
