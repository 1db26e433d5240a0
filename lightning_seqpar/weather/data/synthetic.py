"""Writes a small ERA5-like store in WeatherBench2 layout whose weather is advected by a known zonal wind.

The store has dims ``time, level, latitude, longitude`` and WeatherBench2 variable names, so the
:class:`~lightning_seqpar.weather.data.era5.ERA5DataModule` reads it exactly like a real WeatherBench2 store.

Dynamics (all deterministic given ``seed``):

* One anomaly field ``psi_l`` per pressure level (dimensionless, about unit variance) is moved eastward
  each time step by a latitude-dependent zonal wind ``u_l(lat)`` (an exact fractional shift along
  longitude, done in Fourier space), damped by ``exp(-dt / 30 days)`` and refreshed by smooth noise so
  that its variance stays constant. This one-step map is what a model can learn.
* ``geopotential`` and ``temperature`` at each level are a seasonal, latitude-dependent background
  plus a multiple of ``psi_l``; the 10 m winds are the surface jet profile plus geostrophic-like
  derivatives of ``psi_850``.
* ``2m_temperature`` adds a diurnal cycle tied to local solar time (warmest at 14:00) and a seasonal
  cycle of opposite sign in the two hemispheres, plus a little white noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time as wallclock
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import xarray as xr

from lightning_seqpar.weather.data.samples import parse_years

EARTH_RADIUS_M = 6.371e6
DAMPING_DAYS = 30.0
SURFACE_VARIABLES = ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind")
LEVEL_VARIABLES = ("geopotential", "temperature")
DEFAULT_LEVELS = (500, 850)

# Background fields: value = base - pole_drop * sin(lat)^2 + season * sin(lat) * cos(season phase).
_Z_BACKGROUND = {500: (57_500.0, 7_000.0, 800.0), 850: (14_800.0, 1_500.0, 300.0)}
_T_BACKGROUND = {500: (258.0, 25.0, 4.0), 850: (290.0, 40.0, 8.0)}
_Z_ANOMALY = {500: 1_200.0, 850: 600.0}  # m^2/s^2 per unit psi
_T_ANOMALY = {500: 3.0, 850: 4.0}  # K per unit psi
_JET_SPEED = {500: 25.0, 850: 15.0}  # m/s, peak of the mid-latitude jet


def weatherbench_latitudes(n_lat: int, order: Literal["ascending", "descending"] = "ascending") -> np.ndarray:
    """Cell-centre latitudes of a WeatherBench equiangular grid, e.g. -87.1875 ... 87.1875 for 32 rows.

    Args:
        n_lat: number of latitude rows.
        order: ``"ascending"`` (-90 to 90, the WeatherBench2 order) or ``"descending"`` (ERA5/GRIB order).
    """
    step = 180.0 / n_lat
    lat = -90.0 + step / 2 + step * np.arange(n_lat)
    return lat if order == "ascending" else lat[::-1].copy()


def zonal_wind(lat_deg: np.ndarray, level: int) -> np.ndarray:
    """Zonal wind profile in m/s at a pressure level: westerly jets near 40 deg, weak easterlies at the equator."""
    jet = _JET_SPEED[level] * np.exp(-(((np.abs(lat_deg) - 40.0) / 15.0) ** 2))
    return jet + 3.0 - 6.0 * np.exp(-((lat_deg / 15.0) ** 2))


def surface_wind(lat_deg: np.ndarray) -> np.ndarray:
    """10 m zonal wind profile in m/s: mid-latitude westerlies and tropical trade-wind easterlies."""
    return 8.0 * np.exp(-(((np.abs(lat_deg) - 45.0) / 12.0) ** 2)) - 6.0 * np.exp(-((lat_deg / 15.0) ** 2))


def eastward_shift(field: np.ndarray, shift_cells: np.ndarray) -> np.ndarray:
    """Moves every latitude row of ``field`` eastward by a fractional number of grid cells (periodic, exact for
    band-limited rows).

    Args:
        field: ``[H, W]`` values on a regular grid, longitude increasing eastward.
        shift_cells: ``[H]`` shift of each row, in longitude cells.
    """
    n_lon = field.shape[-1]
    wavenumbers = np.fft.rfftfreq(n_lon, d=1.0 / n_lon)  # [W//2+1]
    phase = np.exp(-2j * np.pi * wavenumbers[None, :] * shift_cells[:, None] / n_lon)  # [H, W//2+1]
    return np.fft.irfft(np.fft.rfft(field, axis=-1) * phase, n=n_lon, axis=-1)


def smooth_noise(
    rng: np.random.Generator, lat_deg: np.ndarray, n_lon: int, n_fields: int, max_wavenumber: int = 6
) -> np.ndarray:
    """Smooth Gaussian random fields of unit variance: zonal waves 1..max_wavenumber times smooth latitude modes.

    Args:
        rng: the generator to draw amplitudes and phases from.
        lat_deg: ``[H]`` latitudes in degrees.
        n_lon: number of longitudes ``W``.
        n_fields: how many independent fields ``N`` to draw.
        max_wavenumber: largest zonal wavenumber ``K``.

    Returns:
        ``[N, H, W]`` float64 fields.
    """
    n_modes = (n_fields, max_wavenumber, 3)  # fields x zonal wavenumbers k x meridional modes m
    amp = rng.standard_normal(n_modes)
    phase_lon, phase_lat = rng.uniform(0, 2 * np.pi, (2,) + n_modes)
    k = np.arange(1, max_wavenumber + 1)[None, :, None, None]
    m = np.arange(1, 4)[None, None, :, None]
    lon = np.linspace(0.0, 2 * np.pi, n_lon, endpoint=False)
    lat = np.deg2rad(lat_deg)
    lat_modes = np.cos(m * lat + phase_lat[..., None])  # [N, K, M, H]
    lon_modes = np.cos(k * lon + phase_lon[..., None])  # [N, K, M, W]
    field = np.einsum("nkm,nkmh,nkmw->nhw", amp, lat_modes, lon_modes)  # [N, H, W]
    return field / np.sqrt(max_wavenumber * 3 / 4.0)  # each term has mean square 1/4


class _AnomalyModel:
    """The advected anomaly fields ``psi_l``: one step is shift, damp, add smooth noise."""

    def __init__(self, lat_deg: np.ndarray, n_lon: int, levels: Sequence[int], step_hours: int, seed: int):
        self.lat, self.n_lon, self.levels = lat_deg, n_lon, tuple(levels)
        self.rng = np.random.default_rng(seed)
        dt = step_hours * 3600.0
        coslat = np.maximum(np.cos(np.deg2rad(lat_deg)), 0.2)  # bound the angular speed near the poles
        cell_rad = 2 * np.pi / n_lon
        self.shift = {lev: zonal_wind(lat_deg, lev) * dt / (EARTH_RADIUS_M * coslat) / cell_rad for lev in self.levels}
        self.damping = float(np.exp(-step_hours / (24.0 * DAMPING_DAYS)))
        self.psi = {lev: smooth_noise(self.rng, lat_deg, n_lon, 1)[0] for lev in self.levels}

    def run(self, n_steps: int) -> dict[int, np.ndarray]:
        """Advances ``n_steps`` steps and returns ``{level: [T, H, W]}``, the state after each step."""
        refresh = np.sqrt(1.0 - self.damping**2)
        out = {}
        for lev in self.levels:
            noise = smooth_noise(self.rng, self.lat, self.n_lon, n_steps)  # [T, H, W]
            states = np.empty_like(noise)
            for t in range(n_steps):
                self.psi[lev] = self.damping * eastward_shift(self.psi[lev], self.shift[lev]) + refresh * noise[t]
                states[t] = self.psi[lev]
            out[lev] = states
        return out


def _background(table: tuple[float, float, float], sin_lat: np.ndarray, season: np.ndarray) -> np.ndarray:
    """``[T, H, 1]`` background from ``sin_lat`` ``[H, 1]`` and the seasonal phase ``season`` ``[T]``."""
    base, pole_drop, seasonal = table
    return base - pole_drop * sin_lat**2 + seasonal * sin_lat * season[:, None, None]


def make_year(
    model: _AnomalyModel,
    times: pd.DatetimeIndex,
    lon_deg: np.ndarray,
    levels: Sequence[int],
    noise_rng: np.random.Generator,
) -> xr.Dataset:
    """Steps ``model`` through ``times`` and returns the physical fields as an in-memory Dataset.

    Args:
        model: the anomaly state, advanced once per time (its state carries over to the next call).
        times: the time stamps to produce.
        lon_deg: ``[W]`` longitudes in degrees east.
        levels: pressure levels in hPa; 500 and 850 are supported.
        noise_rng: generator of the white noise added to 2m temperature.
    """
    lat = model.lat
    psi = model.run(len(times))  # {level: [T, H, W]}
    sin_lat = np.sin(np.deg2rad(lat))[:, None]  # [H, 1]
    coslat = np.maximum(np.cos(np.deg2rad(lat)), 0.2)[:, None]
    season = np.cos(2 * np.pi * (times.day_of_year.to_numpy() - 172) / 365.25)  # [T], +1 at northern midsummer
    fields = {
        "geopotential": np.stack(
            [_background(_Z_BACKGROUND[lev], sin_lat, season) + _Z_ANOMALY[lev] * psi[lev] for lev in levels], 1
        ),
        "temperature": np.stack(
            [_background(_T_BACKGROUND[lev], sin_lat, season) + _T_ANOMALY[lev] * psi[lev] for lev in levels], 1
        ),
    }  # [T, level, H, W]
    psi_low = psi[850 if 850 in psi else levels[-1]]  # [T, H, W]
    dpsi_dlat = np.gradient(psi_low, axis=1)
    dpsi_dlon = (np.roll(psi_low, -1, axis=2) - np.roll(psi_low, 1, axis=2)) / 2.0
    fields["10m_u_component_of_wind"] = surface_wind(lat)[:, None] - 3.0 * dpsi_dlat
    fields["10m_v_component_of_wind"] = 3.0 * dpsi_dlon / coslat
    hours = (times.hour + times.minute / 60.0).to_numpy()
    local_hour = (hours[:, None] + lon_deg[None, :] / 15.0) % 24.0  # [T, W] local solar time
    diurnal = 6.0 * np.cos(np.deg2rad(lat))[None, :, None] * np.cos(2 * np.pi * (local_hour[:, None, :] - 14.0) / 24.0)
    t2m = _background((300.0, 50.0, 12.0), sin_lat, season) + diurnal + 3.0 * psi_low  # [T, H, W]
    fields["2m_temperature"] = t2m + 0.3 * noise_rng.standard_normal(t2m.shape)
    coords = {"time": times.values, "level": np.asarray(levels, np.int64), "latitude": lat, "longitude": lon_deg}
    data_vars = {
        name: (("time", "latitude", "longitude"), fields[name].astype(np.float32)) for name in SURFACE_VARIABLES
    }
    data_vars.update(
        {
            name: (("time", "level", "latitude", "longitude"), fields[name].astype(np.float32))
            for name in LEVEL_VARIABLES
        }
    )
    ds = xr.Dataset(data_vars, coords=coords)
    for name, units in [("2m_temperature", "K"), ("temperature", "K"), ("geopotential", "m**2 s**-2"),
                        ("10m_u_component_of_wind", "m s**-1"), ("10m_v_component_of_wind", "m s**-1")]:
        ds[name].attrs["units"] = units
    ds["level"].attrs["units"] = "hPa"
    return ds


def iter_synthetic_years(
    years: Sequence[int] = (2000, 2001, 2002),
    step_hours: int = 6,
    grid: tuple[int, int] = (32, 64),
    levels: Sequence[int] = DEFAULT_LEVELS,
    latitude_order: Literal["ascending", "descending"] = "ascending",
    seed: int = 0,
):
    """Yields one in-memory ``xr.Dataset`` per year; the weather carries over from one year to the next.

    Args:
        years: consecutive calendar years to produce.
        step_hours: time step in hours; must divide 24.
        grid: ``(n_lat, n_lon)``, e.g. ``(32, 64)`` for the 5.625 degree WeatherBench grid.
        levels: pressure levels in hPa, a subset of ``(500, 850)``.
        latitude_order: ``"ascending"`` (WeatherBench2) or ``"descending"`` (ERA5/GRIB).
        seed: seed of every random draw; the same seed gives the same store.

    Raises:
        ValueError: for years that are not consecutive, a step that does not divide 24, levels other
            than 500/850 hPa, or a grid smaller than (4, 8).
    """
    years = [int(y) for y in years]
    if not years or years != list(range(years[0], years[0] + len(years))):
        raise ValueError(f"years must be consecutive, got {years}; pass e.g. years=[2000, 2001, 2002]")
    if step_hours <= 0 or 24 % step_hours:
        raise ValueError(f"step_hours={step_hours} must divide 24 (e.g. 1, 3, 6, 12, 24)")
    unknown = sorted(set(levels) - set(DEFAULT_LEVELS))
    if unknown or not levels:
        raise ValueError(f"levels {list(levels)} not supported; choose a non-empty subset of {list(DEFAULT_LEVELS)}")
    n_lat, n_lon = grid
    if n_lat < 4 or n_lon < 8:
        raise ValueError(f"grid {grid} too small; use at least (4, 8), e.g. (32, 64)")
    levels = sorted(int(lev) for lev in levels)
    lat = weatherbench_latitudes(n_lat, "ascending")
    lon = np.arange(n_lon) * 360.0 / n_lon
    model = _AnomalyModel(lat, n_lon, levels, step_hours, seed)
    noise_rng = np.random.default_rng(seed + 1)
    for year in years:
        times = pd.date_range(f"{year}-01-01", f"{year + 1}-01-01", freq=f"{step_hours}h", inclusive="left")
        ds = make_year(model, times, lon, levels, noise_rng)
        yield ds.isel(latitude=slice(None, None, -1)) if latitude_order == "descending" else ds


def write_synthetic_era5(
    path: str | Path,
    years: Sequence[int] = (2000, 2001, 2002),
    step_hours: int = 6,
    grid: tuple[int, int] = (32, 64),
    levels: Sequence[int] = DEFAULT_LEVELS,
    format: Literal["zarr", "netcdf"] = "zarr",
    latitude_order: Literal["ascending", "descending"] = "ascending",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes the synthetic store and returns its path.

    Args:
        path: a zarr directory (``format="zarr"``) or a directory that receives one ``era5_<year>.nc``
            file per year (``format="netcdf"``).
        years: consecutive calendar years to write.
        step_hours: time step in hours; must divide 24.
        grid: ``(n_lat, n_lon)``.
        levels: pressure levels in hPa, a subset of ``(500, 850)``.
        format: ``"zarr"`` or ``"netcdf"``.
        latitude_order: ``"ascending"`` (WeatherBench2) or ``"descending"`` (ERA5/GRIB).
        seed: seed of every random draw.
        overwrite: replace an existing store at ``path``.
        progress: print one line per year to stderr.

    The store is written to a hidden sibling (``.<name>.partial-<pid>``) and renamed to ``path`` when
    complete, so an interrupted write leaves nothing at ``path``, and ``overwrite=True`` replaces an old
    store only once the new one is whole.

    Raises:
        ValueError: for an unknown format or the arguments of :func:`iter_synthetic_years`.
        FileExistsError: when ``path`` exists and ``overwrite`` is off.
    """
    path = Path(path)
    if format not in ("zarr", "netcdf"):
        raise ValueError(f"format={format!r} not supported; use 'zarr' or 'netcdf'")
    if path.exists() and any(path.iterdir() if path.is_dir() else [path]) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        _write_years(partial, path, years, step_hours, grid, levels, format, latitude_order, seed, progress)
        _replace(partial, path)
    finally:
        _remove(partial)
    return path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _replace(new: Path, path: Path) -> None:
    """Moves ``new`` to ``path``; an old store there is moved aside first and removed once ``new`` is in place."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(new, path)
    except OSError:
        if old.exists():
            os.replace(old, path)
        raise
    _remove(old)


def _write_years(
    target: Path, path: Path, years: Sequence[int], step_hours: int, grid: tuple[int, int], levels: Sequence[int],
    format: str, latitude_order: Literal["ascending", "descending"], seed: int, progress: bool,
) -> None:
    """Writes every year to ``target``; progress lines name ``path``, where the store will be."""
    start = wallclock.perf_counter()
    step_bytes = 4 * len(levels) * grid[0] * grid[1]
    chunk_t = int(np.clip(2**18 // step_bytes, 1, 366))  # ~256 KiB chunks: cheap random reads, few files
    years_iter = iter_synthetic_years(years, step_hours, grid, levels, latitude_order, seed)
    for i, ds in enumerate(years_iter):
        year = int(ds["time"].dt.year[0])
        if format == "zarr":
            if i == 0:
                encoding = {name: {"chunks": (chunk_t,) + ds[name].shape[1:]} for name in ds.data_vars}
                encoding["time"] = {"units": "hours since 1970-01-01", "dtype": "int64"}
                ds.to_zarr(target, mode="w", encoding=encoding, zarr_format=2, consolidated=True)
            else:
                ds.to_zarr(target, append_dim="time", zarr_format=2, consolidated=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            ds.to_netcdf(
                target / f"era5_{year}.nc", encoding={"time": {"units": "hours since 1970-01-01", "dtype": "int64"}}
            )
        if progress:
            elapsed = wallclock.perf_counter() - start
            print(
                f"seqpar-synthetic-era5: wrote {year} ({ds.sizes['time']} steps) to {path} [{elapsed:.1f} s]",
                file=sys.stderr,
            )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="seqpar-synthetic-era5",
        description="Write a small ERA5-like store in WeatherBench2 layout (dims time, level, latitude, longitude) "
        "with learnable dynamics: eastward advection by a latitude-dependent wind, diurnal and seasonal cycles.",
    )
    parser.add_argument(
        "path", help="output zarr directory, or directory of per-year NetCDF files with --format netcdf"
    )
    parser.add_argument(
        "--years",
        default="2000-2002",
        help="consecutive years: an inclusive range 'START-END' or one year (default: 2000-2002)",
    )
    parser.add_argument("--step-hours", type=int, default=6, help="time step in hours, must divide 24 (default: 6)")
    parser.add_argument(
        "--grid",
        type=int,
        nargs=2,
        default=(32, 64),
        metavar=("N_LAT", "N_LON"),
        help="grid size (default: 32 64, 5.625 deg)",
    )
    parser.add_argument(
        "--levels", type=int, nargs="+", default=list(DEFAULT_LEVELS), help="pressure levels in hPa (default: 500 850)"
    )
    parser.add_argument("--format", choices=("zarr", "netcdf"), default="zarr", help="store format (default: zarr)")
    parser.add_argument(
        "--latitude-order",
        choices=("ascending", "descending"),
        default="ascending",
        help="(default: ascending, as WeatherBench2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``seqpar-synthetic-era5``."""
    args = _parse_args(argv)
    try:
        write_synthetic_era5(
            args.path, years=parse_years(args.years), step_hours=args.step_hours, grid=tuple(args.grid),
            levels=args.levels, format=args.format, latitude_order=args.latitude_order, seed=args.seed,
            overwrite=args.overwrite, progress=not args.quiet,
        )
    except (ValueError, FileExistsError) as err:
        print(f"seqpar-synthetic-era5: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
