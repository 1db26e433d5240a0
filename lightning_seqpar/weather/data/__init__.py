"""ERA5 data in WeatherBench2 layout: the forecasting DataModule, its store reader and a synthetic store writer."""

# ruff: noqa: F401 - the imports below are re-exports for type checkers, made at run time by __getattr__

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lightning_seqpar.weather import require_weather_extra

require_weather_extra("lightning_seqpar.weather.data")

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from lightning_seqpar.weather.data.chunks import ChunkCache, rechunk_time
    from lightning_seqpar.weather.data.era5 import ERA5DataModule
    from lightning_seqpar.weather.data.samples import ERA5ForecastDataset, parse_years
    from lightning_seqpar.weather.data.stats import FieldStatistics, StatisticsCacheError
    from lightning_seqpar.weather.data.store import ERA5Store, StoreReadError
    from lightning_seqpar.weather.data.synthetic import write_synthetic_era5

# Imported on first use, so that `python -m lightning_seqpar.weather.data.synthetic` does not import the module twice.
_EXPORTS = {
    "ERA5DataModule": "era5", "ERA5ForecastDataset": "samples", "parse_years": "samples",
    "ERA5Store": "store", "StoreReadError": "store", "rechunk_time": "chunks", "ChunkCache": "chunks",
    "FieldStatistics": "stats", "StatisticsCacheError": "stats", "write_synthetic_era5": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_seqpar.weather.data' has no attribute {name!r}")
    return getattr(import_module(f"lightning_seqpar.weather.data.{_EXPORTS[name]}"), name)
