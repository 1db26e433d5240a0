"""FSDP2 (lightning_seqpar.fsdp) against single-process training, and DCP checkpoints across layouts, on CPU with gloo.

FSDP2 over 2 ranks (dp 2) and over 4 (sp 2 x dp 2: the sequence-parallel ranks' gradients averaged too), tp 2 x
FSDP2 2, each 3 steps compared with single-process training (parameters within relative error 1e-5, fp32). A model
built on the meta device, sharded, then materialised with its own ``init_weights``. A DCP checkpoint written at
tp 2 x FSDP2 2 (4 ranks, AdamW state included) resumed at FSDP2 over 2 ranks and on 1 rank, each continuing exactly
as the uninterrupted run, and consolidated into one ``torch.save`` file that holds the single-device state dict.
All of it in three launches (4, 2 and 1 ranks), each rank running its layouts in turn.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed, run_distributed_each
from tests.test_tensor_parallel import (
    TOLERANCE,
    check_against_single_process,
    check_token_sharding,
    max_rel_error,
    without_key_bias,
)

WORKER = "tests.tp_workers:parallel_worker"
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(1800)]  # the first test waits for all three launches


LAYOUTS = {
    "fsdp2": (2, {"dp": 2}, [{"name": "block", "fsdp": True}, {"name": "hf_vit", "fsdp": True}]),
    "fsdp2-over-sp2xdp2": (
        4,
        {"dp": 2, "sp": 2},
        [{"name": "block", "fsdp": True}, {"name": "torch_encoder", "fsdp": True}],
    ),
    "tp2xfsdp2": (
        4,
        {"dp": 2, "tp": 2},
        [{"name": "block", "fsdp": True, "reload": True}, {"name": "hf_dinov2", "fsdp": True}],
    ),
}
CASES = [(layout, i) for layout, (_, _, runs) in LAYOUTS.items() for i in range(len(runs))]


DCP_RUN = {"name": "block", "optimizer": "adamw", "fsdp": True, "at_step": 2}


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Three launches (process start-up dominates on a loaded 2-core machine), each rank running in turn:

    - 4 ranks: the sp 2 x dp 2 layout's runs; the tp 2 x dp 2 layout's runs and the uninterrupted tp 2 x FSDP2 2
      AdamW run writing a DCP checkpoint after step 2;
    - 2 ranks: the dp 2 layout's runs and that checkpoint resumed under FSDP2 over 2 ranks; the meta-device ClimaX;
    - 1 rank: the checkpoint resumed on one rank.

    Returns ``{"layouts": {layout: per-rank lists of results}, "dcp": (path, saved, on_two, on_one), "meta": ...}``."""
    path = str(tmp_path_factory.mktemp("dcp") / "step2")

    def call(layout: str, *extra: dict) -> tuple[str, dict]:
        _, sizes, runs = LAYOUTS[layout]
        return WORKER, {"runs": [*runs, *extra], **sizes}

    over_sp, over_tp = run_distributed_each(
        [call("fsdp2-over-sp2xdp2"), call("tp2xfsdp2", dict(DCP_RUN, save=path))], 4, timeout=800
    )
    over_dp, meta = run_distributed_each(
        [call("fsdp2", dict(DCP_RUN, load=path)), ("tests.test_fsdp2:meta_worker", {})], 2, timeout=600
    )
    on_one = [r[0] for r in run_distributed(WORKER, 1, timeout=600, runs=[dict(DCP_RUN, load=path, fsdp=False)])]
    layouts = {
        "fsdp2-over-sp2xdp2": over_sp, "tp2xfsdp2": [r[:-1] for r in over_tp], "fsdp2": [r[:-1] for r in over_dp]
    }
    dcp = (path, [r[-1] for r in over_tp], [r[-1] for r in over_dp], on_one)
    return {"layouts": layouts, "dcp": dcp, "meta": meta}


