"""The strategy's data side: one data seed per sequence-parallel group, loaders keyed to the data-parallel rank, padding
steps.

Every rank of a sequence-parallel (SP) group, and every pipeline stage of a replica, must load the same samples:
the sampler is keyed to the mesh's ``dp`` dimension (:mod:`lightning_seqpar.sampling`), data-loader workers are
seeded per data-parallel rank from one seed the group agrees on, and map-style training loaders are made resumable
mid-epoch (:mod:`lightning_seqpar.resumable`). Evaluation shards pad with batches that
:func:`~lightning_seqpar.sampling.padding_step` keeps out of every sum.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_seqpar import reliability, sampling
from lightning_seqpar.parallelize.apply import sync_rng_state
from lightning_seqpar.resumable import ResumableDataLoader, make_resumable
from lightning_seqpar.topology import Topology


def agree_on_data_seed(topology: Topology, device: torch.device) -> int:
    """One seed in ``[0, 2**31 - 1)`` per SP group (and pipeline), drawn on the group's first rank and broadcast, so
    that every rank of the group seeds its data-loader workers identically (collective over ``sp`` and ``pp``)."""
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    group = topology.sequence_group
    dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
    if topology.pp > 1:  # every stage must draw the samples stage 0 draws
        group = topology.pipeline_group
        dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
    return int(seed.item())


def key_dataloader(dataloader: object, topology: Topology, stage: RunningStage | None, data_seed: int) -> object:
    """``dataloader`` keyed to this rank's data-parallel coordinate (``topology.mesh["dp"]``).

    Training: a user's ``DistributedSampler`` keyed to the global rank is re-keyed
    (:func:`~lightning_seqpar.sampling.rekey_sampler`) and the loader made resumable. Validation and test: contiguous,
    non-overlapping shards padded to equal step counts; prediction: the same shards, unpadded
    (:func:`~lightning_seqpar.sampling.shard_for_evaluation`). Workers are seeded with ``data_seed + dp_rank``.
    Anything but a ``DataLoader`` is returned unchanged.

    Raises:
        SamplerLayoutError: a sampler that would give the ranks of one SP group different samples.
    """
    if not isinstance(dataloader, DataLoader):
        return dataloader
    replica = topology.dp_rank  # the same on every SP rank and pipeline stage of a replica
    training = stage is None or stage == RunningStage.TRAINING
    if training:
        dataloader = sampling.rekey_sampler(dataloader, topology.dp, replica)
    else:
        dataloader = sampling.shard_for_evaluation(
            dataloader, topology.dp, replica, pad=stage != RunningStage.PREDICTING
        )
    dataloader.generator = torch.Generator().manual_seed(data_seed + replica)
    init_fn = dataloader.worker_init_fn
    if isinstance(init_fn, partial) and init_fn.func is pl_worker_init_function:
        dataloader.worker_init_fn = partial(pl_worker_init_function, rank=replica)
    return make_resumable(dataloader) if training else dataloader


def continue_stopped_epoch(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Let a run resumed from a checkpoint written when ``fit`` stopped at ``max_steps`` mid-epoch continue that
    epoch. Returns ``checkpoint``, changed in place where it applies.

    Lightning runs its end-of-epoch hooks when ``max_steps`` stops an epoch early, so a checkpoint written there
    (``ModelCheckpoint``'s at the end of fit, ``save_last``) counts the epoch as processed; resumed, Lightning starts
    the next epoch with the stopped epoch's batch count, and the rest of the stopped epoch is never trained (with
    the resumable loader's position, the first batches of the next epoch were skipped as well). When the training
    loader recorded a position inside its epoch and the last batch was not reached, the epoch is marked unfinished
    again, so that the resumed run continues with the next unseen batch of the same epoch, as from a checkpoint
    written during the epoch. Checkpoints without that position (plain loaders) are left as they are.
    """
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if not fit_loop:
        return checkpoint
    epochs, batches = fit_loop.get("epoch_progress"), fit_loop.get("epoch_loop.batch_progress")
    loaders = (fit_loop.get("state_dict") or {}).get("combined_loader") or []
    mid_epoch = any(isinstance(s, dict) and int(s.get("batches_served", 0) or 0) > 0 for s in loaders)
    if not (epochs and batches and mid_epoch) or batches.get("is_last_batch", True):
        return checkpoint
    current = epochs["current"]
    if current["processed"] == current["completed"] + 1 and current["started"] == current["processed"]:
        for key in ("current", "total"):
            epochs[key]["processed"] -= 1
        rank_zero_info(
            "seqpar: the checkpoint was written when fit stopped at max_steps in the middle of an epoch; resuming"
            " continues that epoch with its next unseen batch."
        )
    return checkpoint


