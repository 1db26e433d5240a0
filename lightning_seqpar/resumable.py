"""Data loaders that resume mid-epoch: after a restart, the epoch continues with the next unseen batch.

Lightning saves a training loader's ``state_dict()`` in every checkpoint and restores it with
``load_state_dict()`` when the loader has both; a plain ``DataLoader`` has neither, so a mid-epoch resume
starts the epoch over and repeats samples. :func:`make_resumable` rebuilds a map-style loader around a
:class:`SkippableBatchSampler` that counts the batches handed out this epoch and, after a restore, skips
that many *index* batches (no sample is loaded to skip it).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler


class SkippableBatchSampler(Sampler[list[int]]):
    """Wrap a batch sampler; skip the first ``skip`` batches of the next epoch once, then count as usual.

    The wrapped sampler's ``set_epoch`` (e.g. ``DistributedSampler``'s) still reaches it through ``.sampler``.
    """

    def __init__(self, batch_sampler: BatchSampler | Sampler[list[int]]) -> None:
        self.batch_sampler = batch_sampler
        self.sampler = getattr(batch_sampler, "sampler", None)
        self.batch_size = getattr(batch_sampler, "batch_size", None)
        self.drop_last = getattr(batch_sampler, "drop_last", False)
        self.served = 0
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip, self.served = self.skip, 0, 0
        for i, batch in enumerate(self.batch_sampler):
            if i < skip:
                continue
            self.served = i + 1
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch is saved in checkpoints and restored on resume.

    The position counts batches the training loop has received (with workers, prefetched batches are not
    counted), so a checkpoint written after batch k resumes with batch k + 1. It belongs to the sampler's epoch:
    when the resumed run starts another epoch, nothing is skipped (a checkpoint written at the end of an epoch holds
    the whole epoch's count; skipping would leave out batches never seen), with a warning when the saved epoch was
    not finished. The strategies resume a ``max_steps`` stop inside the epoch it stopped
    (:func:`lightning_seqpar.strategies.data.continue_stopped_epoch`).
    """

    def state_dict(self) -> dict[str, Any]:
        """``batches_served`` this epoch, ``samples_per_batch`` over all data-parallel ranks, and the sampler's
        ``epoch`` (None when it has none)."""
        return {"batches_served": self._position(), "samples_per_batch": self._samples_per_batch(),
                "epoch": getattr(self, "_epoch", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Skip what the checkpoint's run consumed. Written on another layout (another data-parallel size or batch
        size), the position is carried over in samples: ``batches_served * samples_per_batch`` samples of the epoch's
        order, i.e. that many batches of this layout (the global order of ``DistributedSampler`` does not depend on
        the number of replicas, and it interleaves them, so the first k global batches cover the first samples).

        Raises:
            ValueError: when those samples are not a whole number of this layout's global batches.
        """
        served = int(state.get("batches_served", 0))
        before, now = state.get("samples_per_batch"), self._samples_per_batch()
        if before is not None and now is not None and before != now:
            samples = served * int(before)
            if samples % now:
                raise ValueError(
                    f"the checkpoint stopped after {samples} samples of the epoch ({served} batches of {before}"
                    " samples over all data-parallel ranks), which is not a whole number of this run's batches of"
                    f" {now}; resume with a"
                    " global batch size that divides it, or at an epoch boundary."
                )
            served = samples // now
        self.batch_sampler.skip = served  # type: ignore[union-attr]
        self._skip_epoch = state.get("epoch")

    def _samples_per_batch(self) -> int | None:
        """Samples one batch of this loader stands for over all data-parallel ranks (None if unknown)."""
        batch_size = getattr(self.batch_sampler, "batch_size", None)
        if batch_size is None:
            return None
        sampler = getattr(self.batch_sampler, "sampler", None)
        return int(batch_size) * int(
            getattr(sampler, "num_replicas", 1) if isinstance(sampler, DistributedSampler) else 1
        )

    def __iter__(self):
        self._consumed = 0
        self._delivered: int | None = None
        self._epoch = getattr(getattr(self.batch_sampler, "sampler", None), "epoch", None)
        saved_epoch, self._skip_epoch = getattr(self, "_skip_epoch", None), None
        served = self.batch_sampler.skip  # type: ignore[union-attr]
        if served and saved_epoch is not None and self._epoch is not None and self._epoch != saved_epoch:
            self.batch_sampler.skip = 0  # type: ignore[union-attr]
            if served < len(self.batch_sampler):  # the saved epoch was not finished
                warnings.warn(
                    f"resuming at epoch {self._epoch} from a checkpoint written after {served} batches of epoch"
                    f" {saved_epoch}, whose other batches are not trained; epoch {self._epoch} starts from its first"
                    " batch.",
                    stacklevel=2,
                )
        self._start = self.batch_sampler.skip  # type: ignore[union-attr]
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def mark_delivered(self) -> None:
        """Count one batch that reached the training step. Lightning's fetcher draws one batch ahead (to know the
        last one), so batches drawn overcount by one mid-epoch; the strategy calls this from ``batch_to_device``."""
        self._delivered = (self._delivered or 0) + 1

    def _position(self) -> int:
        delivered = getattr(self, "_delivered", None)
        return getattr(self, "_start", 0) + (delivered if delivered is not None else getattr(self, "_consumed", 0))


def make_resumable(loader: DataLoader) -> DataLoader:
    """A :class:`ResumableDataLoader` equal to ``loader`` (same dataset, batches, workers, seeds), or ``loader``
    itself when it cannot be rebuilt safely (iterable datasets, custom loader classes, no batch sampler)."""
    if type(loader) is not DataLoader or loader.batch_sampler is None or loader._dataset_kind != 0:
        return loader
    kwargs: dict[str, Any] = dict(
        batch_sampler=SkippableBatchSampler(loader.batch_sampler),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return ResumableDataLoader(loader.dataset, **kwargs)
