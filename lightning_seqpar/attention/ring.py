"""Ring attention (arXiv 2310.01889): keys and values travel around the sequence-parallel group while each rank keeps its queries.

Shape flow on rank r of a group of P ranks (rank order = token order)::

    k, v  [B, L_r, H, d]  --pack, pad to max L_r-->  [2, B, L_max, H, d]
    for step s = 0 .. P-1 (this rank holds the block of owner o = (r - s) mod P):
        post send of the block to rank r+1 and receive of the next one from rank r-1   (s < P-1)
        q [B, L_r, H, d] x block [B, L_o, H, d]  ->  partial out [B, L_r, H, d], LSE [B, H, L_r]
        merge into the running output with the log-sum-exp (online softmax); wait for the exchange

Backward recomputes every block's probabilities from the saved final LSE (the FlashAttention-2 backward,
arXiv 2307.08691) while the same blocks travel around the ring a second time, followed one step behind by
their dK/dV accumulators, so that each accumulator ends at its owner after P-1 hops.

Letters: B batch, L tokens, L_r tokens of this rank, L_max the longest L_r, H heads, d head dim, P ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_seqpar.attention.local import (
    BACKENDS,
    AttentionBackend,
    BackendUnavailableError,
    check_same_dtype_device,
    local_attention,
)
from lightning_seqpar.comm import SequenceLayout, group_rank, group_size, resolve_layout

# The originals, not ``dist.isend``: P2POp and batch_isend_irecv compare the op by identity, and a
# monkeypatched ``dist.isend`` (as the tests' collective counter installs) would not match.
_ISEND = dist.distributed_c10d.isend
_IRECV = dist.distributed_c10d.irecv
_TAG_KV, _TAG_GRAD = 0, 1

RING_BACKENDS = ("auto", "math", "sdpa_flash")
"""Block kernels ring attention can run: ``math`` is the plain-torch kernel below (float32 softmax, any device);
``sdpa_flash`` is PyTorch's FlashAttention-2 op (CUDA, fp16/bf16, d a multiple of 8 up to 256), which returns the
block's log-sum-exp and takes the final one in backward; ``auto`` picks flash where it runs, else math."""


# ---------------------------------------------------------------------------------------------------------
# Point-to-point exchange with the ring neighbours.
# ---------------------------------------------------------------------------------------------------------


class _RingExchange:
    """One posted exchange: ``buffer`` goes to the next rank while a block of the same shape comes from the previous one."""

    def __init__(self, buffer: Tensor, group: ProcessGroup, tag: int) -> None:
        world, rank = group_size(group), group_rank(group)
        send_to = dist.get_global_rank(group, (rank + 1) % world)
        recv_from = dist.get_global_rank(group, (rank - 1) % world)
        self.received = torch.empty_like(buffer, memory_format=torch.contiguous_format)
        ops = [
            dist.P2POp(_ISEND, buffer.contiguous(), send_to, group, tag),
            dist.P2POp(_IRECV, self.received, recv_from, group, tag),
        ]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> Tensor:
        for work in self.works:
            work.wait()
        return self.received


def _pack_blocks(k: Tensor, v: Tensor, longest: int) -> Tensor:
    """``[B, L_r, H, d]`` twice -> ``[2, B, L_max, H, d]``, zero rows after L_r (transport only, never read)."""
    kv = k.new_zeros((2, k.shape[0], longest, *k.shape[2:]))
    kv[0, :, : k.shape[1]] = k
    kv[1, :, : v.shape[1]] = v
    return kv


# ---------------------------------------------------------------------------------------------------------
# The block kernel: plain torch, softmax in float32 (float64 for float64 inputs), returns the LSE.
# ---------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _block_scores(q: Tensor, k: Tensor, scale: float, diagonal: bool) -> Tensor:
    """``[B, L_q, H, d] x [B, L_k, H, d] -> [B, H, L_q, L_k]``, causal within the block when ``diagonal``."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if diagonal:
        keep = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def _block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, diagonal: bool) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` over one key/value block: output ``[B, L_q, H, d]`` and LSE ``[B, H, L_q]`` (compute dtype)."""
    scores = _block_scores(q, k, scale, diagonal)  # [B, H, L_q, L_k]
    lse = scores.logsumexp(dim=-1)  # [B, H, L_q]
    probs = (scores - lse.unsqueeze(-1)).exp()
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