def mark_delivered(trainer: Trainer) -> None:
    """Tell the resumable training loaders that a batch reached the model (the epoch position a checkpoint records)."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    for loader in combined.flattened if combined is not None else []:
        if isinstance(loader, ResumableDataLoader):
            loader.mark_delivered()


def evaluation_loader(trainer: Trainer, dataloader_idx: int) -> Any:
    """The processed loader the running validation or test loop is drawing from (None if there is none)."""
    combined = getattr(trainer._evaluation_loop, "_combined_loader", None)
    loaders = combined.flattened if combined is not None else []
    return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None


class PaddingSteps:
    """The :func:`~lightning_seqpar.sampling.padding_step` context, entered on the first padding batch of an evaluation
    shard and left on the next real batch or at the end of the loop (:meth:`end`)."""

    def __init__(self) -> None:
        self._context: Any = None

    def on_batch(self, module: LightningModule, loader: Any) -> None:
        """Enter or leave the padding context for the batch ``loader`` is about to deliver."""
        padding = isinstance(loader, sampling.EvalShardDataLoader) and loader.next_is_padding()
        if padding and self._context is None:
            self._context = sampling.padding_step(module)
            self._context.__enter__()
        elif not padding:
            self.end()

    def end(self) -> None:
        """Leave the padding context, if in it (idempotent)."""
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


class BatchChecks:
    """Checks the first batch of each loader per stage and epoch across the SP group and pipeline, once."""

    def __init__(self) -> None:
        self._checked: set[tuple] = set()

    def check(
        self, batch: Any, topology: Topology, trainer: Trainer, dataloader_idx: int, device: torch.device
    ) -> None:
        """Raise :class:`~lightning_seqpar.sampling.SamplerLayoutError` if the ranks hold different first batches."""
        key = (str(trainer.state.stage), dataloader_idx, trainer.current_epoch)
        if key not in self._checked:
            self._checked.add(key)
            reliability.check_same_batch(batch, topology, f"{trainer.state.stage} dataloader {dataloader_idx}", device)


class DataHooks(DDPStrategy):
    """The data hooks of :class:`~lightning_seqpar.strategies.base.SeqParStrategy`: loaders keyed to the data-parallel
    rank, padding steps of evaluation shards, first-batch checks (the state is set by its ``__init__`` and
    ``setup_distributed``)."""

    topology: Topology | None = None
    _data_seed: int | None
    _padding_steps: PaddingSteps
    _batch_checks: BatchChecks
    _zero_length_setting: bool | None

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Key every loader to the data-parallel rank (:func:`~lightning_seqpar.strategies.data.key_dataloader`), then
        check that the ranks of each SP group (and pipeline) have loaders of the same length."""
        if self.topology is not None and self._data_seed is not None:
            stage = self.lightning_module.trainer.state.stage if self.lightning_module is not None else None
            dataloader = key_dataloader(dataloader, self.topology, stage, self._data_seed)
        if self.topology is not None:
            reliability.check_loader_lengths(dataloader, self.topology, self.root_device)
        return dataloader

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """Move the batch; give the SP group its first rank's random state (collective over ``sp``); on an evaluation
        shard's padding batch, keep the step out of logged sums and metrics
        (:func:`~lightning_seqpar.sampling.padding_step`); check the first batch of each loader across the SP group."""
        batch = super().batch_to_device(batch, device, dataloader_idx)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or self.topology is None:
            return batch
        if self.topology.sp > 1:
            # The model runs replicated outside the region (ViTMAE's random masking, dropout before the blocks): every
            # step starts from the group's first rank's random state, also after code that drew numbers on some
            # ranks only (a rank-zero callback, a rank-dependent branch), which would give each rank's token shard
            # another sample.
            sync_rng_state(self.topology.sequence_group)
        if trainer.state.stage == RunningStage.TRAINING:
            mark_delivered(trainer)
        elif trainer.state.stage in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING, RunningStage.TESTING):
            self._padding_steps.on_batch(self.lightning_module, evaluation_loader(trainer, dataloader_idx))
        self._batch_checks.check(batch, self.topology, trainer, dataloader_idx, self.root_device)
        return batch

    @override
    def on_validation_end(self) -> None:
        self._padding_steps.end()
        super().on_validation_end()

    @override
    def on_test_end(self) -> None:
        self._padding_steps.end()
        super().on_test_end()

    @override
    def on_predict_end(self) -> None:
        if self._zero_length_setting is not None and self.lightning_module is not None:
            self.lightning_module.allow_zero_length_dataloader_with_multiple_devices = self._zero_length_setting
            self._zero_length_setting = None
        super().on_predict_end()
