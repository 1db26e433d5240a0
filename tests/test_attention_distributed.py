"""Ulysses and LSS attention across gloo processes against single-process full attention: outputs, q/k/v gradients
and the collectives each one issues."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import CollectiveCounter, init_gloo, relative_error, run_distributed

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(1200)]

# (name, world, B, L, H, d, causal)
CASES = [
    ("even", 2, 2, 16, 4, 32, False),
    ("L197_P4", 4, 2, 197, 8, 32, False),
    ("H6_P4", 4, 3, 40, 6, 64, False),
    ("L7_H3_P2", 2, 1, 7, 3, 64, False),
    ("causal_L13_P4", 4, 2, 13, 4, 32, True),
]


def attention_worker(world: int, cases: list) -> dict:
    from lightning_seqpar.attention import local_attention, lss_attention, ulysses_attention
    from lightning_seqpar.comm import split_sizes

    init_gloo()
    rank = dist.get_rank()
    group = dist.new_group(list(range(world)))
    results = {}
    for name, _, B, L, H, d, causal in cases:
        for kind, fn in (("ulysses", ulysses_attention), ("lss", lss_attention)):
            gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{kind}".encode()))
            q, k, v, grad_out = (torch.randn(B, L, H, d, generator=gen, dtype=torch.float64).float() for _ in range(4))
            # Reference on the full sequence, in float64.
            qf, kf, vf = (t.double().requires_grad_() for t in (q, k, v))
            ref = local_attention(qf, kf, vf, causal=causal, backend="math")
            ref.backward(grad_out.double())
            sizes = split_sizes(L, world)
            start = sum(sizes[:rank])
            local = [t[:, start : start + sizes[rank]].clone().requires_grad_() for t in (q, k, v)]
            with CollectiveCounter() as fwd:
                out = fn(*local, group, causal=causal, sequence_lengths=sizes)
            with CollectiveCounter() as bwd:
                out.backward(grad_out[:, start : start + sizes[rank]])
            # Also without the lengths: one extra small exchange of the lengths, same result.
            with CollectiveCounter() as inferred:
                out_inferred = fn(*(t.detach() for t in local), group, causal=causal)
            sl = slice(start, start + sizes[rank])
            results[(name, kind)] = {
                "out": relative_error(out.double(), ref[:, sl].detach()),
                "out_inferred": relative_error(out_inferred.double(), ref[:, sl].detach()),
                "dq": relative_error(local[0].grad.double(), qf.grad[:, sl]),
                "dk": relative_error(local[1].grad.double(), kf.grad[:, sl]),
                "dv": relative_error(local[2].grad.double(), vf.grad[:, sl]),
                "fwd": fwd.calls,
                "bwd": bwd.calls,
                "inferred": inferred.calls,
                "local_elems": B * sizes[rank] * H * d,
            }
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request):
    world = request.param
    cases = [c for c in CASES if c[1] == world]
    merged = {}
    for res in run_distributed("tests.test_attention_distributed:attention_worker", world, world=world, cases=cases):
        for key, value in res.items():
            merged.setdefault(key, []).append(value)
    return world, merged


@pytest.mark.parametrize("kind", ["ulysses", "lss"])
def test_matches_full_attention(results, kind):
    world, merged = results
    checked = 0
    for (name, k), per_rank in merged.items():
        if k != kind:
            continue
        for rank, r in enumerate(per_rank):
            for field in ("out", "out_inferred", "dq", "dk", "dv"):
                assert r[field] < 1e-5, f"{kind} {name} rank {rank}: {field} relative error {r[field]:.2e}"
            checked += 1
    assert checked > 0


def test_ulysses_collectives(results):
    """One all-to-all of packed q, k, v and one of the output forward; the same two backward; nothing else."""
    world, merged = results
    for (name, kind), per_rank in merged.items():
        if kind != "ulysses":
            continue
        for r in per_rank:
            assert [c for c, _ in r["fwd"]] == ["all_to_all_single", "all_to_all_single"], (name, r["fwd"])
            assert [c for c, _ in r["bwd"]] == ["all_to_all_single", "all_to_all_single"], (name, r["bwd"])
            # The first moves q, k and v together: three times this rank's share of one tensor.
            assert r["fwd"][0][1] == 3 * r["local_elems"]
            assert r["fwd"][1][1] < r["fwd"][0][1]
            assert [c for c, _ in r["inferred"]] == ["all_gather_into_tensor", "all_to_all_single", "all_to_all_single"]
            assert r["inferred"][0][1] == 1


def test_lss_collectives(results):
    """One fused all-gather of k and v forward and one reduce-scatter backward, of the padded local size."""
    world, merged = results
    for (name, kind), per_rank in merged.items():
        if kind != "lss":
            continue
        longest = max(r["local_elems"] for r in per_rank)
        for r in per_rank:
            assert [c for c, _ in r["fwd"]] == ["all_gather_into_tensor"], (name, r["fwd"])
            assert [c for c, _ in r["bwd"]] == ["reduce_scatter_tensor"], (name, r["bwd"])
            assert r["fwd"][0][1] == 2 * longest  # k and v of this rank, padded to the longest rank
            assert r["bwd"][0][1] == 2 * longest * world
