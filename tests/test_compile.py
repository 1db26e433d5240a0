"""``SeqParStrategy(compile_blocks=...)``: compiled blocks train exactly like eager single-process training.

The blocks run through ``torch.compile`` (inductor, CPU) while the distributed attention stays eager, so the
contract of tests/test_strategy_contract.py must still hold: parameters after three SGD-with-momentum steps
within relative error 1e-5 of single-process training, with and without activation checkpointing around the
compiled blocks, for an attention adapter (timm-shaped) and for SDPA interception. Both variants run in one
launch.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed_each
from tests.models import build_dataset, train_reference
from tests.test_strategy_contract import BATCH, SEED, STEPS, _max_rel_error

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(1200)]

CONFIGS = [("timm_vit", "ulysses"), ("sdpa_vit", "lss")]


CHECKPOINTING = [False, True]


def fresh_contract_worker(**kwargs) -> dict:
    """contract_worker after ``torch._dynamo.reset()``: blocks compile from scratch, as in a fresh process (the
    variants share a launch, and dynamo's caches would otherwise serve a variant the graphs of the one before)."""
    import torch._dynamo

    from tests.test_strategy_contract import contract_worker

    torch._dynamo.reset()
    return contract_worker(**kwargs)


@pytest.fixture(scope="module")
def launch() -> list:
    """Per CHECKPOINTING variant, each rank's results; both variants in ONE launch of 2 ranks, in turn."""
    calls = [
        ("tests.test_compile:fresh_contract_worker",
         {"sp": 2, "configs": CONFIGS, "strategy_kwargs": {"compile_blocks": True, "activation_checkpointing": c}})
        for c in CHECKPOINTING
    ]
    return run_distributed_each(calls, 2, timeout=800)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=["compiled", "compiled+checkpoint"])
def test_compiled_blocks_train_like_one_process(launch, checkpointing):
    per_rank = launch[CHECKPOINTING.index(checkpointing)]
    for config in CONFIGS:
        ranks = [r[config] for r in per_rank]
        # The blocks really were compiled (graphs produced), and broke their graph at the eager attention call.
        assert all(r["compiled_graphs"] >= 2 and r["graph_breaks"] >= 1 for r in ranks), [
            (r["compiled_graphs"], r["graph_breaks"]) for r in ranks
        ]
        reference = train_reference(
            config[0], SEED, [ranks[0]["seen"][t] for t in range(STEPS)], build_dataset(config[0])
        )
        for rank, r in enumerate(ranks):
            assert len(r["seen"][0]) == BATCH
            err, name = _max_rel_error(r["final"], reference)
            assert err < 1e-5, f"{config} rank {rank}: parameter {name} off by relative error {err:.2e}"
            assert r["plain_after_teardown"]
