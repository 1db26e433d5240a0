"""The ERA5 store reader: opens WeatherBench2-layout zarr, NetCDF or GRIB files lazily as one time axis and reads fields.

Letters in shape comments: T times, V fields, H latitudes, W longitudes. A *field* is one variable at one
level: ``2m_temperature`` or ``geopotential_500``. A file that cannot be opened, or a chunk that cannot be
decoded, raises :class:`StoreReadError` naming the file, the variable and the time.
"""

from __future__ import annotations

import glob
import itertools
import os
from typing import Literal, Sequence

import numpy as np
import xarray as xr

from lightning_seqpar.data.stats import STATS_SUFFIX


class StoreReadError(OSError):
    """A file of an ERA5 store cannot be opened, or a chunk of it cannot be decoded (truncated or corrupt data)."""


# ERA5/CDS short names and CMIP/GRIB coordinate names, mapped to the WeatherBench2 names.
SHORT_VARIABLE_NAMES = {
    "t2m": "2m_temperature", "u10": "10m_u_component_of_wind", "v10": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure", "sp": "surface_pressure", "tp": "total_precipitation",
    "tisr": "toa_incident_solar_radiation", "z": "geopotential", "t": "temperature",
    "u": "u_component_of_wind", "v": "v_component_of_wind", "q": "specific_humidity",
    "r": "relative_humidity", "w": "vertical_velocity",
}
COORDINATE_ALIASES = {
    "lat": "latitude", "lon": "longitude", "isobaricInhPa": "level", "plev": "level",
    "pressure_level": "level", "valid_time": None,
}
SPATIAL_DIMS = ("latitude", "longitude")


def _rename_to_weatherbench(ds: xr.Dataset) -> xr.Dataset:
    """Canonical names and order: ``latitude``/``longitude``/``level`` (hPa), long variable names, latitude ascending."""
    if "valid_time" in ds.coords and "time" in ds.dims:
        ds = ds.drop_vars("valid_time")
    renames = {old: new for old, new in COORDINATE_ALIASES.items() if new and old in ds.variables and new not in ds.variables}
    renames.update({short: long for short, long in SHORT_VARIABLE_NAMES.items()
                    if short in ds.data_vars and long not in ds.variables and "time" in ds[short].dims})
    ds = ds.rename(renames)
    if "level" in ds.coords and ds["level"].size and float(ds["level"].max()) > 2000:
        ds = ds.assign_coords(level=ds["level"] / 100.0)  # CMIP `plev` is in Pa
    if "latitude" in ds.coords and ds["latitude"].size > 1 and ds["latitude"].values[0] > ds["latitude"].values[-1]:
        ds = ds.isel(latitude=slice(None, None, -1))
    return ds


def list_store_files(path: str) -> list[str]:
    """The files or zarr directory that ``path`` names: a zarr store, one NetCDF/GRIB file, a directory of them, or a glob."""
    if "://" in path:  # remote zarr (gs://, s3://, https://): needs fsspec and the matching filesystem package
        return [path]
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path) and not _is_zarr(path):
        files = sorted(glob.glob(os.path.join(path, "*.nc")) + glob.glob(os.path.join(path, "*.grib")))
    elif os.path.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no ERA5 store at {path!r}; give a zarr directory, a NetCDF file, a directory of "
                                "NetCDF files or a glob, or write a synthetic one with `seqpar-synthetic-era5 PATH`")
    files = [f for f in files if not f.endswith(STATS_SUFFIX)]
    if not files:
        raise FileNotFoundError(f"{path!r} matches no NetCDF (*.nc), GRIB (*.grib) or zarr store")
    return files


def _is_zarr(path: str) -> bool:
    return path.rstrip("/").endswith(".zarr") or any(
        os.path.exists(os.path.join(path, marker)) for marker in (".zgroup", ".zmetadata", "zarr.json"))


