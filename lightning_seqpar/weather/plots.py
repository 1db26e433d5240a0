"""Figures written at the end of testing: forecast maps of every output field, and RMSE against lead time.

Letters in shape comments: V fields, H latitudes, W longitudes. The maps are equirectangular: one degree of
longitude is as wide as one of latitude, so the globe is 2:1 and every cell is drawn whole (edges at the
half-way points between cell centres, clipped to +-90).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["forecast_map_figure", "plot_forecast_map", "plot_rmse_by_lead_time", "rmse_figure", "rmse_table",
           "write_test_figures"]

FORECAST_STYLES = {  # colour, marker, line style of each forecast in the RMSE figure
    "model": ("tab:blue", "o", "-"),
    "persistence": ("tab:orange", "s", "--"),
    "climatology": ("tab:gray", "^", ":"),
}


def _pyplot():
    """Pyplot on the non-interactive Agg backend, so figures render on headless cluster nodes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def cell_edges(centres: np.ndarray, lower: float | None = None, upper: float | None = None) -> np.ndarray:
    """``[N + 1]`` cell edges of ``[N]`` ascending or descending centres: half-way points, ends extended by half a
    cell and clipped to ``[lower, upper]``."""
    centres = np.asarray(centres, np.float64)
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    edges = np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])
    return np.clip(edges, lower if lower is not None else -np.inf, upper if upper is not None else np.inf)


def _longitude_label(lon: float) -> str:
    lon = (lon + 180) % 360 - 180
    return (
        "0°" if abs(lon) < 1e-9 else "180°" if abs(abs(lon) - 180) < 1e-9 else f"{abs(lon):g}°{'E' if lon > 0 else 'W'}"
    )


def _latitude_label(lat: float) -> str:
    return "EQ" if abs(lat) < 1e-9 else f"{abs(lat):g}°{'N' if lat > 0 else 'S'}"


def _colormap(field: str) -> str:
    return "RdYlBu_r" if "temperature" in field else "viridis"