@pytest.mark.parametrize(
    "layout,index", CASES, ids=[f"{layout}-{LAYOUTS[layout][2][i]['name']}" for layout, i in CASES]
)
def test_fsdp2_equals_single_process(launches, layout, index):
    per_rank = [ranks[index] for ranks in launches["layouts"][layout]]
    tp = LAYOUTS[layout][1].get("tp", 1)
    check_token_sharding(per_rank, tp, sequence_parallel=tp > 1)  # tokens of the norms sharded over tp, if any
    check_against_single_process(per_rank, LAYOUTS[layout][2][index]["name"])


def meta_worker() -> dict:
    """ClimaX built on the meta device, FSDP2 over 2 ranks, materialised with its own init_weights."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_seqpar.fsdp import apply_fsdp, materialize_meta_model
    from lightning_seqpar.weather.models import ClimaX
    from tests.dist_utils import init_gloo
    from tests.tp_workers import full_state_dict

    init_gloo()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_sp",))
    model = ClimaX(["t2m", "z500", "t850"], (12, 20), patch_size=4, embed_dim=32, depth=2, num_heads=4, device="meta")
    apply_fsdp(model, mesh)
    shard = model.pos_embed.to_local()
    materialize_meta_model(model, "cpu")
    return {
        "full": full_state_dict(model),
        "local_rows": model.blocks[0].attn.qkv.weight.to_local().shape[0],
        "meta": shard.is_meta,
    }


def test_meta_device_model_is_materialised_sharded_with_its_own_init(launches):
    from lightning_seqpar.weather.models import ClimaX

    per_rank = launches["meta"]
    single = ClimaX(["t2m", "z500", "t850"], (12, 20), patch_size=4, embed_dim=32, depth=2, num_heads=4).state_dict()
    for r in per_rank:
        assert r["meta"] and r["local_rows"] == 96 // 2  # each rank allocated half of qkv's [3 D, D]
        assert sorted(r["full"]) == sorted(single)
        # Deterministic parts of the init are those of a single-device model; random parts have its statistics.
        for key in ("pos_embed", "var_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "var_agg.query"):
            torch.testing.assert_close(r["full"][key], single[key], rtol=0, atol=0)
        weight = r["full"]["blocks.1.mlp.fc1.weight"]
        assert abs(weight.std().item() - 0.02) < 0.004 and abs(weight.mean().item()) < 0.004  # trunc_normal(std=0.02)
        assert not torch.equal(weight[:32], weight[32:])  # each rank's shard drew its own numbers
    torch.testing.assert_close(per_rank[0]["full"], per_rank[1]["full"])


def test_dcp_checkpoint_of_4_ranks_resumes_on_2_and_on_1(launches):
    _, saved, on_two, on_one = launches["dcp"]
    check_against_single_process(saved, "block", "adamw")
    want = without_key_bias(saved[0]["final"])
    for run, label in ((on_two, "FSDP2 on 2 ranks"), (on_one, "1 rank")):
        for r in run:
            # The third step from the checkpoint (weights and AdamW moments, fused rows re-split for the new layout)
            # ends where the uninterrupted run ends.
            err, key = max_rel_error(r["at_checkpoint"], saved[0]["at_checkpoint"])
            assert err == 0.0, f"loaded on {label}: {key} differs from the saved weights"
            err, key = max_rel_error(without_key_bias(r["final"]), want)
            assert err < TOLERANCE, f"resumed on {label}: {key} off by relative error {err:.2e}"
            torch.testing.assert_close(r["losses"][-1], saved[0]["losses"][-1], rtol=TOLERANCE, atol=0)


def test_dcp_checkpoint_consolidates_to_the_single_device_state_dict(launches, tmp_path):
    from lightning_seqpar.fsdp import consolidate_checkpoint
    from tests.tp_workers import BundledBlockViT

    path, saved, _, _ = launches["dcp"]
    state = torch.load(consolidate_checkpoint(path, tmp_path / "step2.pt"), weights_only=False)
    assert sorted(state["model"]) == sorted(BundledBlockViT().state_dict())
    assert sorted(state["optimizer"]["state"]) == sorted(n for n, _ in BundledBlockViT().named_parameters())
    err, key = max_rel_error(state["model"], saved[0]["at_checkpoint"])
    assert err == 0.0, f"consolidated {key} differs from the weights the 4 ranks saved"
