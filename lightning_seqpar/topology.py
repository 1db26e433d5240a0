"""The process-group layout of a run: one named DeviceMesh over pipeline x data x sequence (x tensor) parallel ranks.

Ranks are laid out with the tensor-parallel (TP) dimension innermost, then sequence parallel (SP), then data
parallel (DP), then pipeline parallel (PP) outermost::

    global_rank = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp + tp_rank

(with ``tp`` 1, ``global_rank = pp_rank * (dp * sp) + dp_rank * sp + sp_rank``): the ranks of one TP group, then
of one SP group, are contiguous (and, with one process per GPU, on one node, where the all-to-all of
Ulysses is cheapest). One :class:`~torch.distributed.device_mesh.DeviceMesh` with the dimensions
``("pp", "dp", "sp", "tp")`` owns every group (torchtitan ``ParallelDims.build_mesh``):

- ``sp`` (``sequence_group``): the ranks that share one sample's tokens; for hybrid attention it is unflattened
  into ``ring x ulysses`` (:meth:`Topology.hybrid_groups`);
- ``dp`` (``data_group``): the ranks holding the same SP rank of different samples;
- ``dp_sp`` (``sequence_data_group``, flattened from ``dp`` and ``sp``): the ranks of one pipeline stage, over
  which gradients are averaged and ZeRO partitions;
- ``pp`` (``pipeline_group``): the ranks holding the same (dp, sp) position in successive stages;
- ``tp`` (``tensor_group``): the ranks that split each block's weights (``tensor_parallel_size``; with the
  DeepSpeed engines it stays 1, a real one-rank group DeepSpeed's mpu reports).

Nothing here is global state: each :class:`Topology` builds its own mesh and groups, so two can live in one process.
Needs torch >= 2.9 (``DeviceMesh._flatten``/``_unflatten`` and ``backend_override``).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_seqpar.parallel_dims import MESH_DIMS, ParallelDims, TopologyError

__all__ = [
    "MESH_DIMS", "DeepSpeedMPU", "ParallelDims", "Topology", "TopologyError", "build_hybrid_groups", "hybrid_rank_grid",
]


def _group_config(backend: str | None, timeout: datetime.timedelta | None) -> tuple[str | None, Any] | None:
    """A DeviceMesh ``backend_override`` entry that gives a dimension's groups ``backend`` and ``timeout``.

    DeviceMesh reads the timeout of a new group from its backend options only; None means the defaults of
    ``torch.distributed.new_group`` (the default group's backend, that backend's default timeout).
    """
    if backend is None and timeout is None:
        return None
    name = backend or dist.get_backend()
    if timeout is None:
        return (name, None)
    if name == "nccl" and dist.is_nccl_available():
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = timeout
        return (name, options)
    from torch.distributed.device_mesh import (
        C10dBackend,  # the generic options; gloo reads only the timeout
    )

    return (name, C10dBackend.Options(name, timeout))


def _default_device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


class Topology:
    """Owns the DeviceMesh (and so every process group) of one :class:`ParallelDims` layout for this process.

    Build it after ``torch.distributed`` is initialised, on every rank (group creation is collective)::

        topology = Topology(ParallelDims(world_size=8, sequence_parallel_size=4))
        topology.mesh["sp"].get_group() is topology.sequence_group, topology.sp_rank

    Args:
        dims: The validated sizes.
        rank: This process's global rank; must be ``torch.distributed.get_rank()`` (kept for callers that pass it).
        backend: Backend of the groups (default: that of the default group).
        timeout: Timeout of the groups' collectives (default: the backend's default).
        device_type: The mesh's device type, ``"cuda"`` or ``"cpu"`` (default: ``"cuda"`` under NCCL, else ``"cpu"``).

    Attributes:
        mesh: The root mesh, dimensions ``("pp", "dp", "sp", "tp")``.
        dp_sp_mesh: The 1-D mesh flattened from ``dp`` and ``sp`` (gradient reduction, ZeRO, FSDP2 sharding).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        TopologyError: ``dims.world_size`` is not the process group's size, or ``rank`` is not this process's.
    """

    def __init__(
        self,
        dims: ParallelDims,
        rank: int | None = None,
        backend: str | None = None,
        timeout: datetime.timedelta | None = None,
        device_type: str | None = None,
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
        if rank is not None and rank != dist.get_rank():
            raise TopologyError(f"Topology(rank={rank}) but this process is rank {dist.get_rank()}: leave rank unset.")
        self.dims = dims
        self.rank = dist.get_rank()
        self._group_config = _group_config(backend, timeout)
        overrides = {name: self._group_config for name in MESH_DIMS} if self._group_config else None
        # Every rank creates every group of every dimension, in the same order (init_device_mesh is collective).
        self.mesh: DeviceMesh = init_device_mesh(
            device_type or _default_device_type(), dims.mesh_shape, mesh_dim_names=MESH_DIMS, backend_override=overrides
        )
        self.dp_sp_mesh: DeviceMesh = self.mesh["dp", "sp"]._flatten("dp_sp", backend_override=self._group_config)
        self._hybrid_meshes: dict[int, DeviceMesh] = {}
        self.pp_rank, self.dp_rank, self.sp_rank = (self.mesh.get_local_rank(name) for name in ("pp", "dp", "sp"))
        self.tp_rank = self.mesh.get_local_rank("tp")
        assert (self.pp_rank, self.dp_rank, self.sp_rank) == dims.coordinates(self.rank), (
            f"the DeviceMesh places rank {self.rank} at {(self.pp_rank, self.dp_rank, self.sp_rank)}, the layout"
            f" formula at {dims.coordinates(self.rank)}"
        )
        self.sequence_group: ProcessGroup = self.mesh.get_group("sp")
        self.data_group: ProcessGroup = self.mesh.get_group("dp")
        self.sequence_data_group: ProcessGroup = self.dp_sp_mesh.get_group()
        self.pipeline_group: ProcessGroup = self.mesh.get_group("pp")
        self.tensor_group: ProcessGroup = self.mesh.get_group("tp")

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
    def tp(self) -> int:
        return self.dims.tp

    def hybrid_mesh(self, ulysses_degree: int) -> DeviceMesh:
        """The mesh with ``sp`` unflattened into ``("ring", "ulysses")``, Ulysses innermost (consecutive SP ranks).

        Built once per degree (collective: call on every rank). Dimensions ``("pp", "dp", "ring", "ulysses", "tp")``;
        SP rank ``p = ring_rank * ulysses_degree + ulysses_rank`` (:func:`hybrid_rank_grid`).

        Raises:
            TopologyError: ``ulysses_degree`` is not a positive divisor of ``sequence_parallel_size``.
        """
        if not isinstance(ulysses_degree, int) or ulysses_degree < 1 or self.sp % ulysses_degree:
            raise TopologyError(
                f"ulysses_degree={ulysses_degree} does not divide sequence_parallel_size={self.sp}; choose a divisor"
                " (ulysses_degree x ring degree = sequence_parallel_size)."
            )
        if ulysses_degree not in self._hybrid_meshes:
            overrides = {"ring": self._group_config, "ulysses": self._group_config} if self._group_config else None
            # The dimension by index: torch 2.11's _unflatten refuses every dimension given by name (its name check
            # is inverted), so "sp" would fail there.
            sp_dim = self.mesh.mesh_dim_names.index("sp")
            self._hybrid_meshes[ulysses_degree] = self.mesh._unflatten(
                sp_dim, (self.sp // ulysses_degree, ulysses_degree), ("ring", "ulysses"), backend_override=overrides
            )
        return self._hybrid_meshes[ulysses_degree]

    def hybrid_groups(self, ulysses_degree: int) -> tuple[ProcessGroup, ProcessGroup]:
        """``(ulysses_group, ring_group)`` of this rank for hybrid attention, from :meth:`hybrid_mesh` (collective the
        first time for a degree)."""
        mesh = self.hybrid_mesh(ulysses_degree)
        return mesh.get_group("ulysses"), mesh.get_group("ring")

    @property
    def mpu(self) -> DeepSpeedMPU:
        """The model-parallel-unit view DeepSpeed's ``initialize(mpu=...)`` expects."""
        return DeepSpeedMPU(self)

    def describe(self) -> str:
        """One line with every factor and this rank's coordinates, for logs."""
        tp = f" x tp {self.tp}" if self.tp != 1 else ""
        return (
            f"world={self.dims.world_size} = pp {self.pp} x dp {self.dp} x sp {self.sp}{tp};"
            f" rank {self.rank} -> (pp {self.pp_rank}, dp {self.dp_rank}, sp {self.sp_rank}"
            + (f", tp {self.tp_rank})" if self.tp != 1 else ")")
        )

    def __repr__(self) -> str:
        return f"Topology({dataclasses.asdict(self.dims)}, rank={self.rank})"