def forecast_map_figure(
    forecast: np.ndarray,
    truth: np.ndarray,
    latitudes: np.ndarray,
    longitudes: np.ndarray,
    fields: Sequence[str],
    units: Sequence[str],
    init_time: str,
    lead_time_hours: float,
    land: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    title: str = "forecast",
):
    """A matplotlib Figure with one row per field: truth, forecast (sharing one colour bar) and forecast - truth.

    Args:
        forecast: ``[V, H, W]`` forecast in physical units.
        truth: ``[V, H, W]`` verifying fields in physical units.
        latitudes: ``[H]`` cell-centre latitudes in degrees north (either order).
        longitudes: ``[W]`` cell-centre longitudes in degrees east, ascending.
        fields: the ``V`` field names (row titles).
        units: the ``V`` units, shown on the colour bars (``"m**2 s**-2"`` is drawn as m² s⁻²).
        init_time: the initial time, e.g. ``"2002-01-01 00:00"`` (UTC), shown with the valid time.
        lead_time_hours: the lead time.
        land: ``(land fraction [h, w], latitudes [h], longitudes [w])`` contoured at 0.5 as coastlines, or None.
        title: what is forecast, first words of the figure title.

    Raises:
        ValueError: when the shapes disagree.
    """
    from lightning_seqpar.weather.forecast_io import display_units, field_long_name
    from lightning_seqpar.weather.metrics import latitude_weights

    weights = latitude_weights(latitudes).numpy()  # [H], mean 1
    forecast, truth = np.asarray(forecast, np.float64), np.asarray(truth, np.float64)
    if forecast.ndim == 2:
        forecast, truth = forecast[None], truth[None]
    expected = (len(fields), len(latitudes), len(longitudes))
    if forecast.shape != expected or truth.shape != expected or len(units) != len(fields):
        raise ValueError(f"forecast {forecast.shape} and truth {truth.shape} must both be [V={len(fields)}, "
                         f"H={len(latitudes)}, W={len(longitudes)}], with {len(fields)} units (got {len(units)})")
    plt = _pyplot()
    lat_edges = cell_edges(latitudes, -90.0, 90.0)  # [H + 1]
    lon_edges = cell_edges(longitudes)  # [W + 1]
    init = np.datetime64(init_time.replace(" ", "T"), "m")
    valid = init + np.timedelta64(int(round(lead_time_hours * 60)), "m")
    fmt = lambda t: str(t).replace("T", " ") + " UTC"  # noqa: E731
    rows = len(fields)
    fig, axes = plt.subplots(rows, 3, figsize=(14.0, 2.55 * rows + 0.9), squeeze=False, layout="constrained")
    fig.suptitle(f"{title} from {fmt(init)}, valid {fmt(valid)} (+{lead_time_hours:g} h)", fontsize=13)
    for v, field in enumerate(fields):
        name, unit = field_long_name(field), display_units(units[v])
        lo, hi = float(min(truth[v].min(), forecast[v].min())), float(max(truth[v].max(), forecast[v].max()))
        error = forecast[v] - truth[v]  # [H, W]
        err_max = float(np.abs(error).max()) or 1.0
        rmse = float(np.sqrt(np.mean(error**2 * weights[:, None])))  # the metrics' latitude-weighted RMSE
        panels = [
            (truth[v], f"{name}: truth", _colormap(field), lo, hi),
            (forecast[v], f"{name}: forecast", _colormap(field), lo, hi),
            (error, f"forecast - truth (RMSE {rmse:,.4g} {unit})".replace(" )", ")"), "RdBu_r", -err_max, err_max),
        ]
        images = []
        for ax, (values, panel_title, cmap, vmin, vmax) in zip(axes[v], panels, strict=True):
            images.append(ax.pcolormesh(lon_edges, lat_edges, values, cmap=cmap, vmin=vmin, vmax=vmax, shading="flat"))
            if land is not None:
                mask, mask_lat, mask_lon = land
                ax.contour(mask_lon, mask_lat, mask, levels=[0.5], colors="black", linewidths=0.7)
            ax.set_title(panel_title, fontsize=10)
            ax.set_xlim(lon_edges[0], lon_edges[-1])
            ax.set_ylim(-90.0, 90.0) if lat_edges.min() <= -90 and lat_edges.max() >= 90 else ax.set_ylim(
                lat_edges.min(), lat_edges.max()
            )
            ax.set_aspect("equal")  # equirectangular: the globe is 2:1
            ax.set_xticks([t for t in range(0, 361, 60) if lon_edges[0] <= t <= lon_edges[-1]])
            ax.set_xticklabels([_longitude_label(t) for t in ax.get_xticks()], fontsize=8)
            ax.set_yticks([t for t in range(-90, 91, 30)])
            ax.set_yticklabels([_latitude_label(t) for t in ax.get_yticks()], fontsize=8)
        label = f"{name} [{unit}]" if unit else name
        fig.colorbar(images[1], ax=list(axes[v, :2]), shrink=0.9, pad=0.01, label=label)
        fig.colorbar(images[2], ax=axes[v, 2], shrink=0.9, pad=0.01, label=f"error [{unit}]" if unit else "error")
    return fig


def plot_forecast_map(forecast, truth, latitudes, longitudes, fields, units, init_time, lead_time_hours, path,
                      land=None, title: str = "forecast") -> Path:
    """Writes :func:`forecast_map_figure` to ``path`` (PNG; parent directories are created) and returns it."""
    return _save(forecast_map_figure(forecast, truth, latitudes, longitudes, fields, units, init_time, lead_time_hours,
                                     land, title), path)


def _y_limit(values: Mapping[str, Sequence[float]]) -> float:
    """Top of the y axis: set by the model and persistence, so a far larger climatology error does not flatten them."""
    close = [v for name, vals in values.items() if name != "climatology" for v in vals] or [
        v for vals in values.values() for v in vals]
    top = max(close) * 1.25
    everything = max(v for vals in values.values() for v in vals)
    return everything * 1.12 if everything <= top * 1.3 else top


