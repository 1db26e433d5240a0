"""The sizes of the parallel dimensions (pp x dp x sp x tp), validated against the world size, and the rank layout.

Ranks are laid out with the tensor-parallel (TP) dimension innermost, then sequence parallel (SP), then data
parallel (DP), then pipeline parallel (PP) outermost::

    global_rank = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp + tp_rank

This module holds the arithmetic only (no process group); :class:`~lightning_seqpar.topology.Topology` builds the
DeviceMesh with this layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MESH_DIMS: tuple[str, ...] = ("pp", "dp", "sp", "tp")
"""The names of the mesh dimensions, outermost first."""


class TopologyError(ValueError):
    """Raised when the parallel sizes cannot be laid out on the world."""


@dataclass(frozen=True)
class ParallelDims:
    """The sizes of the parallel dimensions, validated against the world size.

    Attributes:
        world_size: Number of processes in the job.
        sequence_parallel_size: Ranks that split the tokens of one sample (1 means disabled).
        pipeline_parallel_size: Pipeline stages the block stack is cut into (1 means disabled).
        data_parallel_size: Replicas that see different samples; -1 infers it as
            ``world_size // (sequence_parallel_size * pipeline_parallel_size * tensor_parallel_size)``.
        tensor_parallel_size: Ranks that split the weights of one layer (innermost; 1 means disabled).

    Raises:
        TopologyError: a size is not a positive integer, or the sizes do not multiply to ``world_size``; the
            message prints every factor.
    """

    world_size: int
    sequence_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = -1
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        sp, pp, dp, tp, world = (
            self.sequence_parallel_size,
            self.pipeline_parallel_size,
            self.data_parallel_size,
            self.tensor_parallel_size,
            self.world_size,
        )
        factors = (
            f"world_size={world}, sequence_parallel_size={sp}, pipeline_parallel_size={pp}, data_parallel_size="
            + ("inferred" if dp == -1 else str(dp))
        )
        if tp != 1:
            factors += f", tensor_parallel_size={tp}"
        for name, value in (
            ("world_size", world),
            ("sequence_parallel_size", sp),
            ("pipeline_parallel_size", pp),
            ("tensor_parallel_size", tp),
        ):
            if not isinstance(value, int) or value < 1:
                raise TopologyError(f"{name} must be a positive integer ({factors}).")
        if not isinstance(dp, int) or (dp < 1 and dp != -1):
            raise TopologyError(f"data_parallel_size must be a positive integer or -1 to infer it ({factors}).")
        model = sp * pp * tp
        product = f"{sp} * {pp}" + (f" * {tp}" if tp != 1 else "")
        names = "sequence_parallel_size * pipeline_parallel_size" + (" * tensor_parallel_size" if tp != 1 else "")
        if dp == -1:
            if world % model != 0:
                raise TopologyError(
                    f"world_size={world} is not divisible by {names} = {product} = {model} ({factors}). Choose sizes"
                    " whose product divides the number of processes (devices per node x nodes)."
                )
            object.__setattr__(self, "data_parallel_size", world // model)
        elif dp * model != world:
            raise TopologyError(
                "data_parallel_size * pipeline_parallel_size * sequence_parallel_size"
                + (" * tensor_parallel_size" if tp != 1 else "")
                + f" = {dp} * {pp} * {sp}" + (f" * {tp}" if tp != 1 else "")
                + f" = {dp * model} != world_size={world} ({factors}). Set data_parallel_size=-1 to infer it."
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

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        """``(pp, dp, sp, tp)``: the shape of the mesh, in the order of :data:`MESH_DIMS`."""
        return (self.pp, self.dp, self.sp, self.tp)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """Return ``(pp_rank, dp_rank, sp_rank)`` of a global rank (its TP rank is ``rank % tensor_parallel_size``).

        Raises:
            TopologyError: ``rank`` is outside ``[0, world_size)``.
        """
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside the world of {self.world_size} processes.")
        sp_rank = (rank // self.tp) % self.sp
        dp_rank = (rank // (self.tp * self.sp)) % self.dp
        pp_rank = rank // (self.tp * self.sp * self.dp)
        return pp_rank, dp_rank, sp_rank

    def rank_of(self, pp_rank: int, dp_rank: int, sp_rank: int, tp_rank: int = 0) -> int:
        """Return the global rank at the given coordinates (the formula in the module docstring)."""
        return ((pp_rank * self.dp + dp_rank) * self.sp + sp_rank) * self.tp + tp_rank

    def _groups_along(self, *dims: str) -> list[list[int]]:
        """Every group spanning ``dims`` (the other coordinates fixed), in row-major order of the others."""
        grid = torch.arange(self.world_size).reshape(self.mesh_shape)  # [pp, dp, sp, tp] -> global rank
        along = [MESH_DIMS.index(d) for d in dims]
        others = [i for i in range(len(MESH_DIMS)) if i not in along]
        return grid.permute(*others, *along).reshape(-1, math.prod(grid.shape[i] for i in along)).tolist()

    def sequence_groups(self) -> list[list[int]]:
        """Ranks of every SP group (contiguous blocks of ``sp`` ranks when ``tp`` is 1)."""
        return self._groups_along("sp")

    def data_groups(self) -> list[list[int]]:
        """Ranks of every DP group (same pipeline stage and SP rank)."""
        return self._groups_along("dp")

    def sequence_data_groups(self) -> list[list[int]]:
        """Ranks of every sequence-data group (``dp_sp``: the ``dp * sp`` ranks of one pipeline stage)."""
        return self._groups_along("dp", "sp")

    def pipeline_groups(self) -> list[list[int]]:
        """Ranks of every pipeline group (same DP and SP rank in successive stages)."""
        return self._groups_along("pp")

    def tensor_groups(self) -> list[list[int]]:
        """Ranks of every TP group (contiguous blocks of ``tp`` ranks)."""
        return self._groups_along("tp")

    def check_sequence_length(self, num_tokens: int) -> None:
        """Raise :class:`TopologyError` if a sequence of ``num_tokens`` cannot give every SP rank at least one token."""
        if num_tokens < self.sp:
            raise TopologyError(
                f"a sequence of {num_tokens} tokens cannot be split over sequence_parallel_size={self.sp} ranks:"
                " every rank needs at least one token. Use a smaller sequence_parallel_size or longer sequences."
            )
