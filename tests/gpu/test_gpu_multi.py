"""Sequence parallelism across several GPUs of one host with NCCL: one process per GPU, world 2 (and 4 where the
machine has 4 GPUs). Skipped with fewer than 2 GPUs; run on the GPU machine, not in CI:

    NCCL_NVLS_ENABLE=0 python -m pytest -m gpu tests/gpu/test_gpu_multi.py

Tolerances (stated per test, printed in the assertion messages):

- attention (bf16 q, k, v sharded over the GPUs against fp32 full attention of the same bf16 inputs on one GPU,
  TF32 off): relative error ||out - ref|| / ||ref|| < 2e-2 for the output and dq, dk, dv, as in the one-GPU tier;
- the strategy in fp32 (TF32 off) against single-process CPU fp32 training: every parameter within relative error
  1e-4 after 3 SGD-with-momentum steps (only the summation order differs);
- the strategy in bf16-mixed against the same CPU fp32 reference: the parameter updates of all tensors together
  within relative error 5e-2 (bf16 rounds the matmul inputs to 8 bits of mantissa).
"""

from __future__ import annotations

import datetime
import os
import zlib

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 or more GPUs"),
    pytest.mark.timeout(600),
]

ATTENTION_TOLERANCE = 2e-2
# (name, B, L, H, d, causal): L not divisible by the world size, nor by the kernels' tiles.
CASES = [("L1001_d64", 2, 1001, 8, 64, False), ("L4099_d128_causal", 1, 4099, 16, 128, True)]
WORLDS = [w for w in (2, 4) if torch.cuda.is_available() and torch.cuda.device_count() >= w] or [2]
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}


def _init_nccl() -> int:
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", local_rank))
    return local_rank


def attention_worker(cases: list) -> dict:
    """Every attention kind over all ranks of an NCCL group; errors of this rank's output and gradient shards."""
    import torch.distributed as dist

    from lightning_seqpar.attention import local_attention, lss_attention, ulysses_attention
    from lightning_seqpar.attention.hybrid import build_hybrid_groups, hybrid_attention
    from lightning_seqpar.attention.ring import ring_attention
    from lightning_seqpar.comm import split_sizes

    _init_nccl()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    kinds = {
        "ulysses": lambda *t, **kw: ulysses_attention(*t, group, **kw),
        "lss": lambda *t, **kw: lss_attention(*t, group, **kw),
        "ring": lambda *t, **kw: ring_attention(*t, group, **kw),
    }
    if world >= 4:
        ulysses_group, ring_group = build_hybrid_groups(range(world), 2)
        kinds["hybrid"] = lambda *t, **kw: hybrid_attention(*t, ulysses_group, ring_group, **kw)
    results = {}
    for name, B, L, H, d, causal in cases:
        for kind, fn in kinds.items():
            gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{name}-{kind}".encode()))
            q, k, v, grad_out = (torch.randn(B, L, H, d, device="cuda", generator=gen).bfloat16() for _ in range(4))
            qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
            ref = local_attention(qf, kf, vf, causal=causal, backend="math")
            ref.backward(grad_out.float())
            sizes = split_sizes(L, world)
            sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            local = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
            out = fn(*local, causal=causal, sequence_lengths=sizes)
            out.backward(grad_out[:, sl])
            rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
            results[(name, kind)] = {
                "dtype": str(out.dtype),
                "out": rel(out, ref[:, sl].detach()),
                "dq": rel(local[0].grad, qf.grad[:, sl]),
                "dk": rel(local[1].grad, kf.grad[:, sl]),
                "dv": rel(local[2].grad, vf.grad[:, sl]),
            }
    dist.barrier()
    return results


@pytest.mark.parametrize("world", WORLDS)
def test_attention_across_gpus_matches_full_attention(world):
    per_rank = run_distributed(
        "tests.gpu.test_gpu_multi:attention_worker", world, timeout=300, env=NCCL_ENV, cases=CASES
    )
    expected = {"ulysses", "lss", "ring"} | ({"hybrid"} if world >= 4 else set())
    assert {kind for _, kind in per_rank[0]} == expected
    for rank, results in enumerate(per_rank):
        for (name, kind), r in results.items():
            assert r["dtype"] == "torch.bfloat16"
            errors = {f: r[f] for f in ("out", "dq", "dk", "dv")}
            assert max(errors.values()) < ATTENTION_TOLERANCE, f"{kind} {name} rank {rank}: relative errors {errors}"


# (model, attention): the timm-shaped ViT (Ulysses), SDPA interception (LSS), ring, and the bundled ClimaX's plan.
STRATEGY_CONFIGS = [("timm_vit", "ulysses"), ("sdpa_vit", "lss"), ("timm_vit", "ring"), ("climax", "ulysses")]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_strategy_across_gpus_equals_single_process(precision):
    from tests.test_strategy_contract import check_contract

    world = 2
    per_rank = run_distributed(
        "tests.test_strategy_contract:contract_worker", world, timeout=400, env=NCCL_ENV, sp=world,
        configs=STRATEGY_CONFIGS, accelerator="gpu", precision=precision,
        strategy_kwargs={"process_group_backend": "nccl"},
    )
    if precision == "32-true":
        worst = check_contract(per_rank, world, world, STRATEGY_CONFIGS, tolerance=1e-4)
    else:
        worst = check_contract(per_rank, world, world, STRATEGY_CONFIGS, update_tolerance=5e-2)
    print(f"{precision} worst relative error per config: {worst}")
