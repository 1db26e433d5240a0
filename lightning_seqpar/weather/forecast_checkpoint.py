"""What a forecasting checkpoint carries besides weights, and how it is matched against the data it is used with.

A :class:`~lightning_seqpar.weather.forecast.ForecastModule` checkpoint records (1) how to build its network
(``hyper_parameters["model"]``: ``{"class_path", "init_args"}``, so ``ForecastModule.load_from_checkpoint(path)``
needs nothing else) and (2) the data it was trained on (``checkpoint["forecast_data"]``): input and output field
names in channel order, the normalisation statistics, the grid and the lead times. Used later with other data, the
fields are mapped by name (another order, other statistics) or refused with an error that names the difference,
so a model never forecasts with its input rows in the wrong order or in the wrong units.

Letters in shape comments: V input fields, V_out output fields, H latitudes, W longitudes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DATA_KEY", "DataMapping", "DataMismatchError", "ShardedCheckpointError", "TrainedData", "build_model",
           "check_single_file", "map_data", "model_config"]

DATA_KEY = "forecast_data"
"""Checkpoint key of :meth:`TrainedData.to_checkpoint`."""

GRID_ATOL_DEGREES = 1e-4


class DataMismatchError(ValueError):
    """The data a checkpoint is used with cannot be mapped onto the data it was trained on."""


class ShardedCheckpointError(IsADirectoryError):
    """A sharded (DeepSpeed ZeRO) checkpoint directory was given where one file is needed."""


def check_single_file(path: Any) -> None:
    """Raise :class:`ShardedCheckpointError` with the consolidation command when ``path`` is a checkpoint directory."""
    if not isinstance(path, (str, Path)) or str(path).startswith(("http://", "https://")) or not Path(path).is_dir():
        return
    path = Path(path)
    output = path.with_name(path.name.removesuffix(".ckpt") + "-consolidated.ckpt")
    raise ShardedCheckpointError(
        f"{str(path)!r} is a directory: a sharded checkpoint written by SeqParStrategy with DeepSpeed (zero_stage > 0 "
        f"or"
        " pipeline stages), one ZeRO partition per rank. Consolidate it into one file first (one process, CPU):\n"
        f"    python -m lightning_seqpar.consolidate '{path}' '{output}'\n"
        f"then load '{output}'. See docs/recipes.md, 'Checkpoints'."
    )


# --- the network's configuration ---------------------------------------------------------------------------


def model_config(model: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of ``model`` when it reports its constructor arguments (a ``config`` mapping,
    as :class:`~lightning_seqpar.weather.models.ClimaX` has), else ``None``."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        return None
    cls = type(model)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(config)}


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """The network a checkpoint's ``{"class_path", "init_args"}`` describes.

    Only classes of this package, or of modules the program has already imported, are built: a checkpoint cannot make
    Python import (and run) a module of its choice.

    Raises:
        ValueError: when the mapping lacks ``class_path``/``init_args``, the class's module is not imported
            (by design: a checkpoint does not import code), or the class is not an ``nn.Module``.
    """
    if not isinstance(config.get("class_path"), str):
        raise ValueError(f"a model configuration needs a 'class_path' string and 'init_args', got {dict(config)!r}")
    module_name, _, name = config["class_path"].rpartition(".")
    if module_name not in sys.modules and not module_name.startswith("lightning_seqpar."):
        raise ValueError(
            f"the checkpoint's model class {config['class_path']!r} is in module {module_name!r}, which is not "
            f"imported;"
            f" import it first (import {module_name}) if you trust the checkpoint, or pass model=... to "
            f"load_from_checkpoint."
        )
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"the checkpoint's model class {config['class_path']!r} is not an nn.Module class")
    return cls(**dict(config.get("init_args", {})))


# --- the data ---------------------------------------------------------------------------------------------


@dataclass
class TrainedData:
    """The data of a forecasting run, as the model sees it.

    Attributes:
        variables: input field names ``V``, in channel order.
        out_variables: output field names ``V_out``, in channel order.
        lead_times_hours: lead times, hours.
        latitudes: ``[H]`` degrees, ascending.
        longitudes: ``[W]`` degrees east.
        normalized: whether inputs and targets are ``(value - mean) / std`` (else physical units).
        mean: ``{field: mean}`` in physical units, for every input and output field whose statistics are known.
        std: ``{field: standard deviation}``, physical units.
        climatology: ``[V_out, H, W]`` mean over the training years, physical units, or ``None``.
    """

    variables: list[str]
    out_variables: list[str]
    lead_times_hours: list[float]
    latitudes: list[float]
    longitudes: list[float]
    normalized: bool = True
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    climatology: Tensor | None = None

    @classmethod
    def from_datamodule(cls, dm: Any) -> TrainedData:
        """Read an :class:`~lightning_seqpar.weather.data.ERA5DataModule` (or anything with the same attributes)."""
        variables, out_variables = [str(v) for v in dm.variables], [str(v) for v in dm.out_variables]
        normalized = bool(getattr(dm, "normalize", True))
        mean, std = {}, {}
        if normalized:
            full_mean, full_std = getattr(dm, "mean", None), getattr(dm, "std", None)
            if isinstance(full_mean, Mapping) and isinstance(full_std, Mapping):
                mean = {f: float(full_mean[f]) for f in dict.fromkeys(variables + out_variables) if f in full_mean}
                std = {f: float(full_std[f]) for f in mean if f in full_std}
            # The output statistics are required (they de-normalise the forecasts): from out_mean/out_std if not above.
            for f, m, s in zip(out_variables, np.asarray(dm.out_mean).reshape(-1), np.asarray(dm.out_std).reshape(-1)):
                if f not in mean or f not in std:
                    mean[f], std[f] = float(m), float(s)
        climatology = getattr(dm, "climatology", None)
        return cls(
            variables=variables,
            out_variables=out_variables,
            lead_times_hours=[float(h) for h in dm.lead_times_hours],
            latitudes=[float(x) for x in np.asarray(dm.latitudes)],
            longitudes=[float(x) for x in np.asarray(dm.longitudes)],
            normalized=normalized,
            mean=mean,
            std=std,
            climatology=None if climatology is None else torch.as_tensor(np.asarray(climatology, np.float32)),
        )

    def units(self, field: str) -> tuple[float, float] | None:
        """``(mean, std)`` with which ``field`` is normalised in the batches (``(0, 1)``: physical), or None if
        unknown."""
        if not self.normalized:
            return 0.0, 1.0
        if field in self.mean and field in self.std:
            return self.mean[field], self.std[field]
        return None

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain lists, floats and one tensor: loadable with ``torch.load(weights_only=True)``."""
        return {"variables": list(self.variables), "out_variables": list(self.out_variables),
                "lead_times_hours": list(self.lead_times_hours), "latitudes": list(self.latitudes),
                "longitudes": list(self.longitudes), "normalized": self.normalized, "mean": dict(self.mean),
                "std": dict(self.std), "climatology": self.climatology}

    @classmethod
    def from_checkpoint(cls, record: Mapping[str, Any]) -> TrainedData:
        """The inverse of :meth:`to_checkpoint`; a record without ``normalized`` (older checkpoints) means normalised.
        Raises ``KeyError`` when a field list or the grid is missing."""
        return cls(
            **{k: record[k] for k in ("variables", "out_variables", "lead_times_hours", "latitudes", "longitudes")},
            normalized=bool(record.get("normalized", True)),
            mean=dict(record.get("mean", {})),
            std=dict(record.get("std", {})),
            climatology=record.get("climatology"),
        )