def _block_backward(
    q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, lse: Tensor, delta: Tensor, scale: float, diagonal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of one block from the final LSE ``[B, H, L_q]`` and ``delta = rowsum(dO * O)`` ``[B, H, L_q]``."""
    probs = (_block_scores(q, k, scale, diagonal) - lse.unsqueeze(-1)).exp()  # [B, H, L_q, L_k]
    grad_v = torch.einsum("bhqk,bqhd->bkhd", probs, grad_out)  # [B, L_k, H, d]
    grad_probs = torch.einsum("bqhd,bkhd->bhqk", grad_out, v)  # [B, H, L_q, L_k]
    grad_scores = probs * (grad_probs - delta.unsqueeze(-1)) * scale
    grad_q = torch.einsum("bhqk,bkhd->bqhd", grad_scores, k)  # [B, L_q, H, d]
    grad_k = torch.einsum("bhqk,bqhd->bkhd", grad_scores, q)  # [B, L_k, H, d]
    return grad_q, grad_k, grad_v


def _merge_block(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Online softmax: merge a block's output ``[B, L_q, H, d]`` and LSE ``[B, H, L_q]`` into the running ones."""
    merged = torch.logaddexp(lse, block_lse)  # [B, H, L_q]
    old_weight = (lse - merged).exp().transpose(1, 2).unsqueeze(-1)  # [B, L_q, H, 1]
    block_weight = (block_lse - merged).exp().transpose(1, 2).unsqueeze(-1)
    return out * old_weight + block_out * block_weight, merged


def _flash_block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, diagonal: bool) -> tuple[Tensor, Tensor]:
    """:func:`_block_forward` with PyTorch's flash kernel: output ``[B, L_q, H, d]`` (float32) and LSE ``[B, H, L_q]``."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, diagonal, False, scale=scale
    )  # [B, H, L_q, d], [B, H, L_q]
    return out.transpose(1, 2).float(), lse[..., : q.shape[1]].float()


def _flash_block_backward(
    q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, out: Tensor, lse: Tensor, scale: float, diagonal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_block_backward` with PyTorch's flash kernel, from the final output and LSE (it forms delta itself)."""
    # Dense (not varlen) call: no cumulative sequence lengths; with no dropout the RNG state is never read.
    philox_seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
    philox_offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out.transpose(1, 2),  # [B, H, L_q, d]
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        out.transpose(1, 2),
        lse.contiguous(),
        None,
        None,
        q.shape[1],
        k.shape[1],
        0.0,
        diagonal,
        philox_seed,
        philox_offset,
        scale=scale,
    )
    return tuple(g.transpose(1, 2) for g in grads)  # [B, L, H, d] each


def _use_flash(q: Tensor, backend: str) -> bool:
    """Whether the block kernel is PyTorch's flash op; raise if ``sdpa_flash`` was forced where it cannot run."""
    runs = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    if backend == "sdpa_flash" and not runs:
        raise BackendUnavailableError(
            f"ring attention's backend 'sdpa_flash' needs fp16/bf16 CUDA inputs with a head dim that is a multiple"
            f" of 8 up to 256, got {q.dtype} on {q.device.type} with d={q.shape[-1]}; use backend='auto' or 'math'."
        )
    return runs and backend != "math"


def _visits(owner: int, rank: int, layout: SequenceLayout, causal: bool) -> bool:
    """Whether this rank's queries see any key of ``owner``'s block (causal: blocks in the future are skipped)."""
    if layout.lengths[owner] == 0 or layout.lengths[rank] == 0:
        return False
    return not (causal and owner > rank)


# ---------------------------------------------------------------------------------------------------------
# The autograd Function.
# ---------------------------------------------------------------------------------------------------------


