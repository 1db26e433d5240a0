"""Samplers keyed to the data-parallel rank: training samplers re-keyed, evaluation shards that count every sample once.

Two faults give wrong numbers without an error when a sequence-parallel (SP) group shares one sample:

* A user's ``DistributedSampler(ds)`` is keyed to the *global* rank, so the ranks of one SP group draw
  different samples and attention mixes their tokens. :func:`rekey_sampler` rebuilds it for the data-parallel
  rank and size (or refuses a sampler it cannot rebuild, saying what to write instead).
* Lightning evaluates with a padded ``DistributedSampler``: with 5 samples on 2 data-parallel ranks one sample is
  scored twice. :class:`EvalShardBatchSampler` gives each data-parallel rank a contiguous, non-overlapping shard
  of the dataset (rank order = sample order, so gathered predictions are in dataset order). Validation and test
  must still run the same number of steps on every rank (``self.log(sync_dist=True)`` reduces per key, and a
  per-step reduction needs every rank), so a rank with fewer batches gets *padding batches* at the end: one real
  sample that :func:`padding_step` keeps out of every sum (``self.log`` with ``batch_size=0`` for means and a zero
  value for sums; ``torchmetrics.Metric.update`` skipped). Prediction has no cross-rank step, so it is not padded.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler


class SamplerLayoutError(ValueError):
    """Raised when a DataLoader's sampler would give the ranks of one sequence-parallel group different samples."""


def _inner_sampler(loader: DataLoader) -> Sampler | None:
    """The per-sample sampler of ``loader`` (inside its batch sampler, if any)."""
    batch_sampler = _unwrap(loader.batch_sampler)
    inner = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else None
    return inner if inner is not None else loader.sampler


def _unwrap(batch_sampler: Any) -> Any:
    """The batch sampler inside Lightning's ``_IndexBatchSamplerWrapper`` (prediction), else itself."""
    return getattr(batch_sampler, "_batch_sampler", batch_sampler)


def global_order(sampler: Sampler | None, dataset_size: int) -> list[int]:
    """The sample order one process would visit, for a sampler that may be a distributed one.

    ``DistributedSampler`` (and Lightning's wrappers around a user sampler) give their whole order before the
    split over replicas: the same on every rank (``shuffle`` uses ``seed + epoch``, as ``DistributedSampler`` does).
    """
    if isinstance(sampler, DistributedSampler):
        wrapped = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # Lightning's *SamplerWrapper
        if wrapped is not None:
            order = list(wrapped)
        else:
            order = list(range(len(sampler.dataset)))  # type: ignore[arg-type]
        if sampler.shuffle:
            g = torch.Generator().manual_seed(sampler.seed + sampler.epoch)
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        return order
    if sampler is None or isinstance(sampler, SequentialSampler):
        return list(range(dataset_size))
    return list(sampler)


