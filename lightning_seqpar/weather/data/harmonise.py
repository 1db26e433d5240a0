"""Finds the files of an ERA5 store, opens each and brings it to WeatherBench2 names and conventions, lazily
(nothing is loaded).

What is harmonised, per file (docs/data.md lists the layouts):

* names: ``valid_time`` (current CDS) -> ``time``; ``lat``/``lon`` -> ``latitude``/``longitude``;
  ``pressure_level``/``isobaricInhPa``/``plev`` -> ``level`` in hPa (``plev`` in Pa is divided by 100);
  ERA5 short names (``t2m``, ``z``) -> WeatherBench2 names (``2m_temperature``, ``geopotential``);
  time-invariant short names (``lsm``, ``z`` without time, ``slt``) -> ``land_sea_mask``,
  ``geopotential_at_surface``, ``soil_type``;
* latitude ascending (-90 to 90): a file stored north to south is flipped;
* a scalar ``level`` coordinate (WeatherBench v1 ``geopotential_500/`` files) is kept as the field's level;
* longitudes of a later file in the other convention (-180..180 against 0..360) are reordered to the
  first file's, so that the files of a store never disagree by position.

A file that is a zip archive (the CDS packs several NetCDF files into one), or GRIB without the ``grib``
extra installed, is refused with a message that says what to do.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from lightning_seqpar.weather.data.stats import STATS_SUFFIX

GRIB_SUFFIXES = (".grib", ".grib2", ".grb", ".grb2")
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf")

# ERA5/CDS short names of time-dependent fields, mapped to WeatherBench2 names.
SHORT_VARIABLE_NAMES = {
    "t2m": "2m_temperature", "u10": "10m_u_component_of_wind", "v10": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure", "sp": "surface_pressure", "tp": "total_precipitation",
    "tisr": "toa_incident_solar_radiation", "z": "geopotential", "t": "temperature",
    "u": "u_component_of_wind", "v": "v_component_of_wind", "q": "specific_humidity",
    "r": "relative_humidity", "w": "vertical_velocity", "sst": "sea_surface_temperature",
    "siconc": "sea_ice_cover", "tcc": "total_cloud_cover", "d2m": "2m_dewpoint_temperature",
    "vo": "vorticity", "pv": "potential_vorticity", "tcwv": "total_column_water_vapour",
}
# Short names of time-invariant fields (a variable without a time axis), mapped to WeatherBench2 names.
STATIC_SHORT_NAMES = {"lsm": "land_sea_mask", "z": "geopotential_at_surface", "slt": "soil_type",
                      "sdor": "standard_deviation_of_orography", "anor": "angle_of_sub_gridscale_orography"}
COORDINATE_ALIASES = {"lat": "latitude", "lon": "longitude", "isobaricInhPa": "level", "plev": "level",
                      "pressure_level": "level"}
SPATIAL_DIMS = ("latitude", "longitude")
COORD_TOLERANCE_DEG = 1e-4  # float32 and float64 copies of one grid differ by ~1e-6 deg


class StoreReadError(OSError):
    """A file of an ERA5 store cannot be opened, or a chunk of it cannot be decoded (truncated or corrupt data)."""


def _data_files(folder: str) -> list[str]:
    suffixes = NETCDF_SUFFIXES + GRIB_SUFFIXES
    return sorted(
        f for f in glob.glob(os.path.join(folder, "*")) if f.endswith(suffixes) or (os.path.isdir(f) and is_zarr(f))
    )


def list_store_files(path: str) -> list[str]:
    """The files that ``path`` names: a zarr store, one NetCDF/GRIB file, a glob, a folder of files, or a folder
    of folders of files (WeatherBench v1: one folder per variable and a ``constants`` folder).

    Raises:
        FileNotFoundError: when nothing exists at ``path``, or it holds no NetCDF, GRIB or zarr store
            (listing what it does hold).
    """
    if "://" in path:  # remote zarr (gs://, s3://, https://): needs fsspec and the matching filesystem package
        return [path]
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path) and not is_zarr(path):
        files = _data_files(path) or sorted(
            f for sub in sorted(glob.glob(os.path.join(path, "*", ""))) for f in _data_files(sub)
        )
    elif os.path.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no ERA5 store at {path!r}; give a zarr directory, a NetCDF file, a directory of "
                                "NetCDF files or a glob, or write a synthetic one with `seqpar-synthetic-era5 PATH`")
    files = [f for f in files if not f.endswith(STATS_SUFFIX)]
    if not files:
        held = sorted(os.listdir(path))[:10] if os.path.isdir(path) else []
        raise FileNotFoundError(
            f"{path!r} matches no NetCDF (*.nc, *.nc4), GRIB (*.grib, *.grb) or zarr store, neither directly nor one "
            f"folder down (WeatherBench v1 layout: <root>/<variable>/*.nc); it holds {held}: point data.path at the "
            "folder of the files, or give a glob such as '/data/era5/*/*.nc'")
    return files


def is_zarr(path: str) -> bool:
    """Whether ``path`` is a zarr store (a ``.zarr`` name, or zarr v2/v3 metadata inside the directory)."""
    return path.rstrip("/").endswith(".zarr") or any(
        os.path.exists(os.path.join(path, marker)) for marker in (".zgroup", ".zmetadata", "zarr.json"))


@dataclass
class HarmonisedFile:
    """One opened file in WeatherBench2 names, and what was done to it.

    Attributes:
        path: the file (or zarr directory).
        ds: the lazily opened dataset, renamed, latitude ascending, longitudes in the store's convention.
        original_names: ``{WeatherBench2 name: name in the file}`` of every data variable.
        scalar_levels: ``{variable: level in hPa}`` of variables with a scalar ``level`` coordinate.
        notes: what was harmonised, for the log.
    """

    path: str
    ds: xr.Dataset
    original_names: dict[str, str]
    scalar_levels: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def first_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"``: codec and backend errors can run to many lines of advice."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _magic(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(4)
    except OSError:
        return b""


def _grib_extra_missing() -> bool:
    try:
        import cfgrib  # noqa: F401
    except Exception:  # ImportError, or RuntimeError when the eccodes library itself cannot be loaded
        return True
    return False


def open_file(path: str, store: str) -> xr.Dataset:
    """Opens ``path`` lazily (``chunks=None``: every ``isel`` reads only what it touches), with clear errors."""
    is_grib = path.endswith(GRIB_SUFFIXES) or (not os.path.isdir(path) and _magic(path) == b"GRIB")
    if not os.path.isdir(path) and _magic(path) == b"PK\x03\x04":
        raise StoreReadError(
            f"{path!r} of ERA5 store {store!r} is a zip archive, not NetCDF (the CDS packs fields of different kinds, "
            "e.g. instantaneous and accumulated, into one zip): unzip it into a folder and point data.path at that "
            "folder"
        )
    if is_grib and _grib_extra_missing():
        raise StoreReadError(
            f"{path!r} of ERA5 store {store!r} is GRIB, and reading GRIB needs the optional extra `grib` (cfgrib and "
            "eccodes), which is not installed: pip install 'lightning-seqpar[grib]' (or pip install cfgrib eccodes)")
    try:
        if os.path.isdir(path) or "://" in path:
            return xr.open_zarr(path, chunks=None)
        if is_grib:
            return xr.open_dataset(path, engine="cfgrib", chunks=None, backend_kwargs={"indexpath": ""})
        return xr.open_dataset(path, chunks=None)
    except (OSError, ValueError) as err:  # netCDF4/HDF5 raise OSError, xarray's engine guess ValueError
        raise StoreReadError(
            f"cannot open {path!r} of ERA5 store {store!r} ({first_line(err)}); the file is truncated, corrupt "
            "or not NetCDF/zarr/GRIB (an interrupted download or copy?): download or regenerate it, or move it "
            "out of the store") from err


def _rename(ds: xr.Dataset) -> tuple[xr.Dataset, dict[str, str]]:
    """WeatherBench2 names of dims, coordinates and variables; returns the dataset and ``{new name: old name}``."""
    if "valid_time" in ds.dims and "time" not in ds.dims:
        ds = ds.drop_vars([v for v in ("time",) if v in ds.variables]).rename({"valid_time": "time"})
    elif "valid_time" in ds.variables and "time" in ds.dims:
        ds = ds.drop_vars("valid_time")  # cfgrib's derived coordinate; time is the axis
    renames = {old: new for old, new in COORDINATE_ALIASES.items() if old in ds.variables and new not in ds.variables}
    for name in ds.data_vars:
        table = SHORT_VARIABLE_NAMES if "time" in ds[name].dims else STATIC_SHORT_NAMES
        long = table.get(str(name))
        if long and long not in ds.variables:
            renames[str(name)] = long
    ds = ds.rename(renames)
    inverse = {new: old for old, new in renames.items()}
    back = {str(n): inverse.get(str(n), str(n)) for n in ds.data_vars}
    return ds, back


def harmonise(path: str, ds: xr.Dataset, reference: HarmonisedFile | None, store: str) -> HarmonisedFile:
    """Renames ``ds`` to WeatherBench2 conventions and checks (and where possible fixes) its grid against
    ``reference``, the store's first file; raises ``ValueError`` naming both files and the coordinate otherwise."""
    ds, original = _rename(ds)
    out = HarmonisedFile(path, ds, original)
    for dim in SPATIAL_DIMS:
        if dim not in ds.dims:
            raise ValueError(f"{path!r} of store {store!r} has no {dim!r} dimension (dims: {dict(ds.sizes)}); expected "
                             "WeatherBench2 dims time, [level,] latitude, longitude (aliases lat, lon, valid_time, "
                             "pressure_level, plev, isobaricInhPa)")
    if "level" in ds.variables:
        if ds["level"].size and float(np.nanmax(ds["level"].values)) > 2000:
            ds = ds.assign_coords(level=ds["level"] / 100.0)  # CMIP `plev` is in Pa
            out.notes.append("levels in Pa divided by 100 (hPa)")
        if ds["level"].ndim == 0:  # WeatherBench v1 `geopotential_500/` files: z(time, lat, lon) with level=500
            out.scalar_levels = {str(n): float(ds["level"]) for n in ds.data_vars if "time" in ds[n].dims}
            ds = ds.drop_vars("level")
    lat = ds["latitude"].values
    if lat.size > 1 and lat[0] > lat[-1]:
        ds = ds.isel(latitude=slice(None, None, -1))
        out.notes.append("latitude flipped to ascending")
    if reference is not None:
        ds = _match_grid(ds, out, reference, store)
    out.ds = ds
    return out