def rmse_figure(rmse: Mapping[str, Mapping[str, Mapping[float, float]]], units: Mapping[str, str] | None = None):
    """A matplotlib Figure, one panel per field: latitude-weighted RMSE of each forecast against lead time, or
    bars when there is one lead time. Values above the axis (usually climatology) are drawn at its top and labelled.

    Args:
        rmse: ``rmse[field][forecast][lead_time_hours] = value``, forecasts e.g. "model", "persistence", "climatology".
        units: units per field (``"K"``, ``"m**2 s**-2"``), on the y labels.

    Raises:
        ValueError: when there are no values.
    """
    from lightning_seqpar.weather.forecast_io import display_units, field_long_name

    if not rmse or not any(rmse.values()):
        raise ValueError("rmse_figure got no RMSE values")
    plt = _pyplot()
    fields = list(rmse)
    leads = sorted({lead for by_name in rmse.values() for by_lead in by_name.values() for lead in by_lead})
    cols = min(3, len(fields))
    rows = math.ceil(len(fields) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.5 * rows + 0.6), squeeze=False, layout="constrained")
    order = lambda names: sorted(
        names, key=lambda n: (list(FORECAST_STYLES).index(n) if n in FORECAST_STYLES else 9, n)
    )  # noqa: E731
    handles: dict[str, object] = {}
    for ax, field in zip(axes.flat, fields):
        by_name = {name: rmse[field][name] for name in order(rmse[field])}
        top = _y_limit({name: list(by_lead.values()) for name, by_lead in by_name.items()})
        unit = display_units((units or {}).get(field, ""))
        if len(leads) == 1:
            lead = leads[0]
            for x, (name, by_lead) in enumerate(by_name.items()):
                colour = FORECAST_STYLES.get(name, ("tab:green",))[0]
                value = by_lead.get(lead, np.nan)
                bar = ax.bar(x, min(value, top), color=colour, width=0.7, label=name)
                handles.setdefault(name, bar)
                text = f"{value:,.4g}" + (" ↑" if value > top else "")
                ax.text(x, min(value, top) * (0.97 if value > top else 1.0), text, ha="center",
                        va="top" if value > top else "bottom", fontsize=9, color="white" if value > top else "black")
            ax.set_xticks(range(len(by_name)), list(by_name), fontsize=9)
            ax.set_title(f"{field_long_name(field)}, +{lead:g} h", fontsize=10)
        else:
            off_scale = []
            for name, by_lead in by_name.items():
                colour, marker, style = FORECAST_STYLES.get(name, ("tab:green", "x", "-."))
                xs = sorted(by_lead)
                ys = np.array([by_lead[t] for t in xs])
                (line,) = ax.plot(xs, ys, color=colour, marker=marker, linestyle=style, label=name)
                handles.setdefault(name, line)
                if (ys > top).any():
                    off_scale.append(f"{name} off scale: {ys.min():,.4g} to {ys.max():,.4g}")
            if off_scale:
                ax.text(0.98, 0.03, "\n".join(off_scale), transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                        color="dimgray", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
            ax.set_xticks(leads, [f"{t:g}" for t in leads])
            ax.set_xlabel("lead time [h]")
            ax.set_title(field_long_name(field), fontsize=10)
        ax.set_ylim(0, top)
        ax.set_ylabel(f"RMSE [{unit}]" if unit else "RMSE")
        ax.grid(axis="y", alpha=0.3)
        model, persistence = by_name.get("model", {}), by_name.get("persistence", {})
        shared = [t for t in leads if t in model and t in persistence and persistence[t] > 0]
        if shared:
            change = 100 * (1 - np.mean([model[t] / persistence[t] for t in shared]))
            mean = " (mean over leads)" if len(shared) > 1 else ""
            ax.text(
                0.02,
                0.98,
                f"model RMSE {abs(change):.0f}% {'below' if change >= 0 else 'above'} persistence{mean}",
                transform=ax.transAxes,
                ha="left",
                va="top",
                fontsize=8.5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )
    for ax in list(axes.flat)[len(fields):]:
        ax.axis("off")
    fig.suptitle("latitude-weighted RMSE on the test years", fontsize=12)
    if len(leads) > 1:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles), frameon=False)
    return fig


