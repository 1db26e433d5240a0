"""DeepSpeed-Ulysses attention (arXiv 2309.14509): trade token shards for head shards with one all-to-all each way.

Shape flow on rank r of a group of P ranks (H_r = heads of rank r, uneven when P does not divide H)::

    q, k, v  [B, L_r, H, d]  --stack-->  [3, B, L_r, H, d]
             --all-to-all-->  [3, B, L, H_r, d]      every token, a subset of heads
             --local attention-->  [B, L, H_r, d]
             --all-to-all-->  [B, L_r, H, d]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_seqpar.attention.local import AttentionBackend, check_same_dtype_device, local_attention
from lightning_seqpar.comm import (
    group_size,
    head_to_sequence_shards,
    resolve_layout,
    sequence_to_head_shards,
)


def check_ulysses_heads(num_heads: int, world: int) -> None:
    """Ulysses gives every rank whole heads, so it needs at least as many heads as ranks (``ValueError`` if not)."""
    if num_heads < world:
        raise ValueError(
            f"Ulysses attention splits heads across the sequence-parallel group, but {num_heads} heads cannot"
            f" give each of {world} ranks at least one. Use attention='lss' (no limit on ranks) or a"
            " sequence_parallel_size <= the number of heads."
        )


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: ProcessGroup,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    backend: AttentionBackend = "auto",
    sequence_lengths: Sequence[int] | None = None,
) -> Tensor:
    """Exact full attention over a sequence whose tokens are split across ``group``.

    Args:
        q: This rank's queries ``[B, L_r, H, d]``.
        k: This rank's keys ``[B, L_r, H, d]``.
        v: This rank's values ``[B, L_r, H, d]``.
        group: The sequence-parallel process group.
        dropout_p: Dropout on the attention probabilities.
        softmax_scale: Scale of ``q k^T``; default ``1 / sqrt(d)``.
        causal: Causal masking over the full sequence (token order = rank order).
        backend: Local kernel, see :func:`~lightning_seqpar.attention.local_attention`.
        sequence_lengths: Tokens held by each rank (the strategy passes them); default: exchanged with one
            small all-gather.

    Returns:
        This rank's output tokens ``[B, L_r, H, d]``.

    Communication per rank and direction: one all-to-all of ``3 B L_r H d (P-1)/P`` elements for q, k, v
    and one of ``B L_r H d (P-1)/P`` for the output; backward mirrors both.
    """
    check_same_dtype_device(q, k, v)
    if group_size(group) == 1:
        return local_attention(
            q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, backend=backend
        )
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"ulysses_attention needs q, k, v of one shape [B, L_r, H, d], got {list(q.shape)}, {list(k.shape)},"
            f" {list(v.shape)} (grouped-query attention is not supported: repeat the key/value heads first)."
        )
    num_heads = q.shape[2]
    check_ulysses_heads(num_heads, group_size(group))
    layout = resolve_layout(q.shape[1], group, sequence_lengths)
    qkv = torch.stack([q, k, v])  # [3, B, L_r, H, d]
    qkv = sequence_to_head_shards(qkv, group, layout)  # [3, B, L, H_r, d]
    out = local_attention(
        qkv[0], qkv[1], qkv[2], dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, backend=backend
    )  # [B, L, H_r, d]
    return head_to_sequence_shards(out, group, layout, num_heads)  # [B, L_r, H, d]


class UlyssesAttention(nn.Module):
    """Wrap any local attention callable ``fn(q, k, v, **kw) -> out`` (all ``[B, L, H, d]``) so that it runs
    on token-sharded inputs; the DeepSpeed ``DistributedAttention`` idea.

    Args:
        group: The sequence-parallel process group.
        local_attention_fn: The single-device attention; default :func:`local_attention`.
    """

    def __init__(self, group: ProcessGroup, local_attention_fn: Callable[..., Tensor] = local_attention) -> None:
        super().__init__()
        self.group = group
        self.local_attention_fn = local_attention_fn

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        """``[B, L_r, H, d]`` each -> ``[B, L_r, H, d]``; ``kwargs`` go to the local attention."""
        if group_size(self.group) == 1:
            return self.local_attention_fn(q, k, v, **kwargs)
        num_heads = q.shape[2]
        check_ulysses_heads(num_heads, group_size(self.group))
        layout = resolve_layout(q.shape[1], self.group)
        if q.shape == k.shape == v.shape:
            q, k, v = sequence_to_head_shards(torch.stack([q, k, v]), self.group, layout)  # [B, L, H_r, d] each
        else:
            q, k, v = (sequence_to_head_shards(t, self.group, layout) for t in (q, k, v))
        out = self.local_attention_fn(q, k, v, **kwargs)  # [B, L, H_r, d]
        return head_to_sequence_shards(out, self.group, layout, num_heads)  # [B, L_r, H, d]
