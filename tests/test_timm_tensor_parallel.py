"""Tensor parallelism (with and without Megatron-LM sequence parallelism) and FSDP2 on the real timm ViT, on the CPU
over gloo, against one process: the fp32 cases of tests/gpu/test_gpu_tensor_parallel.py (129 tokens: uneven
shards over tp). Skipped where timm cannot be imported (PyPI's torchvision, which timm needs, loads with PyPI's
torch, not with the CPU build CI installs); run under torch 2.11 with timm 1.0.29 and torchvision 0.26."""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.models import timm_imports


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not timm_imports(), reason="timm (with torchvision) does not import here")
def test_tensor_parallel_and_fsdp2_with_real_timm_equal_one_process():
    from tests.gpu.test_gpu_tensor_parallel import check_real_timm_runs

    per_rank = run_distributed("tests.gpu.test_gpu_tensor_parallel:worker", 2, timeout=600, device_type="cpu")
    print("versions:", per_rank[0]["versions"])
    check_real_timm_runs(per_rank)


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not timm_imports(), reason="timm (with torchvision) does not import here")
def test_strategy_line_with_real_timm_equals_one_process():
    from tests.gpu.test_gpu_tensor_parallel import STRATEGY_CASES, check_strategy_runs

    per_rank = run_distributed("tests.gpu.test_gpu_tensor_parallel:strategy_worker", 2, timeout=600,
                               device_type="cpu")
    assert {n for n, _, p, _ in STRATEGY_CASES if p == "32-true"} == set(per_rank[0])  # tp2, fsdp2, fsdp2 over sp2
    check_strategy_runs(per_rank)
