"""The samples of a forecasting split: the years it holds, its (input time, target time) pairs, and the Dataset.

Letters in shape comments: N samples, K lead times, T times, U fields read (inputs and targets), V input fields,
V_out output fields, S static channels, H latitudes, W longitudes.
A *field* is one variable at one level: ``2m_temperature`` or ``geopotential_500``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_seqpar.weather.data.stats import nan_message
from lightning_seqpar.weather.data.store import ERA5Store

__all__ = ["ERA5ForecastDataset", "forecast_pairs", "lead_steps", "parse_years"]


def parse_years(spec: list[int] | str | int | None) -> list[int] | None:
    """Turns ``"2000-2002"``, ``"2000,2002"``, ``"2000-2001,2005"``, ``2000`` or ``[2000, 2002]`` into a sorted
    list of years (ranges inclusive); ``None`` stays ``None``.

    The one parser of year specifications: the DataModule's ``train_years``/``val_years``/``test_years`` and
    ``seqpar-synthetic-era5 --years`` both read it.

    Raises:
        ValueError: for text that is not comma-separated years and ``START-END`` ranges (``"2002-2000"``,
            ``"20x0"``, ``""``), naming the text and the forms understood.
    """
    if spec is None:
        return None
    if isinstance(spec, (int, np.integer)):
        return [int(spec)]
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        years: list[int] = []
        for part in parts or [""]:
            first, dash, last = (p.strip() for p in part.partition("-"))
            if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
                raise ValueError(
                    f"years {spec!r} not understood; write '2000-2002', '2000,2002' or a list [2000, 2002]"
                )
            years += range(int(first), int(last or first) + 1)
        return sorted(set(years))
    return sorted({int(y) for y in spec})


def lead_steps(lead_times_hours: Sequence[int], step_hours: float, where: str) -> list[int]:
    """``[K]`` lead times in store time steps, from ``[K]`` lead times in hours and the store's step in hours.

    Raises:
        ValueError: when a lead time is not a whole multiple of ``step_hours``, naming the store ``where`` and a
            lead time that is.
    """
    steps = []
    for hours in lead_times_hours:
        ratio = hours / step_hours
        if abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(f"lead_time_hours={hours} is not a multiple of the time step of {where} "
                             f"({step_hours:g} h); use e.g. {int(step_hours * max(1, round(ratio)))}")
        steps.append(int(round(ratio)))
    return steps


def forecast_pairs(in_split: np.ndarray, offset_index: Callable[[np.ndarray, int], np.ndarray], steps: Sequence[int],
                   draw_lead: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The samples of one split: input times whose targets, ``steps`` time steps later, are in the same split.

    Args:
        in_split: ``[T]`` bool, the store times of the split.
        offset_index: ``(indices [N], steps) -> [N]`` store index ``steps`` time steps later, -1 where the store
            lacks it (:meth:`ERA5Store.offset_index`).
        steps: ``[K]`` lead times in store time steps.
        draw_lead: training: one list of inputs valid for every lead, the lead drawn per sample (``lead_index``
            ``None`` when K > 1). Otherwise every (input, lead) pair, lead-major.

    Returns:
        ``init_indices [N]``, ``target_indices [N, K]`` and ``lead_index [N]`` (or ``None``: drawn per sample), as
        :class:`ERA5ForecastDataset` takes them; N may be 0.
    """
    candidates = np.flatnonzero(in_split)
    targets = np.stack([offset_index(candidates, k) for k in steps], axis=1)  # [N, K], -1: no such time
    reachable = (targets >= 0) & in_split[np.maximum(targets, 0)]  # the target exists and is in the same split
    if draw_lead:
        keep = reachable.all(axis=1)
        inits, targets = candidates[keep], targets[keep]
        return inits, targets, None if len(steps) > 1 else np.zeros(len(inits), np.int64)
    rows = [np.flatnonzero(reachable[:, k]) for k in range(len(steps))]
    inits = np.concatenate([candidates[r] for r in rows])
    targets = np.concatenate([targets[r] for r in rows])
    return inits, targets, np.concatenate([np.full(len(r), k) for k, r in enumerate(rows)])


