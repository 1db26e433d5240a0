"""The ERA5 store: zarr, NetCDF or GRIB files opened lazily as one catalogue of fields on one time axis.

Letters in shape comments: T times, V fields, E ERA5 versions (``expver``), H latitudes, W longitudes.
A *field* is one variable at one level: ``2m_temperature`` or ``geopotential_500``. Every file is first
brought to WeatherBench2 names and one grid (:mod:`~lightning_seqpar.weather.data.harmonise`); then each field
is looked up in the files that hold it, so single-level and pressure-level files with the same times
(current CDS downloads), one folder per variable (WeatherBench v1) and yearly files all read alike. The values of
one field in one file are read by a :class:`~lightning_seqpar.weather.data.decode.FileReader`; the time axis is
built by :mod:`~lightning_seqpar.weather.data.time_axis`.
Variables without a time axis (a ``constants`` file) are *static* fields, read with :meth:`ERA5Store.read_static`.
A file that cannot be opened, or a chunk that cannot be decoded, raises :class:`StoreReadError` naming the
file, the variable and the time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from lightning_seqpar.weather.data.chunks import DEFAULT_CACHE_MB, BloscFrameCheck, ChunkCache
from lightning_seqpar.weather.data.decode import FileReader, UndecodableTime
from lightning_seqpar.weather.data.harmonise import (
    SHORT_VARIABLE_NAMES,
    SPATIAL_DIMS,
    STATIC_SHORT_NAMES,
    HarmonisedFile,
    StoreReadError,
    harmonise,
    is_zarr,
    list_store_files,
    open_file,
    relabel_year,
    year_in_name,
)
from lightning_seqpar.weather.data.time_axis import FieldSource, align, field_index, time_step

__all__ = ["ERA5Store", "StoreReadError", "list_store_files", "SHORT_VARIABLE_NAMES"]

FieldKey = tuple[str, "float | None"]  # (variable, level in hPa or None)
DERIVED_STATIC = ("latitude", "longitude")  # static channels computed from the grid (ClimaX's "lattitude")


class ERA5Store:
    """A lazily opened ERA5 store (one zarr store or many files) seen as a catalogue of fields on one time axis.

    Args:
        path: a zarr directory, a NetCDF or GRIB file, a directory of them (or of one folder per variable,
            WeatherBench v1), or a glob.
        select_index: integer positions to take along extra dims, e.g. ``{"number": 0}`` for the first
            ensemble member of an ensemble GRIB file.
        duplicate_times: what to do when two files hold the same time of one field: ``"error"``, or
            ``"keep_first"`` to keep the earliest-sorted file's copy and drop the others.
        fields: the time-dependent fields whose common times make the time axis; ``None`` means every field
            with more than one time.
        years_from_file_names: move each file's times to the year its name gives (yearly files whose time
            axis was relabelled, as in the shipped WeatherBench sample); see :func:`relabel_year`.
        chunk_cache_mb: bytes (MiB) of decoded multi-time chunks kept per process; 0 turns the cache off.

    Attributes:
        times: ``[T]`` datetime64[ns], increasing; gaps are allowed, steps are multiples of ``step_hours``.
        latitudes: ``[H]`` degrees, ascending. longitudes: ``[W]`` degrees east, as in the first file.
    """

    def __init__(self, path: str, select_index: dict[str, int] | None = None,
                 duplicate_times: Literal["error", "keep_first"] = "error", fields: Sequence[str] | None = None,
                 years_from_file_names: bool = False, chunk_cache_mb: float = DEFAULT_CACHE_MB):
        self.path, self.select_index, self.duplicate_times = str(path), dict(select_index or {}), duplicate_times
        if duplicate_times not in ("error", "keep_first"):
            raise ValueError(f"duplicate_times={duplicate_times!r}; use 'error' or 'keep_first'")
        self.years_from_file_names, self.chunk_cache_mb = years_from_file_names, float(chunk_cache_mb)
        self.files = list_store_files(self.path)
        self._opened: list[HarmonisedFile] | None = None
        self._pid = None
        self._resolved: dict[str, FieldKey] = {}
        self._warned: set = set()
        files = self.opened
        notes: dict[str, list[str]] = {}
        for hf in files:
            for note in hf.notes:
                notes.setdefault(note, []).append(hf.path)
        for note, paths in notes.items():  # one line per kind of change, not one per yearly file
            rank_zero_info(f"ERA5 store: {note} in {len(paths)} of {len(files)} files ({paths[0]!r}, ...)")
        self.latitudes = files[0].ds["latitude"].values.astype(np.float64)
        self.longitudes = files[0].ds["longitude"].values.astype(np.float64)
        self._catalogue()
        self.file_times = [self._file_times(k) for k in range(len(self.files))]
        self.levels = sorted({lev for (_, lev) in self._sources if lev is not None})
        if not self._sources:
            odd = "; ".join(f"{name} has dims {dims}" for name, dims in self._odd_dims.items())
            if odd and fields:
                self.resolve(fields[0])  # the variable's own error, with the select_index advice
            raise ValueError(
                f"store {self.path!r} has no time-dependent variable on (time, [level,] latitude, longitude)"
                + (f" ({odd}: pick one index along the extra dims with select_index)" if odd else "")
                + f"; it has static fields {sorted(self._statics)}: add the folders or files of the "
                "time-dependent variables, e.g. <root>/2m_temperature/*.nc next to <root>/constants/"
            )
        keys = (
            [self.resolve(f) for f in fields]
            if fields
            else [k for k in self._sources if sum(len(self.file_times[s.file]) for s in self._sources[k]) > 1]
            or list(self._sources)
        )
        self._build_time_axis(list(dict.fromkeys(keys)))

    # --- opening and cataloguing ---

    @property
    def opened(self) -> list[HarmonisedFile]:
        """The harmonised files, reopened in every new process so that worker processes never share a file handle."""
        if self._opened is None or self._pid != os.getpid():
            opened: list[HarmonisedFile] = []
            for f in self.files:
                ds = open_file(f, self.path)
                ds = ds.isel({d: i for d, i in self.select_index.items() if d in ds.dims})
                opened.append(harmonise(f, ds, opened[0] if opened else None, self.path))
            self._opened = opened
            self._cache = ChunkCache(self.chunk_cache_mb * 2**20)
            self._readers = [
                FileReader(
                    hf,
                    BloscFrameCheck(hf.path) if os.path.isdir(hf.path) and is_zarr(hf.path) else None,
                    self._cache,
                    self.chunk_cache_mb,
                    self._warned,
                )
                for hf in opened
            ]
            self._pid = os.getpid()
        return self._opened

    @property
    def readers(self) -> list[FileReader]:
        """This process's reader of each file (``[len(files)]``), sharing :attr:`chunk_cache`."""
        _ = self.opened  # (re)opens the files in a new process
        return self._readers

    @property
    def chunk_cache(self) -> ChunkCache:
        """This process's cache of decoded multi-time chunks."""
        _ = self.opened  # (re)opens the files in a new process
        return self._cache

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_opened": None, "_pid": None, "_readers": [], "_cache": None}

    def _catalogue(self) -> None:
        """Finds every field (variable, level) and static field in every file."""
        self._sources: dict[FieldKey, list[FieldSource]] = {}
        self._statics: dict[str, tuple[int, str]] = {}
        self._odd_dims: dict[str, tuple] = {}
        for k, hf in enumerate(self.opened):
            ds = hf.ds
            for name in map(str, ds.data_vars):
                dims = ds[name].dims
                if "time" not in dims:
                    if set(dims) == set(SPATIAL_DIMS):
                        self._statics.setdefault(name, (k, name))
                    continue
                if not set(dims) <= {"time", "level", "expver", *SPATIAL_DIMS} or not set(SPATIAL_DIMS) <= set(dims):
                    self._odd_dims.setdefault(name, dims)
                    continue
                if "level" in dims:
                    entries = [(float(v), i) for i, v in enumerate(ds["level"].values)]
                else:
                    entries = [(hf.scalar_levels.get(name), None)]
                for level, pos in entries:
                    self._sources.setdefault((name, level), []).append(FieldSource(k, name, pos))
                if "expver" in dims:
                    rank_zero_info(
                        f"ERA5 store: {name} of {hf.path} holds the ERA5 versions expver="
                        f"{[str(v) for v in ds['expver'].values]}; they are merged per time, preferring final "
                        "ERA5 (expver 1) and taking ERA5T (expver 5) where ERA5 has no data, as ECMWF advises"
                    )
            if "expver" in ds.coords and ds["expver"].dims == ("time",):  # current CDS: one version per time, merged
                late = np.array([int(str(v)) != 1 for v in ds["expver"].values])
                if late.any():
                    rank_zero_info(f"ERA5 store: {int(late.sum())} of {late.size} times of {hf.path} are ERA5T "
                                   f"(expver {sorted({str(v) for v in ds['expver'].values[late]})}), preliminary data "
                                   "that ECMWF may still revise")

    def _file_times(self, k: int) -> np.ndarray:
        ds = self.opened[k].ds
        if "time" not in ds.coords:
            return np.zeros(0, "datetime64[ns]")
        times = np.atleast_1d(ds["time"].values).astype("datetime64[ns]")
        return relabel_year(self.files[k], times) if self.years_from_file_names and times.size else times

    def _duplicate_message(self, k: int, clash: np.ndarray, sources: list[FieldSource]) -> str:
        text = (f"{len(clash)} times of {self.files[k]!r} ({clash[0]} ... {clash[-1]}) are already in an earlier file "
                f"of {self.path!r}; give files that cover distinct times, or pass duplicate_times='keep_first'")
        named = sorted({year_in_name(self.files[s.file]) for s in sources} - {None})
        held = sorted(
            {int(y) for s in sources for y in self.file_times[s.file].astype("datetime64[Y]").astype(int) + 1970}
        )
        if len(named) == len(sources) > 1 and named != held and not self.years_from_file_names:
            text += (
                f"; the file names give years {named} but their times fall in {held}: if the times were relabelled, "
                "pass years_from_file_names=True to take each file's year from its name"
            )
        return text

    def _build_time_axis(self, keys: list[FieldKey]) -> None:
        duplicate = self._duplicate_message if self.duplicate_times == "error" else None
        where = repr(self.path)
        self._index = {key: field_index(self._sources[key], self.file_times, self._name(key), where, duplicate)
                       for key in keys}
        self.times = align({self._name(key): ix for key, ix in self._index.items()}, where)
        step = time_step(self.times, self._index[keys[0]], where)
        self.step_hours = float(step / np.timedelta64(1, "h"))
        self.years = np.asarray(self.times.astype("datetime64[Y]").astype(int) + 1970)

    def offset_index(self, indices: np.ndarray, steps: int) -> np.ndarray:
        """``[N]`` store index of the time ``steps`` time steps after each of ``indices``; -1 where the store lacks
        it."""
        wanted = self.times[indices] + np.timedelta64(int(round(steps * self.step_hours * 3600)), "s")
        pos = np.minimum(np.searchsorted(self.times, wanted), len(self.times) - 1)
        return np.where(self.times[pos] == wanted, pos, -1)

    def describe_time(self, index: int) -> str:
        """The time stamp of ``index`` as ISO text, for messages."""
        return str(self.times[index].astype("datetime64[m]"))

    # --- field names ---

    @staticmethod
    def _name(key: FieldKey) -> str:
        return key[0] if key[1] is None else f"{key[0]}_{key[1]:g}"

    def resolve(self, field: str) -> FieldKey:
        """Splits a field name into ``(variable, level)``: ``"geopotential_500"`` -> ``("geopotential", 500.0)``."""
        if field not in self._resolved:
            self._resolved[field] = self._resolve(field)
        return self._resolved[field]

    def _resolve(self, field: str) -> FieldKey:
        variables = {
            var: sorted({lev for v, lev in self._sources if v == var and lev is not None}) for var, _ in self._sources
        }
        name = SHORT_VARIABLE_NAMES.get(field, field)
        variable, level = name, None
        if name not in variables and name not in self._odd_dims and "_" in name and name.rsplit("_", 1)[1].isdigit():
            base, lev = name.rsplit("_", 1)
            variable, level = SHORT_VARIABLE_NAMES.get(base, base), float(lev)
        if variable in self._odd_dims and variable not in variables:
            dims = self._odd_dims[variable]
            extra = sorted(set(dims) - {"time", "level", "expver", *SPATIAL_DIMS})
            lacking = sorted(set(SPATIAL_DIMS) - set(dims))
            fix = (f"pick one index along {extra} with select_index={{{extra[0]!r}: 0}}" if extra
                   else f"it lacks {lacking}; choose a gridded variable")
            raise ValueError(
                f"variable {variable!r} has dims {dims}; expected (time, [level,] latitude, longitude): {fix}"
            )
        if variable not in variables:
            statics = f"; static fields (for static_variables): {sorted(self._statics)}" if self._statics else ""
            raise KeyError(f"variable {field!r} not in {self.path!r}; it has {self.available_fields()}{statics}")
        levels = variables[variable]
        if level is None and (variable, None) not in self._sources:
            raise KeyError(f"{field!r} asks for no level but {variable!r} has levels {[f'{v:g}' for v in levels]}; "
                           f"ask for e.g. '{variable}_{levels[0]:g}'")
        if level is not None and not levels:
            raise KeyError(
                f"{field!r} asks for level {level:g} but {variable!r} has no level dimension; ask for {variable!r}"
            )
        if level is not None:
            if not np.isclose(levels, level).any():
                raise KeyError(
                    f"{field!r} asks for level {level:g} but {variable!r} has levels {[f'{v:g}' for v in levels]}; "
                    f"ask for e.g. '{variable}_{levels[0]:g}'"
                )
            level = levels[int(np.argmin(np.abs(np.asarray(levels) - level)))]
        return variable, level

    def canonical(self, field: str) -> str:
        """The WeatherBench2 spelling of ``field``: ``"z_500"`` -> ``"geopotential_500"``."""
        return self._name(self.resolve(field))

    def field_attrs(self, field: str) -> dict:
        """The attributes of ``field`` (``units``, ``long_name``, ...) as its first file gives them."""
        src = self._sources[self.resolve(field)][0]
        return dict(self.opened[src.file].ds[src.variable].attrs)

    def available_fields(self) -> list[str]:
        """Every time-dependent field the store offers, with levels spelled out (``geopotential_500``)."""
        return [self._name(key) for key in self._sources]

    # --- reading ---

    def read(self, fields: Sequence[str], time_indices: np.ndarray) -> np.ndarray:
        """``[T, V, H, W]`` float32 physical values of ``fields`` at the store's ``time_indices``.

        Raises:
            KeyError: for a field that is not on the store's time axis.
            StoreReadError: where the data cannot be decoded, naming the file, variable and time.
        """
        time_indices = np.asarray(time_indices)
        out = np.empty((len(time_indices), len(fields), len(self.latitudes), len(self.longitudes)), np.float32)
        for v, field in enumerate(fields):
            key = self.resolve(field)
            if key not in self._index:
                raise KeyError(f"field {field!r} is not on the time axis of this store; list it in the store's fields")
            ix = self._index[key]
            for s in np.unique(ix.source_of[time_indices]):
                rows = np.flatnonzero(ix.source_of[time_indices] == s)
                out[rows, v] = self._read_source(key, ix.sources[s], ix.local[time_indices[rows]], time_indices[rows])
        return out

    def _read_source(self, key: FieldKey, src: FieldSource, local: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """``[t, H, W]`` values of one field from one file at its ``local`` times (store times ``indices``)."""
        try:
            return self.readers[src.file].read(src.variable, src.level_pos, local)
        except UndecodableTime as err:
            raise self._read_error(src.file, key, int(indices[err.position]), err.detail) from err.__cause__

    def _read_error(self, k: int, key: FieldKey, index: int, detail: str) -> StoreReadError:
        where = f"ERA5 store {self.path!r}" + (f" (file {self.files[k]!r})" if len(self.files) > 1 else "")
        return StoreReadError(
            f"cannot read variable {self._name(key)!r} at time index {index} ({self.describe_time(index)}) of {where}: "
            f"{detail}; the data there is truncated or corrupt (an interrupted copy or a bad disk?): copy or "
            f"regenerate "
            "the store again, or choose years that avoid that time"
        )

    # --- static fields ---

    def static_fields(self) -> list[str]:
        """Names of the time-invariant fields of the store, and the derived ``latitude`` and ``longitude``."""
        return sorted(self._statics) + list(DERIVED_STATIC)

    def read_static(self, name: str) -> np.ndarray:
        """``[H, W]`` float32 time-invariant field ``name``, on the store's grid.

        ``name`` is a variable without a time axis (``orography``, ``land_sea_mask`` or its short name ``lsm``,
        ``lat2d``), a variable with a single time in the whole store (a CDS download of an invariant field), or
        ``latitude``/``longitude`` (degrees, from the grid). Raises ``KeyError`` listing what the store has.
        """
        grid = (len(self.latitudes), len(self.longitudes))
        if name in DERIVED_STATIC:
            values = self.latitudes[:, None] if name == "latitude" else self.longitudes[None, :]
            return np.broadcast_to(values, grid).astype(np.float32)
        short = {long: s for s, long in STATIC_SHORT_NAMES.items()}
        # A CDS download of an invariant field keeps a time axis of one time and its short name (`lsm`), or
        # the name of the time-dependent field of the same code (`z` -> `geopotential`).
        candidates = [name, STATIC_SHORT_NAMES.get(name, name), short.get(name, name)]
        candidates.append(SHORT_VARIABLE_NAMES.get(candidates[-1], candidates[-1]))
        for candidate in dict.fromkeys(candidates):
            if candidate in self._statics:
                k, variable = self._statics[candidate]
                return self.opened[k].ds[variable].transpose(*SPATIAL_DIMS).values.astype(np.float32)
            single = [src for (v, lev), srcs in self._sources.items() if v == candidate and lev is None for src in srcs]
            if single:
                if sum(len(self.file_times[s.file]) for s in single) != 1:
                    raise KeyError(
                        f"{name!r} varies in time in {self.path!r}; list it under variables, not static_variables"
                    )
                return self._read_source((candidate, None), single[0], np.array([0]), np.array([0]))[0]
        raise KeyError(f"static field {name!r} not in {self.path!r}; it has {self.static_fields()} (a constants file "
                       "with variables on (latitude, longitude) and no time axis provides them)")