@dataclass
class DataMapping:
    """How a batch of ``data`` becomes what the model trained on ``trained`` expects, and back.

    ``x_trained = x_data[:, in_index] * in_scale + in_shift`` (``[B, V, H, W]``, trained order and units) and
    ``pred_data = pred_trained[:, out_index] * out_scale + out_shift`` (``[B, V_out, H, W]``, the data's order and
    units).
    """

    in_index: list[int]
    out_index: list[int]
    in_scale: Tensor  # [V]
    in_shift: Tensor
    out_scale: Tensor  # [V_out of the data]
    out_shift: Tensor
    identity: bool


def _affine(trained: TrainedData, data: TrainedData, fields: Sequence[str], to_trained: bool) -> tuple[Tensor, Tensor]:
    """Per field ``(scale, shift)`` from the data's units to the trained units (or back)."""
    scale, shift, unknown = [], [], []
    for f in fields:
        t, d = trained.units(f), data.units(f)
        if t is None or d is None:
            if (t is None) != (d is None):  # both unknown: nothing to convert with, as before checkpoints carried them
                unknown.append(f)
            scale.append(1.0), shift.append(0.0)
            continue
        (mt, st), (md, sd) = t, d
        if to_trained:  # x_t = (x_d * sd + md - mt) / st
            scale.append(sd / st), shift.append((md - mt) / st)
        else:  # y_d = (y_t * st + mt - md) / sd
            scale.append(st / sd), shift.append((mt - md) / sd)
    if unknown:
        raise DataMismatchError(
            f"the normalisation statistics of {unknown} are known on one side only (trained: {sorted(trained.mean)},"
            f" data: {sorted(data.mean)}), so the batches cannot be put in the units the model was trained in;"
            " give the datamodule mean/std for every field."
        )
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(shift, dtype=torch.float32)


