"""DeepSpeed ZeRO and pipeline stages on the sequence-parallel groups (CPU, gloo, DS_ACCELERATOR=cpu).

Two launches keep the runtime low: 2 processes (sp = 2) train ZeRO-1/2/3 against single-process SGD, and
save, resume and consolidate a ZeRO-3 checkpoint; 4 processes run 2 pipeline stages x sp 2 against the same
reference and check the errors that need a Trainer. Fast checks without processes come first.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.dist_utils import run_distributed
from tests.models import LossRecorder, RegressionModule, TinyViT, build_dataset, train_reference

SEED, STEPS, BATCH = 1234, 3, 2
DS_ENV = {"DS_ACCELERATOR": "cpu"}
# fp32 on CPU: DeepSpeed's flat-buffer all-reduce sums in another order than DDP's buckets, which moves the
# result by a few ulps; 1e-5 of each tensor's norm holds with a margin of 15x or more (measured 3e-7 for ZeRO
# 1/2/3, 4.6e-7 after a ZeRO-3 resume, 6.1e-7 with 2 pipeline stages).
REL_TOL = 1e-5


def _max_rel_error(a: dict, b: dict) -> tuple[float, str]:
    """Largest per-tensor ||a - b|| / ||b||; tensors that stay near zero (a key bias) compare absolutely (< 1e-7)."""
    worst, name = 0.0, ""
    for key in b:
        diff, scale = (a[key].float() - b[key].float()).norm().item(), b[key].float().norm().item()
        err = diff / scale if scale >= 1e-3 else (0.0 if diff <= 1e-7 else float("inf"))
        if err > worst:
            worst, name = err, key
    return worst, name


# --- without processes ----------------------------------------------------------------------------------


def test_config_from_trainer_settings():
    from lightning_seqpar.deepspeed_engine import build_config

    config = build_config(zero_stage=2, precision="bf16-mixed", gradient_clip_val=0.5, gradient_accumulation_steps=4)
    assert config["zero_optimization"] == {"stage": 2}
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["gradient_clipping"] == 0.5 and config["gradient_accumulation_steps"] == 4
    assert "train_batch_size" not in config
    # DeepSpeed clips at 1.0 unless told otherwise: no Lightning clipping must write 0.
    assert build_config(zero_stage=1)["gradient_clipping"] == 0.0
    assert "bf16" not in build_config(precision="32-true") and build_config(precision="16-mixed")["fp16"] == {
        "enabled": True
    }
    offload = build_config(zero_stage=3, offload_optimizer=True, offload_parameters=True)["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu" and offload["offload_param"]["device"] == "cpu"
    # The explicit config wins, key by key.
    merged = build_config(
        zero_stage=1, user_config={"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0}
    )
    assert (
        merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000} and merged["gradient_clipping"] == 2.0
    )


def test_config_errors(tmp_path):
    from lightning_seqpar.deepspeed_engine import DeepSpeedConfigError, build_config, load_user_config

    with pytest.raises(DeepSpeedConfigError, match="do not set train_batch_size"):
        build_config(user_config={"train_batch_size": 8})
    with pytest.raises(DeepSpeedConfigError, match="offload_parameters=True needs zero_stage=3"):
        build_config(zero_stage=2, offload_parameters=True)
    with pytest.raises(DeepSpeedConfigError, match="offload_optimizer=True needs zero_stage >= 1"):
        build_config(offload_optimizer=True)
    with pytest.raises(DeepSpeedConfigError, match="clips gradients by norm only"):
        build_config(gradient_clip_val=1.0, gradient_clip_algorithm="value")
    with pytest.raises(DeepSpeedConfigError, match="neither a dict nor an existing JSON file"):
        load_user_config(str(tmp_path / "missing.json"))
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert load_user_config(tmp_path / "ds.json") == {"zero_optimization": {"stage": 2}}


def test_strategy_argument_errors():
    from lightning_seqpar import SeqParStrategy

    with pytest.raises(ValueError, match="zero_stage=2 cannot be combined with pipeline_stages=2"):
        SeqParStrategy(zero_stage=2, pipeline_stages=2)
    with pytest.raises(ValueError, match="zero_stage=3 cannot be combined with pipeline_stages=2"):
        SeqParStrategy(pipeline_stages=2, deepspeed_config={"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="on_nonfinite='skip' is not available with DeepSpeed"):
        SeqParStrategy(zero_stage=1, on_nonfinite="skip")
    with pytest.raises(ValueError, match="micro_batches is for pipeline_stages > 1"):
        SeqParStrategy(micro_batches=2)
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        SeqParStrategy(zero_stage=4)
    assert not SeqParStrategy().uses_deepspeed and SeqParStrategy(zero_stage=1).uses_deepspeed


def test_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_seqpar  # noqa: F401

    assert StrategyRegistry["seqpar_zero2"]["init_params"] == {"zero_stage": 2}
    assert StrategyRegistry["seqpar_zero3_offload"]["init_params"] == {
        "zero_stage": 3,
        "offload_optimizer": True,
        "offload_parameters": True,
    }
    assert {"seqpar_zero1", "seqpar_zero3"} <= set(StrategyRegistry)


def test_resume_layout_decisions(tmp_path):
    from lightning_seqpar.deepspeed_engine import DeepSpeedConfigError, check_resume_layout

    saved = {
        "zero_stage": 2,
        "pipeline_parallel_size": 1,
        "data_parallel_size": 1,
        "sequence_parallel_size": 2,
        "sequence_data_parallel_size": 2,
    }
    now = {**saved, "sequence_parallel_size": 4, "sequence_data_parallel_size": 4}
    assert check_resume_layout(tmp_path, saved, now, load_universal=False)  # re-laid out at load
    assert check_resume_layout(tmp_path, saved, {**saved, "zero_stage": 3}, load_universal=False)
    assert not check_resume_layout(tmp_path, saved, saved, load_universal=False)
    assert not check_resume_layout(tmp_path, saved, now, load_universal=True)  # DeepSpeed's universal loader
    directory = tmp_path / "my run" / "last.ckpt"
    with pytest.raises(
        DeepSpeedConfigError,
        match=r"zero_stage=2.*this run has .*zero_stage=None.*python -m lightning_seqpar\.consolidate "
        r"'.*my run/last\.ckpt' weights\.pt then",
    ):
        check_resume_layout(
            directory, saved, {"pipeline_parallel_size": 1, "sequence_parallel_size": 2}, load_universal=False
        )
    with pytest.raises(DeepSpeedConfigError, match="not into or out of pipeline stages"):
        check_resume_layout(
            tmp_path, saved, {**saved, "pipeline_parallel_size": 2, "zero_stage": 1}, load_universal=False
        )


def test_pipeline_contract_errors():
    from lightning_seqpar.pipeline import PipelineError, block_run, declared_layers, split_batch

    module = PipelineRegression()
    with pytest.raises(PipelineError, match="needs RegressionModule.pipeline_layers()"):
        declared_layers(RegressionModule())
    layers = declared_layers(module)
    assert block_run(module, layers, 2)[:2] == (1, 5)
    with pytest.raises(PipelineError, match="once each, in order and next to each other"):
        block_run(module, [layers[0], layers[2], layers[1], *layers[3:]], 2)
    with pytest.raises(PipelineError, match="pipeline_stages=8 but 'model.blocks' has only 4 blocks"):
        block_run(module, layers, 8)
    with pytest.raises(PipelineError, match="does not split into micro_batches=3"):
        split_batch(torch.zeros(4, 2), 3)


# --- the model the pipeline tests train ---------------------------------------------------------------


class _Embed(nn.Module):
    def __init__(self, vit: TinyViT) -> None:
        super().__init__()
        self.patch_embed, self.pos_embed = vit.patch_embed, vit.pos_embed

    def forward(self, x):  # [B, L, IN_DIM] -> [B, L, D]
        return self.patch_embed(x) + self.pos_embed


class _Head(nn.Module):
    def __init__(self, vit: TinyViT) -> None:
        super().__init__()
        self.norm, self.head = vit.norm, vit.head

    def forward(self, x):  # [B, L, D] -> [B, L, OUT_DIM]
        return self.head(self.norm(x))


class PipelineRegression(RegressionModule):
    """RegressionModule on a 4-block TinyViT with the pipeline contract: layers, loss, and batch -> (inputs,
    targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyViT(depth=4)

    def pipeline_layers(self):
        return [_Embed(self.model), *self.model.blocks, _Head(self.model)]

    def pipeline_loss(self, outputs, targets):
        return F.mse_loss(outputs, targets)

    def pipeline_batch(self, batch):
        self.seen.append(batch["index"].tolist())
        return batch["x"], batch["y"]


# --- 2 processes: ZeRO 1/2/3 x sp 2, save / resume / consolidate -------------------------------------------


# Read once: Lightning's environment deletes WORLD_SIZE when a Trainer tears down.
_WORLD = int(os.environ.get("WORLD_SIZE", 1))


def _trainer(strategy, tmp, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", devices=_WORLD, strategy=strategy, default_root_dir=tmp,
                   logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def zero_worker(tmp: str) -> dict:
    import time

    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, Subset

    from lightning_seqpar import SeqParStrategy
    from lightning_seqpar.consolidate import main as consolidate_main
    from lightning_seqpar.deepspeed_engine import consolidate_checkpoint
    from tests.models import RandomTokens


    out: dict = {"times": {}}
    for stage in (1, 2, 3):
        start = time.perf_counter()
        seed_everything(SEED)
        module = RegressionModule()
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        strategy = (
            "seqpar_zero2" if stage == 2 else SeqParStrategy(sequence_parallel_size=2, zero_stage=stage, timeout=300)
        )
        trainer = _trainer(strategy, tmp, max_steps=STEPS, enable_checkpointing=False)
        trainer.fit(module, DataLoader(build_dataset("timm_vit"), batch_size=BATCH))
        out[stage] = {
            "initial": initial,
            "final": trainer.strategy.full_state_dict(),
            "seen": module.seen,
            "engine_dp": trainer.strategy.deepspeed_engine.dp_world_size,
            "optimizer": type(trainer.strategy.deepspeed_engine.optimizer).__name__,
        }
        out["times"][f"zero{stage}"] = time.perf_counter() - start

    # ZeRO-3 wraps every module's inputs, so nn.MultiheadAttention receives self(x, x, x) as three aliases.
    seed_everything(SEED)
    module = RegressionModule("torch_encoder")
    trainer = _trainer(
        SeqParStrategy(sequence_parallel_size=2, zero_stage=3, timeout=300),
        tmp,
        max_steps=STEPS,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(build_dataset("torch_encoder"), batch_size=BATCH))
    out["zero3_torch_encoder"] = {"final": trainer.strategy.full_state_dict(), "seen": module.seen}

    # ZeRO-3: one epoch with a checkpoint, then a new process state resumes it for a second epoch.
    start = time.perf_counter()
    data = lambda: DataLoader(Subset(RandomTokens(), range(8)), batch_size=BATCH)  # noqa: E731
    seed_everything(7)
    first = RegressionModule()
    checkpoint = ModelCheckpoint(dirpath=os.path.join(tmp, "ckpt"), save_last=True)
    record1 = LossRecorder()
    trainer = _trainer(
        SeqParStrategy(sequence_parallel_size=2, zero_stage=3, timeout=300),
        tmp,
        max_epochs=1,
        callbacks=[record1, checkpoint],
    )
    trainer.fit(first, data())
    after_first_epoch = trainer.strategy.full_state_dict()
    seed_everything(7)
    torch.manual_seed(123)  # the RNG differs in a new process: the checkpoint must carry what matters
    second = RegressionModule()
    record2 = LossRecorder()
    trainer = _trainer(
        SeqParStrategy(sequence_parallel_size=2, zero_stage=3, timeout=300),
        tmp,
        max_epochs=2,
        callbacks=[record2],
        enable_checkpointing=False,
    )
    trainer.fit(second, data(), ckpt_path=checkpoint.last_model_path)
    out["resume"] = {
        "seen": first.seen + second.seen,
        "losses": record1.losses + record2.losses,
        "final": trainer.strategy.full_state_dict(),
        "checkpoint": checkpoint.last_model_path,
        "is_dir": os.path.isdir(checkpoint.last_model_path),
    }
    out["times"]["zero3_save_resume"] = time.perf_counter() - start
    if int(os.environ["RANK"]) == 0:
        start = time.perf_counter()
        consolidated = consolidate_checkpoint(checkpoint.last_model_path)
        out["consolidation_error"] = max(
            (consolidated[k] - after_first_epoch[k]).abs().max().item() for k in after_first_epoch
        )
        out["consolidated_keys"] = sorted(consolidated) == sorted(after_first_epoch)
        target = os.path.join(tmp, "consolidated.pt")
        consolidate_main([checkpoint.last_model_path, target])
        plain = RegressionModule()
        plain.load_state_dict(torch.load(target, weights_only=True)["state_dict"])
        out["cli_error"] = max(
            (plain.state_dict()[k] - after_first_epoch[k]).abs().max().item() for k in after_first_epoch
        )
        out["times"]["consolidate"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("zero"))
    return tmp, run_distributed("tests.test_deepspeed:zero_worker", 2, timeout=400, env=DS_ENV, tmp=tmp)


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_training_equals_single_process(zero_runs, stage):
    _, per_rank = zero_runs
    ranks = [r[stage] for r in per_rank]
    assert ranks[0]["seen"] == ranks[1]["seen"], "the two SP ranks must see the same samples"
    assert ranks[0]["engine_dp"] == 2  # DeepSpeed's data parallelism is the sequence-data group
    reference = train_reference("timm_vit", SEED, ranks[0]["seen"], build_dataset("timm_vit"))
    for rank, r in enumerate(ranks):
        err, name = _max_rel_error(r["final"], reference)
        assert err < REL_TOL, f"ZeRO-{stage} rank {rank}: {name} off by relative error {err:.2e}"
        moved, _ = _max_rel_error(r["final"], r["initial"])
        assert moved > 1e-3


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_zero3_with_torch_multihead_attention(zero_runs):
    _, per_rank = zero_runs
    seen = per_rank[0]["zero3_torch_encoder"]["seen"]
    reference = train_reference("torch_encoder", SEED, seen, build_dataset("torch_encoder"))
    for rank, r in enumerate(per_rank):
        err, name = _max_rel_error(r["zero3_torch_encoder"]["final"], reference)
        assert err < REL_TOL, f"ZeRO-3 TransformerEncoder rank {rank}: {name} off by relative error {err:.2e}"


def test_zero3_resume_continues_exactly(zero_runs):
    from tests.models import RandomTokens

    _, per_rank = zero_runs
    resume = per_rank[0]["resume"]
    assert resume["is_dir"], "a DeepSpeed checkpoint is a directory of shards"
    assert len(resume["seen"]) == 8
    # The resumed run ends where 8 uninterrupted single-process steps end (momentum restored from the shards).
    reference = train_reference("timm_vit", 7, resume["seen"], RandomTokens())
    for r in per_rank:
        err, name = _max_rel_error(r["resume"]["final"], reference)
        assert err < REL_TOL, f"resumed ZeRO-3: {name} off by relative error {err:.2e}"


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_consolidated_checkpoint_has_the_trained_weights(zero_runs):
    _, per_rank = zero_runs
    assert per_rank[0]["consolidated_keys"]
    assert per_rank[0]["consolidation_error"] == 0.0
    assert per_rank[0]["cli_error"] == 0.0


# --- 4 processes: 2 pipeline stages x sp 2, and errors that need a Trainer ----------------------------------


def pipeline_worker(tmp: str, zero3_checkpoint: str) -> dict:
    import time

    from lightning.pytorch import seed_everything
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy


    out: dict = {}
    start = time.perf_counter()
    seed_everything(SEED)
    module = PipelineRegression()
    record = LossRecorder()
    strategy = SeqParStrategy(sequence_parallel_size=2, pipeline_stages=2, micro_batches=2, timeout=300)
    trainer = _trainer(strategy, tmp, max_steps=STEPS, enable_checkpointing=False, callbacks=[record])
    trainer.fit(module, DataLoader(build_dataset("timm_vit"), batch_size=2 * BATCH))
    local = {id(p) for p in trainer.strategy.deepspeed_engine.module.parameters()}
    out["pipeline"] = {
        "losses": record.losses,
        "seen": module.seen,  # pipeline_batch runs once per step, before the split into micro-batches
        "local": {k: v.detach().clone() for k, v in module.named_parameters() if id(v) in local},
        "full": trainer.strategy.full_state_dict(),  # every stage's layers, from the ranks that train them
        "parts": [int(p) for p in trainer.strategy.deepspeed_engine.module.parts],
        "topology": trainer.strategy.topology.describe(),
    }
    out["times"] = {"pipeline": time.perf_counter() - start}

    errors = {}
    cases = {
        "accumulate": (
            lambda: SeqParStrategy(sequence_parallel_size=2, pipeline_stages=2, timeout=300),
            PipelineRegression,
            {"accumulate_grad_batches": 2},
            None,
        ),
        "other_sp": (
            lambda: SeqParStrategy(sequence_parallel_size=4, zero_stage=3, timeout=300),
            RegressionModule,
            {},
            zero3_checkpoint,
        ),
    }
    for name, (make_strategy, make_module, kwargs, ckpt_path) in cases.items():
        start = time.perf_counter()
        try:
            _trainer(make_strategy(), tmp, max_steps=1, enable_checkpointing=False, **kwargs).fit(
                make_module(), DataLoader(build_dataset("timm_vit"), batch_size=2 * BATCH), ckpt_path=ckpt_path
            )
            errors[name] = None
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
        out["times"][name] = time.perf_counter() - start
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory, zero_runs):
    tmp = str(tmp_path_factory.mktemp("pipeline"))
    zero3_checkpoint = zero_runs[1][0]["resume"]["checkpoint"]
    return run_distributed(
        "tests.test_deepspeed:pipeline_worker", 4, timeout=400, env=DS_ENV, tmp=tmp, zero3_checkpoint=zero3_checkpoint
    )


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_pipeline_with_sequence_parallel_stages_equals_single_process(pipeline_runs):
    from tests.models import RandomTokens
    from tests.reference import train_single_process

    runs = [r["pipeline"] for r in pipeline_runs]
    assert runs[0]["parts"] == [0, 3, 6]  # embed + 2 blocks | 2 blocks + head
    assert "pp 1, dp 0, sp 1" in runs[3]["topology"]
    # Stage 0 reads the inputs and the last stage the targets: they must be the same samples.
    assert all(r["seen"] == runs[0]["seen"] for r in runs)
    single = train_single_process(PipelineRegression, runs[0]["seen"], RandomTokens(), SEED)
    losses, reference = single.losses, single.state
    # The loss is the mean of two micro-batch means (equal sizes) instead of one mean: a reassociation of fp32 sums.
    for r in runs:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    merged = {}
    for r in runs:
        merged.update(r["local"])
    assert sorted(merged) == sorted(k for k in reference if not k.startswith("samples"))
    err, name = _max_rel_error(merged, {k: reference[k] for k in merged})
    assert err < REL_TOL, f"pipeline: {name} off by relative error {err:.2e}"
    for rank, r in enumerate(runs):
        err, name = _max_rel_error({k: r["full"][k] for k in merged}, {k: reference[k] for k in merged})
        assert err < REL_TOL, f"pipeline full_state_dict on rank {rank}: {name} off by relative error {err:.2e}"


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_trainer_level_errors(pipeline_runs):
    errors = pipeline_runs[0]["errors"]
    assert (
        errors["accumulate"].startswith("PipelineError") and "SeqParStrategy(micro_batches=2)" in errors["accumulate"]
    )
    assert errors["other_sp"] is None, errors[
        "other_sp"
    ]  # ZeRO-3 shards of 2 ranks re-laid out for 4 (test_relayout.py)
