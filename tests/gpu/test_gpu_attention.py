"""Attention on CUDA in bf16 against an fp32 reference: every local kernel, Ulysses / LSS over a one-rank NCCL group,
and ring / hybrid on each block kernel (cuDNN, flash, auto) across 2 GPUs.

Tolerance: relative error ||out - ref|| / ||ref|| < 2e-2 for outputs and for dq, dk, dv (bf16 operands land
between 1e-3 and 1e-2). At world size 1 ``ulysses_attention`` and ``lss_attention`` take the local path, so
the all-to-all and the all-gather / reduce-scatter are also driven directly here through NCCL; exchanges
between GPUs are tested by test_gpu_multi.py (tests/test_attention_distributed.py proves them on gloo).
"""

from __future__ import annotations

import pytest
import torch

from lightning_seqpar.attention import (
    LSSAttention,
    UlyssesAttention,
    local_attention,
    lss_attention,
    math_attention,
    ulysses_attention,
)
from lightning_seqpar.comm import SequenceLayout, _AllGatherStacked, head_to_sequence_shards, sequence_to_head_shards

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOLERANCE = 2e-2
B, L, H, D_HEAD = 2, 1000, 8, 64  # L = 1000: not a multiple of the kernels' 64/128 tiles


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(seed: int, length: int = L):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, length, H, D_HEAD, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]


