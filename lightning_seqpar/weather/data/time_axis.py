"""The one time axis of an ERA5 store: each field's times joined over the files that hold it, the times that every
field holds, and the time step.

Letters in shape comments: T times. Times are ``datetime64[ns]``. The store
(:class:`~lightning_seqpar.weather.data.store.ERA5Store`) calls these in order: :func:`field_index` per field,
:func:`align` over all of them, :func:`time_step` on the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["FieldIndex", "FieldSource", "align", "field_index", "time_step"]


@dataclass(frozen=True)
class FieldSource:
    """Where one file holds one field: file position, variable name in the harmonised dataset, level position."""

    file: int
    variable: str
    level_pos: int | None


@dataclass
class FieldIndex:
    """One field on the store's time axis: for every store time, which source holds it and at which local index."""

    sources: list[FieldSource]
    source_of: np.ndarray  # [T] position in `sources`
    local: np.ndarray  # [T] time index inside that source's file
    times: np.ndarray  # [T] datetime64[ns]


def field_index(sources: list[FieldSource], file_times: list[np.ndarray], name: str, where: str,
                duplicate: Callable[[int, np.ndarray, list[FieldSource]], str] | None) -> FieldIndex:
    """Joins the times of one field over its ``sources`` (sorted by first time; ``file_times[k]`` are file k's times).

    Args:
        sources: the files that hold the field.
        file_times: ``[T_k]`` times of every file of the store.
        name: the field's name, for messages. where: the store, for messages.
        duplicate: ``None`` keeps the first copy of a time held by two files and drops the later ones; otherwise
            ``duplicate(file, clashing times, sources)`` gives the message of the error raised.

    Raises:
        ValueError: when the field has no time at all, or (with ``duplicate``) when two files hold the same time.
    """
    sources = sorted((s for s in sources if len(file_times[s.file])), key=lambda s: file_times[s.file][0])
    if not sources:
        raise ValueError(f"{name} has no times in {where} (its time axis is empty)")
    source_of, local, times, last = [], [], [], None
    for i, src in enumerate(sources):
        t = file_times[src.file]
        keep = np.ones(len(t), bool) if last is None else t > last
        if not keep.all() and duplicate is not None:
            raise ValueError(duplicate(src.file, t[~keep], sources))
        source_of.append(np.full(keep.sum(), i)), local.append(np.flatnonzero(keep)), times.append(t[keep])
        last = t[keep][-1] if keep.any() else last
    return FieldIndex(sources, np.concatenate(source_of), np.concatenate(local), np.concatenate(times))


def align(indexes: dict[str, FieldIndex], where: str) -> np.ndarray:
    """``[T]`` the times every field holds; each index (by field name) is narrowed to them in place.

    Raises:
        ValueError: when the fields share fewer than two times (a forecast needs an input and a target), listing
            each field's span.
    """
    common = None
    for ix in indexes.values():
        common = ix.times if common is None else np.intersect1d(common, ix.times)
    if len(common) < 2:
        spans = {name: f"{ix.times[0]} .. {ix.times[-1]} ({len(ix.times)})" for name, ix in indexes.items()}
        raise ValueError(f"the fields of {where} share {len(common)} times; a forecast needs at least two. "
                         f"Their times: {spans}")
    for name, ix in indexes.items():
        if len(ix.times) > len(common):
            rank_zero_info(f"ERA5 store: {len(ix.times) - len(common)} times of {name} are not held by every field and "
                           "are left out")
        pos = np.searchsorted(ix.times, common)
        ix.source_of, ix.local, ix.times = ix.source_of[pos], ix.local[pos], common
    return common


def time_step(times: np.ndarray, first: FieldIndex, where: str) -> np.timedelta64:
    """The step of the ``[T]`` time axis: the smallest step between two times of one file (``first`` says which).

    Within a file the steps must be multiples of one step (gaps allowed); between files anything goes (yearly files
    of weekly samples end on 30 December and start again on 1 January).

    Raises:
        ValueError: when a step inside a file is not a multiple of the smallest one (resample the data).
    """
    steps = np.diff(times)
    inside = first.source_of[1:] == first.source_of[:-1]
    step = steps[inside].min() if inside.any() else steps.min()
    if np.any(steps[inside] % step):
        odd = np.unique(steps[inside][steps[inside] % step != 0])[:5].astype("timedelta64[m]")
        raise ValueError(f"time axis of {where} is irregular: steps {[str(s) for s in odd]} are not multiples "
                         f"of the smallest step {step.astype('timedelta64[m]')}; resample the data to one step")
    if np.any(steps != step):
        rank_zero_info(f"ERA5 store: the time axis of {where} has {int((steps != step).sum())} gaps or file "
                       f"boundaries off the {step.astype('timedelta64[h]')} step; samples whose target time is not in "
                       "the store are skipped")
    return step
