"""ERA5 data in WeatherBench2 layout: the forecasting DataModule, its store reader and a synthetic store writer."""

from lightning_seqpar.data.era5 import ERA5DataModule, ERA5ForecastDataset, ERA5Store, parse_years
from lightning_seqpar.data.stats import FieldStatistics
from lightning_seqpar.data.synthetic import write_synthetic_era5

__all__ = ["ERA5DataModule", "ERA5ForecastDataset", "ERA5Store", "FieldStatistics", "parse_years", "write_synthetic_era5"]