def _match_grid(ds: xr.Dataset, out: HarmonisedFile, reference: HarmonisedFile, store: str) -> xr.Dataset:
    ref = reference.ds

    def refuse(coord: str, what: str) -> ValueError:
        return ValueError(
            f"files {reference.path!r} and {out.path!r} of store {store!r} disagree on {coord!r}: {what}; "
            "every file of a store must be on one grid: regrid the odd file, or give the files as separate stores"
        )

    lat, ref_lat = ds["latitude"].values.astype(np.float64), ref["latitude"].values.astype(np.float64)
    if lat.shape != ref_lat.shape or not np.allclose(lat, ref_lat, atol=COORD_TOLERANCE_DEG):
        raise refuse("latitude", f"{_describe(ref_lat)} against {_describe(lat)}")
    lon, ref_lon = ds["longitude"].values.astype(np.float64), ref["longitude"].values.astype(np.float64)
    if lon.shape == ref_lon.shape and not np.allclose(lon, ref_lon, atol=COORD_TOLERANCE_DEG):
        # The same circle of longitudes in the other convention (-180..180 vs 0..360) or rotated: reorder it.
        distance = np.abs(((lon[None, :] - ref_lon[:, None]) + 180.0) % 360.0 - 180.0)  # [W_ref, W]
        order = distance.argmin(axis=1)
        if np.all(distance[np.arange(len(ref_lon)), order] < COORD_TOLERANCE_DEG) and len(set(order)) == len(order):
            ds = ds.isel(longitude=order).assign_coords(longitude=ref["longitude"].values)
            out.notes.append(f"longitudes reordered to the convention of {reference.path!r}")
        else:
            raise refuse("longitude", f"{_describe(ref_lon)} against {_describe(lon)}")
    elif lon.shape != ref_lon.shape:
        raise refuse("longitude", f"{_describe(ref_lon)} against {_describe(lon)}")
    for name in set(ds.data_vars) & set(ref.data_vars):
        units, ref_units = ds[name].attrs.get("units"), ref[name].attrs.get("units")
        if units and ref_units and units != ref_units:
            raise refuse(f"units of {name}", f"{ref_units!r} against {units!r}")
    return ds


