"""Autograd-aware collectives along the sequence: shard, gather, and the all-to-all between sequence and head sharding.

Every collective is a small ``torch.autograd.Function`` whose docstring says what forward and backward do;
the layout work around them (moving the head or token dimension first, splitting, concatenating) is plain
differentiable torch code, so autograd derives its backward. Every tensor is made contiguous before it
enters a collective, in forward and in backward: gloo has been seen to return wrong data for transposed
views (DESIGN.md, "Pitfalls").

Uneven splits are first-class: a length ``n`` over ``P`` ranks gives the first ``n % P`` ranks one extra
element (:func:`split_sizes`), and nothing is padded in a way that reaches the results.

Letters: B batch, L tokens, L_r tokens of this rank, H heads, H_r heads of this rank, d head dim, P ranks.

References: DeepSpeed-Ulysses (arXiv 2309.14509) for the all-to-all, LSS Transformer (arXiv 2311.02382)
for the gathered keys and values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``total``: the first ``total % parts`` get one more.

    >>> split_sizes(197, 4)
    [50, 49, 49, 49]
    """
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def group_size(group: ProcessGroup | None) -> int:
    """Number of ranks in ``group`` (``None``: the default group); 1 when ``torch.distributed`` is not initialised,
    so the collectives here run unchanged in one process; -1 (torch's convention) when this rank is not in ``group``."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank within ``group`` (``None``: the default group), in ``[0, group_size(group))``; 0 when
    ``torch.distributed`` is not initialised. ``-1`` (torch's convention) when this rank is not in ``group``."""
    return dist.get_rank(group) if dist.is_initialized() else 0


@dataclass(frozen=True)
class SequenceLayout:
    """How the tokens of one sequence are spread over the ranks of an SP group.

    Attributes:
        lengths: Tokens held by each rank, in group-rank order.
    """

    lengths: tuple[int, ...]

    @classmethod
    def even(cls, total: int, parts: int) -> SequenceLayout:
        return cls(tuple(split_sizes(total, parts)))

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def offset(self, rank: int) -> int:
        """Index of the first token of ``rank`` in the full sequence."""
        return sum(self.lengths[:rank])


def resolve_layout(local_length: int, group: ProcessGroup, lengths: Sequence[int] | None = None) -> SequenceLayout:
    """The sequence layout of ``group`` given this rank's ``local_length``.

    Taken from ``lengths`` if given (the strategy passes the layout it sharded the tokens with), else exchanged
    with one all-gather of ``P`` integers.
    """
    world, rank = group_size(group), group_rank(group)
    if lengths is not None:
        layout = SequenceLayout(tuple(int(n) for n in lengths))
        if len(layout.lengths) != world or layout.lengths[rank] != local_length:
            raise ValueError(
                f"sequence lengths {list(layout.lengths)} do not match this rank: group of {world} ranks,"
                f" rank {rank} holds {local_length} tokens."
            )
        return layout
    mine = torch.tensor([local_length], dtype=torch.int64, device=_comm_device(group))
    everyone = torch.empty(world, dtype=torch.int64, device=mine.device)
    dist.all_gather_into_tensor(everyone, mine, group=group)
    return SequenceLayout(tuple(everyone.tolist()))


