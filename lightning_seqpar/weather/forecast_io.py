"""Forecasts to disk and field metadata: `seqpar predict` writes a CF-conventions NetCDF; units and masks for the plots.

Letters in shape comments: N samples, T initial times, K lead times, V_out output fields, H latitudes, W longitudes.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_seqpar.weather.landmask import bundled_land_sea_mask

__all__ = ["ForecastWriter", "display_units", "field_long_name", "field_units", "forecasts_dataset", "land_sea_mask"]

# Units of the WeatherBench2 / ERA5 variables, for stores whose variables carry no `units` attribute.
ERA5_UNITS = {
    "2m_temperature": "K", "temperature": "K", "geopotential": "m**2 s**-2", "geopotential_at_surface": "m**2 s**-2",
    "10m_u_component_of_wind": "m s**-1", "10m_v_component_of_wind": "m s**-1", "u_component_of_wind": "m s**-1",
    "v_component_of_wind": "m s**-1", "vertical_velocity": "Pa s**-1", "mean_sea_level_pressure": "Pa",
    "surface_pressure": "Pa", "specific_humidity": "kg kg**-1", "relative_humidity": "%",
    "total_precipitation": "m", "toa_incident_solar_radiation": "J m**-2",
}
MASK_NAMES = ("land_sea_mask", "lsm")
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _store(datamodule):
    return getattr(datamodule, "store", None)


def field_units(datamodule, field: str) -> str:
    """Units of ``field`` as the store's ``units`` attribute gives them (``"m**2 s**-2"``), else ERA5's, else ``""``."""
    store = _store(datamodule)
    variable = field
    if store is not None:
        try:
            variable, _ = store.resolve(field)
            units = store.field_attrs(field).get("units")
            if units:
                return str(units)
        except (KeyError, ValueError, OSError):
            pass
    if variable not in ERA5_UNITS and "_" in variable and variable.rsplit("_", 1)[1].isdigit():
        variable = variable.rsplit("_", 1)[0]  # geopotential_500 -> geopotential
    return ERA5_UNITS.get(variable, "")


def display_units(units: str) -> str:
    """``"m**2 s**-2"`` -> ``"m² s⁻²"`` for figure labels."""
    return re.sub(r"\*\*(-?\d+)", lambda m: m.group(1).translate(_SUPERSCRIPT), units)


def field_long_name(field: str) -> str:
    """``"geopotential_500"`` -> ``"geopotential at 500 hPa"``, ``"2m_temperature"`` -> ``"2m temperature"``."""
    base, _, level = field.rpartition("_")
    if base and level.isdigit() and not base.endswith(("2m", "10m")):
        return f"{base.replace('_', ' ')} at {level} hPa"
    return field.replace("_", " ")


def land_sea_mask(
    datamodule, latitudes: np.ndarray, longitudes: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], str]:
    """``((land fraction [h, w], latitudes [h], longitudes [w]), where it came from)`` for coastlines on a map of
    this grid: the store's ``land_sea_mask``/``lsm`` when it has one, else the bundled ERA5 mask interpolated to
    a 1 deg grid over the same longitudes (see :mod:`lightning_seqpar.weather.landmask`)."""
    store = _store(datamodule)
    if store is not None:
        present = [n for n in MASK_NAMES if n in store.static_fields()]
        for name in present + [n for n in MASK_NAMES if n not in present]:
            try:
                values = store.read_static(name)  # [H, W] on the store's grid
            except (KeyError, ValueError):
                continue
            return (values, np.asarray(store.latitudes), np.asarray(store.longitudes)), f"the store's {name!r}"
    lat = np.arange(-89.5, 90.0, 1.0)  # [180]
    half = float(np.median(np.diff(longitudes))) / 2 if len(longitudes) > 1 else 0.5
    lon = np.arange(float(np.min(longitudes)) - half, float(np.max(longitudes)) + half + 1e-9, 0.5)  # to the cell edges
    return (bundled_land_sea_mask(lat, lon), lat, lon), "ERA5's 5.625 deg mask (bundled)"


def forecasts_dataset(forecast: np.ndarray, init_times: np.ndarray, lead_hours: np.ndarray, fields: list[str],
                      latitudes: np.ndarray, longitudes: np.ndarray, units: dict[str, str] | None = None,
                      source: str = "") -> xr.Dataset:  # noqa: F821 - xarray is imported inside
    """An ``xarray.Dataset`` of forecasts following the CF conventions (1.8) and WeatherBench2's forecast layout.

    Args:
        forecast: ``[T, K, V_out, H, W]`` in physical units (NaN where a (time, lead) pair was not forecast).
        init_times: ``[T]`` datetime64 initial (reference) times.
        lead_hours: ``[K]`` lead times in hours.
        fields: the ``V_out`` field names, written as one variable each.
        latitudes: ``[H]`` degrees north; longitudes: ``[W]`` degrees east.
        units: units per field (``field_units``).
        source: what made the forecasts (the checkpoint), recorded in the global attributes.

    Returns:
        Variables ``<field>(time, prediction_timedelta, latitude, longitude)`` with ``units`` and ``long_name``;
            ``time`` is the initial time (``standard_name: forecast_reference_time``), ``prediction_timedelta`` the
            lead time (``forecast_period``), and ``valid_time(time, prediction_timedelta)`` = time + lead (``time``).
    """
    import xarray as xr

    init_times = np.asarray(init_times).astype("datetime64[ns]")
    leads = (np.asarray(lead_hours, np.float64) * 3600 * 1e9).astype("timedelta64[ns]")  # [K]
    dims = ("time", "prediction_timedelta", "latitude", "longitude")
    data = {
        f: xr.Variable(dims, forecast[:, :, v].astype(np.float32),
                       {"units": (units or {}).get(f, ""), "long_name": f"forecast of {field_long_name(f)}"})
        for v, f in enumerate(fields)
    }
    coords = {
        "time": ("time", init_times, {"standard_name": "forecast_reference_time", "long_name": "initial time"}),
        "prediction_timedelta": (
            "prediction_timedelta",
            leads,
            {"standard_name": "forecast_period", "long_name": "lead time"},
        ),
        "valid_time": (
            ("time", "prediction_timedelta"),
            init_times[:, None] + leads[None, :],
            {"standard_name": "time", "long_name": "valid time (initial time + lead time)"},
        ),
        "latitude": (
            "latitude",
            np.asarray(latitudes, np.float64),
            {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"},
        ),
        "longitude": (
            "longitude",
            np.asarray(longitudes, np.float64),
            {"standard_name": "longitude", "units": "degrees_east", "axis": "X"},
        ),
    }
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    attrs = {"Conventions": "CF-1.8", "title": "lightning-seqpar forecasts", "source": source or "lightning-seqpar",
             "history": f"{now}: {' '.join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))}"}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _write_netcdf(ds, path: Path) -> None:
    encoding = {"time": {"units": "hours since 1970-01-01", "dtype": "int64"},
                "valid_time": {"units": "hours since 1970-01-01", "dtype": "int64"},
                "prediction_timedelta": {"units": "hours", "dtype": "float64"}}
    partial = path.with_name(f".{path.name}.partial")
    ds.to_netcdf(partial, encoding=encoding)
    partial.replace(path)


class ForecastWriter(BasePredictionWriter):
    """Writes the forecasts of `trainer.predict` (``ForecastModule.predict_step``) to one CF NetCDF file.

    Every rank keeps the forecasts of its batches; at the end of the epoch they are gathered on global rank 0,
    de-duplicated (the ranks of a sequence-parallel group forecast the same samples, and the distributed
    sampler pads with repeats), and written as ``[T, K, V_out, H, W]`` by :func:`forecasts_dataset`. The
    whole result passes through rank 0's memory: predict a few years at a time on large grids.

    Args:
        output_dir: the directory of the file; ``None`` means the run's log directory (``version_N``).
        filename: the file's name.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "forecasts.nc") -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.filename = output_dir, filename
        self.path: Path | None = None
        self._parts: list[dict[str, np.ndarray]] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        """Starts collecting this rank's forecasts."""
        self._parts = []

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        """Keeps one batch's ``forecast`` ``[B, V_out, H, W]`` (physical units), ``index`` ``[B]`` and
        ``lead_time_hours`` ``[B]`` on the CPU. Raises ``ValueError`` when ``predict_step`` returned other keys."""
        missing = [k for k in ("forecast", "index", "lead_time_hours") if k not in (prediction or {})]
        if missing:
            raise ValueError(f"ForecastWriter needs predict_step to return 'forecast', 'index' and 'lead_time_hours'; "
                             f"{missing} missing (ForecastModule.predict_step returns them)")
        self._parts.append(
            {
                k: prediction[k].detach().float().cpu().numpy()
                if k == "forecast"
                else prediction[k].detach().cpu().numpy()
                for k in ("forecast", "index", "lead_time_hours")
            }
        )

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        """Gathers every rank's forecasts on rank 0 and writes them as one NetCDF file (see the class docstring)."""
        parts = self._parts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size() if trainer.is_global_zero else None
            torch.distributed.gather_object(parts, gathered, dst=0)
            parts = [p for rank_parts in (gathered or []) for p in rank_parts]
        if trainer.is_global_zero and parts:
            self.path = self._write(trainer, pl_module, parts)
        self._parts = []

    def _write(self, trainer, pl_module, parts: list[dict[str, np.ndarray]]) -> Path:
        dm = trainer.datamodule
        index = np.concatenate([p["index"] for p in parts])  # [N] store time index of each input
        lead = np.concatenate([p["lead_time_hours"] for p in parts]).astype(np.float64)  # [N]
        forecast = np.concatenate([p["forecast"] for p in parts])  # [N, V_out, H, W]
        inits, t_pos = np.unique(index, return_inverse=True)
        leads, k_pos = np.unique(lead, return_inverse=True)
        grid = np.full((len(inits), len(leads), *forecast.shape[1:]), np.nan, np.float32)  # [T, K, V_out, H, W]
        grid[t_pos, k_pos] = forecast  # repeats write the same values
        fields = list(pl_module.out_variables)
        source = f"ForecastModule, checkpoint {trainer.ckpt_path}" if trainer.ckpt_path else "ForecastModule"
        ds = forecasts_dataset(grid, dm.store.times[inits], leads, fields, dm.latitudes, dm.longitudes,
                               {f: field_units(dm, f) for f in fields}, source)
        # The logger's directory, not Trainer.log_dir: that broadcasts, and only rank 0 is here.
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
        out_dir = Path(self.output_dir or log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / self.filename
        _write_netcdf(ds, path)
        rank_zero_info(
            f"ForecastWriter: wrote {len(inits)} initial times x {len(leads)} lead time{'s' if len(leads) > 1 else ''} "
            f"({', '.join(f'{h:g} h' for h in leads)})"
            f" of {', '.join(fields)} to {path}"
        )
        return path
