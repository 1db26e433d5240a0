"""The ERA5 forecasting LightningDataModule: splits by years, normalisation statistics, static and mask channels.

It reads an :class:`ERA5Store` and builds the samples of each split with :mod:`lightning_seqpar.weather.data.samples`.
Letters in shape comments: T times, V input fields, V_out output fields, S static channels, M mask channels,
H latitudes, W longitudes.
A *field* is one variable at one level: ``2m_temperature`` or ``geopotential_500``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_seqpar.weather.data.chunks import DEFAULT_CACHE_MB
from lightning_seqpar.weather.data.samples import ERA5ForecastDataset, forecast_pairs, lead_steps, parse_years
from lightning_seqpar.weather.data.stats import STATS_SUFFIX, FieldStatistics, load_or_compute_statistics
from lightning_seqpar.weather.data.store import ERA5Store, StoreReadError
from lightning_seqpar.weather.tiles import TiledDataset, TileLayout

__all__ = ["ERA5DataModule", "ERA5ForecastDataset", "ERA5Store", "StoreReadError", "parse_years"]


class ERA5DataModule(LightningDataModule):
    """Forecasting pairs from an ERA5 store, split by years and normalised per field, with optional static channels.

    Every batch is a dict: ``input`` float32 ``[B, V, H, W]``, ``target`` float32 ``[B, V_out, H, W]``,
    ``lead_time_hours`` float32 ``[B]`` and ``index`` int64 ``[B]`` (the store time index of the input).
    The V input channels are, in order, :attr:`dynamic_variables` (fields at time t), :attr:`static_variables`
    (time-invariant fields such as orography, as ClimaX uses them) and :attr:`mask_variables` (1 where a
    masked field has data, 0 where it was filled); :attr:`variables` lists all of them. Latitudes are
    always ascending (-90 to 90). Data parallelism needs nothing here: the train loader shuffles and
    Lightning (or the sequence-parallel strategy) swaps in its ``DistributedSampler``. docs/data.md lists
    the layouts read (WeatherBench2 zarr, WeatherBench v1 folders, current and older CDS NetCDF, GRIB).

    Args:
        path: a zarr directory, a NetCDF/GRIB file, a directory of files (or of one folder per variable,
            WeatherBench v1), or a glob.
        variables: time-dependent input fields, e.g. ``["2m_temperature", "geopotential_500"]``;
            ``<variable>_<level>`` picks a pressure level in hPa. ERA5 short names (``t2m``, ``z_500``)
            are accepted and reported by their WeatherBench2 names.
        out_variables: target fields; ``None`` means the same as ``variables``.
        lead_time_hours: forecast lead time, a multiple of the store's time step. A list draws one lead
            uniformly per training sample; validation and test then hold every (input time, lead) pair.
            ``None`` means one time step of the store.
        train_years: years of the train split, as a list, ``"2000-2002"`` or ``"2000,2002"``; ``None``
            means every year of the store not in ``val_years`` or ``test_years``.
        val_years: years of the validation split; ``None`` means no validation loader.
        test_years: years of the test split; ``None`` means no test loader.
        batch_size: samples per batch on each data-parallel rank.
        num_workers: DataLoader worker processes; each opens its own handle on the store.
        stats_path: cache file of the train-split statistics; ``None`` means ``<store>.seqpar-stats.nc``
            next to the data (or the user cache dir if that directory is read-only). A file given here is
            computed into when missing, and must then be writable: there is no fallback place.
        normalize: normalise every field with its train-split mean and std (static channels with their
            mean and std over the grid).
        pin_memory: passed to the DataLoaders.
        persistent_workers: passed to the DataLoaders when ``num_workers > 0``.
        select_index: positions along extra dims, e.g. ``{"number": 0}`` for one ensemble member.
        duplicate_times: ``"error"`` when two files share a time of a field, or ``"keep_first"`` to keep the first copy.
        static_variables: time-invariant input channels: variables without a time axis (``orography``,
            ``land_sea_mask``/``lsm``, ``lat2d`` of a WeatherBench ``constants`` file) or ``latitude``/``longitude``
            (degrees, from the grid). They are inputs only, never predicted.
        masked_variables: fields that are NaN on a fixed set of cells (sea-surface temperature over land).
            Those cells (NaN at the first train time) are filled with the field's train mean, a
            ``<field>_mask`` input channel (1 data, 0 filled) is added, and the cells are left out of the
            statistics, the loss and the metrics (:attr:`out_valid_mask`). NaN anywhere else is still an error.
        years_from_file_names: take each file's year from its name (``t2m_1980_5.625deg.nc``), keeping month,
            day and hour: for yearly files whose time axis was relabelled, as in the shipped WeatherBench sample.
        chunk_cache_mb: MiB of decoded multi-time zarr chunks kept per process, so that samples sharing a
            chunk decode it once; 0 turns the cache off (see :mod:`lightning_seqpar.weather.data.chunks`).
        tiles: TILES (ORBIT-2): the train split yields every ``tiles`` x ``tiles`` tile of every sample as a sample
            of its own (:class:`~lightning_seqpar.weather.tiles.TiledDataset`, with a ``tile`` index); validation,
            test and prediction keep whole fields, which a ``ForecastModule`` with the same ``tiles`` stitches.
            None: whole fields everywhere.
        tile_halo: cells of context around each tile's core.
    """

    def __init__(
        self,
        path: str,
        variables: list[str],
        out_variables: list[str] | None = None,
        lead_time_hours: int | list[int] | None = 6,
        train_years: list[int] | str | None = None,
        val_years: list[int] | str | None = None,
        test_years: list[int] | str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        stats_path: str | None = None,
        normalize: bool = True,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        select_index: dict[str, int] | None = None,
        duplicate_times: Literal["error", "keep_first"] = "error",
        static_variables: list[str] | None = None,
        masked_variables: list[str] | None = None,
        years_from_file_names: bool = False,
        chunk_cache_mb: float = DEFAULT_CACHE_MB,
        tiles: int | None = None,
        tile_halo: int = 2,
    ):
        super().__init__()
        self.save_hyperparameters()  # recorded in checkpoints and by LightningCLI
        if not variables:
            raise ValueError("variables is empty; name at least one field, e.g. ['2m_temperature']")
        self.path, self.select_index, self.duplicate_times = str(path), select_index, duplicate_times
        self._variables, self._out_variables = list(variables), list(out_variables or variables)
        self._static, self._masked = list(static_variables or []), list(masked_variables or [])
        self.years_from_file_names, self.chunk_cache_mb = years_from_file_names, chunk_cache_mb
        if lead_time_hours is None:  # one time step of the store
            store = ERA5Store(self.path, select_index, duplicate_times, fields=self._variables + self._out_variables,
                              years_from_file_names=years_from_file_names, chunk_cache_mb=chunk_cache_mb)
            lead_time_hours = int(round(store.step_hours))
        leads = [lead_time_hours] if isinstance(lead_time_hours, int) else list(lead_time_hours)
        if not leads or any(int(h) <= 0 for h in leads):
            raise ValueError(
                f"lead_time_hours={lead_time_hours!r} must be a positive number of hours or a non-empty list of them"
            )
        self.lead_times_hours = sorted({int(h) for h in leads})
        self.split_years = {
            "train": parse_years(train_years),
            "val": parse_years(val_years),
            "test": parse_years(test_years),
        }
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers, self.normalize = pin_memory, persistent_workers, normalize
        self.stats_path = stats_path
        self._store: ERA5Store | None = None
        self.statistics: FieldStatistics | None = None
        self._masks: dict[str, np.ndarray] | None = None
        self._static_inputs: np.ndarray | None = None
        self.static_mean: dict[str, float] = {}
        self.static_std: dict[str, float] = {}
        self.datasets: dict[str, ERA5ForecastDataset | TiledDataset] = {}
        self.tiles, self.tile_halo = tiles, tile_halo

    # --- metadata, available before setup() (opens the store's coordinates only) ---

    @property
    def store(self) -> ERA5Store:
        """The opened store; fields are validated on first access.

        Raises:
            ValueError: when a masked variable is not among the fields; ``KeyError`` when a field or static field
                is not in the store (both list what the store has).
        """
        if self._store is None:
            store = ERA5Store(
                self.path,
                self.select_index,
                self.duplicate_times,
                fields=self._variables + self._out_variables,
                years_from_file_names=self.years_from_file_names,
                chunk_cache_mb=self.chunk_cache_mb,
            )
            dynamic = {store.canonical(f) for f in self._variables + self._out_variables}
            unknown = [f for f in self._masked if store.canonical(f) not in dynamic]
            if unknown:
                raise ValueError(
                    f"masked_variables {unknown} are not among variables or out_variables {sorted(dynamic)}"
                )
            for name in self._static:
                store.read_static(name)  # fails early, listing the static fields the store has
            self._store = store
        return self._store

    @property
    def dynamic_variables(self) -> list[str]:
        """Time-dependent input field names, in WeatherBench2 spelling (``geopotential_500``)."""
        return [self.store.canonical(f) for f in self._variables]

    @property
    def static_variables(self) -> list[str]:
        """Time-invariant input channel names, as given (``orography``, ``land_sea_mask``, ``latitude``)."""
        _ = self.store  # opening the store checks the static fields
        return list(self._static)

    @property
    def mask_variables(self) -> list[str]:
        """Mask input channel names, ``<field>_mask`` for every field of ``masked_variables``."""
        return [f"{self.store.canonical(f)}_mask" for f in self._masked]

    @property
    def variables(self) -> list[str]:
        """Names of the ``V`` input channels: dynamic fields, then static channels, then mask channels."""
        return self.dynamic_variables + self.static_variables + self.mask_variables

    @property
    def out_variables(self) -> list[str]:
        """Target field names ``V_out``."""
        return [self.store.canonical(f) for f in self._out_variables]

    @property
    def latitudes(self) -> np.ndarray:
        """``[H]`` latitudes in degrees, ascending."""
        return self.store.latitudes

    @property
    def longitudes(self) -> np.ndarray:
        """``[W]`` longitudes in degrees east, as stored."""
        return self.store.longitudes

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return len(self.store.latitudes), len(self.store.longitudes)

    @property
    def model_grid_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the fields the model sees: :attr:`grid_shape`, or with TILES one tile with its halo
        (``tile_layout.tile_shape``). The ``seqpar`` command builds the model's ``img_size`` from it."""
        layout = self.tile_layout
        return self.grid_shape if layout is None else tuple(layout.tile_shape)

    @property
    def tile_layout(self) -> TileLayout | None:
        """The TILES layout of the train split (``tiles`` x ``tiles`` over :attr:`grid_shape`), or None."""
        return None if self.tiles is None else TileLayout(self.grid_shape, self.tiles, self.tile_halo)

    @property
    def time_step_hours(self) -> float:
        """Hours between consecutive times of the store."""
        return self.store.step_hours

    # --- statistics, masks and static channels ---

    def _default_stats_path(self) -> Path:
        base = Path(os.path.dirname(self.path) if any(ch in self.path for ch in "*?[") else self.path.rstrip("/"))
        return base.parent / (base.name + STATS_SUFFIX)

    def split_indices(self, split: Literal["train", "val", "test"]) -> np.ndarray:
        """Store time indices whose year is in ``split``; raises if a named year is not in the store."""
        years = self.split_years[split]
        if years is None and split == "train":
            held_out = set(self.split_years["val"] or []) | set(self.split_years["test"] or [])
            years = [int(y) for y in np.unique(self.store.years) if y not in held_out]
        if not years:
            raise ValueError(f"the {split} split is empty (years {years}); store {self.path!r} has years "
                             f"{np.unique(self.store.years).tolist()}; set {split}_years")
        missing = sorted(set(years) - set(self.store.years.tolist()))
        if missing:
            raise ValueError(f"{split}_years {missing} not in {self.path!r}, which has years "
                             f"{np.unique(self.store.years).tolist()}; choose {split}_years among those")
        self.split_years[split] = years
        return np.flatnonzero(np.isin(self.store.years, years))

    @property
    def field_masks(self) -> dict[str, np.ndarray]:
        """``{field: [H, W] bool}`` cells holding data of each masked field (its non-NaN cells at the first train
        time)."""
        if self._masks is None:
            first = self.split_indices("train")[:1]
            fields = [self.store.canonical(f) for f in self._masked]
            values = self.store.read(fields, first)[0] if fields else []  # [M, H, W]
            self._masks = {f: ~np.isnan(v) for f, v in zip(fields, values)}
            for f, valid in self._masks.items():
                if valid.all():
                    rank_zero_warn(f"masked variable {f!r} has no NaN at {self.store.describe_time(int(first[0]))}; "
                                   "its mask channel is all ones")
                rank_zero_info(
                    f"ERA5DataModule: {f} is NaN on {int((~valid).sum())} of {valid.size} cells; they are filled "
                    "with its train mean and left out of the loss and metrics"
                )
        return self._masks

    @property
    def out_valid_mask(self) -> np.ndarray | None:
        """``[V_out, H, W]`` float32, 1 where the target holds data and 0 where a masked field was filled;
        ``None`` when no output field is masked. The loss and the metrics weigh each cell by it."""
        masks = self.field_masks
        if not any(f in masks for f in self.out_variables):
            return None
        return np.stack([masks.get(f, np.ones(self.grid_shape, bool)) for f in self.out_variables]).astype(np.float32)

    def _load_statistics(self) -> FieldStatistics:
        if self.statistics is None:
            fields = list(dict.fromkeys(self.dynamic_variables + self.out_variables))
            self.statistics, used = load_or_compute_statistics(
                self.store.read,
                fields,
                self.split_indices("train"),
                self.split_years["train"],
                self.grid_shape,
                Path(self.stats_path) if self.stats_path else self._default_stats_path(),
                describe_time=self.store.describe_time,
                fallback_to_user_cache=not self.stats_path,
                valid=self.field_masks,
            )
            rank_zero_info(f"ERA5DataModule: normalisation statistics of {len(fields)} fields from {used}")
        return self.statistics

    @property
    def static_inputs(self) -> np.ndarray:
        """``[S + M, H, W]`` float32 static channels (normalised by their grid mean and std when ``normalize``),
        then the mask channels (0/1), in the order of :attr:`static_variables` and :attr:`mask_variables`.

        Raises:
            ValueError: when a static field has NaN cells.
        """
        if self._static_inputs is None:
            channels = []
            for name in self.static_variables:
                field = self.store.read_static(name).astype(np.float64)  # [H, W]
                if np.isnan(field).any():
                    raise ValueError(
                        f"static field {name!r} of {self.path!r} has NaN on {int(np.isnan(field).sum())} cells; "
                        "fill them in the constants file"
                    )
                self.static_mean[name], self.static_std[name] = float(field.mean()), float(field.std() or 1.0)
                channels.append((field - self.static_mean[name]) / self.static_std[name] if self.normalize else field)
            channels += [self.field_masks[self.store.canonical(f)] for f in self._masked]
            self._static_inputs = (
                np.stack(channels).astype(np.float32) if channels else np.zeros((0, *self.grid_shape), np.float32)
            )
        return self._static_inputs

    @property
    def mean(self) -> dict[str, float]:
        """``{field: mean}`` over the train split, physical units."""
        return self._load_statistics().mean

    @property
    def std(self) -> dict[str, float]:
        """``{field: standard deviation}`` over the train split, physical units."""
        return self._load_statistics().std

    @property
    def out_mean(self) -> np.ndarray:
        """``[V_out]`` float32 means in ``out_variables`` order, to de-normalise predictions."""
        return np.array([self.mean[f] for f in self.out_variables], np.float32)

    @property
    def out_std(self) -> np.ndarray:
        """``[V_out]`` float32 standard deviations in ``out_variables`` order."""
        return np.array([self.std[f] for f in self.out_variables], np.float32)

    @property
    def climatology(self) -> np.ndarray:
        """``[V_out, H, W]`` float32 mean over the train split at each grid point, in physical units (for ACC)."""
        stats = self._load_statistics()
        return np.stack([stats.climatology[f] for f in self.out_variables])

    # --- Lightning hooks ---

    def prepare_data(self) -> None:
        """Computes and caches the train-split statistics once (on local rank 0 of each node)."""
        self._load_statistics()

    def setup(self, stage: str | None = None) -> None:
        """Builds the datasets of the splits that ``stage`` needs (all of them for ``None``)."""
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}.get(
            stage, ["train", "val", "test"]
        )
        steps = lead_steps(self.lead_times_hours, self.store.step_hours, repr(self.path))
        stats = self._load_statistics() if self.normalize or self._masked else None
        for split in wanted:
            if self.split_years[split] is None and split != "train":
                continue
            self.datasets[split] = self._make_dataset(split, steps, stats)
            if split == "train" and self.tile_layout is not None:  # TILES: every tile of every sample
                self.datasets[split] = TiledDataset(self.datasets[split], self.tile_layout)
        for split in ("val", "test"):
            shared = sorted(set(self.split_years["train"] or []) & set(self.split_years[split] or []))
            if shared:
                rank_zero_warn(f"train and {split} splits share years {shared}; {split} scores will be optimistic")

    def _make_dataset(self, split: str, steps: list[int], stats: FieldStatistics | None) -> ERA5ForecastDataset:
        in_split = np.zeros(len(self.store.times), bool)
        in_split[self.split_indices(split)] = True
        inits, targets, lead_index = forecast_pairs(
            in_split, self.store.offset_index, steps, draw_lead=split == "train"
        )
        if len(inits) == 0:
            raise ValueError(
                f"the {split} split (years {self.split_years[split]}) has no input whose target "
                f"{max(self.lead_times_hours)} h later is in the same split; add years or shorten lead_time_hours"
            )
        normalise = stats is not None and self.normalize
        mean, std = (stats.mean, stats.std) if normalise else (None, None)
        masks = {f: (valid, stats.mean[f]) for f, valid in self.field_masks.items()}
        return ERA5ForecastDataset(
            self.store,
            self.dynamic_variables,
            self.out_variables,
            inits,
            targets,
            steps,
            lead_index,
            mean,
            std,
            self.static_inputs,
            masks,
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        if split not in self.datasets:
            if self.split_years[split] is None:
                return []  # no such split: Lightning skips the loop
            raise RuntimeError(f"the {split} dataset is not built; call setup() first (Lightning does this for you)")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled train loader (Lightning replaces the sampler with a ``DistributedSampler`` under data
        parallelism)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader in time order, or ``[]`` when ``val_years`` is ``None``."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        """Test loader in time order, or ``[]`` when ``test_years`` is ``None``."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | list:
        """Forecasts for the test years, in time order (``seqpar predict``)."""
        return self._loader("test", shuffle=False)
