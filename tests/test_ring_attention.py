"""Ring and hybrid Ulysses x Ring attention across gloo processes against single-process full attention: outputs,
q/k/v gradients, the exchanges each one issues, and every error message."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import CollectiveCounter, init_gloo, relative_error, run_distributed

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(1200)]

# (name, world, B, L, H, d, causal)
RING_CASES = [
    ("even", 2, 2, 16, 4, 32, False),
    ("causal_L7", 2, 1, 7, 3, 64, True),
    ("L13", 4, 2, 13, 4, 32, False),
    ("causal_L13", 4, 2, 13, 4, 32, True),
    ("L197", 4, 2, 197, 2, 64, False),
    ("causal_L197", 4, 1, 197, 2, 64, True),
    ("L3_empty_rank", 4, 2, 3, 2, 32, False),  # lengths [1, 1, 1, 0]
    ("causal_L6_empty_chunks", 4, 1, 6, 2, 32, True),  # 8 zigzag chunks of [1, 1, 1, 1, 1, 1, 0, 0]
    ("causal_L64_unbalanced", 4, 1, 64, 2, 32, "unbalanced"),  # load_balance=False: the rank-order path
]

# (name, ulysses_degree, B, L, H, d, causal) on 4 ranks
HYBRID_CASES = [
    ("2x2_causal_L13", 2, 2, 13, 4, 32, True),
    ("2x2_L197_d64", 2, 2, 197, 4, 64, False),
    ("2x2_H3_L10", 2, 1, 10, 3, 32, True),
    ("4x1_causal_L13", 4, 2, 13, 4, 32, True),
    ("1x4_causal_L13", 1, 2, 13, 2, 32, True),
    ("2x2_causal_L13_unbalanced", 2, 2, 13, 4, 32, "unbalanced"),  # load_balance=False: the ring in rank order
]


def _inputs(tag: str, B: int, L: int, H: int, d: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return [torch.randn(B, L, H, d, generator=gen, dtype=torch.float64).float() for _ in range(4)]


def _reference(q, k, v, grad_out, causal):
    """Full attention on the whole sequence in float64: output and q/k/v gradients."""
    from lightning_seqpar.attention import local_attention

    qf, kf, vf = (t.double().requires_grad_() for t in (q, k, v))
    ref = local_attention(qf, kf, vf, causal=causal, backend="math")
    ref.backward(grad_out.double())
    return ref.detach(), qf.grad, kf.grad, vf.grad


def _compare(fn, fn_inferred, q, k, v, grad_out, causal, sizes, rank) -> dict:
    """Run ``fn`` on this rank's slice, count its exchanges forward and backward, compare with the reference.
    ``causal="unbalanced"``: causal with ``load_balance=False``."""
    unbalanced = causal == "unbalanced"
    causal = bool(causal)
    ref, dq, dk, dv = _reference(q, k, v, grad_out, causal)
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    local = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
    extra = {"load_balance": False} if unbalanced else {}
    with CollectiveCounter() as fwd:
        out = fn(*local, causal=causal, sequence_lengths=sizes, **extra)
    with CollectiveCounter() as bwd:
        out.backward(grad_out[:, sl])
    with CollectiveCounter() as inferred:
        out_inferred = fn_inferred(*(t.detach() for t in local), causal=causal, **extra)
    norms = {"dq": dq[:, sl], "dk": dk[:, sl], "dv": dv[:, sl]}
    errors = {
        "out": relative_error(out.double(), ref[:, sl]),
        "out_inferred": relative_error(out_inferred.double(), ref[:, sl]),
    }
    for (name, expected), t in zip(norms.items(), local):
        # A rank with no tokens has empty gradients: nothing to compare.
        errors[name] = relative_error(t.grad.double(), expected) if expected.numel() else 0.0
    return {"errors": errors, "fwd": fwd.calls, "bwd": bwd.calls, "inferred": inferred.calls}


def _event_order(group, q, k, v) -> list[str]:
    """The order of exchanges and block computations in one forward (is each exchange posted before the compute?)."""
    from lightning_seqpar.attention import ring

    events: list[str] = []
    original_block, original_batch = ring._block_forward, dist.batch_isend_irecv

    def block(*args, **kwargs):
        events.append("compute")
        return original_block(*args, **kwargs)

    def batch(*args, **kwargs):
        events.append("exchange")
        return original_batch(*args, **kwargs)

    ring._block_forward, dist.batch_isend_irecv = block, batch
    try:
        ring.ring_attention(q, k, v, group)
    finally:
        ring._block_forward, dist.batch_isend_irecv = original_block, original_batch
    return events


def _block_work(group, q, k, v, load_balance: bool) -> float:
    """Query x key pairs this rank's forward computes (a masked diagonal block counts half)."""
    from lightning_seqpar.attention import ring

    work = [0.0]
    original = ring._block_forward

    def block(kernel, q, k, v, scale, diagonal, fallback):
        work[0] += q.shape[1] * k.shape[1] / (2 if diagonal else 1)
        return original(kernel, q, k, v, scale, diagonal, fallback)

    ring._block_forward = block
    try:
        ring.ring_attention(q, k, v, group, causal=True, load_balance=load_balance)
    finally:
        ring._block_forward = original
    return work[0]