def _describe(values: np.ndarray) -> str:
    if values.size == 0:
        return "none"
    step = f" step {values[1] - values[0]:g}" if values.size > 1 else ""
    return f"{values.size} values {values[0]:g} .. {values[-1]:g}{step}"


_YEAR_IN_NAME = re.compile(r"(?<!\d)(1[89]\d\d|2[0-2]\d\d)(?!\d)")


def year_in_name(path: str) -> int | None:
    """The last year-like number (1800-2299) in the file name (WeatherBench v1: ``2m_temperature_1980_5.625deg.nc``)."""
    found = _YEAR_IN_NAME.findall(os.path.basename(path.rstrip("/")))
    return int(found[-1]) if found else None


def relabel_year(path: str, times: np.ndarray) -> np.ndarray:
    """Moves ``times`` (all in one calendar year) by a whole number of days into the year the file name gives.

    For yearly files whose time axis was relabelled (the shipped WeatherBench sample reads 2000 in all three
    files named 1980, 1981 and 1982). The shift is the distance between the two 1 Januaries, so the spacing
    of the times and their day of the year are kept. Raises ``ValueError`` naming the file when its name
    holds no year, its times span several years, or the last day of a leap year has no place in the target year.
    """
    name_year = year_in_name(path)
    if name_year is None:
        raise ValueError(
            f"years_from_file_names is set but the name of {path!r} holds no year (e.g. t2m_1980_5.625deg.nc)"
        )
    years = set((times.astype("datetime64[Y]").astype(int) + 1970).tolist())
    if len(years) != 1:
        raise ValueError(f"years_from_file_names is set but the times of {path!r} span years {sorted(years)}; "
                         "it only relabels files of one year each")
    offset = np.datetime64(f"{name_year}-01-01", "ns") - np.datetime64(f"{years.pop()}-01-01", "ns")
    moved = times + offset
    if int(moved[-1].astype("datetime64[Y]").astype(int)) + 1970 != name_year:
        raise ValueError(f"cannot move the times of {path!r} to {name_year}: they run past its 31 December "
                         "(a leap year's 366th day)")
    return moved
