"""Tensor parallelism and FSDP2 through ``Trainer(strategy=SeqParStrategy(...))`` against single-process training.

Unit tests: the argument errors (tp with DeepSpeed, fsdp with DeepSpeed, bad sizes and plans, world sizes that do not
factor) and the engine each argument set builds. Multi-process (CPU, gloo, 4 ranks): tp 2 x sp 2 and tp 2 x dp 2 on
the DDP engine, FSDP2 over sp 2 x dp 2, and tp 2 x sp 2 with FSDP2 over the sp ranks, on the bundled timm-shaped
ViT (4 heads, 13 tokens: sp shards are uneven); the real Hugging Face ViTModel at tp 2 x sp 2 (DDP engine) and
tp 2 x FSDP2 2; 2 samples per data-parallel rank, SGD with momentum, 3 steps. On the DDP engine with tp, the
weights-only checkpoint holds whole tensors and loads back exactly; a full one also holds the optimizer state. FSDP2: a
checkpoint directory saved at dp 2 resumes at sp 2. The 4-rank configurations all run in one launch.
Each: every rank's whole (gathered) parameters within relative error 1e-5 of single-process training on the same
global batches (the contract's measure), the batches each rank saw (the ranks of one dp coordinate the same samples),
and the logged sample count equal to the global batch (not multiplied by sp or tp).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch import LightningModule

from tests.dist_utils import run_distributed

SEED, STEPS, BATCH, TOLERANCE = 1234, 3, 2, 1e-5


class TensorParallelModule(LightningModule):
    """The bundled-Block ViT of tests/tp_workers.py (built from the same seed on every rank), MSE, SGD with momentum."""

    def __init__(self, model_name: str = "block") -> None:
        super().__init__()
        from tests.tp_workers import build

        self.model = build(model_name)
        self.seen: list[list[int]] = []
        self.samples = torchmetrics.SumMetric()

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        self.plan_applied = self.trainer.strategy.applied_plan is not None
        loss = F.mse_loss(self.model(batch["x"]), batch["y"])
        self.log("samples_in_step", float(len(batch["x"])), reduce_fx="sum", sync_dist=True)
        self.samples.update(torch.tensor(float(len(batch["x"]))))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self.model(batch["x"]), batch["y"]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def strategy_worker(configs: list[dict]) -> list[dict]:
    """Fit :class:`TensorParallelModule` under ``SeqParStrategy(**config)`` for each config; return what each rank saw
    and its whole parameters (gathered over tp / FSDP2 shards: a collective on every rank)."""
    import os

    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy
    from tests.tp_workers import dataset

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])  # read once: Lightning's teardown removes it
    results = []
    for config in configs:
        config = dict(config)
        model_name = config.pop("model", "block")
        module = TensorParallelModule(model_name)
        trainer = Trainer(
            accelerator="cpu", devices=world, max_steps=STEPS, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            strategy=SeqParStrategy(timeout=300, **config),
        )
        trainer.fit(module, DataLoader(dataset(model_name), batch_size=BATCH))
        topology = trainer.strategy.topology
        saved = None
        if config.get("tensor_parallel_size", 1) > 1 and not config.get("fsdp"):
            # The DDP engine saves whole weights (gathered over tp: every rank calls) and refuses the optimizer state.
            path = os.path.join(os.environ["SEQPAR_TEST_OUT"], f"weights{len(results)}.ckpt")
            trainer.save_checkpoint(path)  # whole weights and the whole optimizer state (tests/test_tp_checkpoint.py)
            optimizer_keys = sorted(torch.load(path, weights_only=False)["optimizer_states"][0]["state"])
            trainer.save_checkpoint(path, weights_only=True)
            trainer.strategy.barrier()
            # ... and loads them into a fresh module split over tp (validate restores the weights only).
            fresh = TensorParallelModule(model_name)
            evaluator = Trainer(accelerator="cpu", devices=world, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, strategy=SeqParStrategy(timeout=300, **config))
            evaluator.validate(fresh, DataLoader(dataset(model_name), batch_size=BATCH, shuffle=False), ckpt_path=path)
            saved = {"optimizer_keys": optimizer_keys, "state_dict": torch.load(path, weights_only=False)["state_dict"],
                     "reloaded": evaluator.strategy.full_state_dict()}
        results.append({
            "saved": saved,
            "engine": type(trainer.strategy).__name__,
            "coordinates": (topology.dp_rank, topology.sp_rank, topology.tp_rank),
            "mesh_shape": tuple(topology.mesh.shape),
            "seen": module.seen,
            "plan_applied": module.plan_applied,
            "samples_logged": trainer.callback_metrics["samples_in_step"].item(),
            "samples_metric": module.samples.compute().item(),
            "final": trainer.strategy.full_state_dict(),
            "split": [n for n, p in module.named_parameters() if type(p).__name__ == "DTensor"],
            "foreach": [group.get("foreach") for group in trainer.optimizers[0].param_groups],
        })
    return results


def check_against_single_process(per_rank: list[list[dict]], configs: list[dict]) -> None:
    from tests.reference import train_single_process
    from tests.test_tensor_parallel import max_rel_error
    from tests.tp_workers import dataset

    world = len(per_rank)
    for i, config in enumerate(configs):
        ranks = [r[i] for r in per_rank]
        tp, sp = config.get("tensor_parallel_size", 1), config.get("sequence_parallel_size", 1)
        dp = world // (tp * sp)
        # Rank layout ((dp_rank * sp + sp_rank) * tp + tp_rank) and the mesh (pp, dp, sp, tp).
        assert [r["coordinates"] for r in ranks] == [((k // tp) // sp, (k // tp) % sp, k % tp) for k in range(world)], (
            config
        )
        assert all(r["mesh_shape"] == (1, dp, sp, tp) for r in ranks), config
        if tp > 1 and not config.get("fsdp"):  # DTensors beside plain tensors: no CUDA multi-tensor kernel (GPU fault)
            assert all(r["foreach"] == [False] for r in ranks), [r["foreach"] for r in ranks]
        # The ranks of one dp coordinate (all its sp x tp ranks) saw the same samples; the dp ranks different ones.
        by_dp = [[r for r in ranks if r["coordinates"][0] == d] for d in range(dp)]
        assert all(r["seen"] == group[0]["seen"] for group in by_dp for r in group), config
        global_batches = [sum((group[0]["seen"][t] for group in by_dp), []) for t in range(STEPS)]
        assert all(len(set(b)) == BATCH * dp for b in global_batches), global_batches
        # Sample counts: once per sample, not once per sp or tp rank.
        assert ranks[0]["samples_logged"] == BATCH * dp, config
        assert ranks[0]["samples_metric"] == STEPS * BATCH * dp, config
        assert all(len(r["seen"]) == STEPS and r["plan_applied"] for r in ranks), config
        if tp > 1 or config.get("fsdp"):
            assert ranks[0]["split"], f"{config}: no DTensor parameter: the module was not split or sharded"
        name = config.get("model", "block")
        reference = train_single_process(
            lambda name=name: TensorParallelModule(name), global_batches, dataset(name), seed=None
        )
        if ranks[0]["saved"] is not None:
            # The full checkpoint's optimizer state is keyed by parameter name, one entry per parameter
            params = [k for k, v in reference.module.named_parameters()]
            assert ranks[0]["saved"]["optimizer_keys"] == sorted(params), ranks[0]["saved"]["optimizer_keys"]
            err, key = max_rel_error(ranks[0]["saved"]["state_dict"], reference.state)
            assert err < TOLERANCE, f"{config}: saved weights differ at {key} by {err:.2e}"
            for r in ranks:  # the weights loaded into a freshly split module are exactly those saved
                err, key = max_rel_error(r["saved"]["reloaded"], r["saved"]["state_dict"])
                assert err == 0.0, f"{config}: weights loaded from the checkpoint differ at {key}"
        worst = 0.0
        for rank, r in enumerate(ranks):
            err, key = max_rel_error(r["final"], reference.state)
            assert err < TOLERANCE, f"{config} rank {rank}: parameter {key} off by relative error {err:.2e}"
            worst = max(worst, err)
        print(f"{config}: largest relative parameter error over the ranks {worst:.2e}")


DDP_CONFIGS = [
    {"tensor_parallel_size": 2, "sequence_parallel_size": 2, "attention": "ulysses"},
    {"tensor_parallel_size": 2, "sequence_parallel_size": 1},
]
FSDP_CONFIGS = [
    {"fsdp": True, "sequence_parallel_size": 2, "attention": "ulysses"},
    {"fsdp": True, "tensor_parallel_size": 2, "sequence_parallel_size": 2, "attention": "lss"},
]


# The real Hugging Face ViTModel (separate q/k/v projections, SDPA intercepted), on both engines.
HF_CONFIGS = [
    {"model": "hf_vit", "tensor_parallel_size": 2, "sequence_parallel_size": 2, "attention": "ulysses"},
    {"model": "hf_vit", "fsdp": True, "tensor_parallel_size": 2, "sequence_parallel_size": 1},
]


CONFIG_GROUPS = {
    "ddp-tp2xsp2-tp2xdp2": DDP_CONFIGS,
    "fsdp-sp2xdp2-tp2xsp2": FSDP_CONFIGS,
    "hf_vit-ddp-tp2xsp2-fsdp-tp2xdp2": HF_CONFIGS,
}


@pytest.fixture(scope="module")
def strategy_runs():
    """Each rank's results of every config of CONFIG_GROUPS, fitted in turn in ONE launch of 4 ranks (process
    start-up dominates on a loaded 2-core machine); keyed by group."""
    groups = list(CONFIG_GROUPS.values())
    per_rank = run_distributed(
        "tests.test_tensor_parallel_strategy:strategy_worker", 4, timeout=1500, configs=sum(groups, [])
    )
    out, start = {}, 0
    for name, configs in CONFIG_GROUPS.items():
        out[name] = [r[start:start + len(configs)] for r in per_rank]
        start += len(configs)
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("group", list(CONFIG_GROUPS))
def test_training_equals_single_process(strategy_runs, group):
    configs, per_rank = CONFIG_GROUPS[group], strategy_runs[group]
    engines = [r[i]["engine"] for r in per_rank for i in range(len(configs))]
    assert engines == [
        ("SeqParFSDPStrategy" if c.get("fsdp") else "SeqParDDPStrategy") for _ in per_rank for c in configs
    ]
    check_against_single_process(per_rank, configs)


# --- errors and engine selection (no process group) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,engine",
    [({"tensor_parallel_size": 2}, "SeqParDDPStrategy"), ({"fsdp": True}, "SeqParFSDPStrategy"),
     ({"fsdp": True, "tensor_parallel_size": 2}, "SeqParFSDPStrategy"), ({"zero_stage": 2}, "SeqParDeepSpeedStrategy")],
)
def test_engine_selected_from_arguments(kwargs, engine):
    from lightning_seqpar import SeqParStrategy

    strategy = SeqParStrategy(**kwargs)
    assert type(strategy).__name__ == engine and isinstance(strategy, SeqParStrategy)
    assert strategy.tensor_parallel_size == kwargs.get("tensor_parallel_size", 1)


def test_registered_names_build_their_engines():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_seqpar  # noqa: F401  (registers the names)

    assert type(StrategyRegistry.get("seqpar_fsdp")).__name__ == "SeqParFSDPStrategy"
    assert type(StrategyRegistry.get("seqpar_ulysses")).__name__ == "SeqParDDPStrategy"
    assert type(StrategyRegistry.get("seqpar_zero3")).__name__ == "SeqParDeepSpeedStrategy"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"tensor_parallel_size": 2, "zero_stage": 3},
            r"tensor_parallel_size=2 cannot run with DeepSpeed \(zero_stage=3\).*fsdp=True",
        ),
        ({"tensor_parallel_size": 2, "pipeline_stages": 2}, r"cannot run with DeepSpeed \(pipeline_stages=2\)"),
        ({"tensor_parallel_size": 2, "deepspeed_config": {}}, r"cannot run with DeepSpeed \(deepspeed_config\)"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive integer"),
        ({"tensor_parallel_size": True}, "tensor_parallel_size must be a positive integer"),
        (
            {"tensor_parallel_size": 2, "tp_plan": {"blocks.*.mlp.fc1": "colwise"}},
            "tp_plan must be a dict {module path: ParallelStyle}",
        ),
        ({"tp_plan": {}}, "tp_plan is given but tensor_parallel_size=1"),
        ({"tensor_parallel_size": 2, "tp_sequence_parallel": "no"}, "tp_sequence_parallel must be True or False"),
        (
            {"fsdp": True, "zero_stage": 3},
            r"SeqParFSDPStrategy \(fsdp=True\) shards with FSDP2; zero_stage=3 configures DeepSpeed",
        ),
        ({"fsdp": True, "pipeline_stages": 2}, r"pipeline_stages=2 configures DeepSpeed"),
        ({"fsdp": True, "offload_optimizer": True}, r"offload_optimizer=True configures DeepSpeed"),
    ],
)
def test_argument_errors(kwargs, match):
    from lightning_seqpar import SeqParStrategy

    with pytest.raises(ValueError, match=match):
        SeqParStrategy(**kwargs)


def test_engine_class_refuses_fsdp_it_does_not_run():
    from lightning_seqpar import SeqParDDPStrategy

    with pytest.raises(
        ValueError, match=r"SeqParDDPStrategy does not shard with FSDP2; construct SeqParStrategy\(fsdp=True"
    ):
        SeqParDDPStrategy(fsdp=True)


def test_world_that_does_not_factor():
    """What setup_distributed raises for 6 processes with tp 4: every factor printed."""
    from lightning_seqpar import ParallelDims, TopologyError

    with pytest.raises(
        TopologyError, match=r"world_size=6 is not divisible by .* \* tensor_parallel_size = 1 \* 1 \* 4 = 4"
    ):
        ParallelDims(world_size=6, sequence_parallel_size=1, tensor_parallel_size=4)


def test_default_sequence_parallel_size_leaves_room_for_tp():
    """Without sequence_parallel_size, sp is the node's processes divided by tp (and pipeline stages)."""
    from lightning_seqpar import SeqParStrategy

    strategy = SeqParStrategy(tensor_parallel_size=2, parallel_devices=[torch.device("cpu")] * 8)
    assert strategy.sequence_parallel_size == 4