def worker(world: int, ring_cases: list, hybrid_cases: list) -> dict:
    """Everything that needs ``world`` processes, in one launch (process start-up dominates the runtime)."""
    init_gloo()
    results = {"ring": _ring_cases(world, ring_cases)}
    if hybrid_cases:
        results["hybrid"] = _hybrid_cases(world, hybrid_cases)
    return results


def _ring_cases(world: int, cases: list) -> dict:
    from lightning_seqpar.attention.ring import RingAttention, ring_attention
    from lightning_seqpar.comm import split_sizes

    rank = dist.get_rank()
    group = dist.new_group(list(range(world)))
    module = RingAttention(group)
    results = {}
    for name, _, B, L, H, d, causal in cases:
        q, k, v, grad_out = _inputs(f"ring-{name}", B, L, H, d)
        fn = lambda *t, **kw: ring_attention(*t, group, **kw)  # noqa: E731
        results[name] = _compare(fn, module, q, k, v, grad_out, causal, split_sizes(L, world), rank)
    q, k, v, _ = _inputs("order", 1, 4 * world, 2, 32)
    sl = slice(4 * rank, 4 * rank + 4)
    results["event_order"] = _event_order(group, q[:, sl], k[:, sl], v[:, sl])
    q, k, v, _ = _inputs("work", 1, 16 * world, 2, 32)
    sl = slice(16 * rank, 16 * rank + 16)
    results["work"] = {b: _block_work(group, q[:, sl], k[:, sl], v[:, sl], b) for b in (True, False)}
    return results


def _hybrid_cases(world: int, cases: list) -> dict:
    from lightning_seqpar.attention.hybrid import HybridAttention, build_hybrid_groups, hybrid_attention
    from lightning_seqpar.comm import split_sizes

    rank = dist.get_rank()
    groups = {u: build_hybrid_groups(range(world), u) for u in sorted({c[1] for c in cases})}
    results = {}
    for name, u, B, L, H, d, causal in cases:
        ulysses_group, ring_group = groups[u]
        q, k, v, grad_out = _inputs(f"hybrid-{name}", B, L, H, d)
        fn = lambda *t, **kw: hybrid_attention(*t, ulysses_group, ring_group, **kw)  # noqa: B023 - used in this iteration
        module = HybridAttention(ulysses_group, ring_group)
        results[name] = _compare(fn, module, q, k, v, grad_out, causal, split_sizes(L, world), rank)

    # Errors that need the groups: too few heads for the Ulysses degree, lengths that do not fit.
    ulysses_group, ring_group = groups[2]
    errors = {}
    one_head = torch.zeros(1, 3, 1, 8)
    for key, call in {
        "heads": lambda: hybrid_attention(one_head, one_head, one_head, ulysses_group, ring_group),
        "lengths": lambda: hybrid_attention(
            *(torch.zeros(1, 3, 2, 8),) * 3, ulysses_group, ring_group, sequence_lengths=[3, 3]
        ),
        "lengths_2x2": lambda: hybrid_attention(
            *(torch.zeros(1, 3, 2, 8),) * 3, ulysses_group, ring_group, sequence_lengths=[5, 5, 5, 5]
        ),
    }.items():
        try:
            call()
            errors[key] = None
        except ValueError as err:
            errors[key] = str(err)
    results["errors"] = errors

    # Groups of one SP group that not every rank belongs to: the others get (None, None).
    results["outside"] = build_hybrid_groups([0, 1], 2)
    results["outside"] = tuple(g is None for g in results["outside"])
    return results


