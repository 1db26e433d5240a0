"""Matplotlib figures written at the end of testing: a forecast-vs-truth map and RMSE by lead time."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_forecast_map", "plot_rmse_by_lead_time"]


def _pyplot():
    """Pyplot on the non-interactive Agg backend, so figures render on headless cluster nodes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_forecast_map(
    forecast: np.ndarray,
    truth: np.ndarray,
    latitudes: np.ndarray,
    longitudes: np.ndarray,
    variable: str,
    lead_time_hours: float,
    path: str | Path,
    units: str = "",
) -> Path:
    """Three panels, truth / forecast / forecast minus truth, of one variable of one sample.

    Args:
        forecast: [H, W] forecast in physical units.
        truth: [H, W] verifying field in physical units.
        latitudes: [H] degrees (either order).
        longitudes: [W] degrees east.
        variable: name shown in the title.
        lead_time_hours: lead time shown in the title.
        path: the PNG to write; parent directories are created.
        units: shown on the colour bars.
    """
    if forecast.shape != truth.shape or forecast.shape != (len(latitudes), len(longitudes)):
        raise ValueError(
            f"forecast {forecast.shape} and truth {truth.shape} must both be [H={len(latitudes)}, W={len(longitudes)}]"
        )
    plt = _pyplot()
    extent = (float(longitudes.min()), float(longitudes.max()), float(latitudes.min()), float(latitudes.max()))
    origin = "lower" if latitudes[0] < latitudes[-1] else "upper"
    vmin, vmax = float(min(truth.min(), forecast.min())), float(max(truth.max(), forecast.max()))
    error = forecast - truth
    err_max = float(np.abs(error).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
    panels = [
        (truth, "truth", "viridis", vmin, vmax),
        (forecast, "forecast", "viridis", vmin, vmax),
        (error, "forecast - truth", "RdBu_r", -err_max, err_max),
    ]
    for ax, (field, title, cmap, lo, hi) in zip(axes, panels, strict=True):
        image = ax.imshow(field, origin=origin, extent=extent, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        ax.set_title(title)
        ax.set_xlabel("longitude [deg E]")
        fig.colorbar(image, ax=ax, shrink=0.85, label=units)
    axes[0].set_ylabel("latitude [deg]")
    fig.suptitle(f"{variable} at +{lead_time_hours:g} h")
    return _save(fig, path, plt)


def plot_rmse_by_lead_time(
    rmse: Mapping[str, Mapping[str, Mapping[float, float]]],
    path: str | Path,
    units: Mapping[str, str] | None = None,
) -> Path:
    """One panel per variable: latitude-weighted RMSE against lead time, one line per forecast.

    Args:
        rmse: ``rmse[variable][forecast_name][lead_time_hours] = value``, e.g. forecast names "model",
            "persistence", "climatology".
        path: the PNG to write; parent directories are created.
        units: optional units per variable for the y labels.
    """
    if not rmse:
        raise ValueError("plot_rmse_by_lead_time got no RMSE values")
    plt = _pyplot()
    variables: Sequence[str] = list(rmse)
    cols = min(3, len(variables))
    rows = math.ceil(len(variables) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False, constrained_layout=True)
    styles = {"model": "o-", "persistence": "s--", "climatology": "^:"}
    for ax, variable in zip(axes.flat, variables):
        for name, by_lead in rmse[variable].items():
            leads = sorted(by_lead)
            ax.plot(leads, [by_lead[t] for t in leads], styles.get(name, "x-"), label=name)
        ax.set_title(variable)
        ax.set_xlabel("lead time [h]")
        unit = (units or {}).get(variable, "")
        ax.set_ylabel(f"RMSE [{unit}]" if unit else "RMSE")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(variables) :]:
        ax.axis("off")
    axes.flat[0].legend()
    return _save(fig, path, plt)


def _save(fig, path: str | Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