class DeepSpeedMPU:
    """The ``mpu`` DeepSpeed's ``initialize(mpu=...)`` expects, laid "flat" over a :class:`Topology`'s mesh.

    DeepSpeed's data parallelism is our ``dp_sp`` dimension (``dp * sp`` ranks): ZeRO partitions over it and
    every stage divides the all-reduced gradients by ``dp * sp``, which is the project's gradient convention
    (each SP rank's loss is the full sample's, see the strategy). There are deliberately no
    ``get_sequence_*`` methods: with them DeepSpeed 0.19.8 divides by ``dp`` in ZeRO 0-2 and by ``dp * sp``
    in ZeRO-3, and partitions ZeRO-3 over ``dp`` only (measured in docs/sharding.md). Tensor ("model")
    parallelism is the mesh's ``tp`` dimension, size 1: a real one-rank group, because DeepSpeed all-reduces the
    gradient norm over ``get_model_parallel_group()`` unguarded, and ``None`` there would mean the whole world.
    Pipelines do not use this object: DeepSpeed's ``PipelineEngine`` builds its own grid with the same layout.
    """

    def __init__(self, topology: Topology) -> None:
        self._topology = topology

    # DeepSpeed's data parallelism = our sequence x data parallelism (gradients, ZeRO partitions).
    def get_data_parallel_group(self) -> ProcessGroup:
        return self._topology.sequence_data_group

    def get_data_parallel_world_size(self) -> int:
        return self._topology.dp_sp_mesh.size()

    def get_data_parallel_rank(self) -> int:
        return self._topology.dp_sp_mesh.get_local_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self._topology.dp_sp_mesh.mesh.tolist()

    # Tensor (model) parallelism: the mesh's tp dimension; no pipeline for the non-pipeline engine.
    def get_model_parallel_group(self) -> ProcessGroup:
        return self._topology.tensor_group

    def get_model_parallel_world_size(self) -> int:
        return self._topology.tp

    def get_model_parallel_rank(self) -> int:
        return self._topology.tp_rank

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self._topology.tensor_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._topology.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self._topology.tp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def hybrid_rank_grid(sequence_ranks: Sequence[int], ulysses_degree: int) -> tuple[list[list[int]], list[list[int]]]:
    """The Ulysses groups (consecutive ranks) and ring groups (one rank of each Ulysses group) of one SP group.

    >>> hybrid_rank_grid([0, 1, 2, 3, 4, 5], 2)
    ([[0, 1], [2, 3], [4, 5]], [[0, 2, 4], [1, 3, 5]])

    Raises:
        ValueError: ``ulysses_degree`` does not divide the number of ranks, or the ranks are empty or repeated.
    """
    ranks = sorted(int(r) for r in sequence_ranks)
    if not ranks:
        raise ValueError("build_hybrid_groups needs at least one sequence-parallel rank, got an empty list.")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"sequence_ranks {list(sequence_ranks)} contains a rank more than once.")
    if ulysses_degree < 1 or len(ranks) % ulysses_degree:
        raise ValueError(
            f"ulysses_degree={ulysses_degree} must be a positive divisor of the sequence-parallel size"
            f" {len(ranks)}; the group is split into ulysses_degree x ring_degree ranks."
        )
    ring_degree = len(ranks) // ulysses_degree
    ulysses = [ranks[i * ulysses_degree : (i + 1) * ulysses_degree] for i in range(ring_degree)]
    ring = [ranks[j::ulysses_degree] for j in range(ulysses_degree)]
    return ulysses, ring