def map_data(trained: TrainedData, data: TrainedData) -> DataMapping:
    """Map ``data`` onto ``trained`` by field name, or raise :class:`DataMismatchError` naming the difference.

    Inputs must be the same fields (any order); outputs any of the trained outputs (any order); the grid the same;
    other normalisation statistics are converted exactly. Lead times not trained on are allowed (the model takes
    the lead time as an input) and returned for the caller to warn about.
    """
    missing = [f for f in trained.variables if f not in data.variables]
    extra = [f for f in data.variables if f not in trained.variables]
    if missing or extra:
        raise DataMismatchError(
            f"the model was trained on input fields {trained.variables}; the data has {data.variables}"
            + (f" (missing: {missing})" if missing else "") + (f" (not trained on: {extra})" if extra else "")
            + ". Use the same data.variables (any order: fields are matched by name)."
        )
    untrained = [f for f in data.out_variables if f not in trained.out_variables]
    if untrained:
        raise DataMismatchError(
            f"the data asks for output fields {untrained}, which the model does not forecast; it was trained to "
            f"forecast"
            f" {trained.out_variables}. Choose data.out_variables among those."
        )
    for axis in ("latitudes", "longitudes"):
        mine, theirs = np.asarray(getattr(trained, axis)), np.asarray(getattr(data, axis))
        if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=GRID_ATOL_DEGREES):
            where = (
                ""
                if mine.shape != theirs.shape
                else f", first difference at index {int(np.argmax(~np.isclose(mine, theirs, atol=GRID_ATOL_DEGREES)))}"
            )
            raise DataMismatchError(
                f"the data's {axis} ({theirs.size} from {theirs[:1]} to {theirs[-1:]}) are not the grid the model was "
                f"trained"
                f" on ({mine.size} from {mine[:1]} to {mine[-1:]}){where}; regrid the data to the training grid."
            )
    in_index = [data.variables.index(f) for f in trained.variables]
    out_index = [trained.out_variables.index(f) for f in data.out_variables]
    in_scale, in_shift = _affine(trained, data, trained.variables, to_trained=True)
    out_scale, out_shift = _affine(trained, data, data.out_variables, to_trained=False)
    identity = (
        in_index == list(range(len(in_index)))
        and out_index == list(range(len(trained.out_variables)))
        and bool((in_scale == 1).all() and (in_shift == 0).all() and (out_scale == 1).all() and (out_shift == 0).all())
    )
    return DataMapping(in_index, out_index, in_scale, in_shift, out_scale, out_shift, identity)
