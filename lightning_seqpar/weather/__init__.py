"""The weather application: a ClimaX-style ViT, ERA5 data, the forecasting LightningModule, metrics, plots and the CLI.

It is the reference recipe of lightning-seqpar and sits above the library: it imports the strategy, the strategy
never imports it. Its dependencies (xarray, zarr, netCDF4, h5netcdf, pandas, matplotlib,
jsonargparse) are the ``weather`` extra::

    pip install "lightning-seqpar[weather]"

Raises:
    ImportError: on import when one of those packages is missing, naming it and the command that installs it.
"""

from importlib.util import find_spec

_NEEDED = {"xarray": "xarray", "zarr": "zarr", "netCDF4": "netCDF4", "h5netcdf": "h5netcdf", "pandas": "pandas",
           "matplotlib": "matplotlib", "jsonargparse": "jsonargparse",
           "platformdirs": "platformdirs"}
_missing = sorted(pkg for module, pkg in _NEEDED.items() if find_spec(module) is None)
if _missing:
    raise ImportError(
        f"lightning_seqpar.weather needs {', '.join(_missing)}, which {'is' if len(_missing) == 1 else 'are'} not "
        "installed. The strategy itself does not; the weather application (ClimaX, ERA5 data, forecasting, CLI) "
        "does. Install them with: pip install \"lightning-seqpar[weather]\" (or pip install -e \".[weather]\" in a "
        "checkout).")
