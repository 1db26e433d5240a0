"""The process-group layout of a run: data x pipeline x sequence parallel sizes, validated, with the DeepSpeed `mpu` view.

Ranks are laid out with the sequence-parallel (SP) dimension innermost, then data parallel (DP), then
pipeline parallel (PP) outermost::

    global_rank = pp_rank * (dp * sp) + dp_rank * sp + sp_rank

so the ranks of one SP group are contiguous (and, with one process per GPU, on one node, where the
all-to-all of Ulysses is cheapest). Named groups:

- ``sequence``: the ``sp`` ranks that share one sample's tokens;
- ``data``: the ``dp`` ranks holding the same SP rank of different samples;
- ``sequence_data``: the ``dp * sp`` ranks of one pipeline stage, over which gradients are averaged and
  ZeRO partitions;
- ``pipeline``: the ``pp`` ranks holding the same (dp, sp) position in successive stages.

Nothing here is global state: each :class:`Topology` owns its groups, so two can live in one process.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed import ProcessGroup


class TopologyError(ValueError):
    """Raised when the parallel sizes cannot be laid out on the world."""


@dataclass(frozen=True)
class ParallelDims:
    """The sizes of the three parallel dimensions, validated against the world size.

    Attributes:
        world_size: Number of processes in the job.
        sequence_parallel_size: Ranks that split the tokens of one sample (1 means disabled).
        pipeline_parallel_size: Pipeline stages the block stack is cut into (1 means disabled).
        data_parallel_size: Replicas that see different samples; -1 infers it as
            ``world_size // (sequence_parallel_size * pipeline_parallel_size)``.
    """

    world_size: int
    sequence_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = -1

    def __post_init__(self) -> None:
        sp, pp, dp, world = (
            self.sequence_parallel_size,
            self.pipeline_parallel_size,
            self.data_parallel_size,
            self.world_size,
        )
        factors = f"world_size={world}, sequence_parallel_size={sp}, pipeline_parallel_size={pp}, data_parallel_size={dp}"
        for name, value in (("world_size", world), ("sequence_parallel_size", sp), ("pipeline_parallel_size", pp)):
            if not isinstance(value, int) or value < 1:
                raise TopologyError(f"{name} must be a positive integer ({factors}).")
        if not isinstance(dp, int) or (dp < 1 and dp != -1):
            raise TopologyError(f"data_parallel_size must be a positive integer or -1 to infer it ({factors}).")
        if dp == -1:
            if world % (sp * pp) != 0:
                raise TopologyError(
                    f"world_size={world} is not divisible by sequence_parallel_size * pipeline_parallel_size"
                    f" = {sp} * {pp} = {sp * pp} ({factors}). Choose sizes whose product divides the number of"
                    " processes (devices per node x nodes)."
                )
            object.__setattr__(self, "data_parallel_size", world // (sp * pp))
        elif dp * sp * pp != world:
            raise TopologyError(
                f"data_parallel_size * pipeline_parallel_size * sequence_parallel_size = {dp} * {pp} * {sp}"
                f" = {dp * pp * sp} != world_size={world} ({factors}). Set data_parallel_size=-1 to infer it."
            )

    @property
    def dp(self) -> int:
        return self.data_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_parallel_size

    @property
    def sp(self) -> int:
        return self.sequence_parallel_size

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """Return ``(pp_rank, dp_rank, sp_rank)`` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside the world of {self.world_size} processes.")
        sp_rank = rank % self.sp
        dp_rank = (rank // self.sp) % self.dp
        pp_rank = rank // (self.sp * self.dp)
        return pp_rank, dp_rank, sp_rank

    def rank_of(self, pp_rank: int, dp_rank: int, sp_rank: int) -> int:
        """Return the global rank at the given coordinates."""
        return pp_rank * (self.dp * self.sp) + dp_rank * self.sp + sp_rank

    def sequence_groups(self) -> list[list[int]]:
        """Ranks of every SP group (contiguous blocks of ``sp`` ranks)."""
        return [[self.rank_of(p, d, s) for s in range(self.sp)] for p in range(self.pp) for d in range(self.dp)]

    def data_groups(self) -> list[list[int]]:
        """Ranks of every DP group (same pipeline stage and SP rank)."""
        return [[self.rank_of(p, d, s) for d in range(self.dp)] for p in range(self.pp) for s in range(self.sp)]

    def sequence_data_groups(self) -> list[list[int]]:
        """Ranks of every sequence-data group (one pipeline stage: ``dp * sp`` contiguous ranks)."""
        return [[self.rank_of(p, d, s) for d in range(self.dp) for s in range(self.sp)] for p in range(self.pp)]

    def pipeline_groups(self) -> list[list[int]]:
        """Ranks of every pipeline group (same DP and SP rank in successive stages)."""
        return [[self.rank_of(p, d, s) for p in range(self.pp)] for d in range(self.dp) for s in range(self.sp)]

    def check_sequence_length(self, num_tokens: int) -> None:
        """Raise if a sequence of ``num_tokens`` cannot give every SP rank at least one token."""
        if num_tokens < self.sp:
            raise TopologyError(
                f"a sequence of {num_tokens} tokens cannot be split over sequence_parallel_size={self.sp} ranks:"
                " every rank needs at least one token. Use a smaller sequence_parallel_size or longer sequences."
            )


class Topology:
    """Owns the process groups of one :class:`ParallelDims` layout for this process.

    Build it after ``torch.distributed`` is initialised, on every rank (group creation is collective)::

        topology = Topology(ParallelDims(world_size=8, sequence_parallel_size=4))
        topology.sequence_group, topology.sp_rank

    Args:
        dims: The validated sizes.
        rank: This process's global rank (default: ``torch.distributed.get_rank()``).
        backend: Backend of the sub-groups (default: that of the default group).
        timeout: Timeout of the sub-groups' collectives (default: the default group's).
    """

    def __init__(
        self,
        dims: ParallelDims,
        rank: int | None = None,
        backend: str | None = None,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "Topology needs an initialised torch.distributed process group: call"
                " torch.distributed.init_process_group(...) first (the SeqParStrategy does this for you)."
            )
        if dist.get_world_size() != dims.world_size:
            raise TopologyError(
                f"ParallelDims.world_size={dims.world_size} but torch.distributed has {dist.get_world_size()}"
                " processes: build ParallelDims with world_size=torch.distributed.get_world_size()."
            )
        self.dims = dims
        self.rank = dist.get_rank() if rank is None else rank
        self.pp_rank, self.dp_rank, self.sp_rank = dims.coordinates(self.rank)
        kwargs: dict[str, Any] = {}
        if backend is not None:
            kwargs["backend"] = backend
        if timeout is not None:
            kwargs["timeout"] = timeout
        # Every rank must create every group, in the same order (new_group is collective).
        self.sequence_group = self._own_group(dims.sequence_groups(), kwargs)
        self.data_group = self._own_group(dims.data_groups(), kwargs)
        self.sequence_data_group = self._own_group(dims.sequence_data_groups(), kwargs)
        self.pipeline_group = self._own_group(dims.pipeline_groups(), kwargs)

    def _own_group(self, layouts: list[list[int]], kwargs: dict[str, Any]) -> ProcessGroup:
        mine = None
        for ranks in layouts:
            group = dist.new_group(ranks, **kwargs)
            if self.rank in ranks:
                mine = group
        assert mine is not None, f"rank {self.rank} is in none of {layouts}"
        return mine

    @property
    def sp(self) -> int:
        return self.dims.sp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def mpu(self) -> "DeepSpeedMPU":
        """The model-parallel-unit view DeepSpeed's ``initialize(mpu=...)`` expects."""
        return DeepSpeedMPU(self)

    def describe(self) -> str:
        """One line with every factor and this rank's coordinates, for logs."""
        return (
            f"world={self.dims.world_size} = pp {self.pp} x dp {self.dp} x sp {self.sp};"
            f" rank {self.rank} -> (pp {self.pp_rank}, dp {self.dp_rank}, sp {self.sp_rank})"
        )

    def __repr__(self) -> str:
        return f"Topology({dataclasses.asdict(self.dims)}, rank={self.rank})"


class DeepSpeedMPU:
    """The ``mpu`` DeepSpeed's ``initialize(mpu=...)`` expects, laid "flat" over a :class:`Topology`.

    DeepSpeed's data parallelism is our *sequence-data* group (``dp * sp`` ranks): ZeRO partitions over it and
    every stage divides the all-reduced gradients by ``dp * sp``, which is the project's gradient convention
    (each SP rank's loss is the full sample's, see the strategy). There are deliberately no
    ``get_sequence_*`` methods: with them DeepSpeed 0.19.8 divides by ``dp`` in ZeRO 0-2 and by ``dp * sp``
    in ZeRO-3, and partitions ZeRO-3 over ``dp`` only (measured in docs/sharding.md). Tensor ("model") and
    pipeline parallelism report size 1 with a real one-rank group, because DeepSpeed all-reduces the gradient
    norm over ``get_model_parallel_group()`` unguarded, and ``None`` there would mean the whole world.
    Pipelines do not use this object: DeepSpeed's ``PipelineEngine`` builds its own grid with the same layout.
    """

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._single_rank_group: ProcessGroup | None = None

    # DeepSpeed's data parallelism = our sequence x data parallelism (gradients, ZeRO partitions).
    def get_data_parallel_group(self) -> ProcessGroup:
        return self._topology.sequence_data_group

    def get_data_parallel_world_size(self) -> int:
        return self._topology.sp * self._topology.dp

    def get_data_parallel_rank(self) -> int:
        return self._topology.dp_rank * self._topology.sp + self._topology.sp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self._topology.dims.sequence_data_groups()[self._topology.pp_rank]

    # No tensor (model) parallelism and, for the non-pipeline engine, no pipeline: size 1, real groups.
    def _own_rank_group(self) -> ProcessGroup:
        if self._single_rank_group is None:
            # Only this rank takes part, so creating it lazily cannot desynchronise the other ranks.
            self._single_rank_group = dist.new_group([self._topology.rank], use_local_synchronization=True)
        return self._single_rank_group

    def get_model_parallel_group(self) -> ProcessGroup:
        return self._own_rank_group()

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self._own_rank_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1
