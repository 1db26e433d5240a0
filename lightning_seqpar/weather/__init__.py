"""The weather application: a ClimaX-style ViT, ERA5 data, the forecasting LightningModule, metrics, plots and the CLI.

It is the reference recipe of lightning-seqpar and sits above the library: it imports the strategy, the strategy
never imports it. The model (``lightning_seqpar.weather.models``) needs torch alone; the data, the CLI and the
NetCDF/figure outputs need the ``weather`` extra (xarray, zarr, netCDF4, h5netcdf, pandas, matplotlib, jsonargparse,
platformdirs)::

    pip install "lightning-seqpar[weather]"
"""

from __future__ import annotations

from importlib.util import find_spec

#: The import names of the ``weather`` extra (pyproject.toml), which the data and the CLI need.
WEATHER_EXTRA = ("xarray", "zarr", "netCDF4", "h5netcdf", "pandas", "matplotlib", "jsonargparse", "platformdirs")


def require_weather_extra(part: str, modules: tuple[str, ...] = WEATHER_EXTRA) -> None:
    """Check that the packages ``part`` of the weather application imports are installed.

    Args:
        part: What needs them, for the message (e.g. ``"lightning_seqpar.weather.data"``).
        modules: Import names to look for; the whole ``weather`` extra by default.

    Raises:
        ImportError: naming every missing package and the command that installs them
            (``pip install "lightning-seqpar[weather]"``).
    """
    missing = sorted(module for module in modules if find_spec(module) is None)
    if missing:
        raise ImportError(
            f"{part} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed. The "
            "strategy itself does not; the weather application's data, CLI and outputs do. Install them with: "
            'pip install "lightning-seqpar[weather]" (or pip install -e ".[weather]" in a checkout).')
