"""How the strategies reduce what Lightning asks them to: values over the mesh's ``dp`` dimension, decisions over the
world.

Values (logged metrics, gathered outputs, predictions) reduce over the data-parallel group: the ranks of an SP group
hold the same value, so each sample counts once. Decisions reduce over the world, and ``broadcast`` / ``barrier``
(DDPStrategy's) span the world with ``src`` a global rank, so every rank of every SP group, pipeline stage and
replica acts alike; metric-driven schedulers step on the world's mean of the monitored value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from typing_extensions import override

from lightning_seqpar.topology import Topology


class DataParallelReductions(DDPStrategy):
    """``DDPStrategy`` whose reductions and gathers default to the topology's ``dp`` group (the base of
    :class:`~lightning_seqpar.strategies.base.SeqParStrategy`; ``topology`` is set by its ``setup_distributed``)."""

    topology: Topology | None = None

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any = "mean") -> Tensor | Any:
        """Reduce over the data-parallel group by default: the ranks of an SP group hold the same value."""
        if group is None and self.topology is not None:
            group = self.topology.data_group
        if (
            isinstance(tensor, Tensor)
            and not tensor.is_floating_point()
            and str(reduce_op).lower() in ("mean", "avg", "reduceop.avg")
        ):
            # An integer mean floors: Lightning's epoch mean divides the mean of the summed values by the mean of the
            # (integer) batch counts, which is off when the ranks ran different numbers of samples (evaluation shards).
            tensor = tensor.double()
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """``all`` (or ``any``) of ``decision`` over every rank of the world: ModelCheckpoint's top-k and file checks,
        EarlyStopping and others act on it on every rank, so every rank must get the same answer.

        Lightning's version sums through :meth:`reduce` (here the data-parallel group, dp of the world's ranks) and
        compares with the world size, which is never reached once ``sequence_parallel_size > 1``: "all ranks agree"
        would always be False. The decision is counted over the group it is reduced over instead: the world, which
        also covers pipeline stages and ranks outside this rank's data-parallel group.
        """
        if not dist.is_available() or not dist.is_initialized():
            return bool(decision)
        votes = torch.tensor(int(bool(decision)), device=self.root_device)
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)  # the default group: the world
        return bool(votes.item() == dist.get_world_size()) if all else bool(votes.item() > 0)

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        """Gather over the data-parallel group by default, so each sample appears once."""
        if group is None and self.topology is not None:
            group = self.topology.data_group
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    def gather_predictions(self, predictions: list[Any]) -> list[Any]:
        """All data-parallel ranks' ``trainer.predict`` outputs, in dataset order, on every rank (collective over the
        data-parallel group; call on every rank). Each rank predicts a contiguous shard and the shards follow the
        rank order, so the batches of rank 0, then rank 1, ... are the samples in order (batch boundaries may differ
        from one process; concatenate along the batch dimension to compare)."""
        assert self.topology is not None
        shards: list[Any] = [None] * self.topology.dp
        dist.all_gather_object(shards, list(predictions or []), group=self.topology.data_group)
        return [batch for shard in shards for batch in shard]


def agree_on_scheduler_metrics(module: Any, device: torch.device) -> Callable[[], None]:
    """Make every rank step its metric-driven schedulers (``ReduceLROnPlateau``) on the same value: the mean of the
    ranks' monitored values over the world, as if one device had seen all of their validation data.

    Lightning calls ``LightningModule.lr_scheduler_step(scheduler, metric)`` on every rank with that rank's own
    ``callback_metrics[monitor]``; a metric logged without ``sync_dist`` (or computed from one rank's data) differs
    between data-parallel ranks, and then each rank takes its own decision to cut its learning rate: replicas train
    with different learning rates (DDP) or one model's ZeRO partitions are stepped with different ones. Collective:
    Lightning steps the schedulers at the same point on every rank. Returns the function that restores the module's
    own ``lr_scheduler_step``.
    """
    step = module.lr_scheduler_step

    def lr_scheduler_step(scheduler: Any, metric: Any | None) -> None:
        if metric is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            value = torch.as_tensor(metric, dtype=torch.float64, device=device).detach().clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)  # the default group: every rank, every pipeline stage
            agreed = value / dist.get_world_size()
            metric = agreed.to(metric.dtype) if isinstance(metric, Tensor) else float(agreed.item())
        return step(scheduler, metric)

    module.lr_scheduler_step = lr_scheduler_step
    return lambda: module.__dict__.pop("lr_scheduler_step", None)
