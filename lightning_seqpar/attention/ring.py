"""Ring attention (arXiv 2310.01889): keys and values travel around the sequence-parallel group while each rank keeps
its queries.

Shape flow on rank r of a group of P ranks (rank order = token order)::

    k, v  [B, L_r, H, d]  --pack, pad to max L_r-->  [2, B, L_max, H, d]
    for step s = 0 .. P-1 (this rank holds the block of owner o = (r - s) mod P):
        post send of the block to rank r+1 and receive of the next one from rank r-1   (s < P-1)
        q [B, L_r, H, d] x block [B, L_o, H, d]  ->  partial out [B, L_r, H, d], LSE [B, H, L_r]
        merge into the running output with the log-sum-exp (online softmax); wait for the exchange

Backward recomputes every block's probabilities from the saved final LSE (the FlashAttention-2 backward,
arXiv 2307.08691) while the same blocks travel around the ring a second time, followed one step behind by
their dK/dV accumulators, so that each accumulator ends at its owner after P-1 hops. The block kernels
(cuDNN, PyTorch's flash op, plain torch) are in :mod:`lightning_seqpar.attention.blocks`.

Causal attention is load-balanced (``load_balance=True``): with tokens in rank order, rank P-1 would attend
to all P blocks and rank 0 to one. The sequence is cut into 2P chunks and rank r takes chunks r and 2P-1-r
(the "zigzag" / head-tail order of ring-flash-attn and Llama 3's context parallelism, arXiv 2407.21783), moved
there by one all-to-all of q, k, v before the ring and one of the output after it. Then every step after the
first does half a block on every rank: owner o < r: all queries x the first chunk of o; o > r: the second
chunk of queries x both chunks of o.

Letters: B batch, L tokens, L_r tokens of this rank, L_max the longest L_r, H heads, d head dim, P ranks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_seqpar.attention import blocks
from lightning_seqpar.attention.local import (
    BACKENDS,
    AttentionBackend,
    BackendUnavailableError,
    check_same_dtype_device,
    local_attention,
)
from lightning_seqpar.comm import SequenceLayout, _AllToAll, group_rank, group_size, resolve_layout, split_sizes

# The originals, not ``dist.isend``: P2POp and batch_isend_irecv compare the op by identity, and a
# monkeypatched ``dist.isend`` (as the tests' collective counter installs) would not match.
_ISEND = dist.distributed_c10d.isend
_IRECV = dist.distributed_c10d.irecv
_TAG_KV, _TAG_GRAD = 0, 1

RING_BACKENDS = ("auto", "math", "sdpa_flash", "sdpa_cudnn")
"""Block kernels ring attention can run (each returns the block's log-sum-exp, see
:mod:`~lightning_seqpar.attention.blocks`): ``sdpa_cudnn`` (cuDNN fused attention; CUDA sm80+, fp16/bf16, d a
multiple of 8 up to 128), ``sdpa_flash`` (PyTorch's FlashAttention-2 op; CUDA, fp16/bf16, d a multiple of 8 up to
256), ``math`` (plain torch, float32 softmax, any device); ``auto`` picks cuDNN where it runs, falling back to
flash per block where cuDNN refuses a shape, else flash, else math."""


def choose_kernel(q: Tensor, backend: str) -> tuple[str, bool]:
    """The block kernel for ``backend`` on inputs like ``q`` and whether it may fall back at run time; raise
    :class:`BackendUnavailableError` when a forced kernel cannot run on them."""
    if backend == "sdpa_flash" and not blocks.flash_runs(q):
        raise BackendUnavailableError(
            f"ring attention's backend 'sdpa_flash' needs fp16/bf16 CUDA inputs with a head dim that is a multiple"
            f" of 8 up to 256, got {q.dtype} on {q.device.type} with d={q.shape[-1]}; use backend='auto' or 'math'."
        )
    if backend == "sdpa_cudnn" and not blocks.cudnn_runs(q):
        raise BackendUnavailableError(
            f"ring attention's backend 'sdpa_cudnn' needs fp16/bf16 inputs on an sm80+ CUDA GPU with cuDNN attention"
            f" enabled and a head dim that is a multiple of 8 up to 128, got {q.dtype} on {q.device.type} with"
            f" d={q.shape[-1]}; use backend='auto', 'sdpa_flash' or 'math'."
        )
    if backend == "auto":
        if blocks.cudnn_runs(q):
            return "sdpa_cudnn", True
        return ("sdpa_flash" if blocks.flash_runs(q) else "math"), False
    return backend, False


# ---------------------------------------------------------------------------------------------------------
# Point-to-point exchange with the ring neighbours.
# ---------------------------------------------------------------------------------------------------------


class _RingExchange:
    """One posted exchange: ``buffer`` goes to the next rank while a block of the same shape comes from the previous
    one."""

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
    kv = k.new_empty((2, k.shape[0], longest, *k.shape[2:]))
    kv[0, :, : k.shape[1]] = k
    kv[1, :, : v.shape[1]] = v
    if longest > k.shape[1]:
        kv[:, :, k.shape[1] :] = 0
    return kv


# ---------------------------------------------------------------------------------------------------------
# Which part of which block each step computes.
# ---------------------------------------------------------------------------------------------------------


def _block_forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, scale: float, diagonal: bool, fallback: bool):
    """One block's forward (a module-level name, so that tests can observe when blocks are computed)."""
    return blocks.block_forward(kernel, q, k, v, scale, diagonal, fallback)


