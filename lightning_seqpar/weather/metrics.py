"""Latitude-weighted RMSE and ACC per variable and lead time as torchmetrics Metrics; the persistence and climatology
baselines; and :class:`ForecastSkill`, which scores a model and the baselines with them.

Letters in shape comments: B samples, V variables, T lead times, H latitudes, W longitudes.

Formulas (WeatherBench / ClimaX convention, in physical units after de-normalisation
``x = x_norm * std + mean``), with latitude weights ``w_h = cos(lat_h) / mean_h(cos(lat_h))``
and ``mean_hw`` the plain mean over the ``H x W`` grid:

* RMSE of one sample: ``sqrt(mean_hw(w_h * (f - o)^2))``; the metric is the mean over samples.
* ACC of one sample: with anomalies ``a = f - c`` and ``b = o - c`` against the climatology ``c``,
  and their weighted spatial means removed (``a' = a - mean_hw(w_h a)``, same for ``b'``),
  ``sum_hw(w_h a' b') / sqrt(sum_hw(w_h a'^2) * sum_hw(w_h b'^2))``; the metric is the mean over samples.
  A sample whose anomaly is constant over the grid (e.g. the climatology forecast itself) scores 0.

States are sums over samples (``dist_reduce_fx="sum"``), so the result is exact under data parallelism.
Pass ``process_group=`` (the data-parallel group) so that each sample counts once and not once per
sequence-parallel rank that holds a copy of it. ``compute()`` returns
``{"<prefix><metric>/<variable>/<lead>h": value}``, e.g. ``{"val/rmse/2m_temperature/6h": tensor(1.3)}``,
for every lead time that received at least one sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric


def latitude_weights(latitudes: Sequence[float] | np.ndarray | Tensor) -> Tensor:
    """``[H]`` weights ``cos(lat) / mean(cos(lat))`` (mean 1) from latitudes in degrees."""
    lat = torch.as_tensor(np.asarray(latitudes, dtype=np.float64))
    weights = torch.cos(torch.deg2rad(lat))
    return weights / weights.mean()


def latitude_weighted_mse(pred: Tensor, target: Tensor, weights: Tensor, field_weights: Tensor | None = None,
                          valid_mask: Tensor | None = None) -> Tensor:
    """Mean over batch, fields and grid of (pred - target)^2 weighted by cos(latitude) with mean 1.

    Args:
        pred: [B, V_out, H, W] forecast (any dtype; computed in float32).
        target: [B, V_out, H, W].
        weights: [H] latitude weights with mean 1.
        field_weights: optional [V_out] weight of each field, used as given.
        valid_mask: optional [V_out, H, W], 1 where the target holds data and 0 on filled cells (a field's
            fixed NaN mask); the cell weights of each field are renormalised to mean 1 over its grid, so
            filled cells count zero and an all-ones mask gives the unmasked loss.
    """
    cell = weights.float().view(-1, 1)  # [H, 1]
    if valid_mask is not None:
        cell = cell * valid_mask.float()  # [V_out, H, W]
        cell = cell / cell.mean(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(cell.dtype).tiny)
    error = (pred.float() - target.float()).square() * cell  # [B, V_out, H, W]
    if field_weights is not None:
        error = error * field_weights.float().view(-1, 1, 1)
    return error.mean()


def _as_vector(values: Sequence[float] | np.ndarray | Tensor | None, n: int, name: str) -> Tensor | None:
    if values is None:
        return None
    vector = torch.as_tensor(np.asarray(values, dtype=np.float64)).reshape(-1)
    if vector.numel() != n:
        raise ValueError(f"{name} has {vector.numel()} entries but there are {n} variables; give one per variable")
    return vector


class _LatitudeWeightedMetric(Metric):
    """Shared bookkeeping: de-normalisation, lead-time bins, additive sum and count states."""

    full_state_update = False
    name = "metric"

    def __init__(
        self,
        variables: Sequence[str],
        latitudes: Sequence[float] | np.ndarray | Tensor,
        lead_times_hours: Sequence[float],
        mean: Sequence[float] | np.ndarray | Tensor | None = None,
        std: Sequence[float] | np.ndarray | Tensor | None = None,
        prefix: str = "",
        valid_mask: np.ndarray | Tensor | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not variables or not len(lead_times_hours):
            raise ValueError(f"{type(self).__name__} needs variables and lead_times_hours, got {list(variables)} and "
                             f"{list(lead_times_hours)}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (to de-normalise) or neither (values already in physical units)")
        self.variables, self.prefix = list(variables), prefix
        self.lead_times_hours = [float(h) for h in lead_times_hours]
        self.register_buffer("weights", latitude_weights(latitudes), persistent=False)  # [H]
        mask = None if valid_mask is None else torch.as_tensor(np.asarray(valid_mask, dtype=np.float64))
        if mask is not None and (
            mask.ndim != 3 or tuple(mask.shape[:2]) != (len(self.variables), self.weights.numel())
        ):
            raise ValueError(
                f"valid_mask must be [V={len(self.variables)}, H={self.weights.numel()}, W], got {tuple(mask.shape)}"
            )
        self.register_buffer("valid_mask", mask, persistent=False)  # [V, H, W] 1 data, 0 filled; or None
        self.register_buffer("leads", torch.tensor(self.lead_times_hours, dtype=torch.float64), persistent=False)
        self.register_buffer("mean", _as_vector(mean, len(self.variables), "mean"), persistent=False)  # [V] or None
        self.register_buffer("std", _as_vector(std, len(self.variables), "std"), persistent=False)
        n_leads, n_vars = len(self.lead_times_hours), len(self.variables)
        self.add_state("total", default=torch.zeros(n_leads, n_vars, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n_leads, dtype=torch.float64), dist_reduce_fx="sum")

    def _physical(self, x: Tensor) -> Tensor:
        x = x.to(torch.float64)
        if self.mean is None:
            return x
        return x * self.std[None, :, None, None] + self.mean[None, :, None, None]  # [B, V, H, W]

    def _check(self, preds: Tensor, target: Tensor, lead_time_hours: Tensor | float) -> Tensor:
        expected = (len(self.variables), self.weights.numel())
        if preds.shape != target.shape or preds.ndim != 4 or tuple(preds.shape[1:3]) != expected:
            raise ValueError(f"{type(self).__name__}.update expects preds and target of shape [B, V={expected[0]}, "
                             f"H={expected[1]}, W], got {tuple(preds.shape)} and {tuple(target.shape)}")
        lead = torch.as_tensor(lead_time_hours, dtype=torch.float64, device=self.leads.device).reshape(-1)
        lead = lead.expand(preds.shape[0]) if lead.numel() == 1 else lead
        match = torch.isclose(lead[:, None], self.leads[None, :])  # [B, T]
        if not bool(match.any(dim=1).all()):
            unknown = sorted({float(h) for h, ok in zip(lead.tolist(), match.any(dim=1).tolist()) if not ok})
            raise ValueError(f"lead times {unknown} h are not among lead_times_hours {self.lead_times_hours}; "
                             "construct the metric with every lead time the loader yields")
        return match.to(torch.float64).argmax(dim=1)  # [B] lead bin of each sample

    def _cell_weights(self, like: Tensor) -> Tensor:
        """``[1, V or 1, H, W or 1]`` weight of each cell: latitude weight times the valid mask, normalised to mean 1
        over the grid of each field (so masked cells count zero and the rest as many as without a mask)."""
        w = self.weights.to(like)[None, None, :, None]  # [1, 1, H, 1]
        if self.valid_mask is None:
            return w
        w = w * self.valid_mask.to(like)[None]  # [1, V, H, W]
        return w / w.mean(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)

    def _per_sample(self, preds: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor, lead_time_hours: Tensor | float) -> None:
        """Adds a batch.

        Args:
            preds: ``[B, V, H, W]`` forecasts, normalised if ``mean``/``std`` were given, else physical.
            target: ``[B, V, H, W]`` truth in the same units as ``preds``.
            lead_time_hours: ``[B]`` lead time of each sample (or one number for the whole batch).
        """
        bins = self._check(preds, target, lead_time_hours)
        values = self._per_sample(self._physical(preds), self._physical(target))  # [B, V]
        self.total.index_add_(0, bins, values)
        self.count.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))

    def compute(self) -> dict[str, Tensor]:
        """``{"<prefix><name>/<variable>/<lead>h": mean over samples}`` for every lead time seen."""
        out = {}
        for t, hours in enumerate(self.lead_times_hours):
            if self.count[t] == 0:
                continue
            for v, variable in enumerate(self.variables):
                out[f"{self.prefix}{self.name}/{variable}/{hours:g}h"] = (self.total[t, v] / self.count[t]).float()
        return out


class LatitudeWeightedRMSE(_LatitudeWeightedMetric):
    """Latitude-weighted RMSE per variable and lead time, in physical units (see the module docstring).

    Args:
        variables: names of the ``V`` channels, used in the result keys.
        latitudes: ``[H]`` latitudes in degrees, in the order of the ``H`` axis.
        lead_times_hours: every lead time the data yields; one result per variable and lead time.
        mean: ``[V]`` means to de-normalise with, or ``None`` when values are physical.
        std: ``[V]`` standard deviations, given with ``mean``.
        prefix: prepended to every result key, e.g. ``"val/"``.
        valid_mask: ``[V, H, W]`` 1 where the field holds data, 0 on cells to leave out (a field's fixed NaN
            mask, e.g. sea-surface temperature over land); ``None`` scores every cell.
        **kwargs: passed to ``torchmetrics.Metric``, e.g. ``process_group`` (the data-parallel group).
    """

    name = "rmse"

    def _per_sample(self, preds: Tensor, target: Tensor) -> Tensor:
        weighted = self._cell_weights(preds) * (preds - target) ** 2  # [B, V, H, W]
        return weighted.mean(dim=(2, 3)).sqrt()  # [B, V]


class LatitudeWeightedACC(_LatitudeWeightedMetric):
    """Latitude-weighted anomaly correlation per variable and lead time (see the module docstring).

    Args:
        variables: names of the ``V`` channels, used in the result keys.
        latitudes: ``[H]`` latitudes in degrees, in the order of the ``H`` axis.
        lead_times_hours: every lead time the data yields.
        climatology: ``[V, H, W]`` climatology in physical units (e.g. ``ERA5DataModule.climatology``).
        mean: ``[V]`` means to de-normalise with, or ``None`` when values are physical.
        std: ``[V]`` standard deviations, given with ``mean``.
        prefix: prepended to every result key, e.g. ``"val/"``.
        valid_mask: ``[V, H, W]`` 1 where the field holds data, 0 on cells to leave out; ``None`` scores every cell.
        **kwargs: passed to ``torchmetrics.Metric``, e.g. ``process_group`` (the data-parallel group).

    Raises:
        ValueError: when ``climatology`` is not ``[V, H, W]``, besides the RMSE's argument checks.
    """

    name = "acc"

    def __init__(self, variables: Sequence[str], latitudes: Sequence[float] | np.ndarray | Tensor,
                 lead_times_hours: Sequence[float], climatology: np.ndarray | Tensor,
                 mean: Sequence[float] | np.ndarray | Tensor | None = None,
                 std: Sequence[float] | np.ndarray | Tensor | None = None, prefix: str = "",
                 valid_mask: np.ndarray | Tensor | None = None, **kwargs: Any):
        super().__init__(variables, latitudes, lead_times_hours, mean, std, prefix, valid_mask, **kwargs)
        clim = torch.as_tensor(np.asarray(climatology, dtype=np.float64))
        if clim.ndim != 3 or tuple(clim.shape[:2]) != (len(self.variables), self.weights.numel()):
            raise ValueError(f"climatology must be [V={len(self.variables)}, H={self.weights.numel()}, W] in physical "
                             f"units, got {tuple(clim.shape)}")
        self.register_buffer("climatology", clim, persistent=False)

    def _per_sample(self, preds: Tensor, target: Tensor) -> Tensor:
        w = self._cell_weights(preds)  # [1, 1, H, 1], or [1, V, H, W] with a valid mask
        a = preds - self.climatology[None]  # [B, V, H, W]
        b = target - self.climatology[None]
        a = a - (w * a).mean(dim=(2, 3), keepdim=True)
        b = b - (w * b).mean(dim=(2, 3), keepdim=True)
        covariance = (w * a * b).sum(dim=(2, 3))  # [B, V]
        norm = ((w * a**2).sum(dim=(2, 3)) * (w * b**2).sum(dim=(2, 3))).sqrt()
        return torch.where(norm > 0, covariance / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))


def persistence_forecast(batch: Mapping[str, Tensor], variables: Sequence[str], out_variables: Sequence[str]) -> Tensor:
    """The input fields at ``t`` as the forecast for ``t + lead``: ``[B, V, H, W]`` -> ``[B, V_out, H, W]``.

    Args:
        batch: a batch of :class:`~lightning_seqpar.weather.data.era5.ERA5DataModule`.
        variables: names of the input channels.
        out_variables: names of the target channels; each must be an input channel.

    Raises:
        ValueError: when an output channel is not an input channel.
    """
    missing = [v for v in out_variables if v not in variables]
    if missing:
        raise ValueError(f"persistence needs every output among the inputs; {missing} are not in {list(variables)}")
    return batch["input"][:, [list(variables).index(v) for v in out_variables]]


def climatology_forecast(batch: Mapping[str, Tensor], climatology: Tensor) -> Tensor:
    """The climatology as the forecast for every sample: ``[V_out, H, W]`` -> ``[B, V_out, H, W]``.

    Args:
        batch: a batch; only its size and device are used.
        climatology: ``[V_out, H, W]`` in the units of ``batch["target"]`` (normalised if the data is).
    """
    target = batch["target"]
    return climatology.to(target)[None].expand_as(target)


class ForecastSkill(nn.Module):
    """The skill of a model's forecast and of the persistence and climatology baselines, on one split: latitude-weighted
    RMSE, and ACC, per field and lead time, each forecast with its own metric objects.

    The one implementation of the baselines: :class:`~lightning_seqpar.weather.forecast.ForecastModule` scores its
    validation and test batches with it, and :func:`evaluate_baselines` scores the baselines alone.

    Args:
        variables: names of the ``V`` input channels. Persistence forecasts each output by its input channel; it is
            left out when an output field is not an input.
        out_variables: names of the ``V_out`` target channels.
        latitudes: ``[H]`` latitudes in degrees.
        lead_times_hours: every lead time the data yields, hours.
        climatology: ``[V_out, H, W]`` climatology in physical units: the climatology forecast, and the reference
            of ACC.
        mean: ``[V_out]`` means the targets were normalised with, or ``None`` when the data is in physical units.
        std: ``[V_out]`` standard deviations, given with ``mean``.
        valid_mask: ``[V_out, H, W]`` 1 where the target holds data, 0 on filled cells (left out); ``None``: every cell.
        prefix: prepended to every key, e.g. ``"val/"``.
        forecasts: which forecasts to score, among ``"model"``, ``"persistence"`` and ``"climatology"``.
        acc: also the ACC of the model and persistence (the climatology forecast has no anomaly: its ACC is 0).

    :meth:`compute` returns ``{"<prefix>rmse/<field>/<lead>h": ...}`` for the model and
    ``{"<prefix><baseline>/rmse/<field>/<lead>h": ...}`` (and ``acc``) for the baselines, in physical units.

    Raises:
        ValueError: for an unknown forecast name, or as the metrics raise for shapes that do not agree.
    """

    FORECASTS = ("model", "persistence", "climatology")

    def __init__(self, variables: Sequence[str], out_variables: Sequence[str], latitudes: Sequence[float] | np.ndarray,
                 lead_times_hours: Sequence[float], climatology: np.ndarray | Tensor,
                 mean: Sequence[float] | np.ndarray | None = None, std: Sequence[float] | np.ndarray | None = None,
                 valid_mask: np.ndarray | Tensor | None = None, prefix: str = "",
                 forecasts: Sequence[str] = FORECASTS, acc: bool = True):
        super().__init__()
        unknown = sorted(set(forecasts) - set(self.FORECASTS))
        if unknown:
            raise ValueError(f"ForecastSkill: unknown forecasts {unknown}; choose among {list(self.FORECASTS)}")
        self.variables, self.out_variables = list(variables), list(out_variables)
        self.has_persistence = set(self.out_variables) <= set(self.variables)
        clim = torch.as_tensor(np.asarray(climatology, np.float32))  # [V_out, H, W], physical
        if mean is not None:
            shift = torch.as_tensor(np.asarray(mean, np.float32))[:, None, None]
            clim_data_units = (clim - shift) / torch.as_tensor(np.asarray(std, np.float32))[:, None, None]
        else:
            clim_data_units = clim
        # The climatology forecast in the units of the targets (normalised like them).
        self.register_buffer("climatology_forecast", clim_data_units, persistent=False)
        common = {"lead_times_hours": lead_times_hours, "mean": mean, "std": std, "valid_mask": valid_mask}
        metrics: dict[str, Metric] = {}
        for kind in forecasts:
            if kind == "persistence" and not self.has_persistence:
                continue
            where = prefix if kind == "model" else f"{prefix}{kind}/"
            metrics[f"{kind}_rmse"] = LatitudeWeightedRMSE(self.out_variables, latitudes, prefix=where, **common)
            if acc and kind != "climatology":
                metrics[f"{kind}_acc"] = LatitudeWeightedACC(self.out_variables, latitudes, climatology=climatology,
                                                             prefix=where, **common)
        self.metrics = nn.ModuleDict(metrics)

    def update(self, batch: Mapping[str, Tensor], prediction: Tensor | None = None) -> None:
        """Scores one batch: ``batch["input"]`` ``[B, V, H, W]``, ``batch["target"]`` ``[B, V_out, H, W]`` and
        ``batch["lead_time_hours"]`` ``[B]``; ``prediction`` ``[B, V_out, H, W]`` is the model's forecast, in the
        units of the targets, required when ``"model"`` is scored.

        Raises:
            ValueError: when the model is scored and ``prediction`` is not given.
        """
        if prediction is None and any(key.startswith("model_") for key in self.metrics):
            raise ValueError("ForecastSkill scores the model's forecast: pass update(batch, prediction)")
        made: dict[str, Tensor] = {}
        for key, metric in self.metrics.items():
            kind = key.split("_")[0]
            if kind not in made:
                if kind == "model":
                    made[kind] = prediction.float()
                elif kind == "persistence":
                    made[kind] = persistence_forecast(batch, self.variables, self.out_variables)
                else:
                    made[kind] = climatology_forecast(batch, self.climatology_forecast)
            metric.update(made[kind], batch["target"], batch["lead_time_hours"])

    def compute(self) -> dict[str, Tensor]:
        """Every metric's values, synced over the data-parallel ranks (see the module docstring for the keys)."""
        return {key: value for metric in self.metrics.values() for key, value in metric.compute().items()}

    def reset(self) -> None:
        """Clears every metric's state, for the next epoch."""
        for metric in self.metrics.values():
            metric.reset()