def plot_rmse_by_lead_time(rmse: Mapping[str, Mapping[str, Mapping[float, float]]], path: str | Path,
                           units: Mapping[str, str] | None = None) -> Path:
    """Writes :func:`rmse_figure` to ``path`` (PNG; parent directories are created) and returns it."""
    return _save(rmse_figure(rmse, units), path)


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def rmse_table(values: Mapping[str, float], fields: Sequence[str]) -> dict[str, dict[str, dict[float, float]]]:
    """``{field: {forecast: {lead hours: RMSE}}}`` from test metrics keyed ``"test/[<baseline>/]rmse/<field>/<lead>h"``
    (:class:`~lightning_seqpar.weather.metrics.ForecastSkill`); the model's forecast is ``"model"``, other keys
    (ACC, the loss) are passed over. Raises ``KeyError`` for an RMSE of a field not in ``fields``."""
    table: dict[str, dict[str, dict[float, float]]] = {f: {} for f in fields}
    for key, value in values.items():
        parts = key.split("/")
        if len(parts) >= 4 and parts[-3] == "rmse":
            forecast = parts[1] if len(parts) == 5 else "model"
            table[parts[-2]].setdefault(forecast, {})[float(parts[-1].rstrip("h"))] = value
    return table


def write_test_figures(
    datamodule: Any,
    table: Mapping[str, Mapping[str, Mapping[float, float]]],
    sample: Mapping[str, Any] | None,
    fields: Sequence[str],
    latitudes: np.ndarray,
    longitudes: np.ndarray,
    out_dir: Path,
    title: str,
    plot_variable: str | None = None,
) -> list[Path]:
    """Writes ``rmse_by_lead_time.png`` (from :func:`rmse_table`) and, given a ``sample``, ``forecast_map.png`` in
    ``out_dir``, with units from the store and coastlines (:func:`land_sea_mask`); returns the paths written.

    Args:
        datamodule: where units, time stamps and the land-sea mask come from (an ``ERA5DataModule``, or anything).
        table: ``{field: {forecast: {lead hours: RMSE in physical units}}}``.
        sample: ``{"forecast": [V_out, H, W], "truth": [V_out, H, W]`` tensors in physical units, ``"lead"`` hours,
            ``"index"`` the store time index of the input or ``None``}``, or ``None`` for no map.
        fields: the ``V_out`` output field names, in the order of the sample's channels.
        latitudes: ``[H]`` degrees. longitudes: ``[W]`` degrees east.
        out_dir: folder of the figures.
        title: title of the map.
        plot_variable: the one field to map; ``None`` maps every output field.

    Raises:
        ValueError: when ``plot_variable`` is not an output field, listing them.
    """
    from lightning_seqpar.weather.forecast_io import field_units, land_sea_mask

    units = {f: field_units(datamodule, f) for f in fields}
    paths = [plot_rmse_by_lead_time(table, out_dir / "rmse_by_lead_time.png", units)]
    if sample is not None:
        shown = list(fields)
        if plot_variable is not None:
            if plot_variable not in shown:
                raise ValueError(f"plot_variable={plot_variable!r} is not an output field; choose from {shown}")
            shown = [plot_variable]
        rows = [list(fields).index(f) for f in shown]
        store = getattr(datamodule, "store", None)
        init = (
            str(store.times[sample["index"]].astype("datetime64[m]"))
            if store is not None and sample["index"] is not None
            else "1970-01-01T00:00"
        )
        land, _ = land_sea_mask(datamodule, latitudes, longitudes)
        paths.append(plot_forecast_map(
            sample["forecast"][rows].numpy(), sample["truth"][rows].numpy(), latitudes, longitudes, shown,
            [units[f] for f in shown], init, sample["lead"], out_dir / "forecast_map.png", land=land, title=title,
        ))
    return paths