def _merge(per_rank: list[dict]) -> dict:
    merged: dict = {}
    for res in per_rank:
        for key, value in res.items():
            merged.setdefault(key, []).append(value)
    return merged


@pytest.fixture(scope="module")
def launch():
    """``launch(world)``: the merged per-rank results of one launch of ``world`` processes, made once per module."""
    cache: dict[int, dict] = {}

    def results(world: int) -> dict:
        if world not in cache:
            ring_cases = [c for c in RING_CASES if c[1] == world]
            hybrid_cases = HYBRID_CASES if world == 4 else []
            per_rank = run_distributed(
                "tests.test_ring_attention:worker", world, world=world, ring_cases=ring_cases, hybrid_cases=hybrid_cases
            )
            cache[world] = {kind: _merge([r[kind] for r in per_rank]) for kind in per_rank[0]}
        return cache[world]

    return results


@pytest.fixture(params=[2, 4], ids=["world2", "world4"])
def ring_results(request, launch):
    return request.param, launch(request.param)["ring"]


@pytest.fixture
def hybrid_results(launch):
    return launch(4)["hybrid"]


def _assert_close(merged: dict, names: list[str], label: str) -> None:
    for name in names:
        for rank, r in enumerate(merged[name]):
            for field, err in r["errors"].items():
                assert err < 1e-5, f"{label} {name} rank {rank}: {field} relative error {err:.2e}"


def test_ring_matches_full_attention(ring_results):
    world, merged = ring_results
    _assert_close(merged, [c[0] for c in RING_CASES if c[1] == world], "ring")


def test_ring_exchanges(ring_results):
    """Forward: P-1 neighbour exchanges of k/v and nothing else; backward: P-1 of k/v and P-1 of dK/dV. Balanced
    causal adds one all-to-all into zigzag order before the ring and one back after it, each way."""
    world, merged = ring_results
    for name, _, *_, causal in (c for c in RING_CASES if c[1] == world):
        zigzag = ["all_to_all_single"] if causal is True else []
        for r in merged[name]:
            assert [c for c, _ in r["fwd"]] == zigzag + ["batch_isend_irecv"] * (world - 1) + zigzag, (name, r["fwd"])
            assert [c for c, _ in r["bwd"]] == zigzag + ["batch_isend_irecv"] * (2 * (world - 1)) + zigzag, (
                name,
                r["bwd"],
            )
            assert [c for c, _ in r["inferred"]] == ["all_gather_into_tensor"] + zigzag + ["batch_isend_irecv"] * (
                world - 1
            ) + zigzag


def test_causal_ring_is_load_balanced(ring_results):
    """Causal, 16 tokens per rank: in zigzag order every rank computes the same query x key pairs (a diagonal block
    of 2 chunks, then half a block per step); in rank order the last rank computes 2P-1 times the first one's."""
    world, merged = ring_results
    balanced = [w[True] for w in merged["work"]]
    unbalanced = [w[False] for w in merged["work"]]
    assert balanced == [16 * 16 / 2 + (world - 1) * 16 * 8] * world, balanced
    assert unbalanced == [16 * 16 / 2 + r * 16 * 16 for r in range(world)], unbalanced