def _reference(q, k, v, causal: bool):
    """Output and gradients in fp32 (full-precision matmuls) from the same bf16 inputs, for the gradient ``grad``."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = math_attention(q32, k32, v32, causal=causal)
        grad = torch.randn_like(out, generator=torch.Generator(device="cuda").manual_seed(99))
        out.backward(grad)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return out.detach(), grad, (q32.grad, k32.grad, v32.grad)


def _check(fn, q, k, v, causal: bool = False):
    out_ref, grad, grads_ref = _reference(q, k, v, causal)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == out_ref.shape
    assert torch.isfinite(out).all()
    out.backward(grad.to(out.dtype))
    errors = {"out": _rel(out, out_ref)} | {n: _rel(t.grad, r) for n, t, r in zip("qkv", (q, k, v), grads_ref)}
    assert max(errors.values()) < TOLERANCE, f"relative errors {errors} (tolerance {TOLERANCE})"
    return errors


@pytest.mark.parametrize("backend", ["auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_local_attention_bf16_matches_fp32(backend, causal):
    q, k, v = _inputs(seed=1)
    _check(lambda q, k, v: local_attention(q, k, v, causal=causal, backend=backend), q, k, v, causal)


@pytest.mark.parametrize("attention", ["ulysses", "lss"])
@pytest.mark.parametrize("backend", ["auto", "sdpa_cudnn", "sdpa_flash"])
def test_distributed_attention_on_one_nccl_rank(nccl_group, attention, backend):
    q, k, v = _inputs(seed=2)
    fn = {"ulysses": ulysses_attention, "lss": lss_attention}[attention]
    _check(lambda q, k, v: fn(q, k, v, nccl_group, backend=backend), q, k, v)
    module = {"ulysses": UlyssesAttention, "lss": LSSAttention}[attention](nccl_group)
    _check(lambda q, k, v: module(q, k, v), q, k, v)


def test_ulysses_all_to_all_path_through_nccl(nccl_group):
    """The Ulysses exchange (token shards -> head shards -> attention -> token shards) driven through NCCL."""
    q, k, v = _inputs(seed=3)
    layout = SequenceLayout((L,))

    def ulysses_exchange(q, k, v):
        qkv = sequence_to_head_shards(torch.stack([q, k, v]), nccl_group, layout)  # [3, B, L, H_r, d]
        out = local_attention(qkv[0], qkv[1], qkv[2], backend="sdpa_flash")  # [B, L, H_r, d]
        return head_to_sequence_shards(out, nccl_group, layout, H)  # [B, L_r, H, d]

    _check(ulysses_exchange, q, k, v)


def test_all_gather_reduce_scatter_through_nccl(nccl_group):
    """LSS's fused key/value all-gather and its reduce-scatter backward, driven through NCCL."""
    x = torch.randn(2, B, 257, H, D_HEAD, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gathered = _AllGatherStacked.apply(x, nccl_group)  # [1, 2, B, L, H, d]
    torch.testing.assert_close(gathered[0], x, rtol=0, atol=0)
    grad = torch.randn_like(gathered)
    gathered.backward(grad)
    torch.testing.assert_close(x.grad, grad[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Ring and hybrid on each block kernel across 2 GPUs (cuDNN, flash, auto), against fp32 full attention.
# ---------------------------------------------------------------------------------------------------------

# (name, B, L, H, d, causal, load_balance): L odd (uneven shards, zigzag chunks of unequal length), d 64 and 128.
RING_KERNEL_CASES = [
    ("L1001_d64", 2, 1001, 8, 64, False, True),
    ("L2049_d128_causal_zigzag", 1, 2049, 4, 128, True, True),
    ("L1001_d64_causal_rank_order", 1, 1001, 8, 64, True, False),
]


def ring_kernels_worker(cases: list) -> dict:
    """Every (kind, kernel, case) on this rank: relative errors of the output and gradient shards."""
    import datetime
    import os
    import zlib

    import torch.distributed as dist

    from lightning_seqpar.attention.hybrid import build_hybrid_groups, hybrid_attention
    from lightning_seqpar.attention.ring import ring_attention
    from lightning_seqpar.comm import split_sizes

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", local_rank))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    hybrid_groups = build_hybrid_groups(range(world), 1)  # u = 1: the ring runs inside hybrid's path
    kinds = {
        "ring": lambda *t, **kw: ring_attention(*t, group, **kw),
        "hybrid_u1": lambda *t, **kw: hybrid_attention(*t, *hybrid_groups, **kw),
    }
    results = {}
    for name, B, L, H, d, causal, balance in cases:
        gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(name.encode()))
        q, k, v, grad_out = (torch.randn(B, L, H, d, device="cuda", generator=gen).bfloat16() for _ in range(4))
        qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
        ref = math_attention(qf, kf, vf, causal=causal)
        ref.backward(grad_out.float())
        sizes = split_sizes(L, world)
        sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        for kind, fn in kinds.items():
            for backend in ("sdpa_cudnn", "sdpa_flash", "auto"):
                local = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
                extra = {} if kind != "ring" else {"load_balance": balance}
                if kind != "ring" and not balance:
                    continue
                out = fn(*local, causal=causal, backend=backend, sequence_lengths=sizes, **extra)
                out.backward(grad_out[:, sl])
                results[(name, kind, backend)] = {"dtype": str(out.dtype)} | {
                    "out": _rel(out, ref[:, sl].detach()),
                    "dq": _rel(local[0].grad, qf.grad[:, sl]),
                    "dk": _rel(local[1].grad, kf.grad[:, sl]),
                    "dv": _rel(local[2].grad, vf.grad[:, sl]),
                }
    dist.barrier()
    dist.destroy_process_group()
    return results


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.timeout(600)
def test_ring_and_hybrid_kernels_across_gpus():
    """cuDNN, flash and auto block kernels give the same attention across 2 GPUs, forward and gradients, uneven
    shards, full, causal in zigzag order and causal in rank order (tolerance as above)."""
    from tests.dist_utils import run_distributed

    per_rank = run_distributed("tests.gpu.test_gpu_attention:ring_kernels_worker", 2, timeout=400,
                               env={"NCCL_NVLS_ENABLE": "0"}, cases=RING_KERNEL_CASES)
    for rank, results in enumerate(per_rank):
        assert len(results) == 15
        for key, r in results.items():
            errors = {f: r[f] for f in ("out", "dq", "dk", "dv")}
            assert r["dtype"] == "torch.bfloat16" and max(errors.values()) < TOLERANCE, f"{key} rank {rank}: {errors}"