class ERA5ForecastDataset(Dataset):
    """Forecasting pairs ``(fields at t, fields at t + lead)`` from an :class:`ERA5Store`.

    Args:
        store: the store to read (each worker process reopens it on first use).
        variables: time-dependent input field names ``V_dyn``.
        out_variables: target field names ``V_out``.
        init_indices: ``[N]`` store time index of each sample's input.
        target_indices: ``[N, K]`` store time index of each sample's target for each of the K lead times.
        lead_steps: ``[K]`` lead times in store time steps.
        lead_index: ``[N]`` position in ``lead_steps`` of each sample's lead, or ``None`` to draw one
            uniformly per sample (training with several lead times).
        mean: ``{field: mean}`` to normalise with, or ``None`` for physical units.
        std: ``{field: std}``, given with ``mean``.
        static: ``[S, H, W]`` time-invariant channels appended to every input (already normalised), or ``None``.
        masks: ``{field: ([H, W] bool data cells, fill value in physical units)}`` of fields with a fixed NaN mask.

    Items are dicts: ``input`` float32 ``[V, H, W]`` (``V = V_dyn + S``), ``target`` float32 ``[V_out, H, W]``,
    ``lead_time_hours`` float32 scalar and ``index`` int64 scalar (the store time index of the input).
    Reading raises ``ValueError`` naming the field and time where a value is NaN (outside a fixed mask), and
    :class:`~lightning_seqpar.weather.data.store.StoreReadError` where the data cannot be decoded.
    """

    def __init__(
        self,
        store: ERA5Store,
        variables: Sequence[str],
        out_variables: Sequence[str],
        init_indices: np.ndarray,
        target_indices: np.ndarray,
        lead_steps: Sequence[int],
        lead_index: np.ndarray | None,
        mean: dict[str, float] | None = None,
        std: dict[str, float] | None = None,
        static: np.ndarray | None = None,
        masks: dict[str, tuple[np.ndarray, float]] | None = None,
    ):
        self.store, self.init_indices, self.target_indices = store, init_indices, target_indices
        self.lead_steps, self.lead_index = list(lead_steps), lead_index
        self.fields = list(dict.fromkeys([*variables, *out_variables]))  # union U, input fields first
        self.in_pos = [self.fields.index(f) for f in variables]
        self.out_pos = [self.fields.index(f) for f in out_variables]
        self.shift = None if mean is None else np.array([mean[f] for f in self.fields], np.float32)[:, None, None]
        self.scale = None if std is None else np.array([std[f] for f in self.fields], np.float32)[:, None, None]
        self.static = None if static is None or not len(static) else np.ascontiguousarray(static, np.float32)
        self.masks = [
            (self.fields.index(f), valid, fill) for f, (valid, fill) in (masks or {}).items() if f in self.fields
        ]

    def __len__(self) -> int:
        return len(self.init_indices)

    def __getitem__(self, n: int) -> dict[str, torch.Tensor]:
        init = int(self.init_indices[n])
        choice = (
            int(torch.randint(len(self.lead_steps), ()).item()) if self.lead_index is None else int(self.lead_index[n])
        )
        target = int(self.target_indices[n, choice])
        block = self.store.read(self.fields, np.array([init, target]))  # [2, U, H, W]
        for u, valid, fill in self.masks:
            leaked = ~np.isnan(block[:, u]) & ~valid  # [2, H, W]: data where the fixed mask says none
            if leaked.any():
                when = self.store.describe_time((init, target)[int(np.argwhere(leaked.any(axis=(1, 2)))[0, 0])])
                raise ValueError(
                    f"variable {self.fields[u]!r} has data at time {when} on cells that were NaN at the first "
                    "train time: its NaN mask is not fixed, so masked_variables cannot fill it"
                )
            block[:, u] = np.where(valid, block[:, u], fill)
        bad = np.isnan(block)
        if bad.any():
            row, field = np.argwhere(bad.any(axis=(2, 3)))[0]
            when = f"{self.store.describe_time((init, target)[row])} of {self.store.path!r}"
            raise ValueError(nan_message(self.fields[field], when, bad[:, field]))
        if self.shift is not None:
            block = (block - self.shift) / self.scale
        inputs = block[0, self.in_pos]  # [V_dyn, H, W]
        if self.static is not None:
            inputs = np.concatenate([inputs, self.static])  # [V_dyn + S, H, W]
        return {
            "input": torch.from_numpy(np.ascontiguousarray(inputs)),  # [V, H, W]
            "target": torch.from_numpy(np.ascontiguousarray(block[1, self.out_pos])),  # [V_out, H, W]
            "lead_time_hours": torch.tensor(self.lead_steps[choice] * self.store.step_hours, dtype=torch.float32),
            "index": torch.tensor(init, dtype=torch.int64),
        }