def _comm_device(group: ProcessGroup) -> torch.device:
    """The device tensors of ``group``'s collectives must live on."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# Autograd Functions: the only places that talk to other ranks.
# ---------------------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """All-to-all of a flat buffer with per-rank split sizes (DeepSpeed ``_SeqAllToAll``, arXiv 2309.14509).

    forward: rank r sends ``x[input_splits[:s].sum() : ...]`` to rank s and receives ``output_splits[s]``
    elements from each rank s, concatenated in rank order.
    backward: the same exchange with the split sizes swapped (the all-to-all is its own transpose).
    """

    @staticmethod
    def forward(ctx, flat: Tensor, input_splits: list[int], output_splits: list[int], group: ProcessGroup) -> Tensor:
        ctx.splits, ctx.group = (input_splits, output_splits), group
        out = flat.new_empty(sum(output_splits))
        dist.all_to_all_single(out, flat.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        input_splits, output_splits = ctx.splits
        out = grad.new_empty(sum(input_splits))
        dist.all_to_all_single(out, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return out, None, None, None


class _AllGatherStacked(torch.autograd.Function):
    """All-gather of equally shaped tensors into a new leading rank dimension.

    forward: ``[*S] -> [P, *S]`` (every rank's tensor, in rank order), one ``all_gather_into_tensor``.
    backward: ``[P, *S] -> [*S]``, one ``reduce_scatter_tensor`` (sum): rank r receives the sum over all
    ranks of the gradient slot r, which is the exact transpose of the gather.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        world = group_size(group)
        # Flat buffers: gloo wants the output as [P * n] for an input of n elements.
        out = x.new_empty(world * x.numel())
        dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.new_empty(grad[0].numel())
        dist.reduce_scatter_tensor(out, grad.contiguous().view(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        return out.view(grad.shape[1:]), None


class _ShardSequence(torch.autograd.Function):
    """Keep this rank's slice of a tensor that every rank of the group holds in full.

    forward: ``[..., L, ...] -> [..., L_r, ...]`` along ``dim``; no communication.
    backward: the gradient of the slice, zero elsewhere. Every rank computed the full input redundantly, so
    each rank's parameters before the shard receive the part of the gradient that flowed through its own
    tokens; the gradient average over the group (times P, see :func:`gather_sequence`) adds them up.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, start: int, length: int) -> Tensor:
        ctx.shape, ctx.dim, ctx.start, ctx.length = x.shape, dim, start, length
        return x.narrow(dim, start, length).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        full = grad.new_zeros(ctx.shape)
        full.narrow(ctx.dim, ctx.start, ctx.length).copy_(grad)
        return full, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public helpers built from the Functions above.
# ---------------------------------------------------------------------------------------------------------


def shard_sequence(x: Tensor, group: ProcessGroup, dim: int = 1, layout: SequenceLayout | None = None) -> Tensor:
    """Keep this rank's tokens of ``x`` (``[..., L, ...] -> [..., L_r, ...]`` along ``dim``).

    Args:
        x: A tensor every rank of ``group`` holds in full.
        group: The sequence-parallel group.
        dim: The token dimension.
        layout: How the tokens are split (default: :func:`split_sizes` of ``x.shape[dim]``).
    """
    dim = dim % x.dim()
    world, rank = group_size(group), group_rank(group)
    layout = layout or SequenceLayout.even(x.shape[dim], world)
    if layout.total != x.shape[dim] or len(layout.lengths) != world:
        raise ValueError(f"layout {layout.lengths} does not split {x.shape[dim]} tokens over {world} ranks")
    if world == 1:
        return x
    return _ShardSequence.apply(x, dim, layout.offset(rank), layout.lengths[rank])


def all_gather_sequence(x: Tensor, group: ProcessGroup, dim: int = 1, layout: SequenceLayout | None = None) -> Tensor:
    """All-gather the tokens of every rank (``[..., L_r, ...] -> [..., L, ...]`` along ``dim``).

    forward: one ``all_gather_into_tensor`` (uneven lengths are padded to the longest for transport and the
    padding is dropped before anything reads it). backward: one ``reduce_scatter_tensor``, so each rank gets
    the sum over the group of the gradients of its own tokens.
    """
    dim = dim % x.dim()
    world = group_size(group)
    if world == 1:
        return x
    layout = layout or resolve_layout(x.shape[dim], group)
    longest = max(layout.lengths)
    pad = longest - x.shape[dim]
    if pad:
        # [..., L_r, ...] -> [..., max L_r, ...]: transport only, sliced off below.
        x = torch.cat([x, x.new_zeros((*x.shape[:dim], pad, *x.shape[dim + 1 :]))], dim=dim)
    stacked = _AllGatherStacked.apply(x, group)  # [P, ..., max L_r, ...]
    pieces = [stacked[r].narrow(dim, 0, n) for r, n in enumerate(layout.lengths)]
    return torch.cat(pieces, dim=dim)


def gather_sequence(x: Tensor, group: ProcessGroup, dim: int = 1, layout: SequenceLayout | None = None) -> Tensor:
    """Gather the tokens at the end of the sequence-parallel region (``[..., L_r, ...] -> [..., L, ...]``).

    The same collective as :func:`all_gather_sequence`. Its backward (reduce-scatter, sum) makes the
    gradient of every token the sum over the group's copies of the replicated computation after the
    gather; with gradients averaged over the sequence-data group this gives exactly the single-device
    gradient (see docs/concepts.md, "Gradients").
    """
    return all_gather_sequence(x, group, dim=dim, layout=layout)


def sequence_to_head_shards(x: Tensor, group: ProcessGroup, layout: SequenceLayout) -> Tensor:
    """Ulysses' first all-to-all: ``[*A, L_r, H, d] -> [*A, L, H_r, d]`` (any leading dims ``A``).

    Heads are split with :func:`split_sizes` (they need not divide P); one all-to-all moves the tensor.
    """
    world, rank = group_size(group), group_rank(group)
    *lead, local_len, heads, head_dim = x.shape
    head_split = split_sizes(heads, world)
    inner = math.prod(lead) * head_dim
    # [*A, L_r, H, d] -> [H, *A, L_r, d]: each destination's heads are one contiguous block.
    send = x.movedim(-2, 0).contiguous().reshape(-1)
    received = _AllToAll.apply(
        send,
        [h * inner * local_len for h in head_split],
        [head_split[rank] * inner * n for n in layout.lengths],
        group,
    )
    # From rank s: [H_r, *A, L_s, d]; concatenated along tokens: [H_r, *A, L, d].
    chunks = received.split([head_split[rank] * inner * n for n in layout.lengths])
    chunks = [c.view(head_split[rank], *lead, n, head_dim) for c, n in zip(chunks, layout.lengths)]
    return torch.cat(chunks, dim=-2).movedim(0, -2)  # [*A, L, H_r, d]


def head_to_sequence_shards(x: Tensor, group: ProcessGroup, layout: SequenceLayout, num_heads: int) -> Tensor:
    """Ulysses' second all-to-all, the inverse of :func:`sequence_to_head_shards`:
    ``[*A, L, H_r, d] -> [*A, L_r, H, d]``."""
    world, rank = group_size(group), group_rank(group)
    *lead, total_len, local_heads, head_dim = x.shape
    head_split = split_sizes(num_heads, world)
    if local_heads != head_split[rank] or total_len != layout.total:
        raise ValueError(f"expected [*, {layout.total}, {head_split[rank]}, d] on rank {rank}, got {list(x.shape)}")
    inner = math.prod(lead) * head_dim
    # [*A, L, H_r, d] -> [H_r, *A, L, d], then one contiguous block of tokens per destination.
    heads_first = x.movedim(-2, 0)
    send = torch.cat([c.reshape(-1) for c in heads_first.split(list(layout.lengths), dim=-2)])
    local_len = layout.lengths[rank]
    received = _AllToAll.apply(
        send,
        [local_heads * inner * n for n in layout.lengths],
        [h * inner * local_len for h in head_split],
        group,
    )
    # From rank s: [H_s, *A, L_r, d]; stacked in rank order they are already [H, *A, L_r, d].
    return received.view(num_heads, *lead, local_len, head_dim).movedim(0, -2)  # [*A, L_r, H, d]