def test_ring_posts_exchange_before_compute(ring_results):
    """Each block's exchange is posted before the block already here is computed (communication overlaps compute)."""
    world, merged = ring_results
    for events in merged["event_order"]:
        assert events == ["exchange", "compute"] * (world - 1) + ["compute"]


def test_hybrid_matches_full_attention(hybrid_results):
    _assert_close(hybrid_results, [c[0] for c in HYBRID_CASES], "hybrid")


def test_hybrid_collectives(hybrid_results):
    """2x2: all-to-all, one ring exchange, all-to-all; the degenerate grids are pure Ulysses or pure ring. Causal
    with a ring of 2 or more adds the ring's zigzag all-to-all on each side of it."""
    a2a, p2p = "all_to_all_single", "batch_isend_irecv"
    for name, u, *_, causal in HYBRID_CASES:
        ring_world = 4 // u
        z = [a2a] if causal is True and ring_world > 1 else []
        ulysses = [a2a] if u > 1 else []
        fwd = ulysses + z + [p2p] * (ring_world - 1) + z + ulysses
        bwd = ulysses + z + [p2p] * (2 * (ring_world - 1)) + z + ulysses
        for r in hybrid_results[name]:
            assert [c for c, _ in r["fwd"]] == fwd, (name, r["fwd"])
            assert [c for c, _ in r["bwd"]] == bwd, (name, r["bwd"])
            # Without lengths: one small all-gather in the Ulysses group and one in the ring group.
            assert [c for c, _ in r["inferred"]][:2] == ["all_gather_into_tensor"] * 2


def test_hybrid_errors_and_outside_ranks(hybrid_results):
    for errors in hybrid_results["errors"]:
        assert "Ulysses group of 2 ranks" in errors["heads"] and "ulysses_degree <= 1" in errors["heads"]
        assert "do not match this rank: 2 x 2 = 4" in errors["lengths"]
    for rank, errors in enumerate(hybrid_results["errors"]):
        assert f"SP rank {rank} holds 3 tokens" in errors["lengths_2x2"]
    assert hybrid_results["outside"] == [(False, False), (False, False), (True, True), (True, True)]


# ---------------------------------------------------------------------------------------------------------
# Errors raised before any communication (no process group).
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn_name", ["ring", "hybrid"])
def test_argument_errors(fn_name):
    from lightning_seqpar.attention.hybrid import hybrid_attention
    from lightning_seqpar.attention.local import BackendUnavailableError
    from lightning_seqpar.attention.ring import ring_attention

    fn = (lambda *a, **kw: ring_attention(*a, None, **kw)) if fn_name == "ring" else (
        lambda *a, **kw: hybrid_attention(*a, None, None, **kw)
    )
    x = torch.zeros(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match=r"does not implement attention dropout \(got dropout_p=0.1\)"):
        fn(x, x, x, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"needs q, k, v of one shape \[B, L_r, H, d\].*grouped-query"):
        fn(x, x[:, :, :1], x[:, :, :1])
    with pytest.raises(
        BackendUnavailableError,
        match="backend 'sdpa' cannot be used; pass backend='auto', 'sdpa_cudnn', 'sdpa_flash' or 'math'",
    ):
        fn(x, x, x, backend="sdpa")
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        fn(x, x, x, backend="fast")
    if fn_name == "ring":
        with pytest.raises(
            BackendUnavailableError, match=r"'sdpa_flash' needs fp16/bf16 CUDA inputs.*got torch.float32 on cpu"
        ):
            fn(x, x, x, backend="sdpa_flash")
        with pytest.raises(
            BackendUnavailableError,
            match=r"'sdpa_cudnn' needs fp16/bf16 inputs on an sm80\+ CUDA GPU.*got torch.float32 on cpu",
        ):
            fn(x, x, x, backend="sdpa_cudnn")


