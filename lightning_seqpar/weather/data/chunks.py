"""Reads that cost what they read: a cache of decoded time chunks, and a tool that rechunks a zarr store to one time
per chunk.

A zarr (or chunked NetCDF) array whose chunks hold many times is decoded a whole chunk at a time: reading
one sample of a store written with 100 times per chunk decodes 100 times, and an epoch in random order
decodes the store about 100 times over. :class:`ChunkCache` keeps the decoded chunks (least recently used
first out, within a byte budget) so that the samples sharing a chunk decode it once; when one chunk is
too large for the budget the store warns once, with the command that rechunks it::

    python -m lightning_seqpar.weather.data.chunks SRC.zarr DST.zarr     # one time per chunk, streamed, no dask
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import xarray as xr

DEFAULT_CACHE_MB = 256.0


class ChunkCache:
    """Least-recently-used cache of decoded chunk blocks, bounded in bytes, one per process.

    Args:
        max_bytes: the most bytes held; a block larger than half of it is never cached (the caller reads
            it directly, and warns).

    Attributes:
        decodes: number of blocks loaded (cache misses) since creation: what the tests count.
    """

    def __init__(self, max_bytes: float):
        self.max_bytes = float(max_bytes)
        self.blocks: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.decodes = 0

    def fits(self, nbytes: int) -> bool:
        """Whether a block of ``nbytes`` is cached (at least two such blocks fit, so that neighbours do not thrash)."""
        return 2 * nbytes <= self.max_bytes

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The block under ``key``, loaded with ``load()`` on a miss; evicts the least recently used blocks to fit."""
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return self.blocks[key]
        block = load()
        self.decodes += 1
        while self.blocks and self.bytes + block.nbytes > self.max_bytes:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.nbytes
        self.blocks[key] = block
        self.bytes += block.nbytes
        return block

    def clear(self) -> None:
        """Drops every cached block (``decodes`` keeps counting)."""
        self.blocks.clear()
        self.bytes = 0


class BloscFrameCheck:
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
            array = self.group[variable]
            dims = list(array.attrs.get("_ARRAY_DIMENSIONS") or getattr(array.metadata, "dimension_names", None) or [])
            plain_blosc = array.shards is None and "blosc" in str(array.compressors).lower()
            self.layouts[variable] = (array, dims.index("time")) if plain_blosc and "time" in dims else None
        return self.layouts[variable]

    def first_damaged(self, variable: str, local_times: np.ndarray) -> tuple[int, str] | None:
        """``(position in local_times, what is wrong)`` of the first time in a truncated chunk, else ``None``.

        ``variable`` is the array's name in the zarr group (the name in the file, not the WeatherBench2 name).
        """
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
                size, expected = (
                    os.path.getsize(file),
                    int.from_bytes(header[12:16], "little") if len(header) == 16 else 16,
                )
                if size < expected:
                    return position, f"chunk file {file!r} holds {size} bytes but its blosc header says {expected}"
            self.checked.add((variable, time_chunk))
        return None


def time_chunk_size(da: xr.DataArray) -> int:
    """Times per on-disk chunk of ``da`` (zarr ``chunks`` or NetCDF-4 ``chunksizes`` encoding); 1 when unchunked."""
    chunks = da.encoding.get("chunks") or da.encoding.get("chunksizes")
    if not chunks or "time" not in da.dims or len(chunks) != da.ndim:
        return 1
    return int(chunks[da.dims.index("time")])


def rechunk_command(path: str) -> str:
    """The shell command that rewrites the zarr store ``path`` with one time per chunk."""
    target = path.rstrip("/").removesuffix(".zarr") + "-time1.zarr"
    return f"python -m lightning_seqpar.weather.data.chunks {path} {target}"


def rechunk_time(source: str, target: str, time_chunk: int = 1, block_times: int | None = None) -> None:
    """Copies the zarr store ``source`` to ``target`` with ``time_chunk`` times per chunk, streaming over time.

    Other dims keep one chunk each. ``block_times`` (default: the source's time chunk) times are held in
    memory at once, so the copy decodes every source chunk once and needs no dask.

    Raises:
        ValueError: when ``source`` has no ``time`` dimension.
    """
    ds = xr.open_zarr(source, chunks=None)
    if "time" not in ds.dims:
        raise ValueError(f"{source!r} has no 'time' dimension to rechunk (dims: {dict(ds.sizes)})")
    block = block_times or max([time_chunk_size(ds[v]) for v in ds.data_vars] + [time_chunk])
    encoding = {name: {"chunks": tuple(time_chunk if d == "time" else ds.sizes[d] for d in ds[name].dims)}
                for name in ds.data_vars}
    # The source's zarr format; consolidated metadata only where the format defines it (zarr 2).
    version = (
        {"zarr_format": 2, "consolidated": True}
        if os.path.exists(os.path.join(source, ".zgroup"))
        else {"zarr_format": 3}
    )
    for start in range(0, ds.sizes["time"], block):
        part = ds.isel(time=slice(start, start + block)).load().drop_encoding()
        if start == 0:
            part.to_zarr(target, mode="w-", encoding=encoding, **version)
        else:
            part.to_zarr(target, append_dim="time", **version)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m lightning_seqpar.weather.data.chunks SRC DST``: :func:`rechunk_time` from the command
    line; argparse exits with status 2 on bad arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_seqpar.weather.data.chunks",
        description="Rewrite a zarr store with one time (or --time-chunk times) per chunk, so that reading one "
        "sample decodes one time, not a whole multi-time chunk.")
    parser.add_argument("source", help="zarr store to read")
    parser.add_argument("target", help="new zarr store to write (must not exist)")
    parser.add_argument("--time-chunk", type=int, default=1, help="times per chunk in the new store (default: 1)")
    args = parser.parse_args(argv)
    rechunk_time(args.source, args.target, args.time_chunk)
    print(f"wrote {args.target} with {args.time_chunk} time(s) per chunk", file=sys.stderr)


if __name__ == "__main__":
    main()