@torch.no_grad()
def evaluate_baselines(
    datamodule: Any, split: Literal["val", "test"] = "val", max_batches: int | None = None
) -> dict[str, Tensor]:
    """Scores the persistence and climatology forecasts with the same metrics a model gets (:class:`ForecastSkill`).

    Args:
        datamodule: an :class:`~lightning_seqpar.weather.data.era5.ERA5DataModule` after ``setup()``.
        split: which loader to score.
        max_batches: stop after this many batches (``None``: the whole split).

    Returns:
        ``{"persistence/rmse/<variable>/<lead>h": ..., "persistence/acc/...": ..., "climatology/rmse/...": ...}``
        in physical units; persistence is left out when an output variable is not an input, and the climatology
        forecast has no ACC (its anomaly is zero, so its ACC is 0 by definition).

    Raises:
        ValueError: when the datamodule has no such split.
    """
    dm = datamodule
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    if not loader:
        raise ValueError(f"the datamodule has no {split} split; set {split}_years")
    mean, std = (dm.out_mean, dm.out_std) if dm.normalize else (None, None)
    skill = ForecastSkill(dm.variables, dm.out_variables, dm.latitudes, dm.lead_times_hours, dm.climatology, mean, std,
                          valid_mask=getattr(dm, "out_valid_mask", None), forecasts=("persistence", "climatology"))
    for n, batch in enumerate(loader):
        if max_batches is not None and n >= max_batches:
            break
        skill.update(batch)
    return skill.compute()
