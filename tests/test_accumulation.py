"""Gradient accumulation and clipping on every engine path equal single-process training on the same global batch.

The grid: engine (DDP, ZeRO 1/2/3, pipeline) x ``accumulate_grad_batches`` {1, 2, 3} x clipping {off, by norm}
x sequence-parallel size {1, 2}. All configurations of one world size run in ONE launch (one Trainer after the
other on the same process group): world 2 covers dp 2 x sp 1, dp 1 x sp 2 and 2 pipeline stages x sp 1; world 4
covers 2 pipeline stages x sp 2. The reference is single-process SGD with momentum over the same samples, two
optimizer steps, the loss of a step being the mean over all its samples (what single-process Lightning
computes: the mean of equal-sized micro-batch means), clipped by the total norm of the accumulated gradient.

With pipelines, one DataLoader batch is one optimizer step cut into ``micro_batches`` (DeepSpeed's gradient
accumulation); ``accumulate_grad_batches=k`` is refused with the advice to use ``micro_batches=k``, so the
pipeline column accumulates over ``micro_batches`` in {1, 2, 3}.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed
from tests.models import RandomTokens, RegressionModule, build_dataset

SEED, STEPS, BATCH = 1234, 2, 2
DS_ENV = {"DS_ACCELERATOR": "cpu"}
# Clipping threshold well below the gradient norms of this model (0.3-1.5): clipping bites on every step.
CLIP = 0.05
# fp32 reassociation of the gradient sums (flat buffers, micro-batch order): measured below 1e-6.
REL_TOL = 1e-5
ENGINES = ("ddp", "zero1", "zero2", "zero3", "pipeline")
ACCUMULATE = (1, 2, 3)
CLIPS = (None, CLIP)

_WORLD = int(os.environ.get("WORLD_SIZE", 1))


def _strategy(engine: str, sp: int, accumulate: int):
    from lightning_seqpar import SeqParStrategy

    if engine == "pipeline":
        return SeqParStrategy(sequence_parallel_size=sp, pipeline_stages=2, micro_batches=accumulate, timeout=300)
    return SeqParStrategy(
        sequence_parallel_size=sp, zero_stage={"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[engine], timeout=300
    )


def grid_worker(tmp: str, configs: list[tuple[str, int, int, float | None]]) -> dict:
    """Train every (engine, sp, accumulate, clip) of ``configs`` for ``STEPS`` optimizer steps."""
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    from tests.test_deepspeed import PipelineRegression

    out: dict = {"times": {}}
    for config in configs:
        engine, sp, accumulate, clip = config
        start = time.perf_counter()
        seed_everything(SEED)
        module = PipelineRegression() if engine == "pipeline" else RegressionModule()
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        pipeline = engine == "pipeline"
        trainer = Trainer(
            accelerator="cpu", devices=_WORLD, strategy=_strategy(engine, sp, accumulate), default_root_dir=tmp,
            logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            max_steps=STEPS, accumulate_grad_batches=1 if pipeline else accumulate,
            gradient_clip_val=clip, gradient_clip_algorithm="norm" if clip else None,
        )
        loader = DataLoader(build_dataset("timm_vit"), batch_size=BATCH * accumulate if pipeline else BATCH)
        trainer.fit(module, loader)
        out[config] = {
            "initial": initial,
            "final": trainer.strategy.full_state_dict(),
            "seen": module.seen,
            "dp_rank": trainer.strategy.topology.dp_rank,
            "dp": trainer.strategy.topology.dp,
            "global_step": trainer.global_step,
        }
        out["times"][config] = time.perf_counter() - start
    return out


def _global_batches(per_rank: list[dict], config, accumulate: int, pipeline: bool) -> list[list[int]]:
    """The samples of each optimizer step: every data-parallel rank's micro-batches of that step."""
    results = {r[config]["dp_rank"]: r[config]["seen"] for r in per_rank}
    per_step = 1 if pipeline else accumulate
    steps = []
    for step in range(STEPS):
        samples = []
        for dp_rank in sorted(results):
            for batch in results[dp_rank][step * per_step:(step + 1) * per_step]:
                samples += batch
        steps.append(samples)
    return steps


@functools.cache
def reference(pipeline: bool, global_batches: tuple[tuple[int, ...], ...], clip: float | None) -> dict:
    """Single-process SGD(momentum 0.9) over the global batches, clipped by the total gradient norm (cached: the
    engines of one data layout see the same batches)."""
    from lightning.pytorch import seed_everything

    from tests.test_deepspeed import PipelineRegression

    seed_everything(SEED)
    module = PipelineRegression() if pipeline else RegressionModule()
    dataset = RandomTokens()
    optimizer = module.configure_optimizers()
    for indices in global_batches:
        optimizer.zero_grad()
        F.mse_loss(module.model(dataset.x[list(indices)]), dataset.y[list(indices)]).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
    return module.state_dict()


def _max_rel_error(a: dict, b: dict) -> tuple[float, str]:
    worst, name = 0.0, ""
    for key in b:
        if key.startswith("samples"):
            continue
        diff, scale = (a[key].float() - b[key].float()).norm().item(), b[key].float().norm().item()
        err = diff / scale if scale >= 1e-3 else (0.0 if diff <= 1e-7 else float("inf"))
        if err > worst:
            worst, name = err, key
    return worst, name


def _grid(world: int) -> list[tuple]:
    configs = []
    for engine in ENGINES:
        for sp in (1, 2):
            if engine == "pipeline" and sp * 2 != world:
                continue  # pipelines: 2 stages x sp ranks = world
            if engine != "pipeline" and world != 2:
                continue
            for accumulate in ACCUMULATE:
                for clip in CLIPS:
                    configs.append((engine, sp, accumulate, clip))
    return configs


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    runs = {}
    for world in (2, 4):
        tmp = str(tmp_path_factory.mktemp(f"grid{world}"))
        per_rank = run_distributed(
            "tests.test_accumulation:grid_worker", world, timeout=900, env=DS_ENV, tmp=tmp, configs=_grid(world)
        )
        for config in _grid(world):
            runs[config] = [r[config] for r in per_rank]
        runs[f"times{world}"] = per_rank[0]["times"]
    return runs


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("engine", ENGINES)
def test_accumulation_and_clipping_equal_single_process(grid_runs, engine):
    failures, checked = [], 0
    for config, ranks in grid_runs.items():
        if not isinstance(config, tuple) or config[0] != engine:
            continue
        _, sp, accumulate, clip = config
        pipeline = engine == "pipeline"
        batches = _global_batches([{config: r} for r in ranks], config, accumulate, pipeline)
        assert all(len(b) == BATCH * accumulate * ranks[0]["dp"] for b in batches), (config, batches)
        expected = reference(pipeline, tuple(tuple(sorted(b)) for b in batches), clip)
        for rank, r in enumerate(ranks):
            assert r["global_step"] == STEPS, (config, r["global_step"])
            err, name = _max_rel_error(r["final"], expected)
            if err >= REL_TOL:
                failures.append(f"{config} rank {rank}: {name} off by {err:.2e}")
            assert _max_rel_error(r["final"], r["initial"])[0] > 1e-3
        checked += 1
    assert checked == 12, checked  # 3 accumulations x 2 clippings x 2 layouts
    assert not failures, "\n".join(failures)