class _RingAttention(torch.autograd.Function):
    """Exact attention of this rank's queries over the keys and values of the whole ring (arXiv 2310.01889).

    forward: P-1 exchanges of the packed ``[2, B, L_max, H, d]`` key/value block with the ring neighbours
    (send to r+1, receive from r-1), each posted before the current block is computed; partial outputs
    are merged with their log-sum-exp.
    backward: the key/value blocks go around the ring again (P-1 exchanges) and the dK/dV accumulator of
    each block follows one step behind (P-1 exchanges, in the compute dtype), so it arrives at the block's
    owner, which adds its own contribution last. dQ stays local.
    """

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup, layout: SequenceLayout, scale: float, causal: bool,
        flash: bool,
    ) -> Tensor:
        world, rank = group_size(group), group_rank(group)
        compute = _compute_dtype(q.dtype)
        q_c = q if flash else q.to(compute)
        # Running output and LSE in the compute dtype whichever kernel computes the blocks.
        out = q.new_zeros(q.shape, dtype=compute)  # [B, L_r, H, d]
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=compute)  # [B, H, L_r]
        kv = _pack_blocks(k, v, max(layout.lengths))  # [2, B, L_max, H, d]
        for step in range(world):
            owner = (rank - step) % world
            pending = _RingExchange(kv, group, _TAG_KV) if step < world - 1 else None
            if _visits(owner, rank, layout, causal):
                n = layout.lengths[owner]
                k_blk, v_blk = (kv[0, :, :n], kv[1, :, :n]) if flash else (kv[0, :, :n].to(compute), kv[1, :, :n].to(compute))
                block_out, block_lse = (_flash_block_forward if flash else _block_forward)(
                    q_c, k_blk, v_blk, scale, causal and owner == rank
                )
                out, lse = _merge_block(out, lse, block_out, block_lse)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.layout, ctx.scale, ctx.causal, ctx.flash = group, layout, scale, causal, flash
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, scale, causal, flash = ctx.group, ctx.layout, ctx.scale, ctx.causal, ctx.flash
        world, rank = group_size(group), group_rank(group)
        compute = _compute_dtype(q.dtype)
        grad_out = grad_out.contiguous()
        q_c, grad_out_c = (q, grad_out) if flash else (q.to(compute), grad_out.to(compute))
        # The flash op forms delta = rowsum(dO * O) itself; the math kernel takes it: [B, L_r, H] -> [B, H, L_r].
        delta = None if flash else (grad_out_c * out.to(compute)).sum(dim=-1).transpose(1, 2)
        grad_q = torch.zeros_like(q, dtype=compute)
        longest = max(layout.lengths)
        kv = _pack_blocks(k, v, longest)  # [2, B, L_max, H, d]
        own_grad_kv: Tensor | None = None
        grad_pending: _RingExchange | None = None
        for step in range(world):
            owner = (rank - step) % world
            kv_pending = _RingExchange(kv, group, _TAG_KV) if step < world - 1 else None
            grad_kv = kv.new_zeros(kv.shape, dtype=compute)  # [2, B, L_max, H, d]
            if _visits(owner, rank, layout, causal):
                n = layout.lengths[owner]
                diagonal = causal and owner == rank
                if flash:
                    dq, dk, dv = _flash_block_backward(q, kv[0, :, :n], kv[1, :, :n], grad_out, out, lse, scale, diagonal)
                else:
                    dq, dk, dv = _block_backward(
                        q_c, kv[0, :, :n].to(compute), kv[1, :, :n].to(compute), grad_out_c, lse, delta, scale, diagonal
                    )
                grad_q += dq
                grad_kv[0, :, :n] = dk
                grad_kv[1, :, :n] = dv
            if step == 0:
                own_grad_kv = grad_kv  # added last, when the accumulator comes home
            else:
                if grad_pending is not None:
                    grad_kv += grad_pending.wait()
                grad_pending = _RingExchange(grad_kv, group, _TAG_GRAD)
            if kv_pending is not None:
                kv = kv_pending.wait()
        if grad_pending is not None:
            own_grad_kv += grad_pending.wait()
        n = q.shape[1]
        grad_k = own_grad_kv[0, :, :n].to(k.dtype)
        grad_v = own_grad_kv[1, :, :n].to(v.dtype)
        return grad_q.to(q.dtype), grad_k, grad_v, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------