def build_hybrid_groups(
    sequence_ranks: Sequence[int],
    ulysses_degree: int,
    *,
    backend: str | None = None,
    timeout: datetime.timedelta | None = None,
    device_type: str | None = None,
) -> tuple[ProcessGroup | None, ProcessGroup | None]:
    """The Ulysses and ring groups of one SP group outside a :class:`Topology` (attention used on its own).

    Builds a 2-D DeviceMesh ``("ring", "ulysses")`` over ``sequence_ranks`` (:func:`hybrid_rank_grid`). Every rank of
    the default group must call this with the same arguments (group creation is collective); ranks outside
    ``sequence_ranks`` get ``(None, None)``. Under a strategy, use :meth:`Topology.hybrid_groups` instead.

    Args:
        sequence_ranks: Global ranks of one sequence-parallel group (SP rank order is rank order).
        ulysses_degree: Ranks per Ulysses group u (innermost, consecutive); the ring degree is P / u.
        backend: Backend of the groups (default: that of the default group).
        timeout: Timeout of the groups' collectives (default: the backend's default).
        device_type: The mesh's device type (default: ``"cuda"`` under NCCL, else ``"cpu"``).

    Returns:
        ``(ulysses_group, ring_group)`` of this rank.

    Raises:
        ValueError: ``ulysses_degree`` does not divide the SP size, or the ranks are empty or repeated.
    """
    ulysses_ranks, _ = hybrid_rank_grid(sequence_ranks, ulysses_degree)
    config = _group_config(backend, timeout)
    mesh = DeviceMesh(
        device_type or _default_device_type(),
        torch.tensor(ulysses_ranks),  # [ring, ulysses] -> global rank
        mesh_dim_names=("ring", "ulysses"),
        backend_override=(config, config) if config else None,
    )
    if mesh.get_coordinate() is None:
        return None, None
    return mesh.get_group("ulysses"), mesh.get_group("ring")