class _BloscFrameCheck:
    """Finds truncated blosc chunks of a local zarr store before they are decoded.

    c-blosc 1 trusts the compressed length in a chunk's 16-byte header, so a chunk file cut short is decoded
    from whatever memory follows it, usually without an error. Comparing that length with the file's size,
    once per chunk and process, catches it; other codecs (zstd, gzip) check their own frames.
    """

    def __init__(self, root: str):
        import zarr

        self.root, self.group = root, zarr.open_group(root, mode="r")
        self.layouts: dict[str, tuple | None] = {}
        self.checked: set[tuple[str, int]] = set()

    def _layout(self, variable: str) -> tuple | None:
        """``(array, time axis)`` of a blosc-compressed, unsharded array with a time dim; ``None`` for anything else."""
        if variable not in self.layouts:
            short = {long: short for short, long in SHORT_VARIABLE_NAMES.items()}.get(variable)
            array = self.group[variable if variable in self.group else short]
            dims = list(array.attrs.get("_ARRAY_DIMENSIONS") or getattr(array.metadata, "dimension_names", None) or [])
            plain_blosc = array.shards is None and "blosc" in str(array.compressors).lower()
            self.layouts[variable] = (array, dims.index("time")) if plain_blosc and "time" in dims else None
        return self.layouts[variable]

    def first_damaged(self, variable: str, local_times: np.ndarray) -> tuple[int, str] | None:
        """``(position in local_times, what is wrong)`` of the first time in a truncated chunk, else ``None``."""
        layout = self._layout(variable)
        if layout is None:
            return None
        array, axis = layout
        for position, t in enumerate(local_times):
            time_chunk = int(t) // array.chunks[axis]
            if (variable, time_chunk) in self.checked:
                continue
            grid = [range(n) if d != axis else [time_chunk] for d, n in enumerate(array.cdata_shape)]
            for coords in itertools.product(*grid):
                file = os.path.join(self.root, array.path, array.metadata.encode_chunk_key(coords))
                if not os.path.exists(file):
                    continue  # a missing chunk reads as the fill value
                with open(file, "rb") as handle:
                    header = handle.read(16)
                size, expected = os.path.getsize(file), int.from_bytes(header[12:16], "little") if len(header) == 16 else 16
                if size < expected:
                    return position, f"chunk file {file!r} holds {size} bytes but its blosc header says {expected}"
            self.checked.add((variable, time_chunk))
        return None


def _first_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"``: codec and backend errors can run to many lines of advice."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _open_one(path: str) -> xr.Dataset:
    if os.path.isdir(path) or "://" in path:
        return xr.open_zarr(path, chunks=None)  # lazy: each isel reads only the chunks it touches
    if path.endswith((".grib", ".grib2", ".grb", ".grb2")):
        return xr.open_dataset(path, engine="cfgrib", chunks=None, backend_kwargs={"indexpath": ""})
    return xr.open_dataset(path, chunks=None)