def check_ring_arguments(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, backend: str, name: str = "ring_attention") -> None:
    """Raise a clear error for inputs ring attention does not support."""
    check_same_dtype_device(q, k, v)
    if q.dim() != 4 or not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"{name} needs q, k, v of one shape [B, L_r, H, d], got {list(q.shape)}, {list(k.shape)},"
            f" {list(v.shape)} (grouped-query attention is not supported: repeat the key/value heads first)."
        )
    if dropout_p > 0.0:
        raise NotImplementedError(
            f"{name} does not implement attention dropout (got dropout_p={dropout_p}); set the attention"
            " dropout to 0.0 or use attention='ulysses' or 'lss'."
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend not in RING_BACKENDS:
        raise BackendUnavailableError(
            f"{name} needs the log-sum-exp of every block, which only its plain-torch kernel and PyTorch's flash"
            f" op return, so backend {backend!r} cannot be used; pass backend='auto', 'math' or 'sdpa_flash'."
        )


def ring_attention(
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
    """Exact full attention over a sequence whose tokens are split across ``group``, by passing keys and values around a ring.

    Args:
        q: This rank's queries ``[B, L_r, H, d]``.
        k: This rank's keys ``[B, L_r, H, d]``.
        v: This rank's values ``[B, L_r, H, d]``.
        group: The sequence-parallel process group; its rank order is the token order.
        dropout_p: Must be 0.0: attention dropout is not implemented (``NotImplementedError``).
        softmax_scale: Scale of ``q k^T``; default ``1 / sqrt(d)``.
        causal: Causal masking over the full sequence (token order = rank order): blocks entirely in the
            future are skipped, the diagonal block is masked.
        backend: The block kernel, see :data:`RING_BACKENDS`: ``"math"`` (plain torch, fp32 softmax, any
            device), ``"sdpa_flash"`` (PyTorch's FlashAttention-2 op on fp16/bf16 CUDA inputs), or
            ``"auto"``: flash where it runs, else math. Partial results are merged in fp32 either way.
        sequence_lengths: Tokens held by each rank (they may differ, e.g. L = 197 over 4 ranks); the strategy
            passes them; default: exchanged with one small all-gather.

    Returns:
        This rank's output tokens ``[B, L_r, H, d]``.

    Communication per rank: forward P-1 exchanges with the ring neighbours of ``2 B L_max H d`` elements,
    each overlapped with the attention of the block already here; backward the same P-1 exchanges plus
    P-1 of the dK/dV accumulators (same size, compute dtype). No head limit; memory holds two blocks of
    keys and values (current and incoming) and, with the math kernel, one ``[B, H, L_r, L_max]`` score block at a time.
    """
    check_ring_arguments(q, k, v, dropout_p, backend)
    flash = _use_flash(q, backend)
    if group_size(group) == 1:
        kernel = "sdpa_flash" if flash else "math"
        return local_attention(q, k, v, softmax_scale=softmax_scale, causal=causal, backend=kernel)
    layout = resolve_layout(q.shape[1], group, sequence_lengths)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _RingAttention.apply(q, k, v, group, layout, scale, causal, flash)


class RingAttention(nn.Module):
    """Ring attention as a module: ``[B, L_r, H, d]`` q, k, v -> ``[B, L_r, H, d]``, mirroring ``UlyssesAttention``.

    Args:
        group: The sequence-parallel process group.
        backend: The block kernel, see :func:`ring_attention`.
    """

    def __init__(self, group: ProcessGroup, backend: AttentionBackend = "auto") -> None:
        super().__init__()
        self.group = group
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        """``kwargs`` (``dropout_p``, ``softmax_scale``, ``causal``, ``sequence_lengths``) go to :func:`ring_attention`."""
        kwargs.setdefault("backend", self.backend)
        return ring_attention(q, k, v, self.group, **kwargs)
