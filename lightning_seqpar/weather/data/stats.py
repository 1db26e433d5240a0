"""Per-variable normalisation statistics and climatology of the train split, computed by streaming and cached on disk.

The cache is a small NetCDF file (by default next to the data, ``<store>.seqpar-stats.nc``) holding, for
every field (a variable at one level, e.g. ``geopotential_500``), the scalar ``mean`` and ``std`` over
all train times and grid points, and the ``climatology``: the mean over train times at each grid point
``[H, W]``, in physical units. It is reused when its train years, number of train times and grid match;
fields missing from it are computed and added. It is always written atomically (a temporary file, then a
rename), and a file that cannot be read (truncated, not NetCDF) is recomputed with a warning. When the
default place cannot be written the file goes to the user cache directory
(``platformdirs.user_cache_dir("lightning-seqpar")``) with a warning; a place the user chose is never
swapped for another: it raises :class:`StatisticsCacheError` before computing anything.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs
import xarray as xr

STATS_SUFFIX = ".seqpar-stats.nc"
STATS_FORMAT_VERSION = 1

# read(fields, time_indices) -> [T, V, H, W] in physical units, the same reader the dataset uses
FieldReader = Callable[[Sequence[str], np.ndarray], np.ndarray]


class StatisticsCacheError(OSError):
    """The statistics file the user chose lacks what is needed and cannot be written."""


@dataclass
class FieldStatistics:
    """Statistics of the train split, one entry per field name.

    Attributes:
        mean: scalar mean over train times and grid points, physical units.
        std: scalar standard deviation over train times and grid points, physical units.
        climatology: ``[H, W]`` mean over train times at each grid point, physical units.
    """

    mean: dict[str, float]
    std: dict[str, float]
    climatology: dict[str, np.ndarray]

    def subset(self, fields: Sequence[str]) -> FieldStatistics:
        """The statistics of ``fields`` only (every one must be present)."""
        return FieldStatistics({f: self.mean[f] for f in fields}, {f: self.std[f] for f in fields},
                               {f: self.climatology[f] for f in fields})


def nan_message(field: str, when: str, nan_at_each_time: np.ndarray) -> str:
    """What to do about NaN in ``field``: a NaN mask fixed over ``nan_at_each_time`` (``[T, H, W]`` bool, T >= 2)
    points to ``masked_variables`` (a grid that is NaN everywhere is a gap, not a mask); anything else to filling or
    dropping the times."""
    first = nan_at_each_time[0]
    if len(nan_at_each_time) > 1 and first.any() and not first.all() and (nan_at_each_time == first).all():
        return (
            f"NaN in variable {field!r} at time {when}: it is NaN on the same {int(first.sum())} of {first.size} grid "
            f"cells at every time read, as a field with a land or sea mask is (sea-surface temperature over land); "
            f"pass masked_variables=[{field!r}] (data.masked_variables in YAML) to fill those cells, add a mask "
            "input channel and leave them out of the loss and the metrics"
        )
    return (f"NaN in variable {field!r} at time {when}; fill or drop those times (interpolate the gaps in time, or "
            "choose years without them)")


def compute_statistics(
    read: FieldReader, fields: Sequence[str], time_indices: np.ndarray, chunk_size: int = 256,
    describe_time: Callable[[int], str] = str, valid: dict[str, np.ndarray] | None = None,
) -> FieldStatistics:
    """Streams over ``time_indices`` in blocks of ``chunk_size`` and returns mean, std and climatology per field.

    Block means and sums of squared deviations are merged with Chan's parallel formula, in float64, so
    the result does not depend on holding the whole split in memory.

    Args:
        read: returns ``[T, V, H, W]`` physical values of ``fields`` at the given time indices.
        fields: field names, e.g. ``["2m_temperature", "geopotential_500"]``.
        time_indices: ``[N]`` time indices of the train split.
        chunk_size: number of time steps read at once.
        describe_time: turns a time index into text for error messages.
        valid: ``{field: [H, W] bool}`` cells that hold data for fields with a fixed NaN mask; their other
            cells must be NaN at every time, are left out of mean and std, and get the mean as climatology.

    Raises:
        ValueError: NaN outside a field's mask (with advice on a fixed NaN mask), data inside it, or std = 0.
    """
    if len(time_indices) == 0:
        raise ValueError("cannot compute statistics of an empty train split; give train_years that exist in the store")
    valid = valid or {}
    count, mean, m2, grid_sum = None, None, None, None
    for start in range(0, len(time_indices), chunk_size):
        block_idx = np.asarray(time_indices[start : start + chunk_size])
        block = read(fields, block_idx).astype(np.float64)  # [T, V, H, W]
        grid = block.shape[2:]
        ok = np.stack([valid.get(f, np.ones(grid, bool)) for f in fields])  # [V, H, W]
        nan = np.isnan(block)
        for bad, what in ((nan & ok[None], "nan"), (~nan & ~ok[None], "data")):
            if bad.any():
                t, v = np.argwhere(bad.any(axis=(2, 3)))[0]
                when = describe_time(int(block_idx[t]))
                if what == "nan":
                    raise ValueError(nan_message(fields[v], when, nan[:, v]))
                raise ValueError(f"variable {fields[v]!r} has data at time {when} on cells that were NaN at the first "
                                 "train time: its NaN mask is not fixed, so masked_variables cannot fill it; fill the "
                                 "NaN cells in the data instead")
        block = np.where(ok[None], block, 0.0)
        n_block = block.shape[0] * ok.sum(axis=(1, 2)).astype(np.float64)  # [V] data points per field
        block_mean = block.sum(axis=(0, 2, 3)) / n_block  # [V]
        block_m2 = (((block - block_mean[None, :, None, None]) * ok[None]) ** 2).sum(axis=(0, 2, 3))  # [V]
        block_grid_sum = block.sum(axis=0)  # [V, H, W]
        if mean is None:
            count, mean, m2, grid_sum = n_block, block_mean, block_m2, block_grid_sum
            continue
        delta = block_mean - mean
        total = count + n_block
        mean = mean + delta * n_block / total
        m2 = m2 + block_m2 + delta**2 * count * n_block / total
        grid_sum = grid_sum + block_grid_sum
        count = total
    std = np.sqrt(m2 / count)
    climatology = grid_sum / len(time_indices)  # [V, H, W]
    climatology = np.where(ok, climatology, mean[:, None, None])  # masked cells: the field mean, never NaN
    flat = [f for f, s in zip(fields, std) if s == 0]
    if flat:
        raise ValueError(f"fields {flat} are constant over the train split (std = 0) and cannot be normalised; "
                         "drop them from variables or pass normalize=False")
    return FieldStatistics(
        mean={f: float(m) for f, m in zip(fields, mean)},
        std={f: float(s) for f, s in zip(fields, std)},
        climatology={f: climatology[i].astype(np.float32) for i, f in enumerate(fields)},
    )


def fallback_stats_path(stats_path: Path) -> Path:
    """Where the statistics go when ``stats_path`` cannot be written: the user cache dir, keyed by the original path."""
    key = hashlib.sha1(str(stats_path.resolve()).encode()).hexdigest()[:12]
    return Path(platformdirs.user_cache_dir("lightning-seqpar")) / "stats" / f"{key}-{stats_path.name}"


def _identity(train_years: Sequence[int], n_times: int, grid_shape: tuple[int, int]) -> dict[str, str | int]:
    return {"format_version": STATS_FORMAT_VERSION, "train_years": ",".join(str(y) for y in train_years),
            "n_train_times": int(n_times), "grid_shape": f"{grid_shape[0]}x{grid_shape[1]}"}


def read_statistics(path: Path, identity: dict) -> FieldStatistics | None:
    """Reads a cache file, or returns ``None`` when it is absent, unreadable (with a warning), or was made for
    other train years or another grid."""
    if not path.is_file():
        return None
    try:
        with xr.open_dataset(path) as ds:
            if any(str(ds.attrs.get(key)) != str(value) for key, value in identity.items()):
                return None
            ds = ds.load()
        fields = [str(f) for f in ds["field"].values]
        return FieldStatistics(
            mean={f: float(ds["mean"].values[i]) for i, f in enumerate(fields)},
            std={f: float(ds["std"].values[i]) for i, f in enumerate(fields)},
            climatology={f: ds["climatology"].values[i].astype(np.float32) for i, f in enumerate(fields)},
        )
    except (OSError, ValueError, KeyError, IndexError) as err:  # truncated HDF5, not NetCDF, variables missing
        first = (str(err).strip().splitlines() or [""])[0]
        warnings.warn(f"normalisation statistics file {path} is unreadable ({type(err).__name__}: {first}); "
                      "recomputing it (it is replaced atomically; delete it by hand if this repeats)", stacklevel=3)
        return None


def write_statistics(path: Path, stats: FieldStatistics, identity: dict) -> None:
    """Writes ``stats`` to ``path`` atomically (a temporary file in the same directory, then a rename)."""
    fields = list(stats.mean)
    ds = xr.Dataset(
        {
            "mean": (("field",), np.array([stats.mean[f] for f in fields])),
            "std": (("field",), np.array([stats.std[f] for f in fields])),
            "climatology": (("field", "latitude", "longitude"), np.stack([stats.climatology[f] for f in fields])),
        },
        coords={"field": np.array(fields, dtype=object)},
        attrs=dict(identity),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".nc", dir=path.parent)
    os.close(handle)
    try:
        ds.to_netcdf(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the cache is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _cannot_write(directory: Path) -> OSError | None:
    """The error that writing into ``directory`` would raise, or ``None``; probes with a temporary file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".tmp-", suffix=".probe", dir=directory)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        return err
    return None


