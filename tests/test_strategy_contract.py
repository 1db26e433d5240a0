"""The central contract: training under SeqParStrategy equals single-process training on the same global batch.

For sp in {2, 4} x dp in {1, 2} (world <= 4), Ulysses and LSS, 13 tokens (divisible by neither 2 nor 4),
parameters before, inside and after the sequence-parallel region, loss on the gathered output, SGD with
momentum: parameters after three steps must match within relative error 1e-5 (fp32, CPU, gloo). The two
4-process layouts run in one launch.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed_each
from tests.models import build_dataset, train_reference

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(1200)]

SEED, STEPS, BATCH = 1234, 3, 2
CONFIGS = [("timm_vit", "ulysses"), ("timm_vit", "lss"), ("torch_encoder", "ulysses"), ("sdpa_vit", "lss")]
# Hugging Face transformers' ViT (SDPA interception) and a vit-pytorch-shaped ViT (built-in adapter, container blocks).
THIRD_PARTY = [("hf_vit", "ulysses"), ("container_vit", "lss")]
# The bundled ClimaX through its own plan (tokens sharded after patchify, position embedding sliced per rank).
CLIMAX = [("climax", "ulysses"), ("climax", "lss")]
# Ring, and hybrid as 2 (Ulysses) x 2 (ring) on sp = 4.
RING_HYBRID = [("timm_vit", "ring"), ("sdpa_vit", "hybrid")]


def contract_worker(sp: int, configs: list, strategy_kwargs: dict | None = None, accelerator: str = "cpu",
                    precision: str = "32-true") -> dict:
    """Train each (model, attention) config under the strategy on this rank; on ``accelerator="gpu"`` (NCCL, one
    GPU per rank) TF32 is turned off so that fp32 is full precision."""
    import os

    from lightning.pytorch import Callback, Trainer, seed_everything
    from torch._dynamo.utils import counters
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy
    from tests.models import RegressionModule, build_dataset

    world = int(os.environ["WORLD_SIZE"])
    if accelerator == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    class SyncedSampleCount(Callback):
        """The torchmetrics total, synced while the module is still on its device (after fit it is on the CPU,
        which an NCCL group cannot reduce)."""

        def on_train_start(self, trainer, pl_module):
            mesh = pl_module.device_mesh  # what the LightningModule sees, as under ModelParallelStrategy
            self.mesh = (mesh.mesh_dim_names, tuple(mesh.shape), mesh is trainer.strategy.device_mesh,
                         mesh.get_group("sp") is trainer.strategy.topology.sequence_group)

        def on_train_end(self, trainer, pl_module):
            self.value = pl_module.samples.compute().item()

    results = {}
    for model_name, attention in configs:
        counted = SyncedSampleCount()
        seed_everything(SEED)
        module = RegressionModule(model_name)
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        trainer = Trainer(
            accelerator=accelerator,
            precision=precision,
            devices=world,
            strategy=SeqParStrategy(
                sequence_parallel_size=sp,
                attention=attention,
                timeout=300,
                ulysses_degree=2 if attention == "hybrid" else None,
                **(strategy_kwargs or {}),
            ),
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[counted],
        )
        counters.clear()
        trainer.fit(module, DataLoader(build_dataset(model_name), batch_size=BATCH))
        results[(model_name, attention)] = {
            "compiled_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "initial": initial,
            "final": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            "seen": module.seen,
            "samples_logged": trainer.callback_metrics["samples_in_step"].item(),
            "samples_metric": counted.value,
            "topology": (trainer.strategy.topology.dp_rank, trainer.strategy.topology.sp_rank),
            "device_mesh": counted.mesh,
            "plan": str(trainer.strategy.applied_plan.plan) if trainer.strategy.applied_plan else None,
            "plain_after_teardown": "forward" not in module.model.blocks[0].__dict__
            if hasattr(module.model, "blocks")
            else True,
        }
    return results


def _max_rel_error(a: dict, b: dict) -> tuple[float, str]:
    """Largest per-tensor relative error ||a - b|| / ||b||. Tensors that stay near zero (||b|| < 1e-3, e.g. a
    key-projection bias, whose true gradient is exactly zero because softmax ignores a per-query constant)
    have no meaningful relative error: for them the absolute difference must stay under 1e-7 instead."""
    worst, name = 0.0, ""
    for key in b:
        diff, scale = (a[key] - b[key]).norm().item(), b[key].norm().item()
        err = diff / scale if scale >= 1e-3 else (0.0 if diff <= 1e-7 else float("inf"))
        if err > worst:
            worst, name = err, key
    return worst, name


LAYOUTS = [
    (2, 2, CONFIGS + THIRD_PARTY + RING_HYBRID[:1] + CLIMAX),
    (4, 4, CONFIGS + RING_HYBRID + CLIMAX[:1]),
    (4, 2, CONFIGS[:2] + THIRD_PARTY[:1]),
]


@pytest.fixture(scope="module")
def launches():
    """``launches(world)``: per (world, sp) of LAYOUTS with that world, each rank's contract_worker results; the
    layouts of one world size run in turn in ONE launch (process start-up dominates on a loaded 2-core machine)."""
    cache: dict[tuple[int, int], list] = {}

    def get(world: int, sp: int) -> list:
        if (world, sp) not in cache:
            layouts = [(w, s, configs) for w, s, configs in LAYOUTS if w == world]
            calls = [("tests.test_strategy_contract:contract_worker", {"sp": s, "configs": configs})
                     for _, s, configs in layouts]
            results = run_distributed_each(calls, world, timeout=400 * len(calls))
            cache.update({(w, s): r for (w, s, _), r in zip(layouts, results)})
        return cache[(world, sp)]

    return get


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world,sp,configs", LAYOUTS, ids=["sp2-dp1", "sp4-dp1", "sp2-dp2"])
def test_training_equals_single_process(launches, world, sp, configs):
    check_contract(launches(world, sp), world, sp, configs)


def check_contract(per_rank: list[dict], world: int, sp: int, configs: list, tolerance: float = 1e-5,
                   update_tolerance: float | None = None) -> dict:
    """Batches, sample counts and parameters of every rank against single-process training (CPU, fp32).

    ``tolerance`` bounds each tensor's relative error; with ``update_tolerance`` (bf16) the bound is instead on the
    parameter updates of all tensors together, ||(final - initial) - (reference - initial)|| / ||reference - initial||.
    Returns the worst error per config."""
    dp = world // sp
    worst = {}
    for config in configs:
        dataset = build_dataset(config[0])
        ranks = [r[config] for r in per_rank]
        assert [r["topology"] for r in ranks] == [(rank // sp, rank % sp) for rank in range(world)]
        # The LightningModule sees the strategy's mesh (names, shape), whose sp group is the one attention uses.
        assert all(r["device_mesh"] == (("pp", "dp", "sp", "tp"), (1, dp, sp, 1), True, True) for r in ranks), config
        # Every rank of an SP group saw the same samples; different DP ranks saw different ones.
        for d in range(dp):
            group = ranks[d * sp : (d + 1) * sp]
            assert all(g["seen"] == group[0]["seen"] for g in group), (
                f"{config}: SP ranks of dp {d} saw different batches"
            )
        leaders = [ranks[d * sp] for d in range(dp)]
        global_batches = [sum((leader["seen"][t] for leader in leaders), []) for t in range(STEPS)]
        assert all(len(set(b)) == BATCH * dp for b in global_batches)
        # Each sample is counted once by sync_dist sums and by torchmetrics, not once per SP rank.
        assert ranks[0]["samples_logged"] == BATCH * dp
        assert ranks[0]["samples_metric"] == STEPS * BATCH * dp
        reference = train_reference(config[0], SEED, global_batches, dataset)
        untrained = train_reference(config[0], SEED, [], dataset)
        for key, value in ranks[0]["initial"].items():
            torch.testing.assert_close(value, untrained[key])
        for rank, r in enumerate(ranks):
            if update_tolerance is None:
                err, name = _max_rel_error(r["final"], reference)
                assert err < tolerance, f"{config} rank {rank}: parameter {name} off by relative error {err:.2e}"
            else:
                keys = [k for k in reference if reference[k].is_floating_point()]
                got = torch.cat([(r["final"][k] - untrained[k]).flatten().double() for k in keys])
                want = torch.cat([(reference[k] - untrained[k]).flatten().double() for k in keys])
                err = ((got - want).norm() / want.norm()).item()
                assert err < update_tolerance, (
                    f"{config} rank {rank}: parameter updates off by relative error {err:.2e}"
                )
            worst[config] = max(worst.get(config, 0.0), err)
            moved, _ = _max_rel_error(r["final"], r["initial"])
            assert moved > 1e-3, "training did not change the parameters"
            assert r["plain_after_teardown"]
    return worst