def _block_plan(rank: int, owner: int, lengths: tuple[int, ...], causal: bool, chunks: tuple[int, ...] | None):
    """``(first query row, keys of the block, diagonal mask)`` that this rank's queries attend to in ``owner``'s
    block, or None when they attend to none of it.

    ``chunks`` (zigzag order, causal only): the 2P chunk lengths; rank r holds chunks r and 2P-1-r.
    """
    n_q, n_k = lengths[rank], lengths[owner]
    if n_q == 0 or n_k == 0:
        return None
    if owner == rank:
        return 0, n_k, causal
    if not causal:
        return 0, n_k, False
    if chunks is None:
        return (0, n_k, False) if owner < rank else None
    if owner < rank:  # every query of this rank comes after the first chunk of the owner and before its second
        return (0, chunks[owner], False) if chunks[owner] else None
    first = chunks[rank]  # owner > rank: only this rank's second chunk comes after both chunks of the owner
    return (first, n_k, False) if n_q > first else None


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
        kernel: str, fallback: bool = False, chunks: tuple[int, ...] | None = None,
    ) -> Tensor:
        world, rank = group_size(group), group_rank(group)
        compute = blocks.compute_dtype(q.dtype)
        # Running output and LSE in the compute dtype whichever kernel computes the blocks.
        out = q.new_zeros(q.shape, dtype=compute)  # [B, L_r, H, d]
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=compute)  # [B, H, L_r]
        kv = _pack_blocks(k, v, max(layout.lengths))  # [2, B, L_max, H, d]
        for step in range(world):
            owner = (rank - step) % world
            pending = _RingExchange(kv, group, _TAG_KV) if step < world - 1 else None
            plan = _block_plan(rank, owner, layout.lengths, causal, chunks)
            if plan is not None:
                first, n, diagonal = plan
                block_out, block_lse = _block_forward(
                    kernel, q[:, first:], kv[0, :, :n], kv[1, :, :n], scale, diagonal, fallback
                )
                out[:, first:], lse[..., first:] = blocks.merge_block(
                    out[:, first:], lse[..., first:], block_out, block_lse
                )
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.layout, ctx.scale, ctx.causal = group, layout, scale, causal
        ctx.kernel, ctx.fallback, ctx.chunks = kernel, fallback, chunks
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, scale = ctx.group, ctx.layout, ctx.scale
        world, rank = group_size(group), group_rank(group)
        compute = blocks.compute_dtype(q.dtype)
        grad_out = grad_out.contiguous()
        grad_q = torch.zeros_like(q, dtype=compute)
        longest = max(layout.lengths)
        kv = _pack_blocks(k, v, longest)  # [2, B, L_max, H, d]
        own_grad_kv: Tensor | None = None
        grad_pending: _RingExchange | None = None
        for step in range(world):
            owner = (rank - step) % world
            kv_pending = _RingExchange(kv, group, _TAG_KV) if step < world - 1 else None
            grad_kv = kv.new_zeros(kv.shape, dtype=compute)  # [2, B, L_max, H, d]
            plan = _block_plan(rank, owner, layout.lengths, ctx.causal, ctx.chunks)
            if plan is not None:
                first, n, diagonal = plan
                dq, dk, dv = blocks.block_backward(
                    ctx.kernel, q[:, first:], kv[0, :, :n], kv[1, :, :n], grad_out[:, first:], out[:, first:],
                    lse[..., first:], scale, diagonal, ctx.fallback,
                )
                grad_q[:, first:] += dq
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
        return grad_q.to(q.dtype), grad_k, grad_v, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Zigzag order for causal load balance: rank r holds chunks r and 2P-1-r of the 2P chunks.
