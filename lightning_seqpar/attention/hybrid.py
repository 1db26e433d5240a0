"""Hybrid Ulysses x Ring attention (USP, arXiv 2405.07719): an all-to-all over heads inside small groups, ring attention
across them.

The sequence-parallel group of P = u x r ranks is laid out with Ulysses innermost: SP rank
``p = i_ring * u + i_ulysses``, so each Ulysses group holds u consecutive ranks (inside one node) and each
ring group takes one rank from every Ulysses group. Tokens are split over the SP ranks in rank order, so
after the all-to-all the Ulysses group ``i_ring`` holds the contiguous chunk of tokens of SP ranks
``i_ring * u .. i_ring * u + u - 1``: ring order is token order, which causal masking relies on.

Shape flow on one rank (H_u = heads of this rank's Ulysses shard, L_u = tokens of its Ulysses group)::

    q, k, v  [B, L_r, H, d]  --stack-->  [3, B, L_r, H, d]
             --all-to-all in ulysses_group-->  [3, B, L_u, H_u, d]
             --ring attention in ring_group-->  [B, L_u, H_u, d]
             --all-to-all in ulysses_group-->  [B, L_r, H, d]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_seqpar.attention.local import AttentionBackend
from lightning_seqpar.attention.ring import check_ring_arguments, ring_attention
from lightning_seqpar.comm import (
    SequenceLayout,
    group_rank,
    group_size,
    head_to_sequence_shards,
    resolve_layout,
    sequence_to_head_shards,
)
from lightning_seqpar.topology import build_hybrid_groups, hybrid_rank_grid  # noqa: F401 (moved to topology)


def check_hybrid_heads(num_heads: int, ulysses_degree: int) -> None:
    """The Ulysses part gives each of its u ranks whole heads, so it needs ``H >= u`` (``ValueError`` if not)."""
    if num_heads < ulysses_degree:
        raise ValueError(
            f"hybrid attention splits the {num_heads} heads over a Ulysses group of {ulysses_degree}"
            " ranks, which needs at least one head per rank; build the groups with ulysses_degree <="
            f" {num_heads} (the ring part has no head limit)."
        )


def hybrid_layouts(
    local_length: int,
    ulysses_group: ProcessGroup,
    ring_group: ProcessGroup,
    sequence_lengths: Sequence[int] | None = None,
) -> tuple[SequenceLayout, SequenceLayout]:
    """The token layout inside this rank's Ulysses group and the layout of the ring's blocks.

    ``sequence_lengths`` (the strategy passes them) lists the tokens of all P = u x r SP ranks in
    SP rank order; without them, two small all-gathers (Ulysses group, then ring group) find the lengths.
    """
    u, r = group_size(ulysses_group), group_size(ring_group)
    i_u, i_r = group_rank(ulysses_group), group_rank(ring_group)
    if sequence_lengths is not None:
        lengths = [int(n) for n in sequence_lengths]
        if len(lengths) != u * r or lengths[i_r * u + i_u] != local_length:
            raise ValueError(
                f"sequence lengths {lengths} do not match this rank: {u} x {r} = {u * r} sequence-parallel ranks"
                f" (Ulysses x ring), SP rank {i_r * u + i_u} holds {local_length} tokens."
            )
        ulysses_layout = SequenceLayout(tuple(lengths[i_r * u : (i_r + 1) * u]))
        ring_layout = SequenceLayout(tuple(sum(lengths[j * u : (j + 1) * u]) for j in range(r)))
        return ulysses_layout, ring_layout
    ulysses_layout = resolve_layout(local_length, ulysses_group)
    ring_layout = resolve_layout(ulysses_layout.total, ring_group)
    return ulysses_layout, ring_layout


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ulysses_group: ProcessGroup,
    ring_group: ProcessGroup,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    backend: AttentionBackend = "auto",
    sequence_lengths: Sequence[int] | None = None,
    load_balance: bool = True,
) -> Tensor:
    """Exact full attention over a sequence split across u x r ranks: Ulysses within ``ulysses_group``, ring across
    ``ring_group``.

    Args:
        q: This rank's queries ``[B, L_r, H, d]``.
        k: This rank's keys ``[B, L_r, H, d]``.
        v: This rank's values ``[B, L_r, H, d]``.
        ulysses_group: The u consecutive SP ranks of this rank (see :func:`build_hybrid_groups`); needs
            ``H >= u``.
        ring_group: The r SP ranks with this rank's position inside their Ulysses groups.
        dropout_p: Must be 0.0 (ring attention has no dropout).
        softmax_scale: Scale of ``q k^T``; default ``1 / sqrt(d)``.
        causal: Causal masking over the full sequence (token order = SP rank order).
        backend: The ring's block kernel, see :func:`~lightning_seqpar.attention.ring.ring_attention`.
        sequence_lengths: Tokens held by each of the u x r SP ranks, in SP rank order (the strategy
            passes them); default: exchanged with two small all-gathers.
        load_balance: With ``causal`` and r > 1, the ring runs in zigzag order so that every ring rank does the
            same work (see :func:`~lightning_seqpar.attention.ring.ring_attention`).

    Returns:
        This rank's output tokens ``[B, L_r, H, d]``.

    Communication per rank: the two Ulysses all-to-alls within u ranks (of ``3 B L_r H d (u-1)/u`` and
    ``B L_r H d (u-1)/u`` elements) and r-1 ring exchanges of ``2 B L_u H_u d`` elements, L_u ~ L / r and
    H_u ~ H / u; backward mirrors them (plus r-1 dK/dV exchanges).
    """
    check_ring_arguments(q, k, v, dropout_p, backend, name="hybrid_attention")
    num_heads = q.shape[2]
    check_hybrid_heads(num_heads, group_size(ulysses_group))
    ulysses_layout, ring_layout = hybrid_layouts(q.shape[1], ulysses_group, ring_group, sequence_lengths)
    ring_kwargs = dict(
        softmax_scale=softmax_scale, causal=causal, backend=backend, sequence_lengths=ring_layout.lengths,
        load_balance=load_balance,
    )
    if group_size(ulysses_group) == 1:
        return ring_attention(q, k, v, ring_group, **ring_kwargs)
    qkv = torch.stack([q, k, v])  # [3, B, L_r, H, d]
    qkv = sequence_to_head_shards(qkv, ulysses_group, ulysses_layout)  # [3, B, L_u, H_u, d]
    out = ring_attention(qkv[0], qkv[1], qkv[2], ring_group, **ring_kwargs)  # [B, L_u, H_u, d]
    return head_to_sequence_shards(out, ulysses_group, ulysses_layout, num_heads)  # [B, L_r, H, d]


class HybridAttention(nn.Module):
    """Hybrid Ulysses x Ring attention as a module: ``[B, L_r, H, d]`` q, k, v -> ``[B, L_r, H, d]``.

    Args:
        ulysses_group: This rank's Ulysses group (consecutive SP ranks), from :func:`build_hybrid_groups`.
        ring_group: This rank's ring group.
        backend: The ring's block kernel, see :func:`~lightning_seqpar.attention.ring.ring_attention`.
    """

    def __init__(
        self, ulysses_group: ProcessGroup, ring_group: ProcessGroup, backend: AttentionBackend = "auto"
    ) -> None:
        super().__init__()
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        """``kwargs`` (``dropout_p``, ``softmax_scale``, ``causal``, ``sequence_lengths``, ``load_balance``) go to
        :func:`hybrid_attention`."""
        kwargs.setdefault("backend", self.backend)
        return hybrid_attention(q, k, v, self.ulysses_group, self.ring_group, **kwargs)
