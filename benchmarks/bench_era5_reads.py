"""Read time of one training epoch from zarr stores whose time chunks hold many times or one, with and without the
chunk cache.

One command (CPU only, a minute or two on an idle core)::

    PYTHONPATH=. python benchmarks/bench_era5_reads.py --out benchmarks/results

writes ``era5_reads.json`` and ``era5_reads.md`` into ``--out``. Method: one year of 3-hourly data (2,920 times)
of 2m_temperature and geopotential at 2 levels on the 32 x 64 grid, written as zarr (blosc) with 1, 16, 365 and
2,920 times per chunk; the read of one epoch is the train dataset of ``ERA5DataModule`` (lead 3 h, no
normalisation) read sample by sample in a random order, as a shuffled DataLoader with ``num_workers=0`` does.
It reports the wall time of the epoch, the number of chunks zarr read from disk, and, for the
largest chunks without the cache, the time of one sample against reading all 2,920 times at once.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lightning_seqpar.weather.data import ERA5DataModule  # noqa: E402

TIMES = 2920
CHUNKS = (1, 16, 365, 2920)


def write_store(path: Path, time_chunk: int) -> None:
    rng = np.random.default_rng(0)
    time = pd.date_range("2001-01-01", periods=TIMES, freq="3h")
    lat, lon = np.linspace(-87.1875, 87.1875, 32), np.arange(64) * 5.625
    ds = xr.Dataset(
        {
            "2m_temperature": (
                ("time", "latitude", "longitude"),
                (280 + rng.normal(size=(TIMES, 32, 64))).astype(np.float32),
            ),
            "geopotential": (
                ("time", "level", "latitude", "longitude"),
                rng.normal(size=(TIMES, 2, 32, 64)).astype(np.float32),
            ),
        },
        coords={"time": time, "level": [500, 850], "latitude": lat, "longitude": lon},
    )
    encoding = {"2m_temperature": {"chunks": (time_chunk, 32, 64)}, "geopotential": {"chunks": (time_chunk, 2, 32, 64)}}
    ds.to_zarr(path, encoding=encoding, zarr_format=2, consolidated=True)


def epoch(path: Path, cache_mb: float, limit: int | None) -> dict:
    import zarr.storage

    reads, original = [0], zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):
        reads[0] += not key.endswith((".zarray", ".zattrs", ".zgroup", ".zmetadata"))
        return await original(self, key, *args, **kwargs)

    zarr.storage.LocalStore.get = get
    try:
        dm = ERA5DataModule(str(path), ["2m_temperature", "geopotential_500", "geopotential_850"], lead_time_hours=3,
                            train_years=[2001], normalize=False, chunk_cache_mb=cache_mb)
        dm.setup("fit")
        train = dm.datasets["train"]
        order = np.random.default_rng(0).permutation(len(train))[:limit]
        reads[0] = 0
        start = time.perf_counter()
        for n in order:
            train[int(n)]
        seconds = time.perf_counter() - start
    finally:
        zarr.storage.LocalStore.get = original
    scale = len(train) / len(order)  # a partial epoch (--limit) is scaled to a whole one
    return {"samples": len(train), "timed_samples": len(order), "epoch_s": seconds * scale,
            "ms_per_sample": 1e3 * seconds / len(order), "chunk_reads": int(reads[0] * scale)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for era5_reads.json and era5_reads.md")
    parser.add_argument(
        "--limit",
        type=int,
        default=300,
        help="samples timed per uncached run of large chunks (their whole epoch takes minutes); scaled up",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in CHUNKS:
            path = Path(tmp) / f"chunk{chunk}.zarr"
            write_store(path, chunk)
            for cache_mb in (0.0, 256.0):
                limit = args.limit if cache_mb == 0 and chunk > 16 else None
                row = {"time_chunk": chunk, "chunk_cache_mb": cache_mb, **epoch(path, cache_mb, limit)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        whole = xr.open_zarr(Path(tmp) / f"chunk{TIMES}.zarr", chunks=None)
        start = time.perf_counter()
        whole["geopotential"].values, whole["2m_temperature"].values
        all_times_ms = 1e3 * (time.perf_counter() - start)
    result = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "times": TIMES, "grid": [32, 64], "fields": 3, "read_all_times_ms": all_times_ms, "rows": rows}
    (out / "era5_reads.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| times per chunk | chunk cache | epoch read (s) | ms per sample | chunks read from disk |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cache = "off" if r["chunk_cache_mb"] == 0 else f"{r['chunk_cache_mb']:g} MiB"
        timed = "" if r["timed_samples"] == r["samples"] else f" ({r['timed_samples']} samples timed, scaled)"
        lines.append(
            f"| {r['time_chunk']} | {cache} | {r['epoch_s']:.2f}{timed} | {r['ms_per_sample']:.2f} | "
            f"{r['chunk_reads']} |"
        )
    lines.append(
        f"\nReading all {TIMES} times of the 3 fields at once from the {TIMES}-time chunks: {all_times_ms:.0f} ms."
    )
    (out / "era5_reads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