# ---------------------------------------------------------------------------------------------------------


def zigzag_chunks(total: int, world: int) -> tuple[int, ...]:
    """Lengths of the 2P chunks of a sequence of ``total`` tokens (:func:`~lightning_seqpar.comm.split_sizes`)."""
    return tuple(split_sizes(total, 2 * world))


class _Zigzag:
    """The all-to-all that moves tokens from rank order (``layout``) to zigzag order and back, for one rank.

    ``index``: this rank's token positions grouped by the rank that holds them in zigzag order (each group in
    sequence order); ``send``/``recv``: tokens sent to / received from each rank going to zigzag order. Tokens
    arrive in source-rank order, which is sequence order, which is the zigzag rank's own order.
    """

    def __init__(self, layout: SequenceLayout, rank: int, device: torch.device) -> None:
        world = len(layout.lengths)
        self.chunks = zigzag_chunks(layout.total, world)
        starts = [sum(self.chunks[:i]) for i in range(2 * world)]
        spans = [[(starts[c], starts[c] + self.chunks[c]) for c in (j, 2 * world - 1 - j)] for j in range(world)]

        def overlap(begin: int, end: int, j: int) -> list[tuple[int, int]]:
            return [(max(lo, begin), min(hi, end)) for lo, hi in spans[j] if min(hi, end) > max(lo, begin)]

        begin, end = layout.offset(rank), layout.offset(rank) + layout.lengths[rank]
        runs = [overlap(begin, end, j) for j in range(world)]
        self.send = [sum(hi - lo for lo, hi in r) for r in runs]
        self.recv = [
            sum(hi - lo for lo, hi in overlap(layout.offset(s), layout.offset(s) + layout.lengths[s], rank))
            for s in range(world)
        ]
        pieces = [torch.arange(lo - begin, hi - begin, device=device) for r in runs for lo, hi in r]
        self.index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)
        self.inverse = torch.argsort(self.index)
        self.lengths = tuple(self.chunks[j] + self.chunks[2 * world - 1 - j] for j in range(world))

    @staticmethod
    def _exchange(x: Tensor, dim: int, send: list[int], recv: list[int], group: ProcessGroup) -> Tensor:
        tokens_first = x.movedim(dim, 0)  # [L, *rest]: each destination's tokens are one contiguous run
        rest = tokens_first.shape[1:]
        inner = math.prod(rest)
        flat = tokens_first.contiguous().reshape(-1)
        received = _AllToAll.apply(flat, [n * inner for n in send], [n * inner for n in recv], group)
        return received.view(sum(recv), *rest).movedim(0, dim)

    def to_zigzag(self, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
        return self._exchange(x.index_select(dim, self.index), dim, self.send, self.recv, group)

    def from_zigzag(self, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
        return self._exchange(x, dim, self.recv, self.send, group).index_select(dim, self.inverse)


@functools.lru_cache(maxsize=64)
def _zigzag(layout: SequenceLayout, rank: int, device: torch.device) -> _Zigzag:
    """One :class:`_Zigzag` per layout (every layer of a step shares it)."""
    return _Zigzag(layout, rank, device)


# ---------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------


def check_ring_arguments(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float, backend: str, name: str = "ring_attention"
) -> None:
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
            f"{name} needs the log-sum-exp of every block, which only cuDNN's and PyTorch's flash ops and its"
            f" plain-torch kernel return, so backend {backend!r} cannot be used; pass backend='auto', 'sdpa_cudnn',"
            " 'sdpa_flash' or 'math'."
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
    load_balance: bool = True,
) -> Tensor:
    """Exact full attention over a sequence whose tokens are split across ``group``, by passing keys and values around a
    ring.

    Args:
        q: This rank's queries ``[B, L_r, H, d]``.
        k: This rank's keys ``[B, L_r, H, d]``.
        v: This rank's values ``[B, L_r, H, d]``.
        group: The sequence-parallel process group; its rank order is the token order.
        dropout_p: Must be 0.0: attention dropout is not implemented (``NotImplementedError``).
        softmax_scale: Scale of ``q k^T``; default ``1 / sqrt(d)``.
        causal: Causal masking over the full sequence (token order = rank order): blocks entirely in the
            future are skipped, the diagonal block is masked.
        backend: The block kernel, see :data:`RING_BACKENDS`: ``"sdpa_cudnn"`` (cuDNN), ``"sdpa_flash"``
            (PyTorch's FlashAttention-2 op), ``"math"`` (plain torch, fp32 softmax, any device), or ``"auto"``:
            cuDNN where it runs (flash for a block cuDNN refuses), else flash, else math. Partial results are
            merged in fp32 whichever kernel runs.
        sequence_lengths: Tokens held by each rank (they may differ, e.g. L = 197 over 4 ranks); the strategy
            passes them; default: exchanged with one small all-gather.
        load_balance: With ``causal``, move the tokens to zigzag order for the ring (see the module docstring) so
            that every rank does the same work; the output comes back in this rank's own tokens either way.

    Returns:
        This rank's output tokens ``[B, L_r, H, d]``.

    Raises:
        BackendUnavailableError: a forced ``backend`` cannot run on these inputs.

    Communication per rank: forward P-1 exchanges with the ring neighbours of ``2 B L_max H d`` elements,
    each overlapped with the attention of the block already here; backward the same P-1 exchanges plus
    P-1 of the dK/dV accumulators (same size, compute dtype). Balanced causal adds one all-to-all of q, k, v
    (half of this rank's tokens move on 2 ranks, up to all of them on more) and one of the output, each way. No head
    limit; memory holds two
    blocks of keys and values (current and incoming) and, with the math kernel, one ``[B, H, L_r, L_max]`` score
    block at a time.
    """
    check_ring_arguments(q, k, v, dropout_p, backend)
    kernel, fallback = choose_kernel(q, backend)
    world = group_size(group)
    if world == 1:
        local = {"sdpa_cudnn": "sdpa" if fallback else "sdpa_cudnn"}.get(kernel, kernel)
        return local_attention(q, k, v, softmax_scale=softmax_scale, causal=causal, backend=local)
    layout = resolve_layout(q.shape[1], group, sequence_lengths)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not (causal and load_balance):
        return _RingAttention.apply(q, k, v, group, layout, scale, causal, kernel, fallback, None)
    zigzag = _zigzag(layout, group_rank(group), q.device)
    qkv = zigzag.to_zigzag(torch.stack([q, k, v]), 2, group)  # [3, B, L_z, H, d]
    out = _RingAttention.apply(
        qkv[0], qkv[1], qkv[2], group, SequenceLayout(zigzag.lengths), scale, causal, kernel, fallback, zigzag.chunks
    )  # [B, L_z, H, d]
    return zigzag.from_zigzag(out, 1, group)  # [B, L_r, H, d]


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
        """``kwargs`` (``dropout_p``, ``softmax_scale``, ``causal``, ``sequence_lengths``, ``load_balance``) go to
        :func:`ring_attention`."""
        kwargs.setdefault("backend", self.backend)
        return ring_attention(q, k, v, self.group, **kwargs)