def test_cudnn_refusal_falls_back_per_block_with_one_warning(monkeypatch):
    """Where cuDNN raises for a block, ``auto`` (fallback=True) computes it with the next kernel (math on the CPU),
    forward and backward, warns once per shape, and a forced ``sdpa_cudnn`` (fallback=False) raises instead."""
    from lightning_seqpar.attention import blocks

    def refuse(*args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: No valid engine configs")

    monkeypatch.setattr(blocks, "cudnn_forward", refuse)
    monkeypatch.setattr(blocks, "cudnn_backward", refuse)
    monkeypatch.setattr(blocks, "_warned", set())
    q, k, v, grad_out = _inputs("fallback", 2, 9, 2, 16)
    expected = blocks.math_forward(q, k, v, 0.25, True)
    with pytest.warns(
        RuntimeWarning,
        match=r"cuDNN attention refused a ring block \(forward; q \[2, 9, 2, 16\].*No valid engine.*math",
    ):
        got = blocks.block_forward("sdpa_cudnn", q, k, v, 0.25, True, fallback=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    out, lse = expected
    with pytest.warns(RuntimeWarning, match="backward"):
        grads = blocks.block_backward("sdpa_cudnn", q, k, v, grad_out, out, lse, 0.25, True, fallback=True)
    torch.testing.assert_close(grads, blocks.math_backward(q, k, v, grad_out, out, lse, 0.25, True), rtol=0, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same shape again: no second warning
        blocks.block_forward("sdpa_cudnn", q, k, v, 0.25, True, fallback=True)
    with pytest.raises(RuntimeError, match="No valid engine"):
        blocks.block_forward("sdpa_cudnn", q, k, v, 0.25, True, fallback=False)


def test_kernel_choice_on_cpu():
    from lightning_seqpar.attention.ring import choose_kernel

    x = torch.zeros(1, 4, 2, 8)
    assert choose_kernel(x, "auto") == ("math", False)
    assert choose_kernel(x, "math") == ("math", False)


def test_single_rank_is_local_attention():
    from lightning_seqpar.attention import local_attention
    from lightning_seqpar.attention.ring import ring_attention

    q, k, v, _ = _inputs("single", 2, 9, 2, 16)
    expected = local_attention(q, k, v, causal=True, backend="math")
    torch.testing.assert_close(ring_attention(q, k, v, None, causal=True), expected)


def test_hybrid_grid_errors_and_layout():
    from lightning_seqpar.attention.hybrid import build_hybrid_groups, hybrid_rank_grid

    assert hybrid_rank_grid([4, 5, 6, 7, 8, 9, 10, 11], 4) == (
        [[4, 5, 6, 7], [8, 9, 10, 11]],
        [[4, 8], [5, 9], [6, 10], [7, 11]],
    )
    assert hybrid_rank_grid([3, 1, 2, 0], 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    with pytest.raises(
        ValueError, match=r"ulysses_degree=3 must be a positive divisor of the sequence-parallel size 4"
    ):
        build_hybrid_groups([0, 1, 2, 3], 3)
    with pytest.raises(ValueError, match="ulysses_degree=0 must be a positive divisor"):
        build_hybrid_groups([0, 1], 0)
    with pytest.raises(ValueError, match="needs at least one sequence-parallel rank"):
        build_hybrid_groups([], 1)
    with pytest.raises(ValueError, match=r"contains a rank more than once"):
        build_hybrid_groups([0, 1, 1, 2], 2)


# ---------------------------------------------------------------------------------------------------------
# CUDA: the cuDNN and flash block kernels against the math one (run on the GPU machine; the ring logic around the
# kernels is the one the gloo tests above check).
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN and flash block kernels need CUDA")
@pytest.mark.parametrize("kernel", ["sdpa_cudnn", "sdpa_flash"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_blocks_match_math(kernel, causal, head_dim):
    """The last rank of a 2-rank ring, in bf16: its own (diagonal) block, then the earlier one, merged by LSE;
    backward from the final output and LSE. The CUDA kernel must be as close to float64 as the math one."""
    from lightning_seqpar.attention import blocks, math_attention

    B, H, lengths = 2, 4, (301, 300)
    q, k, v, grad_out = (t.cuda() for t in _inputs(f"cuda-{head_dim}", B, sum(lengths), H, head_dim))
    q, grad_out = q[:, lengths[0] :], grad_out[:, lengths[0] :]  # [B, L_1, H, d]: queries of rank 1
    scale = head_dim**-0.5
    qf, kf, vf = (t.double().requires_grad_() for t in (q, k, v))
    keep = torch.ones(lengths[1], sum(lengths), dtype=torch.bool, device="cuda").tril(lengths[0]) if causal else None
    ref = math_attention(qf, kf, vf, attn_mask=keep)
    ref.backward(grad_out.double())
    expected = {"out": ref.detach(), "dq": qf.grad, "dk": kf.grad, "dv": vf.grad}

    errors = {}
    for name in (kernel, "math"):
        qb, kb, vb, gb = (t.bfloat16() for t in (q, k, v, grad_out))
        block_list = [(1, kb[:, lengths[0] :], vb[:, lengths[0] :]), (0, kb[:, : lengths[0]], vb[:, : lengths[0]])]
        out = torch.zeros(qb.shape, dtype=torch.float32, device="cuda")
        lse = torch.full((B, H, lengths[1]), float("-inf"), device="cuda")
        for owner, kk, vv in block_list:
            out, lse = blocks.merge_block(
                out, lse, *blocks.block_forward(name, qb, kk, vv, scale, causal and owner == 1)
            )
        out = out.bfloat16()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for owner, kk, vv in block_list:
            sl = slice(lengths[0], None) if owner == 1 else slice(0, lengths[0])
            grads = blocks.block_backward(name, qb, kk, vv, gb, out, lse, scale, causal and owner == 1)
            dq += grads[0].float()
            dk[:, sl] += grads[1].float()
            dv[:, sl] += grads[2].float()
        got = {"out": out, "dq": dq, "dk": dk, "dv": dv}
        errors[name] = {n: relative_error(got[n].double(), expected[n]) for n in expected}
    for n in expected:
        assert errors[kernel][n] < 2e-2, f"{kernel} {n}: relative error {errors[kernel][n]:.2e}"
        assert errors[kernel][n] < 2 * errors["math"][n] + 2e-3, (n, errors)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN and flash block kernels need CUDA")
@pytest.mark.parametrize("kernel", ["sdpa_cudnn", "sdpa_flash"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ring_function_cuda_path_on_one_rank(kernel, causal):
    """The autograd Function's CUDA path end to end (one block, no peers) against float64 attention."""
    from lightning_seqpar.attention import math_attention, ring
    from lightning_seqpar.comm import SequenceLayout

    q, k, v, grad_out = (t.cuda() for t in _inputs("cuda-function", 2, 257, 4, 64))
    qf, kf, vf = (t.double().requires_grad_() for t in (q, k, v))
    ref = math_attention(qf, kf, vf, causal=causal)
    ref.backward(grad_out.double())
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = ring._RingAttention.apply(qb, kb, vb, None, SequenceLayout((257,)), 64**-0.5, causal, kernel, False, None)
    out.backward(grad_out.bfloat16())
    for name, got, expected in (
        ("out", out, ref),
        ("dq", qb.grad, qf.grad),
        ("dk", kb.grad, kf.grad),
        ("dv", vb.grad, vf.grad),
    ):
        err = relative_error(got.double(), expected.detach())
        assert err < 2e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_kernel_is_cudnn_with_fallback_on_cuda():
    """``auto`` picks cuDNN on bf16 d=64 (with fallback), flash where cuDNN's head-dim limit is passed, math on fp32."""
    from lightning_seqpar.attention.ring import choose_kernel

    x = torch.zeros(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert choose_kernel(x, "auto") == ("sdpa_cudnn", True)
    assert choose_kernel(torch.zeros(1, 8, 2, 256, device="cuda", dtype=torch.bfloat16), "auto") == (
        "sdpa_flash",
        False,
    )
    assert choose_kernel(x.float(), "auto") == ("math", False)
    assert choose_kernel(x, "sdpa_cudnn") == ("sdpa_cudnn", False)