class ERA5Store:
    """A lazily opened WeatherBench2-layout store (one zarr store or several files) seen as one time axis.

    Args:
        path: a zarr directory, a NetCDF or GRIB file, a directory of ``*.nc``/``*.grib`` files, or a glob.
        select_index: integer positions to take along extra dims, e.g. ``{"number": 0}`` for the first
            ensemble member of an ensemble GRIB file.
        duplicate_times: what to do when two files hold the same time: ``"error"``, or ``"keep_first"``
            to keep the earliest-sorted file's copy and drop the others.
    """

    def __init__(self, path: str, select_index: dict[str, int] | None = None,
                 duplicate_times: Literal["error", "keep_first"] = "error"):
        self.path, self.select_index, self.duplicate_times = str(path), dict(select_index or {}), duplicate_times
        if duplicate_times not in ("error", "keep_first"):
            raise ValueError(f"duplicate_times={duplicate_times!r}; use 'error' or 'keep_first'")
        self.files = list_store_files(self.path)
        self._datasets: list[xr.Dataset] | None = None
        self._frame_checks: list[_BloscFrameCheck | None] = []
        self._pid = None
        self._resolved: dict[str, tuple[str, float | None]] = {}
        datasets = self.datasets
        ds0 = datasets[0]
        for dim in ("time",) + SPATIAL_DIMS:
            if dim not in ds0.dims:
                raise ValueError(f"store {self.path!r} has no {dim!r} dimension (dims: {dict(ds0.sizes)}); expected "
                                 "WeatherBench2 dims time, [level,] latitude, longitude (aliases lat, lon, plev, isobaricInhPa)")
        self.latitudes = ds0["latitude"].values.astype(np.float64)
        self.longitudes = ds0["longitude"].values.astype(np.float64)
        self.levels = [float(v) for v in ds0["level"].values] if "level" in ds0.coords else []
        self._build_time_index([ds["time"].values for ds in datasets])

    @property
    def datasets(self) -> list[xr.Dataset]:
        """The opened datasets, reopened in every new process so that worker processes never share a file handle."""
        if self._datasets is None or self._pid != os.getpid():
            opened = [_rename_to_weatherbench(self._open_file(f)) for f in self.files]
            self._datasets = [ds.isel({d: i for d, i in self.select_index.items() if d in ds.dims}) for ds in opened]
            self._frame_checks = [_BloscFrameCheck(f) if os.path.isdir(f) and _is_zarr(f) else None for f in self.files]
            self._pid = os.getpid()
        return self._datasets

    def _open_file(self, file: str) -> xr.Dataset:
        try:
            return _open_one(file)
        except (OSError, ValueError) as err:  # netCDF4/HDF5 raise OSError, xarray's engine guess ValueError
            raise StoreReadError(
                f"cannot open {file!r} of ERA5 store {self.path!r} ({_first_line(err)}); the file is truncated, corrupt "
                "or not NetCDF/zarr/GRIB (an interrupted download or copy?): download or regenerate it, or move it "
                "out of the store") from err

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_datasets": None, "_pid": None, "_frame_checks": []}

    def _build_time_index(self, file_times: list[np.ndarray]) -> None:
        order = sorted(range(len(file_times)), key=lambda k: file_times[k][0] if len(file_times[k]) else np.datetime64("NaT"))
        file_of, local, times, last = [], [], [], None
        for k in order:
            t = file_times[k].astype("datetime64[ns]")
            keep = np.ones(len(t), bool) if last is None else t > last
            if not keep.all() and self.duplicate_times == "error":
                clash = t[~keep]
                raise ValueError(
                    f"{(~keep).sum()} times of {self.files[k]!r} ({clash[0]} ... {clash[-1]}) are already in an earlier file "
                    f"of {self.path!r}; give files that cover distinct times, or pass duplicate_times='keep_first'")
            file_of.append(np.full(keep.sum(), k)), local.append(np.flatnonzero(keep)), times.append(t[keep])
            last = t[keep][-1] if keep.any() else last
        self.file_of, self.local_index = np.concatenate(file_of), np.concatenate(local)
        self.times = np.concatenate(times)
        steps = np.unique(np.diff(self.times)) if len(self.times) > 1 else np.array([])
        if len(steps) != 1:
            raise ValueError(f"time axis of {self.path!r} must be evenly spaced with at least two times; found "
                             f"{len(self.times)} times with steps {[str(s.astype('timedelta64[h]')) for s in steps[:5]]}; "
                             "fill or drop the gaps")
        self.step_hours = float(steps[0] / np.timedelta64(1, "h"))
        self.years = np.asarray(self.times.astype("datetime64[Y]").astype(int) + 1970)

    def describe_time(self, index: int) -> str:
        """The time stamp of ``index`` as ISO text, for messages."""
        return str(self.times[index].astype("datetime64[m]"))

    def resolve(self, field: str) -> tuple[str, float | None]:
        """Splits a field name into ``(variable, level)``: ``"geopotential_500"`` -> ``("geopotential", 500.0)``."""
        if field not in self._resolved:
            self._resolved[field] = self._resolve(field)
        return self._resolved[field]

    def _resolve(self, field: str) -> tuple[str, float | None]:
        ds = self.datasets[0]
        name = SHORT_VARIABLE_NAMES.get(field, field)
        variable, level = name, None
        if name not in ds.data_vars and "_" in name and name.rsplit("_", 1)[1].isdigit():
            base, lev = name.rsplit("_", 1)
            variable, level = SHORT_VARIABLE_NAMES.get(base, base), float(lev)
        if variable not in ds.data_vars:
            raise KeyError(f"variable {field!r} not in {self.path!r}; it has {self.available_fields()}")
        dims = ds[variable].dims
        expected = {"time", *SPATIAL_DIMS} | ({"level"} if "level" in dims else set())
        if set(dims) != expected:
            extra, lacking = sorted(set(dims) - expected), sorted(expected - set(dims))
            fix = (f"pick one index along {extra} with select_index={{{extra[0]!r}: 0}}" if extra
                   else f"it lacks {lacking}; choose a gridded variable")
            raise ValueError(f"variable {variable!r} has dims {dims}; expected (time, [level,] latitude, longitude): {fix}")
        if "level" in dims:
            levels = [float(v) for v in ds["level"].values]
            if level is None or not np.isclose(levels, level).any():
                asked = "no level" if level is None else f"level {level:g}"
                raise KeyError(f"{field!r} asks for {asked} but {variable!r} has levels {[f'{v:g}' for v in levels]}; "
                               f"ask for e.g. '{variable}_{levels[0]:g}'")
            level = levels[int(np.argmin(np.abs(np.asarray(levels) - level)))]
        elif level is not None:
            raise KeyError(f"{field!r} asks for level {level:g} but {variable!r} has no level dimension; ask for {variable!r}")
        return variable, level

    def available_fields(self) -> list[str]:
        """Every field the store offers, with levels spelled out (``geopotential_500``)."""
        ds, names = self.datasets[0], []
        for var in ds.data_vars:
            if "time" not in ds[var].dims:
                continue
            levels = ds["level"].values if "level" in ds[var].dims else [None]
            names += [str(var) if lev is None else f"{var}_{float(lev):g}" for lev in levels]
        return names

    def read(self, fields: Sequence[str], time_indices: np.ndarray) -> np.ndarray:
        """``[T, V, H, W]`` float32 physical values of ``fields`` at the global ``time_indices``."""
        time_indices = np.asarray(time_indices)
        out = np.empty((len(time_indices), len(fields), len(self.latitudes), len(self.longitudes)), np.float32)
        resolved = [self.resolve(f) for f in fields]
        for k in np.unique(self.file_of[time_indices]):
            rows = np.flatnonzero(self.file_of[time_indices] == k)
            ds = self.datasets[k].isel(time=self.local_index[time_indices[rows]])
            check = self._frame_checks[k]
            for v, (variable, level) in enumerate(resolved):
                damaged = check.first_damaged(variable, self.local_index[time_indices[rows]]) if check else None
                if damaged is not None:
                    raise self._read_error(k, variable, level, int(time_indices[rows][damaged[0]]), damaged[1])
                da = ds[variable] if level is None else ds[variable].isel(level=self.levels.index(level))
                if da.dims != ("time", *SPATIAL_DIMS):
                    da = da.transpose("time", *SPATIAL_DIMS)
                try:
                    out[rows, v] = da.values  # [T_k, H, W]
                except MemoryError:
                    raise
                except Exception as err:  # codecs raise what they like: RuntimeError (blosc), zlib.error, ValueError
                    raise self._decode_error(k, variable, level, time_indices[rows], err) from err
        return out

    def _decode_error(self, k: int, variable: str, level: float | None, times: np.ndarray, err: Exception) -> StoreReadError:
        """The error of a failed read, narrowed down to the first time of ``times`` whose data cannot be decoded."""
        full = self.datasets[k][variable]
        da = full if level is None else full.isel(level=self.levels.index(level))
        bad = int(times[0])
        for t in times:
            try:
                da.isel(time=int(self.local_index[t])).values
            except Exception as single:  # the same broad net as the read that failed
                bad, err = int(t), single
                break
        chunks = full.encoding.get("chunks")  # zarr and NetCDF-4 record their chunk shape per dim
        hint = f"time chunk {int(self.local_index[bad]) // chunks[full.dims.index('time')]}: " if chunks else ""
        return self._read_error(k, variable, level, bad, hint + _first_line(err))

    def _read_error(self, k: int, variable: str, level: float | None, index: int, detail: str) -> StoreReadError:
        field = variable if level is None else f"{variable}_{level:g}"
        where = f"ERA5 store {self.path!r}" + (f" (file {self.files[k]!r})" if len(self.files) > 1 else "")
        return StoreReadError(
            f"cannot read variable {field!r} at time index {index} ({self.describe_time(index)}) of {where}: {detail}; "
            "the data there is truncated or corrupt (an interrupted copy or a bad disk?): copy or regenerate the "
            "store again, or choose years that avoid that time")