def _chosen_path_error(stats_path: Path, missing: Sequence[str], err: OSError) -> StatisticsCacheError:
    state = (
        "does not exist"
        if not stats_path.exists()
        else f"lacks the statistics of {list(missing)} for these train years"
    )
    return StatisticsCacheError(
        f"stats_path {str(stats_path)!r} {state} and cannot be written ({err}); point stats_path at a writable "
        f"file, make {str(stats_path.parent)!r} writable, or leave stats_path unset to cache the statistics next to "
        "the store (or in the user cache directory when that is read-only)")


def load_or_compute_statistics(
    read: FieldReader, fields: Sequence[str], time_indices: np.ndarray, train_years: Sequence[int],
    grid_shape: tuple[int, int], stats_path: Path, chunk_size: int = 256,
    describe_time: Callable[[int], str] = str, fallback_to_user_cache: bool = True,
    valid: dict[str, np.ndarray] | None = None,
) -> tuple[FieldStatistics, Path]:
    """Returns the statistics of ``fields`` and the file they live in, computing and caching only what is missing.

    Args:
        read: returns ``[T, V, H, W]`` physical values of ``fields`` at the given time indices.
        fields: field names.
        time_indices: time indices of the train split.
        train_years: the train years, recorded in the cache so that another split does not reuse it.
        grid_shape: ``(H, W)``, recorded likewise.
        stats_path: preferred cache file.
        chunk_size: time steps read at once while computing.
        describe_time: turns a time index into text for error messages.
        fallback_to_user_cache: when ``stats_path`` cannot be written, write to the user cache dir with a
            warning (the default place); ``False`` for a place the user chose, which then raises
            :class:`StatisticsCacheError` before any statistics are computed.
        valid: ``{field: [H, W] bool}`` data cells of fields with a fixed NaN mask (see :func:`compute_statistics`).
    """
    identity = _identity(train_years, len(time_indices), grid_shape)
    fallback = fallback_stats_path(stats_path)
    cached = None
    for candidate in (stats_path, fallback) if fallback_to_user_cache else (stats_path,):
        cached = read_statistics(candidate, identity)
        if cached is not None:
            stats_path = candidate
            break
    missing = [f for f in fields if cached is None or f not in cached.mean]
    if not missing:
        return cached.subset(fields), stats_path
    if not fallback_to_user_cache and (err := _cannot_write(stats_path.parent)) is not None:
        raise _chosen_path_error(stats_path, missing, err)  # before hours of streaming, not after
    fresh = compute_statistics(read, missing, time_indices, chunk_size, describe_time, valid)
    if cached is not None:
        fresh = FieldStatistics({**cached.mean, **fresh.mean}, {**cached.std, **fresh.std},
                                {**cached.climatology, **fresh.climatology})
    try:
        write_statistics(stats_path, fresh, identity)
    except OSError as err:
        if not fallback_to_user_cache:
            raise _chosen_path_error(stats_path, missing, err) from err
        warnings.warn(f"cannot write normalisation statistics to {stats_path} ({err}); "
                      f"writing them to {fallback} instead (pass stats_path= to choose the place)", stacklevel=2)
        stats_path = fallback
        write_statistics(stats_path, fresh, identity)
    return fresh.subset(fields), stats_path
