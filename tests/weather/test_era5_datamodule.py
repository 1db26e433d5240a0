"""Unit tests of ERA5DataModule on small synthetic stores: formats, splits, statistics cache, lead times, quirks,
errors."""

import os
import pickle

import numpy as np
import pytest
import torch
import xarray as xr
from torch.utils.data import RandomSampler, SequentialSampler

from lightning_seqpar.weather.data import ERA5DataModule, parse_years, write_synthetic_era5
from lightning_seqpar.weather.data import stats as stats_module
from lightning_seqpar.weather.data.synthetic import iter_synthetic_years

GRID = (8, 16)
FIELDS = ["2m_temperature", "geopotential_500", "temperature_850"]


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("zarr") / "era5.zarr"
    return str(write_synthetic_era5(path, years=[2000, 2001, 2002], step_hours=24, grid=GRID, progress=False))


@pytest.fixture(scope="module")
def netcdf_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("netcdf") / "era5"
    return str(
        write_synthetic_era5(path, years=[2000, 2001, 2002], step_hours=24, grid=GRID, format="netcdf", progress=False)
    )


def make_dm(path, tmp_path, **kwargs):
    kwargs = {"variables": FIELDS, "lead_time_hours": 24, "train_years": "2000-2001", "val_years": [2002],
              "stats_path": str(tmp_path / "stats.nc"), "batch_size": 4, **kwargs}
    return ERA5DataModule(path, **kwargs)


def test_sample_layout_and_formats_agree(zarr_store, netcdf_store, tmp_path):
    samples = []
    for store in (zarr_store, netcdf_store):
        dm = make_dm(store, tmp_path / os.path.basename(store))
        dm.setup("fit")
        samples.append(dm.datasets["val"][3])
    sample = samples[0]
    assert set(sample) == {"input", "target", "lead_time_hours", "index"}
    assert sample["input"].shape == (3, *GRID) and sample["input"].dtype == torch.float32
    assert sample["target"].shape == (3, *GRID)
    assert sample["lead_time_hours"].dtype == torch.float32 and float(sample["lead_time_hours"]) == 24.0
    assert sample["index"].dtype == torch.int64 and sample["index"].ndim == 0
    for key in sample:
        torch.testing.assert_close(samples[0][key], samples[1][key])


def test_metadata_before_setup(zarr_store, tmp_path):
    dm = make_dm(zarr_store, tmp_path, variables=["t2m", "z_500"])
    assert dm.variables == ["2m_temperature", "geopotential_500"]
    assert dm.grid_shape == GRID and dm.time_step_hours == 24.0
    assert np.all(np.diff(dm.latitudes) > 0) and dm.latitudes[0] < 0
    assert len(dm.longitudes) == GRID[1]


def test_splits_follow_years(zarr_store, tmp_path):
    dm = make_dm(zarr_store, tmp_path, test_years="2002")
    dm.setup(None)
    years = dm.store.years
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert set(years[train.init_indices]) == {2000, 2001} and set(years[train.init_indices + 1]) == {2000, 2001}
    assert set(years[val.init_indices]) == {2002} and len(val) == 364  # 365 days of 2002, the last has no target
    assert len(train) == 366 + 365 - 1 and len(test) == len(val)
    assert isinstance(dm.train_dataloader().sampler, RandomSampler)
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)


def test_missing_val_split_gives_empty_loader(zarr_store, tmp_path):
    dm = make_dm(zarr_store, tmp_path, val_years=None, train_years=None)
    dm.setup("fit")
    assert dm.val_dataloader() == [] and dm.split_years["train"] == [2000, 2001, 2002]


def test_statistics_match_numpy_and_are_cached(zarr_store, tmp_path, monkeypatch):
    dm = make_dm(zarr_store, tmp_path)
    dm.setup("fit")
    raw = xr.open_zarr(zarr_store, chunks=None).sel(time=slice("2000", "2001"))
    t2m = raw["2m_temperature"].values.astype(np.float64)
    assert dm.mean["2m_temperature"] == pytest.approx(t2m.mean(), rel=1e-9)
    assert dm.std["2m_temperature"] == pytest.approx(t2m.std(), rel=1e-6)
    np.testing.assert_allclose(dm.climatology[0], t2m.mean(0), rtol=1e-6)
    z500 = raw["geopotential"].sel(level=500).values.astype(np.float64)
    assert dm.std["geopotential_500"] == pytest.approx(z500.std(), rel=1e-6)
    sample = dm.datasets["train"][0]
    expected = (t2m[0] - t2m.mean()) / t2m.std()
    np.testing.assert_allclose(sample["input"][0].numpy(), expected, rtol=1e-4, atol=1e-5)

    stamp = os.stat(tmp_path / "stats.nc").st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(stats_module, "compute_statistics", fail)
    again = make_dm(zarr_store, tmp_path)
    again.setup("fit")
    assert again.mean == dm.mean and os.stat(tmp_path / "stats.nc").st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="recomputed"):  # other train years do not reuse the cache
        make_dm(zarr_store, tmp_path, train_years=[2000], val_years=[2001]).setup("fit")