def shard_bounds(num_samples: int, num_replicas: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of ``rank``'s contiguous shard: the first ``num_samples % num_replicas`` ranks hold one more."""
    base, extra = divmod(num_samples, num_replicas)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _num_batches(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


class EvalShardBatchSampler(Sampler[list[int]]):
    """Batches of this data-parallel rank's contiguous shard of ``sampler``'s order; every sample exactly once.

    Args:
        sampler: The loader's sampler (Lightning's ``DistributedSampler``, a wrapper of the user's sampler, or a
            plain one); only its global order is used.
        dataset_size: ``len(dataset)``.
        batch_size: Samples per batch; the shard's last batch may be smaller.
        drop_last: Drop the shard's last partial batch (per rank; differs from one process when shards are uneven).
        num_replicas: Data-parallel size.
        rank: Data-parallel rank.
        pad: Append padding batches (one sample each, marked in :attr:`padding`) up to the largest rank's count.
    """

    def __init__(self, sampler: Sampler | None, dataset_size: int, batch_size: int, drop_last: bool,
                 num_replicas: int, rank: int, pad: bool) -> None:
        self.sampler, self.dataset_size = sampler, dataset_size
        self.batch_size, self.drop_last = batch_size, drop_last
        self.num_replicas, self.rank, self.pad = num_replicas, rank, pad

    def _layout(self) -> tuple[list[int], int, int]:
        order = global_order(self.sampler, self.dataset_size)
        start, end = shard_bounds(len(order), self.num_replicas, self.rank)
        real = _num_batches(end - start, self.batch_size, self.drop_last)
        most = _num_batches(shard_bounds(len(order), self.num_replicas, 0)[1], self.batch_size, self.drop_last)
        return order, real, (most if self.pad else real)

    @property
    def padding(self) -> list[bool]:
        """One flag per batch of the next epoch: True for a padding batch."""
        _, real, total = self._layout()
        return [False] * real + [True] * (total - real)

    def __iter__(self) -> Iterator[list[int]]:
        order, real, total = self._layout()
        start, end = shard_bounds(len(order), self.num_replicas, self.rank)
        shard = order[start:end]
        for i in range(real):
            yield shard[i * self.batch_size:(i + 1) * self.batch_size]
        for _ in range(total - real):
            yield [order[0]]  # a real sample, so the model runs as usual; padding_step keeps it out of the sums

    def __len__(self) -> int:
        return self._layout()[2]


class EvalShardDataLoader(DataLoader):
    """A DataLoader over an :class:`EvalShardBatchSampler`; queues its padding flags when an epoch starts, for
    the strategy to read batch by batch (prefetching workers cannot shift them)."""

    def __iter__(self):
        self.padding_flags = deque(self.batch_sampler.padding)  # type: ignore[union-attr]
        return super().__iter__()

    def next_is_padding(self) -> bool:
        flags = getattr(self, "padding_flags", None)
        return bool(flags.popleft()) if flags else False


def _rebuild(loader: DataLoader, cls: type[DataLoader], **changes: Any) -> DataLoader:
    kwargs: dict[str, Any] = dict(
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    kwargs.update(changes)
    return cls(loader.dataset, **kwargs)


def shard_for_evaluation(loader: DataLoader, num_replicas: int, rank: int, *, pad: bool) -> DataLoader:
    """``loader`` rebuilt over an :class:`EvalShardBatchSampler` (unchanged for iterable datasets or a custom
    batch sampler, which the user shards).

    Raises:
        SamplerLayoutError: for a distributed sampler that is not a ``DistributedSampler``.
    """
    if type(loader) not in (DataLoader, EvalShardDataLoader) or loader._dataset_kind != 0:
        return loader
    batch_sampler = _unwrap(loader.batch_sampler)
    if isinstance(batch_sampler, EvalShardBatchSampler):
        return loader
    inner = _inner_sampler(loader)
    batch_size = getattr(batch_sampler, "batch_size", None) or loader.batch_size
    if batch_size is None or not isinstance(inner, (DistributedSampler, SequentialSampler, RandomSampler)):
        _refuse_global_rank_sampler(inner, num_replicas)
        return loader
    sampler = EvalShardBatchSampler(
        inner, len(loader.dataset), int(batch_size), bool(getattr(batch_sampler, "drop_last", False)),  # type: ignore[arg-type]
        num_replicas, rank, pad,
    )
    return _rebuild(loader, EvalShardDataLoader, batch_sampler=sampler)


def _refuse_global_rank_sampler(sampler: Any, num_replicas: int) -> None:
    replicas = getattr(sampler, "num_replicas", None)
    if replicas is not None and replicas != num_replicas:
        raise SamplerLayoutError(
            f"the DataLoader's sampler {type(sampler).__name__} splits the data over num_replicas={replicas} ranks, but"
            f" the ranks of a sequence-parallel group share samples: there are {num_replicas} data-parallel replicas."
            f" Build it with num_replicas=trainer.strategy.distributed_sampler_kwargs['num_replicas'] and"
            f" rank=trainer.strategy.distributed_sampler_kwargs['rank'], or pass no sampler and let Lightning add one."
        )


def rekey_sampler(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """``loader`` with a ``DistributedSampler`` keyed to the global rank rebuilt for the data-parallel ``rank`` of
    ``num_replicas`` (same dataset, shuffle, seed, drop_last, epoch); other loaders are returned unchanged.

    Raises:
        SamplerLayoutError: for a sampler of another class that splits over a different number of replicas.
    """
    inner = _inner_sampler(loader)
    if not isinstance(inner, DistributedSampler):
        _refuse_global_rank_sampler(inner, num_replicas)
        return loader
    if inner.num_replicas == num_replicas and inner.rank == rank:
        return loader
    if type(inner) is not DistributedSampler or type(loader) is not DataLoader:
        raise SamplerLayoutError(
            f"the DataLoader's sampler {type(inner).__name__}(num_replicas={inner.num_replicas}, rank={inner.rank}) is"
            f" keyed to the global rank, but the ranks of a sequence-parallel group must see the same samples (this"
            f" rank is data-parallel rank {rank} of {num_replicas}). Build it with"
            f" num_replicas=trainer.strategy.distributed_sampler_kwargs['num_replicas'] and"
            f" rank=trainer.strategy.distributed_sampler_kwargs['rank'], or pass no sampler and let Lightning add one."
        )
    sampler = DistributedSampler(inner.dataset, num_replicas=num_replicas, rank=rank, shuffle=inner.shuffle,
                                 seed=inner.seed, drop_last=inner.drop_last)
    sampler.set_epoch(inner.epoch)
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:
        return _rebuild(loader, DataLoader, sampler=sampler, batch_size=None)
    if type(batch_sampler) is not BatchSampler:
        raise SamplerLayoutError(
            f"the DataLoader's batch sampler {type(batch_sampler).__name__} wraps a DistributedSampler keyed to the"
            f" global rank; build that DistributedSampler with num_replicas={num_replicas} (data-parallel size) and"
            " the data-parallel rank (trainer.strategy.distributed_sampler_kwargs)."
        )
    return _rebuild(
        loader, DataLoader, sampler=sampler, batch_size=batch_sampler.batch_size, drop_last=batch_sampler.drop_last
    )


# --- padding steps: the model runs, nothing is counted ---------------------------------------------------------

_LOG_SIGNATURE = None


def _skip_in_batch_hooks(module: Any, update: Any) -> Any:
    def update_outside_padding(*args: Any, **kwargs: Any) -> Any:
        return None if _in_batch_hook(module) else update(*args, **kwargs)

    return update_outside_padding


def _neutral_log(log: Any) -> Any:
    """``LightningModule.log`` that keeps the value out of epoch sums and means but still takes part in every
    reduction (``sync_dist`` needs all ranks); ``max``/``min`` are unchanged by a repeated sample."""
    global _LOG_SIGNATURE
    from lightning.pytorch import LightningModule

    if _LOG_SIGNATURE is None:
        _LOG_SIGNATURE = inspect.signature(LightningModule.log)

    def log_without_weight(name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if not _in_batch_hook(log.__self__):
            return log(name, value, *args, **kwargs)  # epoch-end values count on every rank
        bound = _LOG_SIGNATURE.bind(None, name, value, *args, **kwargs)
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        reduce_fx = arguments.get("reduce_fx", "mean")
        if isinstance(value, (torch.Tensor, int, float)):
            if reduce_fx in ("mean", torch.mean):
                arguments["batch_size"] = 0
            elif reduce_fx in ("sum", torch.sum):
                arguments["value"] = value * 0
        return log(**arguments)

    return log_without_weight


def _in_batch_hook(module: Any) -> bool:
    """True while Lightning runs a per-batch hook of ``module`` (``validation_step``, ``on_test_batch_end``, ...):
    padding neutralises those, not the epoch-end hooks that follow the last (padding) batch."""
    name = getattr(module, "_current_fx_name", None) or ""
    return name.endswith("_step") or "_batch_" in name


@contextlib.contextmanager
def padding_step(module: nn.Module) -> Iterator[None]:
    """While active: ``module.log`` adds nothing to sums and means, and every ``torchmetrics.Metric`` in
    ``module`` ignores ``update`` (and so ``forward``'s accumulation)."""
    from torchmetrics import Metric

    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    updates = [m.__dict__.get("update") for m in metrics]  # torchmetrics keeps a wrapped update on the instance
    module.log = _neutral_log(module.log)  # type: ignore[method-assign]
    try:
        for metric, update in zip(metrics, updates):
            metric.update = _skip_in_batch_hooks(module, update or metric.update)  # type: ignore[method-assign]
        yield
    finally:
        del module.log
        for metric, update in zip(metrics, updates):
            if update is None:
                del metric.update
            else:
                metric.update = update  # type: ignore[method-assign]
