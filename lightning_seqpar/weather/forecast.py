"""The forecasting LightningModule: latitude-weighted MSE training, skill against baselines, AdamW with warmup + cosine.

Letters in shape comments: B batch, V input fields, V_out output fields, H latitudes, W longitudes, K lead times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_seqpar.weather.forecast_checkpoint import (
    DATA_KEY,
    DataMapping,
    TrainedData,
    build_model,
    check_single_file,
    map_data,
    model_config,
)
from lightning_seqpar.weather.metrics import ForecastSkill, latitude_weighted_mse, latitude_weights
from lightning_seqpar.weather.plots import rmse_table, write_test_figures
from lightning_seqpar.weather.tiles import TiledDataset, TileLayout, forward_tiles, tiled_mse

__all__ = ["ForecastModule", "latitude_weighted_mse", "warmup_cosine"]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup from 1/warmup_steps to 1, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(max_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ForecastModule(LightningModule):
    """Trains a forecaster `model(x, lead_time_hours, variables, out_variables)` on ERA5DataModule batches.

    The variables, latitudes, normalisation statistics, climatology and lead times are read from
    `trainer.datamodule` in `setup()` (an `ERA5DataModule` or anything with the same attributes). The first data a
    module sees is what it is trained on: checkpoints carry it (`checkpoint["forecast_data"]`, see
    `lightning_seqpar.weather.forecast_checkpoint`) together with the network's configuration, so that
    `ForecastModule.load_from_checkpoint(path)` returns a model ready to forecast (`forward`, `forecast`) without a
    datamodule, and data given later is mapped onto the trained fields by name or refused with
    `DataMismatchError` naming the difference.

    Args:
        model: the network, e.g. `lightning_seqpar.weather.models.ClimaX` (in YAML: `class_path` + `init_args`). A
            model with a `config` mapping of its constructor arguments (ClimaX has one) is recorded in the
            hyperparameters; a `{"class_path", "init_args"}` mapping is built (that is how a checkpoint restores it).
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay, not applied to embeddings, norms and biases.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warmup; 0 means none.
        max_steps: optimizer step at which the cosine decay ends; None means the trainer's estimate of the
            total number of steps (`trainer.estimated_stepping_batches`).
        min_lr_ratio: learning rate at the end of the decay, as a fraction of `lr`.
        residual: predict the change from the input: forecast = input fields of `out_variables` + model output
            (in normalised units). Persistence is then where training starts, which short lead times need to
            beat it early; every output field must be an input field.
        loss_weights: weight of each output field in the loss, by name (others weigh 1); the weights are
            rescaled to mean 1 over the output fields. Use it to up-weight fields whose change over one lead
            time is small next to their variability (normalised MSE then undervalues them).
        plot_variable: the one field drawn in the forecast map written after testing; None means every output field.
        tiles: TILES (ORBIT-2, arXiv 2505.04802): cut every field into ``tiles`` x ``tiles`` tiles with a halo and run
            each as its own sequence; the model is built for the tile shape (``TileLayout.tile_shape``). Training
            batches of tiles (``ERA5DataModule(tiles=...)``) are scored on the tiles' cores; validation, test,
            prediction and `forecast` run every tile of a whole field and stitch the cores (metrics on the stitched
            field). None: whole fields. See `lightning_seqpar.weather.tiles`.
        tile_halo: cells of context around each tile's core (cropped when stitching).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 5e-4,
        weight_decay: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 1000,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        residual: bool = False,
        loss_weights: dict[str, float] | None = None,
        plot_variable: str | None = None,
        tiles: int | None = None,
        tile_halo: int = 2,
    ) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if max_steps is not None and max_steps <= 0:
            raise ValueError(f"max_steps must be positive or None (the trainer's estimate), got {max_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if isinstance(model, Mapping):
            model = build_model(model)
        self.save_hyperparameters(ignore=["model"])
        # The network is rebuilt from its own configuration (not the CLI's instantiator), in plain Python as well.
        self.hparams.pop("_instantiator", None)
        config = model_config(model)
        if config is not None:
            self.hparams["model"] = config
        self.model = model
        self.trained_data: TrainedData | None = None  # what the model is (being) trained on
        self.data_in_use: TrainedData | None = None  # the data of the current run, mapped onto trained_data
        self.data_mapping: DataMapping | None = None
        self.variables: list[str] = []
        self.out_variables: list[str] = []
        self.lead_times_hours: list[float] = []
        self.latitudes = np.zeros(0)
        self.longitudes = np.zeros(0)
        self._plot_sample: dict[str, Any] | None = None
        self.tile_layout: TileLayout | None = None

    # --- wiring to the data ---

    def setup(self, stage: str) -> None:
        """Reads fields, grid, statistics and lead times from the datamodule, maps them onto the trained ones and builds
        the skill metrics.

        Raises:
            RuntimeError: when the trainer has no datamodule with the attributes listed above.
            DataMismatchError: when the data does not map onto the fields the model was trained on.
        """
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        needed = ("variables", "out_variables", "latitudes", "longitudes", "lead_times_hours", "climatology")
        missing = [name for name in needed if dm is None or not hasattr(dm, name)]
        if missing:
            raise RuntimeError(
                f"ForecastModule reads {missing} from trainer.datamodule; pass an ERA5DataModule "
                "(trainer.fit(module, datamodule=dm)) or a datamodule with the same attributes"
            )
        data = TrainedData.from_datamodule(dm)
        self._use_data(self.trained_data or data, data)
        self._build_metrics_and_baselines(data, getattr(dm, "out_valid_mask", None))
        data_tiles = getattr(dm, "tile_layout", None)  # TILES: the datamodule's training tiles must be the module's
        if data_tiles is not None and data_tiles != self.tile_layout:
            raise ValueError(f"the datamodule cuts training samples into {data_tiles} but the ForecastModule tiles as "
                             f"{self.tile_layout}; give both the same tiles and tile_halo")
        built_for = getattr(self.model, "img_size", None)
        if self.tile_layout is not None and built_for is not None and tuple(built_for) != self.tile_layout.tile_shape:
            raise ValueError(
                f"the model was built for a {tuple(built_for)} grid but with TILES it sees tiles of"
                f" {self.tile_layout.tile_shape} ({self.tile_layout}); build it with"
                f" img_size={list(self.tile_layout.tile_shape)} (ERA5DataModule.model_grid_shape; the seqpar command"
                " does this when data.tiles is set)"
            )

    def _use_data(self, trained: TrainedData, data: TrainedData) -> None:
        """Batches of `data` feed the model trained on `trained`: fields mapped by name, units converted (buffers)."""
        if self.hparams.residual:
            absent = [f for f in trained.out_variables if f not in trained.variables]
            if absent:
                raise ValueError(
                    f"residual=True forecasts input + change, but output fields {absent} are not inputs; "
                    "add them to data.variables or set model.residual=false"
                )
        mapping = map_data(trained, data)
        unseen = sorted(set(data.lead_times_hours) - set(trained.lead_times_hours))
        if unseen:
            rank_zero_warn(
                f"ForecastModule: lead times {unseen} h were not trained on (trained: {trained.lead_times_hours} h)"
            )
        self.trained_data, self.data_in_use, self.data_mapping = trained, data, mapping
        persist = [trained.variables.index(f) for f in trained.out_variables] if self.hparams.residual else []
        device = self.device
        buffers = {
            "in_index": torch.as_tensor(mapping.in_index, dtype=torch.long),  # [V] data channel of each trained input
            "out_index": torch.as_tensor(
                mapping.out_index, dtype=torch.long
            ),  # [V_out] trained output of each data one
            "in_scale": mapping.in_scale.view(-1, 1, 1),
            "in_shift": mapping.in_shift.view(-1, 1, 1),  # [V, 1, 1]
            "out_scale": mapping.out_scale.view(-1, 1, 1),
            "out_shift": mapping.out_shift.view(-1, 1, 1),
            "trained_persist_pos": torch.as_tensor(persist, dtype=torch.long),  # input of each output, trained order
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(device), persistent=False)

    def _build_metrics_and_baselines(self, data: TrainedData, valid_mask: Any = None) -> None:
        """Loss weights, de-normalisation, baselines and skill metrics, in the units and order of `data`;
        `valid_mask` ([V_out, H, W], 1 where targets hold data) keeps filled cells of masked fields out of both."""
        self.variables, self.out_variables = list(data.variables), list(data.out_variables)
        self.lead_times_hours = list(data.lead_times_hours)
        self.latitudes, self.longitudes = np.asarray(data.latitudes), np.asarray(data.longitudes)
        if self.hparams.get("tiles") is not None:
            grid = (len(self.latitudes), len(self.longitudes))
            self.tile_layout = TileLayout(grid, self.hparams.tiles, self.hparams.tile_halo)
        unknown = sorted(set(self.hparams.loss_weights or {}) - set(self.out_variables))
        if unknown:
            raise ValueError(f"loss_weights names {unknown}, which are not output fields {self.out_variables}")
        field_weights = torch.tensor([(self.hparams.loss_weights or {}).get(f, 1.0) for f in self.out_variables])
        if (field_weights < 0).any() or field_weights.sum() <= 0:
            raise ValueError(f"loss_weights must be >= 0 and not all 0, got {self.hparams.loss_weights}")
        normalized = data.normalized
        out_mean = np.asarray(
            [data.mean[f] for f in self.out_variables] if normalized else np.zeros(len(self.out_variables)), np.float32
        )
        out_std = np.asarray(
            [data.std[f] for f in self.out_variables] if normalized else np.ones(len(self.out_variables)), np.float32
        )
        if data.climatology is None:
            raise RuntimeError("ForecastModule needs the climatology of the output fields (datamodule.climatology)")
        climatology = np.asarray(data.climatology, np.float32)  # [V_out, H, W], physical
        # Cells of masked fields (sea-surface temperature over land) hold filled values: out of loss and metrics.
        valid = valid_mask  # [V_out, H, W] or None
        buffers = {
            "lat_weights": latitude_weights(self.latitudes).float(),  # [H]
            "field_weights": (field_weights / field_weights.mean()).float(),  # [V_out], mean 1
            "out_mean": torch.from_numpy(out_mean).view(-1, 1, 1),  # [V_out, 1, 1]
            "out_std": torch.from_numpy(out_std).view(-1, 1, 1),
            "valid_mask": None if valid is None else torch.as_tensor(np.asarray(valid, np.float32)),  # [V_out, H, W]
        }
        for name, value in buffers.items():
            self.register_buffer(name, None if value is None else value.to(self.device), persistent=False)

        def skill(prefix: str, forecasts: tuple[str, ...], acc: bool) -> ForecastSkill:
            return ForecastSkill(self.variables, self.out_variables, self.latitudes, self.lead_times_hours, climatology,
                                 out_mean if normalized else None, out_std if normalized else None, valid, prefix,
                                 forecasts, acc)

        self.skill = nn.ModuleDict({
            "val": skill("val/", ("model", "persistence"), acc=False),
            "test": skill("test/", ("model", "persistence", "climatology"), acc=True),
        }).to(self.device)

    def configure_model(self) -> None:
        """Materialises a model that was built on the meta device and initialises it with its own `init_weights`.

        Raises:
            RuntimeError: when a meta-device model has neither ``init_weights`` nor ``reset_parameters``.
        """
        if any(p.is_meta for p in self.model.parameters()):
            self.model.to_empty(device=self.device)
            init = getattr(self.model, "init_weights", None) or getattr(self.model, "reset_parameters", None)
            if init is None:
                raise RuntimeError(f"{type(self.model).__name__} is on the meta device but has no init_weights()")
            init()

    # --- steps ---

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Normalised forecast [B, V_out, H, W] of one batch, in the fields and units of the data in use.

        Raises:
            RuntimeError: before the module knows its fields (no setup, no checkpoint).
        """
        if self.trained_data is None or self.data_mapping is None:
            raise RuntimeError(
                "ForecastModule does not know its fields yet: run it under a Trainer with a datamodule, or load it with"
                " ForecastModule.load_from_checkpoint(path)"
            )
        x = batch["input"]  # [B, V, H, W], the data's order and units
        if not self.data_mapping.identity:  # the trained order and units; exact, field by field
            x = x[:, self.in_index] * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        trained = self.trained_data
        def run(inputs: Tensor, lead: Tensor) -> Tensor:
            return self.model(inputs, lead, trained.variables, trained.out_variables)  # [B, V_out_trained, H, W]

        pred = forward_tiles(run, x, batch["lead_time_hours"], self.tile_layout)  # TILES: tiles run, fields stitched
        if self.hparams.residual:
            # The inputs are normalised with the same per-field statistics as the targets.
            pred = pred + x[:, self.trained_persist_pos].to(pred.dtype)
        if not self.data_mapping.identity:
            pred = pred[:, self.out_index] * self.out_scale.to(pred.dtype) + self.out_shift.to(pred.dtype)
        return pred

    @torch.no_grad()
    def forecast(self, fields: Tensor, lead_time_hours: float | Tensor) -> Tensor:
        """Forecast in physical units from fields in physical units, e.g. right after `load_from_checkpoint`.

        Args:
            fields: [B, V, H, W] input fields in the order of `self.variables`, physical units, on the module's grid.
            lead_time_hours: one lead time for all samples or [B] lead times, hours.

        Returns:
            [B, V_out, H, W] forecast of `self.out_variables`, physical units.

        Raises:
            RuntimeError: before the module knows its fields.
            ValueError: when ``fields`` is not ``[B, V, H, W]`` or a field's statistics are unknown.
        """
        data = self.data_in_use
        if data is None:
            raise RuntimeError(
                "ForecastModule.forecast needs the module's fields: load it from a checkpoint or set it up first"
            )
        if fields.ndim != 4 or fields.shape[1] != len(data.variables):
            raise ValueError(
                f"fields must be [B, {len(data.variables)}, H, W] ({data.variables}), got {tuple(fields.shape)}"
            )
        units = [data.units(f) for f in data.variables]
        if None in units:
            raise ValueError(f"the normalisation statistics of some of {data.variables} are unknown; cannot normalise")
        mean = torch.tensor([u[0] for u in units], device=fields.device).view(-1, 1, 1)  # [V, 1, 1]
        std = torch.tensor([u[1] for u in units], device=fields.device).view(-1, 1, 1)
        lead = torch.as_tensor(lead_time_hours, dtype=torch.float32, device=fields.device).expand(fields.shape[0])
        pred = self({"input": ((fields.float() - mean) / std).to(fields.device), "lead_time_hours": lead})
        return pred.float() * self.out_std + self.out_mean

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if "tile" in batch:  # TILES: a batch of tiles, scored on their cores with their own latitudes
            if self.tile_layout is None:
                raise ValueError(
                    "the datamodule yields tiles (tiles=...) but the ForecastModule has tiles=None; set both"
                )
            weights = TiledDataset.cell_weights(self.tile_layout, self.lat_weights, batch["tile"], self.valid_mask)
            loss = tiled_mse(self(batch), batch["target"], weights, self.field_weights)
        else:
            loss = latitude_weighted_mse(
                self(batch), batch["target"], self.lat_weights, self.field_weights, self.valid_mask
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Logs ``val/loss`` and scores the forecast and persistence with the ``val`` skill metrics."""
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Logs ``test/loss``, scores the forecast and both baselines, and keeps the first sample for the map."""
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """De-normalised forecast [B, V_out, H, W] in physical units, with the batch's `index` and lead times."""
        forecast = self(batch).float() * self.out_std + self.out_mean
        return {"forecast": forecast, "index": batch["index"], "lead_time_hours": batch["lead_time_hours"]}

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        pred = self(batch)  # [B, V_out, H, W], normalised
        target, lead = batch["target"], batch["lead_time_hours"]
        loss = latitude_weighted_mse(pred, target, self.lat_weights, self.field_weights, self.valid_mask)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=pred.shape[0])
        self.skill[stage].update(batch, pred)  # the metrics de-normalise
        if stage == "test" and self._plot_sample is None:
            physical = [x[0].float() * self.out_std + self.out_mean for x in (pred, target)]  # [V_out, H, W]
            self._plot_sample = {"forecast": physical[0].cpu(), "truth": physical[1].cpu(), "lead": float(lead[0]),
                                 "index": int(batch["index"][0]) if "index" in batch else None}

    def _log_skill(self, stage: str) -> dict[str, float]:
        """Computes (synced over the data-parallel ranks), logs and resets the metrics of `stage`."""
        values = {key: float(value) for key, value in self.skill[stage].compute().items()}
        self.skill[stage].reset()
        self.log_dict(values, sync_dist=True)  # already synced by the metrics: averaging equal values is a no-op
        return values

    def on_validation_epoch_end(self) -> None:
        """Logs `val/rmse/<field>/<lead>h` and `val/persistence/rmse/<field>/<lead>h`, in physical units."""
        self._log_skill("val")

    def on_test_epoch_start(self) -> None:
        """Forgets the previous test's map sample."""
        self._plot_sample = None

    def on_test_epoch_end(self) -> None:
        """Logs RMSE and ACC per field and lead time of the model and the baselines, then writes the figures
        (``rmse_by_lead_time.png``, ``forecast_map.png`` of the first test sample) in :meth:`figure_dir`."""
        values = self._log_skill("test")
        if self.trainer.is_global_zero:
            paths = write_test_figures(
                self.trainer.datamodule, rmse_table(values, self.out_variables), self._plot_sample, self.out_variables,
                self.latitudes, self.longitudes, self.figure_dir(), f"{type(self.model).__name__} forecast",
                self.hparams.plot_variable,
            )
            rank_zero_info("ForecastModule: wrote " + ", ".join(str(p) for p in paths))

    def figure_dir(self) -> Path:
        """Where the test figures go: the logger's directory, else `trainer.default_root_dir`."""
        logger = self.trainer.logger
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        return Path(log_dir or self.trainer.default_root_dir)

    # --- checkpoints ---

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Records the data the model was trained on (fields in order, statistics, grid, lead times)."""
        if self.trained_data is not None:
            checkpoint[DATA_KEY] = self.trained_data.to_checkpoint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the trained data: a loaded module forecasts without a datamodule, and data set up before (resuming,
        testing) is mapped onto the trained fields by name, or refused with `DataMismatchError`."""
        record = checkpoint.get(DATA_KEY)
        if record is None:
            return
        trained = TrainedData.from_checkpoint(record)
        if self.data_in_use is None:  # loaded alone: the data in use is the trained data
            self._use_data(trained, trained)
            self._build_metrics_and_baselines(trained)
        else:  # the datamodule set up its data first; its metrics stay (their process group is set)
            self._use_data(trained, self.data_in_use)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> ForecastModule:  # type: ignore[override]
        """`LightningModule.load_from_checkpoint`, with the network rebuilt from the checkpoint's configuration and the
        trained data restored. A sharded DeepSpeed checkpoint (a directory) raises `ShardedCheckpointError` with the
        command that consolidates it into one file."""
        check_single_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # --- optimisation ---

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices, none on embeddings, norms and biases."""
        skip = set(getattr(self.model, "no_weight_decay", lambda: set())())
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warmup and cosine decay, stepped every optimizer step."""
        max_steps = self.hparams.max_steps or int(self.trainer.estimated_stepping_batches)
        warmup = min(self.hparams.warmup_steps, max_steps)
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, max_steps, self.hparams.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}
