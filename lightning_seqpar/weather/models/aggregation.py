"""Hierarchical and channel-parallel variable aggregation for ClimaX (D-CHAG, arXiv 2506.21411).

Letters in shape comments: B batch, V variables present, g channels per group, G = ceil(V / g) channel groups,
G_r groups of this rank, L tokens (L_r under sequence parallelism), p patch size, D width, P ranks of the channel
group.

Flat aggregation (`VariableAggregation`) tokenises every variable, [B, V, L, D], and attends over all V at once;
for 48 variables the per-variable tokens and their gradients dominate ClimaX's memory. The hierarchical form
splits the V channels into G contiguous groups of `group_size`, tokenises and partially aggregates one group at a
time (a small cross-attention or a linear map per group, recomputed in backward), so the per-variable tokens exist
for g channels of one token slice at a time; a final cross-attention merges the G partial aggregates
[B, G, L, D] into one token per patch. The channel-parallel form gives each rank of a process group a contiguous
share of the groups (uneven shares allowed), so each rank tokenises only its channels; one all-gather of the
partial aggregates ([B, G_r, L, D] -> [B, G, L, D]) precedes the final cross-attention, which every rank runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from lightning_seqpar.comm import SequenceLayout, all_gather_sequence, group_rank, group_size, split_sizes
from lightning_seqpar.weather.models.layers import trunc_normal_init

__all__ = [
    "HierarchicalAggregation",
    "LinearPartialAggregation",
    "VariableAggregation",
    "channel_group_sizes",
    "local_channel_groups",
]

PartialKind = Literal["cross_attention", "linear"]
Tokenize = Callable[[Tensor, Tensor], Tensor]
"""``tokenize(patches [B, V, L, p*p], var_ids [V]) -> tokens [B, V, L, D]`` (ClimaX's per-variable embedding)."""


def channel_group_sizes(num_channels: int, group_size: int) -> list[int]:
    """Sizes of the contiguous channel groups: ``group_size`` each, the last one holds the remainder.

    >>> channel_group_sizes(7, 3)
    [3, 3, 1]
    """
    if group_size < 1:
        raise ValueError(f"aggregation group_size must be >= 1, got {group_size}")
    if num_channels < 1:
        raise ValueError(f"hierarchical aggregation needs at least one channel, got {num_channels}")
    full, rest = divmod(num_channels, group_size)
    return [group_size] * full + ([rest] if rest else [])


def local_channel_groups(num_groups: int, ranks: int, rank: int, num_channels: int | None = None) -> tuple[int, int]:
    """``(first, count)``: the channel groups rank ``rank`` of ``ranks`` aggregates (contiguous, first ranks get one
    more).

    Raises:
        ValueError: fewer groups than ranks (a rank would have no channel); the message names the largest
            ``aggregation_group_size`` that gives every rank a group (from ``num_channels``), or, with fewer
            channels than ranks, the most ranks the channels can fill.
    """
    if num_groups < ranks:
        advice = "lower aggregation_group_size"
        if num_channels is not None and num_channels < ranks:
            advice = (f"{num_channels} channel(s) cannot fill {ranks} ranks: split them over at most"
                      f" {num_channels} rank(s) (a smaller channel-parallel group)")
        elif num_channels is not None:
            largest = max(g for g in range(1, num_channels + 1) if -(-num_channels // g) >= ranks)
            advice = f"set aggregation_group_size to at most {largest} for {num_channels} channels"
        raise ValueError(
            f"channel-parallel aggregation over {ranks} ranks needs at least {ranks} channel groups but there are"
            f" {num_groups}: {advice}."
        )
    shares = split_sizes(num_groups, ranks)
    return sum(shares[:rank]), shares[rank]


class VariableAggregation(nn.Module):
    """Cross-attention of one learnable query over the V variable tokens of each patch: [B, V, L, D] -> [B, L, D].

    It attends over variables, never over tokens, so it is token-local and must not be swapped for a
    sequence-parallel attention. The query is shared by all patches and starts at zero (uniform weights over
    the variables at initialisation, as in ClimaX).
    """

    MAX_ATTENTION_ROWS = 32768
    """Rows (patches x batch) per fused attention call: cuDNN and flash kernels failed at 65,536 rows on the H100
    (benchmarks/NOTES.md), so longer inputs are attended in slices (exactly the same result)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        chunk_tokens: int | None = 16384,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"VariableAggregation width {dim} is not divisible by num_heads={num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.chunk_tokens = chunk_tokens
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Parameter(torch.empty(1, dim, **factory))
        self.q = nn.Linear(dim, dim, **factory)
        self.kv = nn.Linear(dim, 2 * dim, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.query)
        for linear in (self.q, self.kv, self.proj):
            trunc_normal_init(linear)

    def forward(self, x: Tensor) -> Tensor:
        """[B, V, L, D] -> [B, L, D]; more than `chunk_tokens` tokens are aggregated in slices, each recomputed in
        backward, so the [B, V, L, D] key/value projection exists for one slice at a time (ClimaX's memory hog)."""
        L = x.shape[2]
        if self.chunk_tokens is None or L <= self.chunk_tokens:
            return self._aggregate(x)
        pieces = x.chunk(math.ceil(L / self.chunk_tokens), dim=2)  # [B, V, L/chunks, D] views
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(self._aggregate, piece, use_reentrant=False) for piece in pieces], dim=1)
        return torch.cat([self._aggregate(piece) for piece in pieces], dim=1)

    def _aggregate(self, x: Tensor) -> Tensor:
        B, V, L, D = x.shape
        H, d = self.num_heads, self.head_dim
        x = x.transpose(1, 2).reshape(B * L, V, D)  # [B, V, L, D] -> [B*L, V, D]
        kv = self.kv(x).reshape(B * L, V, 2, H, d).permute(2, 0, 3, 1, 4)  # [2, B*L, H, V, d]
        q = self.q(self.query).reshape(1, H, 1, d).expand(B * L, H, 1, d)  # same query for every patch
        rows = self.MAX_ATTENTION_ROWS
        out = torch.cat(
            [
                F.scaled_dot_product_attention(q[i : i + rows], kv[0, i : i + rows], kv[1, i : i + rows])
                for i in range(0, B * L, rows)
            ]
        )  # [B*L, H, 1, d]
        return self.proj(out.reshape(B, L, D))  # [B*L, H, 1, d] -> [B, L, D]


class LinearPartialAggregation(nn.Module):
    """Linear partial aggregation of one channel group: the mean of its g tokens, then ``Linear(D, D)``.

    [B, g, L, D] -> [B, L, D]. Since each variable's token is itself a linear embedding of its patch, this is one
    linear map of the group's stacked patches (D-CHAG's linear partial aggregation), shared by all groups.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_init(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.mean(dim=1))  # [B, g, L, D] -> [B, L, D]


class HierarchicalAggregation(nn.Module):
    """Partial aggregation per channel group, then a final cross-attention over the groups: [B, V, L, p*p] -> [B, L, D].

    Args:
        dim: token width D.
        num_heads: heads of the cross-attentions (partial and final).
        group_size: channels g per group; the V channels present are cut into ``ceil(V / g)`` contiguous groups
            in the order the caller lists them (the last group may be smaller).
        partial: ``"cross_attention"`` (one learnable query over the g tokens, as the flat aggregation does over
            all V) or ``"linear"`` (:class:`LinearPartialAggregation`). Both share their weights over the groups,
            so any subset of the model's variables can be aggregated.
        chunk_tokens: tokenise and partially aggregate at most this many tokens at a time; None means all.
        recompute: recompute each group's tokens and partial aggregation in backward (``torch.utils.checkpoint``)
            instead of keeping them; this is what bounds the per-variable token memory by the group size.
        device: where the parameters are created.
        dtype: parameter dtype.

    Attributes:
        channel_group: the process group the channel groups are split across (see :meth:`set_channel_group`),
            or None on one device.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: int,
        partial: PartialKind = "cross_attention",
        chunk_tokens: int | None = 16384,
        recompute: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channel_group_sizes(1, group_size)  # validates group_size
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1 or None, got {chunk_tokens}")
        factory = {"device": device, "dtype": dtype}
        self.group_size, self.chunk_tokens, self.recompute = group_size, chunk_tokens, recompute
        if partial == "cross_attention":
            self.partial: nn.Module = VariableAggregation(dim, num_heads, chunk_tokens=None, **factory)
        elif partial == "linear":
            self.partial = LinearPartialAggregation(dim, **factory)
        else:
            raise ValueError(f"partial aggregation must be 'cross_attention' or 'linear', got {partial!r}")
        self.final = VariableAggregation(dim, num_heads, chunk_tokens=chunk_tokens, **factory)
        self.channel_group: ProcessGroup | None = None

    def reset_parameters(self) -> None:
        self.partial.reset_parameters()
        self.final.reset_parameters()

    def set_channel_group(self, group: ProcessGroup | None) -> None:
        """Split the channel groups across the ranks of ``group`` (None: every channel on this rank).

        Every rank of ``group`` must hold the same tokens of the same samples (a tensor-parallel group, or the
        sequence-parallel group with the token shard placed after the aggregation, as
        ``ClimaX.sequence_parallel_plan`` does when channel parallelism is on). The parameters stay replicated;
        gradients follow the convention of :func:`lightning_seqpar.comm.gather_sequence` (averaged over the group
        they equal the single-device ones).
        """
        self.channel_group = group

    def forward(self, patches: Tensor, var_ids: Tensor, tokenize: Tokenize) -> Tensor:
        """Aggregate the channels of ``patches`` [B, V, L, p*p] (variables ``var_ids`` [V]) into [B, L, D].

        Under channel parallelism each rank tokenises only its channel groups and the partial aggregates are
        all-gathered (one ``all_gather_into_tensor`` forward, one ``reduce_scatter_tensor`` backward, moving
        B * G * L * D elements; uneven group shares are padded for transport only).
        """
        sizes = channel_group_sizes(patches.shape[1], self.group_size)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        first, count = 0, len(sizes)
        group = self.channel_group
        ranks = group_size(group) if group is not None else 1
        if ranks > 1:
            first, count = local_channel_groups(len(sizes), ranks, group_rank(group), patches.shape[1])
        partials = [
            self._partial_group(
                patches[:, starts[i] : starts[i] + sizes[i]], var_ids[starts[i] : starts[i] + sizes[i]], tokenize
            )
            for i in range(first, first + count)
        ]  # G_r x [B, L, D]
        local = torch.stack(partials, dim=1)  # [B, G_r, L, D]
        if ranks > 1:
            layout = SequenceLayout(tuple(split_sizes(len(sizes), ranks)))
            local = all_gather_sequence(
                local.contiguous(), group, dim=1, layout=layout
            )  # [B, G_r, L, D] -> [B, G, L, D]
        return self.final(local)  # [B, G, L, D] -> [B, L, D]

    def _partial_group(self, patches: Tensor, var_ids: Tensor, tokenize: Tokenize) -> Tensor:
        """Tokenise one channel group and aggregate it: [B, g, L, p*p] -> [B, L, D], in token slices."""

        def run(piece: Tensor) -> Tensor:
            return self.partial(tokenize(piece, var_ids))  # [B, g, L_c, D] -> [B, L_c, D]

        L = patches.shape[2]
        chunks = 1 if self.chunk_tokens is None else max(1, math.ceil(L / self.chunk_tokens))
        pieces = patches.chunk(chunks, dim=2) if chunks > 1 else (patches,)
        if self.recompute and torch.is_grad_enabled():
            outs = [checkpoint(run, piece, use_reentrant=False) for piece in pieces]
        else:
            outs = [run(piece) for piece in pieces]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, chunk_tokens={self.chunk_tokens}, recompute={self.recompute}"