def test_mixed_precision_policy_from_trainer_precision():
    from lightning_seqpar.strategies.model_parallel import mixed_precision_dtypes

    assert mixed_precision_dtypes("bf16-mixed") == (torch.bfloat16, torch.float32)
    assert mixed_precision_dtypes("16-mixed") == (torch.float16, torch.float32)
    assert mixed_precision_dtypes("32-true") == (None, None)
    assert mixed_precision_dtypes("bf16-true") == (None, None)


def resume_worker(directory: str) -> dict:
    """Fit 2 steps under FSDP2 over dp 2 and save a checkpoint directory; resume it under FSDP2 over sp 2 (another
    layout, a fresh module) for a third step. Returns the batches of both fits and the whole final parameters."""
    import os

    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy
    from tests.tp_workers import dataset

    torch.set_num_threads(1)
    world, path = int(os.environ["WORLD_SIZE"]), os.path.join(directory, "fsdp.ckpt")
    seen, files = [], None
    for config, steps, ckpt in (({"sequence_parallel_size": 1}, 2, None),
                                ({"sequence_parallel_size": 2, "attention": "ulysses"}, 3, path)):
        module = TensorParallelModule()
        trainer = Trainer(
            accelerator="cpu", devices=world, max_steps=steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            strategy=SeqParStrategy(fsdp=True, timeout=300, **config),
        )
        trainer.fit(module, DataLoader(dataset("block"), batch_size=BATCH), ckpt_path=ckpt)
        if ckpt is None:
            trainer.save_checkpoint(path)
            files = sorted(os.listdir(path))
        seen.append({"seen": module.seen, "dp": trainer.strategy.topology.dp_rank, "global_step": trainer.global_step})
    return {"seen": seen, "files": files, "final": trainer.strategy.full_state_dict()}


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_fsdp_checkpoint_resumes_at_another_layout(tmp_path):
    """Saved at FSDP2 over dp 2 (SGD momentum buffers sharded), resumed at FSDP2 over sp 2: the third step ends where
    single-process training on the same three global batches ends."""
    from tests.reference import train_single_process
    from tests.test_tensor_parallel import max_rel_error
    from tests.tp_workers import dataset

    per_rank = run_distributed(
        "tests.test_tensor_parallel_strategy:resume_worker", 2, timeout=560, directory=str(tmp_path)
    )
    assert "lightning_state.pt" in per_rank[0]["files"] and ".metadata" in per_rank[0]["files"]
    first = [r["seen"][0] for r in per_rank]
    resumed = per_rank[0]["seen"][1]
    assert resumed["global_step"] == 3 and len(resumed["seen"]) == 1  # only the third step ran after the resume
    assert per_rank[1]["seen"][1]["seen"] == resumed["seen"]  # sp ranks: the same samples
    global_batches = [first[0]["seen"][t] + first[1]["seen"][t] for t in range(2)] + resumed["seen"]
    reference = train_single_process(TensorParallelModule, global_batches, dataset("block"), seed=None)
    for rank, r in enumerate(per_rank):
        err, key = max_rel_error(r["final"], reference.state)
        assert err < TOLERANCE, f"rank {rank}: parameter {key} off by relative error {err:.2e} after the resume"