def test_statistics_cache_adds_missing_fields(zarr_store, tmp_path, monkeypatch):
    make_dm(zarr_store, tmp_path).setup("fit")
    computed = []
    original = stats_module.compute_statistics
    monkeypatch.setattr(
        stats_module,
        "compute_statistics",
        lambda read, fields, *a, **k: computed.append(list(fields)) or original(read, fields, *a, **k),
    )
    dm = make_dm(zarr_store, tmp_path, variables=FIELDS + ["10m_u_component_of_wind"])
    dm.setup("fit")
    assert computed == [["10m_u_component_of_wind"]] and len(dm.mean) == 4


def test_default_stats_path_is_next_to_the_store(zarr_store):
    dm = ERA5DataModule(zarr_store, FIELDS, lead_time_hours=24, train_years="2000-2001", val_years=[2002])
    dm.prepare_data()
    assert os.path.isfile(zarr_store + ".seqpar-stats.nc")


def test_read_only_stats_dir_falls_back_to_user_cache(zarr_store, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the default place, next to the store, made unwritable (even for root)
    monkeypatch.setattr(ERA5DataModule, "_default_stats_path", lambda self: blocker / "era5.zarr.seqpar-stats.nc")
    dm = make_dm(zarr_store, tmp_path, stats_path=None)
    with pytest.warns(UserWarning, match="cannot write normalisation statistics .* writing them to .*cache"):
        dm.setup("fit")
    assert list((tmp_path / "cache" / "lightning-seqpar" / "stats").glob("*-stats.nc"))
    monkeypatch.setattr(stats_module, "compute_statistics", lambda *a, **k: pytest.fail("fallback cache not reused"))
    make_dm(zarr_store, tmp_path, stats_path=None).setup("fit")


def test_lead_times_index_the_right_target(zarr_store, tmp_path):
    dm = make_dm(zarr_store, tmp_path, lead_time_hours=[24, 72], normalize=False)
    dm.setup("fit")
    raw = xr.open_zarr(zarr_store, chunks=None)["2m_temperature"].values
    val = dm.datasets["val"]
    assert len(val) == 364 + 362
    for n in (0, len(val) - 1):
        sample = val[n]
        init, lead = int(sample["index"]), int(sample["lead_time_hours"])
        np.testing.assert_array_equal(sample["input"][0].numpy(), raw[init])
        np.testing.assert_array_equal(sample["target"][0].numpy(), raw[init + lead // 24])
    torch.manual_seed(0)
    drawn = {float(dm.datasets["train"][i]["lead_time_hours"]) for i in range(20)}
    assert drawn == {24.0, 72.0}


def test_out_variables_subset(zarr_store, tmp_path):
    dm = make_dm(zarr_store, tmp_path, out_variables=["geopotential_500"])
    dm.setup("fit")
    assert dm.datasets["train"][0]["target"].shape == (1, *GRID)
    assert dm.climatology.shape == (1, *GRID) and dm.out_mean.shape == (1,)


def test_both_latitude_orders_give_identical_samples(tmp_path):
    kwargs = dict(years=[2000, 2001], step_hours=24, grid=GRID, progress=False)
    up = write_synthetic_era5(tmp_path / "up.zarr", **kwargs)
    down = write_synthetic_era5(tmp_path / "down.zarr", latitude_order="descending", **kwargs)
    assert xr.open_zarr(down)["latitude"].values[0] > 0
    samples = []
    for store in (up, down):
        dm = make_dm(str(store), tmp_path / store.name, train_years=[2000], val_years=[2001])
        dm.setup("fit")
        samples.append(dm.datasets["val"][5])
        np.testing.assert_array_equal(dm.latitudes, np.sort(dm.latitudes))
    for key in samples[0]:
        torch.testing.assert_close(samples[0][key], samples[1][key])


def test_short_names_lat_lon_and_plev_in_pascal(tmp_path):
    ds = next(iter_synthetic_years(years=[2000], step_hours=24, grid=GRID))
    quirky = ds.rename(
        {"latitude": "lat", "longitude": "lon", "level": "plev", "2m_temperature": "t2m", "geopotential": "z"}
    )
    quirky = quirky.assign_coords(plev=quirky["plev"] * 100).isel(lat=slice(None, None, -1))
    quirky = quirky.transpose("time", "plev", "lon", "lat")  # WeatherBench2 64x32 stores put longitude first
    quirky.to_netcdf(tmp_path / "quirky.nc")
    ds.to_netcdf(tmp_path / "plain.nc")
    samples = []
    for name in ("quirky.nc", "plain.nc"):
        dm = ERA5DataModule(str(tmp_path / name), ["2m_temperature", "geopotential_500"], lead_time_hours=24,
                            train_years=[2000], stats_path=str(tmp_path / f"{name}.stats"))
        dm.setup("fit")
        samples.append(dm.datasets["train"][7])
    for key in samples[0]:
        torch.testing.assert_close(samples[0][key], samples[1][key])


def test_dataset_pickles_and_loads_in_a_worker(zarr_store, tmp_path):
    dm = make_dm(zarr_store, tmp_path, num_workers=1)
    dm.setup("fit")
    clone = pickle.loads(pickle.dumps(dm.datasets["val"]))
    torch.testing.assert_close(clone[0]["input"], dm.datasets["val"][0]["input"])
    batch = next(iter(dm.val_dataloader()))
    assert batch["input"].shape == (4, 3, *GRID) and batch["index"].tolist() == [365 + 366 + i for i in range(4)]


def test_parse_years():
    assert parse_years("2000-2002") == [2000, 2001, 2002]
    assert parse_years("2000,2002") == [2000, 2002] and parse_years(2001) == [2001] and parse_years(None) is None
    assert parse_years("2000-2001, 2005,") == [2000, 2001, 2005] and parse_years([2002, 2000]) == [2000, 2002]
    for bad in ("2002-2000", "", "20x0", "2000-"):
        with pytest.raises(ValueError, match=f"years '{bad}' not understood"):
            parse_years(bad)


def test_synthetic_cli_reads_years_with_the_same_parser(tmp_path, capsys):
    from lightning_seqpar.weather.data.synthetic import main

    assert main([str(tmp_path / "s.zarr"), "--years", "2002-2000", "--quiet"]) == 2
    assert "years '2002-2000' not understood" in capsys.readouterr().err
    assert (
        main([str(tmp_path / "s.zarr"), "--years", "2000,2002", "--quiet"]) == 2
    )  # the writer needs consecutive years
    assert "years must be consecutive, got [2000, 2002]" in capsys.readouterr().err


# --- errors: each names what was asked, what exists and what to do ---


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ERA5 store at .*seqpar-synthetic-era5"):
        ERA5DataModule(str(tmp_path / "nope.zarr"), FIELDS).grid_shape


def test_missing_variable_lists_store(zarr_store, tmp_path):
    with pytest.raises(KeyError, match="'relative_humidity_500' not in .* it has .*'geopotential_850'"):
        make_dm(zarr_store, tmp_path, variables=["relative_humidity_500"]).setup("fit")


def test_missing_level(zarr_store, tmp_path):
    with pytest.raises(KeyError, match="level 700 but 'geopotential' has levels \\['500', '850'\\]"):
        make_dm(zarr_store, tmp_path, variables=["geopotential_700"]).variables
    with pytest.raises(KeyError, match="asks for no level .* ask for e.g. 'geopotential_500'"):
        make_dm(zarr_store, tmp_path, variables=["geopotential"]).variables
    with pytest.raises(KeyError, match="'2m_temperature' has no level dimension"):
        make_dm(zarr_store, tmp_path, variables=["2m_temperature_500"]).variables


def test_missing_years(zarr_store, tmp_path):
    with pytest.raises(ValueError, match=r"val_years \[2010\] not in .* has years \[2000, 2001, 2002\]"):
        make_dm(zarr_store, tmp_path, val_years=[2010]).setup("fit")


def test_empty_split(zarr_store, tmp_path):
    with pytest.raises(ValueError, match="the train split is empty .* set train_years"):
        make_dm(zarr_store, tmp_path, train_years=None, val_years="2000-2001", test_years=[2002]).setup("fit")
    with pytest.raises(ValueError, match="val split .* has no input whose target 8760 h later"):
        make_dm(zarr_store, tmp_path, lead_time_hours=24 * 365).setup("fit")


def test_lead_time_not_a_multiple_of_the_step(zarr_store, tmp_path):
    with pytest.raises(ValueError, match="lead_time_hours=6 is not a multiple .* \\(24 h\\); use e.g. 24"):
        make_dm(zarr_store, tmp_path, lead_time_hours=6).setup("fit")
    with pytest.raises(ValueError, match="must be a positive number of hours"):
        make_dm(zarr_store, tmp_path, lead_time_hours=[])


def test_wrong_dims_suggest_select_index(tmp_path):
    ds = next(iter_synthetic_years(years=[2000], step_hours=24, grid=GRID))
    ensemble = xr.concat([ds, ds + 1.0], dim="number")
    ensemble.to_netcdf(tmp_path / "ens.nc")
    with pytest.raises(ValueError, match="has dims .*'number'.* select_index=\\{'number': 0\\}"):
        ERA5DataModule(str(tmp_path / "ens.nc"), ["2m_temperature"]).variables
    ds["zonal_mean"] = ds["2m_temperature"].mean("longitude")
    ds.to_netcdf(tmp_path / "zonal.nc")
    with pytest.raises(ValueError, match=r"'zonal_mean' has dims \('time', 'latitude'\).* it lacks \['longitude'\]"):
        ERA5DataModule(str(tmp_path / "zonal.nc"), ["zonal_mean"]).variables
    dm = ERA5DataModule(str(tmp_path / "ens.nc"), ["2m_temperature"], lead_time_hours=24, train_years=[2000],
                        select_index={"number": 1}, normalize=False, stats_path=str(tmp_path / "s.nc"))
    dm.setup("fit")
    np.testing.assert_allclose(dm.datasets["train"][0]["input"][0].numpy(), ds["2m_temperature"].values[0] + 1.0)


def test_nan_in_sample_names_variable_and_time(tmp_path):
    ds = next(iter_synthetic_years(years=[2000, 2001], step_hours=24, grid=GRID))
    ds2 = next(iter_synthetic_years(years=[2001], step_hours=24, grid=GRID))
    ds2["geopotential"][10, 0, 2, 3] = np.nan
    (tmp_path / "store").mkdir()
    ds.to_netcdf(tmp_path / "store" / "a.nc")
    ds2.to_netcdf(tmp_path / "store" / "b.nc")
    dm = ERA5DataModule(
        str(tmp_path / "store" / "*.nc"),
        FIELDS,
        lead_time_hours=24,
        train_years=[2000],
        val_years=[2001],
        stats_path=str(tmp_path / "s.nc"),
    )
    dm.setup("fit")
    with pytest.raises(ValueError, match="NaN in variable 'geopotential_500' at time 2001-01-11T00:00"):
        dm.datasets["val"][10]
    with pytest.raises(ValueError, match="NaN in variable 'geopotential_500' at time 2001-01-11T00:00 .* fill or drop"):
        dm.datasets["val"][9]  # the NaN sits in the target
    bad_train = ERA5DataModule(str(tmp_path / "store" / "*.nc"), FIELDS, lead_time_hours=24, train_years=[2001],
                               stats_path=str(tmp_path / "s2.nc"))
    with pytest.raises(ValueError, match="NaN in variable 'geopotential_500' at time 2001-01-11T00:00; fill or drop"):
        bad_train.setup("fit")


def test_duplicate_times_across_files(tmp_path):
    ds = next(iter_synthetic_years(years=[2000], step_hours=24, grid=GRID))
    ds.to_netcdf(tmp_path / "a.nc")
    (ds + 1.0).to_netcdf(tmp_path / "b.nc")
    with pytest.raises(
        ValueError, match="366 times of .*b.nc.* already in an earlier file .* duplicate_times='keep_first'"
    ):
        ERA5DataModule(str(tmp_path), ["2m_temperature"]).grid_shape
    dm = ERA5DataModule(
        str(tmp_path), ["2m_temperature"], duplicate_times="keep_first", lead_time_hours=24, train_years=[2000]
    )
    assert len(dm.store.times) == 366


def test_time_axis_with_a_gap_skips_the_pairs_that_straddle_it(tmp_path):
    ds = next(iter_synthetic_years(years=[2000], step_hours=24, grid=GRID)).isel(time=[0, 1, 3, 4, 5])
    ds.to_netcdf(tmp_path / "gappy.nc")
    dm = ERA5DataModule(str(tmp_path / "gappy.nc"), ["2m_temperature"], lead_time_hours=24, train_years=[2000],
                        normalize=False, stats_path=str(tmp_path / "s.nc"))
    dm.setup("fit")
    assert dm.time_step_hours == 24
    train = dm.datasets["train"]
    assert train.init_indices.tolist() == [0, 2, 3]  # 01-02 -> 01-03 is missing: no pair from index 1
    np.testing.assert_array_equal(train[1]["target"][0].numpy(), ds["2m_temperature"].values[3])


def test_irregular_time_axis_is_an_error(tmp_path):
    ds = next(iter_synthetic_years(years=[2000], step_hours=6, grid=GRID)).isel(time=[0, 4, 5, 9])
    ds = ds.assign_coords(time=ds["time"].values + np.array([0, 0, 3, 0]).astype("timedelta64[h]"))  # a 9 h step
    ds.to_netcdf(tmp_path / "irregular.nc")
    with pytest.raises(
        ValueError, match=r"time axis of .* is irregular: steps .* not multiples of the smallest step .* resample"
    ):
        ERA5DataModule(str(tmp_path / "irregular.nc"), ["2m_temperature"]).grid_shape
