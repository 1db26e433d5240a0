"""Reading one field out of one harmonised ERA5 file: through the chunk cache, ERA5/ERA5T versions merged, and a
failed decode narrowed down to the first time whose data is damaged.

The store (:class:`~lightning_seqpar.weather.data.store.ERA5Store`) knows which file holds which field at which
time; a :class:`FileReader` knows one file and speaks in that file's own (local) time indices. It reports damage
as :class:`UndecodableTime`, which the store turns into a
:class:`~lightning_seqpar.weather.data.harmonise.StoreReadError` naming the store, the field and the time.

Letters in shape comments: t times asked for, E ERA5 versions (``expver``), L levels, H latitudes, W longitudes.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from lightning.pytorch.utilities import rank_zero_warn

from lightning_seqpar.weather.data.chunks import BloscFrameCheck, ChunkCache, rechunk_command, time_chunk_size
from lightning_seqpar.weather.data.harmonise import SPATIAL_DIMS, HarmonisedFile, first_line

__all__ = ["FileReader", "UndecodableTime"]


class UndecodableTime(Exception):
    """The data of one asked-for time cannot be decoded.

    Attributes:
        position: index into the ``local`` times given to :meth:`FileReader.read` of the first damaged one.
        detail: what the codec (or the frame check) said, one line, with the time chunk where the file is chunked.
    """

    def __init__(self, position: int, detail: str):
        super().__init__(f"time {position}: {detail}")
        self.position, self.detail = position, detail


class FileReader:
    """Reads fields of one harmonised file at local time indices, decoding each multi-time chunk once.

    Args:
        hf: the opened, harmonised file.
        check: a check of zarr blosc frames that finds damaged chunks before they are decoded, or ``None``.
        cache: this process's cache of decoded chunks, shared by the readers of one store.
        chunk_cache_mb: the cache's budget in MiB; 0 turns caching off (every read decodes what it needs).
        warned: ``(file, variable)`` pairs already warned about chunks too large to cache; shared by the readers
            of one store so that each is warned about once.
    """

    def __init__(self, hf: HarmonisedFile, check: BloscFrameCheck | None, cache: ChunkCache, chunk_cache_mb: float,
                 warned: set):
        self.hf, self.check, self.cache, self.chunk_cache_mb, self.warned = hf, check, cache, chunk_cache_mb, warned

    def read(self, variable: str, level_pos: int | None, local: np.ndarray) -> np.ndarray:
        """``[t, H, W]`` values of ``variable`` (at level position ``level_pos``, or a field without levels) at the
        file's ``local`` time indices ``[t]``, in the file's dtype.

        Raises:
            UndecodableTime: at the first time whose data is damaged (truncated chunk, codec error).
            MemoryError: as raised; it says nothing about the data.
        """
        damaged = self.check.first_damaged(self.hf.original_names[variable], local) if self.check else None
        if damaged is not None:
            raise UndecodableTime(*damaged)
        try:
            values = self._load(variable, level_pos, local)  # [t, E, H, W] or [t, H, W]
        except MemoryError:
            raise
        except Exception as err:  # codecs raise what they like: RuntimeError (blosc), zlib.error, ValueError
            raise self._narrow(variable, level_pos, local, err) from err
        if values.ndim == 4:
            values = self._merge_versions(values)
        return values

    def _array(self, variable: str) -> xr.DataArray:
        da = self.hf.ds[variable]
        order = ["time"] + [d for d in ("expver", "level") if d in da.dims] + list(SPATIAL_DIMS)
        return da if list(da.dims) == order else da.transpose(*order)

    def _load(self, variable: str, level_pos: int | None, local: np.ndarray) -> np.ndarray:
        da = self._array(variable)
        level = {} if level_pos is None else {"level": level_pos}
        per_chunk = time_chunk_size(self.hf.ds[variable])
        if per_chunk <= 1 or self.chunk_cache_mb <= 0:
            return da.isel(time=local, **level).values
        block_bytes = per_chunk * da.dtype.itemsize * int(np.prod([n for d, n in da.sizes.items() if d != "time"]))
        if not self.cache.fits(block_bytes):
            self._warn_chunks(variable, per_chunk, block_bytes)
            return da.isel(time=local, **level).values
        out = np.empty((len(local), *[n for d, n in da.sizes.items() if d not in ("time", "level")]), da.dtype)
        for chunk in np.unique(local // per_chunk):  # every level of the chunk: zarr decodes them all anyway
            key = (self.hf.path, variable, int(chunk))
            times = slice(chunk * per_chunk, (chunk + 1) * per_chunk)
            block = self.cache.get(key, lambda times=times: da.isel(time=times).values)
            rows = np.flatnonzero(local // per_chunk == chunk)
            picked = block[local[rows] - chunk * per_chunk]  # [t, (E), (L), H, W]
            out[rows] = picked if level_pos is None else picked[..., level_pos, :, :]
        return out

    def _warn_chunks(self, variable: str, per_chunk: int, block_bytes: int) -> None:
        if (self.hf.path, variable) in self.warned:
            return
        self.warned.add((self.hf.path, variable))
        rank_zero_warn(
            f"{variable} in {self.hf.path!r} is stored in chunks of {per_chunk} times "
            f"({block_bytes / 2**20:.0f} MiB decoded, more than half of chunk_cache_mb={self.chunk_cache_mb:g}): every "
            f"sample decodes a whole chunk, so an epoch in random order reads the data about {per_chunk} times over. "
            f"Rechunk it to one time per chunk: {rechunk_command(self.hf.path)} (or raise chunk_cache_mb)")

    def _merge_versions(self, values: np.ndarray) -> np.ndarray:
        """``[t, E, H, W]`` -> ``[t, H, W]``: the first version with data at each point, final ERA5 (expver 1) first."""
        order = np.argsort([int(str(v)) for v in self.hf.ds["expver"].values], kind="stable")
        merged = values[:, order[0]].copy()
        for e in order[1:]:
            merged = np.where(np.isnan(merged), values[:, e], merged)
        return merged

    def _narrow(self, variable: str, level_pos: int | None, local: np.ndarray, err: Exception) -> UndecodableTime:
        """The failure of a read of ``local`` times, narrowed down to the first time that cannot be decoded."""
        da = self._array(variable)
        level = {} if level_pos is None else {"level": level_pos}
        position = 0
        for n, lt in enumerate(local):
            try:
                da.isel(time=int(lt), **level).load()
            except Exception as single:  # the same broad net as the read that failed
                position, err = n, single
                break
        chunked = bool(self.hf.ds[variable].encoding.get("chunks"))
        hint = f"time chunk {int(local[position]) // time_chunk_size(self.hf.ds[variable])}: " if chunked else ""
        return UndecodableTime(position, hint + first_line(err))
