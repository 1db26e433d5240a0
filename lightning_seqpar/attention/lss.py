"""LSS segment attention (arXiv 2311.02382): each rank attends with its own queries to keys and values gathered from the
group.

Shape flow on rank r of a group of P ranks::

    k, v  [B, L_r, H, d]  --stack-->  [2, B, L_r, H, d]
          --one all-gather-->  [2, B, L, H, d]        every token's keys and values
    q     [B, L_r, H, d]  --local attention over all L keys-->  [B, L_r, H, d]

Backward: dq stays local; dk and dv, computed for all L tokens on every rank, are summed onto their
owners by one reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_seqpar.attention.local import AttentionBackend, causal_mask, check_same_dtype_device, local_attention
from lightning_seqpar.comm import SequenceLayout, all_gather_sequence, group_rank, group_size, resolve_layout


def _gather_keys_values(k: Tensor, v: Tensor, group: ProcessGroup, layout: SequenceLayout) -> tuple[Tensor, Tensor]:
    kv = torch.stack([k, v])  # [2, B, L_r, H, d]
    kv = all_gather_sequence(kv, group, dim=2, layout=layout)  # [2, B, L, H, d]
    return kv[0], kv[1]


def lss_attention(
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
    """Exact full attention of this rank's queries over the whole sequence's keys and values.

    Args:
        q: This rank's queries ``[B, L_r, H, d]``.
        k: This rank's keys ``[B, L_r, H, d]``.
        v: This rank's values ``[B, L_r, H, d]``.
        group: The sequence-parallel process group.
        dropout_p: Dropout on the attention probabilities.
        softmax_scale: Scale of ``q k^T``; default ``1 / sqrt(d)``.
        causal: Causal masking over the full sequence (token order = rank order). Uses an explicit
            mask, so it runs on SDPA or math, not flash-attn.
        backend: Local kernel, see :func:`~lightning_seqpar.attention.local_attention`.
        sequence_lengths: Tokens held by each rank (the strategy passes them); default: exchanged with one
            small all-gather.

    Returns:
        This rank's output tokens ``[B, L_r, H, d]``.

    Communication per rank: one all-gather receiving ``2 B (L - L_r) H d`` elements of keys and values;
    backward: one reduce-scatter of the same size. No head limit: any P up to L works.
    """
    check_same_dtype_device(q, k, v)
    if group_size(group) == 1:
        return local_attention(
            q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, backend=backend
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[1] != k.shape[1]:
        raise ValueError(
            f"lss_attention needs q, k, v of one shape [B, L_r, H, d], got {list(q.shape)}, {list(k.shape)},"
            f" {list(v.shape)}."
        )
    layout = resolve_layout(q.shape[1], group, sequence_lengths)
    k_all, v_all = _gather_keys_values(k, v, group, layout)  # [B, L, H, d] each
    rank = group_rank(group)
    mask = causal_mask(layout.offset(rank), layout.lengths[rank], layout.total, q.device) if causal else None
    return local_attention(
        q, k_all, v_all, dropout_p=dropout_p, softmax_scale=softmax_scale, attn_mask=mask, backend=backend
    )


class LSSAttention(nn.Module):
    """Wrap any local attention callable ``fn(q, k, v, **kw) -> out`` so that this rank's queries attend to the
    keys and values of the whole group (gathered in one fused all-gather).

    Args:
        group: The sequence-parallel process group.
        local_attention_fn: The single-device attention ``[B, L_q, H, d]`` x ``[B, L_k, H, d]`` -> ``[B, L_q, H, d]``;
            default :func:`local_attention`. It must accept ``L_q != L_k`` (non-causal).
    """

    def __init__(self, group: ProcessGroup, local_attention_fn: Callable[..., Tensor] = local_attention) -> None:
        super().__init__()
        self.group = group
        self.local_attention_fn = local_attention_fn

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        """``[B, L_r, H, d]`` each -> ``[B, L_r, H, d]``; ``kwargs`` go to the local attention."""
        if group_size(self.group) == 1:
            return self.local_attention_fn(q, k, v, **kwargs)
        if kwargs.get("causal") or kwargs.get("is_causal"):
            raise ValueError(
                "LSSAttention passes keys of the whole sequence to the local attention, whose causal mask would be"
                " aligned to the wrong tokens on every rank but the first; use lss_attention(..., causal=True),"
                " which builds the offset mask."
            )
        layout = resolve_layout(q.shape[1], self.group)
        k_all, v_all = _gather_keys_values(k, v, self.group, layout)
        return self.local_attention_fn(q, k_all, v_all, **kwargs)
