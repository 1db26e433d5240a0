"""Pipeline stages a user can live with (CPU, gloo, DS_ACCELERATOR=cpu): every parameter trained or an error,
evaluation through the stages, and stages built from the module's own steps.

One 4-process launch runs every configuration against single-process references computed here:
2 stages x sp 2 for a timm-style ViT, the bundled ClimaX and a Hugging Face ViT without any pipeline method
(training, then validate / test / predict), the explicit ``pipeline_layers()`` contract with validation during fit,
2 stages x dp 2 (sp 1), and the errors (a layer that does not register what it computes with, a skip connection
around the blocks). Fast checks without processes come first.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from tests.dist_utils import run_distributed
from tests.models import RegressionModule, TinyViT, build_dataset
from tests.test_deepspeed import _Embed, _Head  # the explicit contract's first and last layers

SEED, STEPS, BATCH, MICRO = 1234, 3, 4, 2
DS_ENV = {"DS_ACCELERATOR": "cpu"}
VAL_SAMPLES = 12  # 3 batches of 4: every stage and rank must count each sample once
REL_TOL = 1e-5  # fp32 reassociation (micro-batch means, DeepSpeed's flat all-reduce); see tests/test_deepspeed.py


def _max_rel_error(a: dict, b: dict) -> tuple[float, str]:
    worst, name = 0.0, ""
    for key in b:
        diff, scale = (a[key].float() - b[key].float()).norm().item(), b[key].float().norm().item()
        err = diff / scale if scale >= 1e-3 else (0.0 if diff <= 1e-7 else float("inf"))
        if err > worst:
            worst, name = err, key
    return worst, name


class EvalRegression(RegressionModule):
    """RegressionModule that also validates, tests and predicts: a logged loss (sync_dist) and torchmetrics states."""

    def __init__(self, model_name: str = "timm_vit") -> None:
        super().__init__(model_name)
        self.val_mse = torchmetrics.MeanSquaredError()
        self.val_samples = torchmetrics.SumMetric()

    def validation_step(self, batch, batch_idx):
        pred = self.model(batch["x"])
        self.log("val_loss", F.mse_loss(pred, batch["y"]), sync_dist=True)
        self.val_mse.update(pred, batch["y"])
        self.val_samples.update(torch.tensor(float(len(batch["x"]))))
        self.log("val_mse", self.val_mse)
        self.log("val_samples", self.val_samples)
        return {"pred": pred}

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.mse_loss(self.model(batch["x"]), batch["y"]), sync_dist=True)


class _LeakyEmbed(nn.Module):
    """Computes embed(x) + pos from a model it keeps in a plain attribute: registers nothing."""

    def __init__(self, vit: TinyViT) -> None:
        super().__init__()
        self.__dict__["vit"] = vit

    def forward(self, x):
        return self.vit.patch_embed(x) + self.vit.pos_embed


class ContractRegression(EvalRegression):
    """The explicit contract on a 4-block TinyViT (its validation_step is the module's own)."""

    embed = _Embed

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyViT(depth=4)

    def pipeline_layers(self):
        return [self.embed(self.model), *self.model.blocks, _Head(self.model)]

    def pipeline_loss(self, outputs, targets):
        return F.mse_loss(outputs, targets)

    def pipeline_batch(self, batch):
        self.seen.append(batch["index"].tolist())
        return batch["x"], batch["y"]


class LeakyContract(ContractRegression):
    embed = _LeakyEmbed


class SkipAroundBlocks(TinyViT):
    """A forward that adds the embedding to the output of the stack: cannot cross the stages."""

    def forward(self, x):
        x = skip = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x + skip))


# --- without processes ----------------------------------------------------------------------------------


def test_ownership_check_lists_left_out_and_twice_claimed_parameters():
    from lightning_seqpar.pipeline import PipelineError, check_ownership

    module = LeakyContract()
    with pytest.raises(
        PipelineError,
        match=r"in no layer \(they would never be trained\): model\.pos_embed, model\.patch_embed\.weight, "
        r"model\.patch_embed\.bias\.",
    ):
        check_ownership(module, module.pipeline_layers())
    good = ContractRegression()
    check_ownership(good, good.pipeline_layers())
    layers = good.pipeline_layers()
    with pytest.raises(PipelineError, match=r"in more than one layer: model\.norm\.weight \(layers \[5, 6\]\)"):
        check_ownership(good, [*layers, _Head(good.model)])
    with pytest.raises(PipelineError, match=r"layers \[5\] hold parameters that are not ContractRegression's"):
        check_ownership(good, [*layers[:-1], _Head(TinyViT())])


def test_stage_parameters_cover_every_parameter_once():
    from lightning_seqpar.pipeline_auto import block_stack, even_split, stage_parameters

    for name in ("timm_vit", "climax", "hf_vit"):
        module = RegressionModule(name)
        path, blocks = block_stack(module, 2)
        owned = stage_parameters(module, blocks, even_split(len(blocks), 2))
        names = [n for stage in owned for n, _ in stage]
        assert sorted(names) == sorted(n for n, _ in module.named_parameters()), name
        first_block = next(n for n, _ in module.named_parameters() if n.startswith(path))
        assert first_block in [n for n, _ in owned[0]] and all(
            not n.startswith(path) or n.startswith(f"{path}.0.") for n, _ in owned[0]
        )
    assert even_split(5, 2) == [0, 3, 5] and even_split(4, 4) == [0, 1, 2, 3, 4]


class _StridedOutput(nn.Module):
    """A block whose output is a strided view in memory (element-wise work on a transposed tensor), as timm's
    VisionTransformer blocks hand on."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return (x.transpose(1, 2).contiguous() * self.scale).transpose(1, 2)  # [B, L, D] view of a [B, D, L] buffer


def test_stage_runner_sends_one_contiguous_buffer():
    """The activation handed to the point-to-point send is contiguous: gloo refuses a strided one and NCCL sends
    its storage as if contiguous (the real timm ViT trained through 2 stages on 2 GPUs was wrong before this)."""
    from lightning_seqpar.pipeline_auto import StageRunner

    blocks = nn.Sequential(_StridedOutput(), _StridedOutput())
    x = torch.randn(2, 5, 3)
    assert not blocks[0](x).is_contiguous()
    first = StageRunner(blocks, "", blocks, [0, 1, 2], 0, lambda: None)
    finished, activation = first.run(lambda: blocks(x), None)
    first.remove()
    assert not finished and activation.is_contiguous()
    torch.testing.assert_close(activation, blocks[0](x))


def test_stage_runner_runs_a_chain_in_two_stages_and_refuses_what_is_not_one():
    from lightning_seqpar.pipeline import PipelineError
    from lightning_seqpar.pipeline_auto import StageRunner, block_stack
    from tests.models import ContainerBlocksViT

    torch.manual_seed(0)
    vit, x = TinyViT(depth=4), torch.randn(2, 13, 6)
    path, blocks = block_stack(vit, 2)
    expected = vit(x)
    first = StageRunner(vit, path, blocks, [0, 2, 4], 0, lambda: None)
    finished, activation = first.run(lambda: vit(x), None)
    first.remove()
    last = StageRunner(vit, path, blocks, [0, 2, 4], 1, lambda: None)
    # stage 1 computes the embedding itself, skips blocks 0-1 and continues from the received activation
    finished_last, output = last.run(lambda: vit(x), activation)
    assert not finished and finished_last and first.calls == [0, 1] and last.calls == [0, 1, 2, 3]
    torch.testing.assert_close(output, expected)
    assert torch.equal(vit(x), expected)  # outside run() the hooks do nothing
    with pytest.raises(PipelineError, match=r"called blocks\.0 twice"):
        last.run(lambda: (vit(x), vit(x)), activation)
    with pytest.raises(PipelineError, match=r"received an activation of shape \(2, 5, 32\) for blocks\.2"):
        last.run(lambda: vit(x), activation[:, :5])
    with pytest.raises(PipelineError, match=r"in the order \[0, 1, 2\]; expected \[0, 1, 2, 3\]"):
        last.run(lambda: blocks[2](blocks[1](blocks[0](vit.patch_embed(x) + vit.pos_embed))), activation)
    last.remove()
    with pytest.raises(PipelineError, match="are ModuleList containers that their owner loops over"):
        block_stack(ContainerBlocksViT(), 2)


def test_pipeline_checkpoint_layer_files_load_by_name(tmp_path):
    """The layer files DeepSpeed writes per stage map back to the module's names: the explicit chain's layers, and
    the StageLayers of automatic stages (here written by hand, as PipelineModule.save_state_dict does)."""
    from lightning_seqpar.pipeline import PipelineError, load_pipeline_checkpoint
    from lightning_seqpar.pipeline_auto import StageLayer, block_stack, even_split, stage_parameters

    for make in (ContractRegression, EvalRegression):
        torch.manual_seed(0)
        trained = make()
        folder = tmp_path / make.__name__ / "checkpoint"
        folder.mkdir(parents=True)
        if make is ContractRegression:
            layers = trained.pipeline_layers()
        else:
            _, blocks = block_stack(trained, 2)
            layers = [
                StageLayer([p for _, p in stage], lambda x: x)
                for stage in stage_parameters(trained, blocks, even_split(len(blocks), 2))
            ]
        for i, layer in enumerate(layers):
            torch.save(layer.state_dict(), folder / f"layer_{i:02d}-model_states.pt")
        torch.save(
            {"module": None, "optimizer": None, "global_step": 6, "loops": {}}, folder / "mp_rank_00_model_states.pt"
        )
        torch.manual_seed(1)
        fresh = make()
        client = load_pipeline_checkpoint(fresh, tmp_path / make.__name__, "checkpoint")
        assert client == {"global_step": 6, "loops": {}}
        for name, value in trained.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], value), f"{make.__name__}: {name}"
    (folder / "layer_01-model_states.pt").unlink()
    with pytest.raises(PipelineError, match=r"lacks model\.blocks\.1\.norm1\.weight"):
        load_pipeline_checkpoint(EvalRegression(), tmp_path / "EvalRegression", "checkpoint")


def test_micro_batches_split_any_batch_and_combine_outputs():
    from lightning_seqpar.pipeline import PipelineError
    from lightning_seqpar.pipeline_auto import combine_outputs, split_micro_batches

    batch = {"x": torch.arange(10.0).view(5, 2), "meta": ["a"], "lead": torch.tensor(6.0)}
    parts = split_micro_batches(batch, 2, equal=False)
    assert [p["x"].shape[0] for p in parts] == [3, 2] and parts[1]["meta"] == ["a"] and parts[0]["lead"] == 6.0
    with pytest.raises(PipelineError, match="does not split into micro_batches=2 equal micro-batches"):
        split_micro_batches(batch, 2, equal=True)
    out = combine_outputs([{"pred": p["x"], "loss": p["x"].mean()} for p in parts], [3, 2])
    assert torch.equal(out["pred"], batch["x"]) and torch.allclose(out["loss"], batch["x"].mean())


# --- 4 processes ------------------------------------------------------------------------------------------

_WORLD = int(os.environ.get("WORLD_SIZE", 1))


def _trainer(strategy, tmp, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", devices=_WORLD, strategy=strategy, default_root_dir=tmp, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs)


def _metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _fit_and_evaluate(make_module, dataset_name: str, tmp: str, sp: int, *, evaluate: bool, **fit_kwargs) -> dict:
    from lightning.pytorch import seed_everything
    from torch.utils.data import DataLoader, Subset

    from lightning_seqpar import SeqParStrategy

    seed_everything(SEED)
    module = make_module()
    data = build_dataset(dataset_name)
    strategy = SeqParStrategy(sequence_parallel_size=sp, pipeline_stages=2, micro_batches=MICRO, timeout=300)
    trainer = _trainer(strategy, tmp, max_steps=STEPS, **fit_kwargs)
    trainer.fit(
        module, DataLoader(data, batch_size=BATCH), DataLoader(Subset(data, range(VAL_SAMPLES)), batch_size=BATCH)
    )
    out = {"seen": module.seen, "full": trainer.strategy.full_state_dict(), "fit_metrics": _metrics(trainer)}
    # at the end of the fit every rank holds the whole trained model again
    out["module_state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if evaluate:
        val = DataLoader(Subset(data, range(VAL_SAMPLES)), batch_size=BATCH)
        out["validate"] = trainer.validate(module, val, verbose=False)[0]
        out["test"] = trainer.test(module, val, verbose=False)[0]
        out["predict"] = torch.cat(trainer.predict(module, DataLoader(Subset(data, range(6)), batch_size=3)))
        fresh = _trainer(SeqParStrategy(sequence_parallel_size=_WORLD, timeout=300), tmp)  # no pipeline stages
        out["validate_without_stages"] = fresh.validate(module, val, verbose=False)[0]
    return out


def _save_and_resume(tmp: str) -> dict:
    """2 stages x sp 2 without pipeline methods: 2 steps with a checkpoint, then a fresh module resumes for a third."""
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, Subset

    from lightning_seqpar import SeqParStrategy

    data = build_dataset("timm_vit")
    strategy = lambda: SeqParStrategy(sequence_parallel_size=2, pipeline_stages=2, micro_batches=MICRO, timeout=300)  # noqa: E731
    seed_everything(SEED)
    first = EvalRegression()
    checkpoint = ModelCheckpoint(dirpath=os.path.join(tmp, "resume"), save_last=True, every_n_train_steps=1)
    from lightning.pytorch import Trainer

    Trainer(
        accelerator="cpu",
        devices=_WORLD,
        strategy=strategy(),
        default_root_dir=tmp,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=2,
        limit_val_batches=0,
        callbacks=[checkpoint],
    ).fit(first, DataLoader(data, batch_size=BATCH))
    seed_everything(SEED)
    torch.manual_seed(99)  # a different initialisation: the checkpoint must carry the weights
    second = EvalRegression()
    trainer = _trainer(strategy(), tmp, max_steps=STEPS, limit_val_batches=0)
    trainer.fit(second, DataLoader(data, batch_size=BATCH), ckpt_path=checkpoint.last_model_path)
    out = {"seen": first.seen + second.seen, "full": trainer.strategy.full_state_dict(),
           "module_state": {k: v.detach().clone() for k, v in second.state_dict().items()}}
    # evaluation from the checkpoint (written after 2 steps) in a fresh module and Trainer, through the stages
    torch.manual_seed(7)
    third = EvalRegression()
    val = DataLoader(Subset(data, range(VAL_SAMPLES)), batch_size=BATCH)
    out["validate_from_checkpoint"] = _trainer(strategy(), tmp).validate(
        third, val, ckpt_path=checkpoint.last_model_path, verbose=False
    )[0]
    out["first_seen"] = first.seen
    return out


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def pipeline_worker(tmp: str) -> dict:
    import time

    out: dict = {"times": {}}
    no_val = {"limit_val_batches": 0}
    for name, kwargs in (("timm_vit", {"val_check_interval": STEPS}), ("climax", no_val), ("hf_vit", no_val)):
        start = time.perf_counter()
        out[name] = _fit_and_evaluate(
            lambda name=name: EvalRegression(name),
            name,
            tmp,
            2,
            evaluate=name == "timm_vit",
            num_sanity_val_steps=0,
            **kwargs,
        )
        out["times"][name] = time.perf_counter() - start
    start = time.perf_counter()
    out["contract"] = _fit_and_evaluate(
        ContractRegression, "timm_vit", tmp, 2, evaluate=False, val_check_interval=STEPS
    )
    out["times"]["contract"] = time.perf_counter() - start
    start = time.perf_counter()
    out["dp"] = _fit_and_evaluate(
        lambda: EvalRegression("timm_vit"),
        "timm_vit",
        tmp,
        1,
        evaluate=False,
        val_check_interval=STEPS,
        num_sanity_val_steps=0,
    )
    out["times"]["dp"] = time.perf_counter() - start

    start = time.perf_counter()
    out["resume"] = _save_and_resume(tmp)
    out["times"]["resume"] = time.perf_counter() - start

    def skip_connection():
        module = EvalRegression()
        module.model = SkipAroundBlocks()
        _fit_and_evaluate(lambda: module, "timm_vit", tmp, 2, evaluate=False, limit_val_batches=0)

    out["errors"] = {
        "leaky": _error(
            lambda: _fit_and_evaluate(LeakyContract, "timm_vit", tmp, 2, evaluate=False, limit_val_batches=0)
        ),
        "skip": _error(skip_connection),
    }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("pipeline"))
    return run_distributed("tests.test_pipeline:pipeline_worker", 4, timeout=500, env=DS_ENV, tmp=tmp)


def _reference_model(name: str, global_batches, make_module=None):
    """Single-process SGD on the global batches: (trained model in eval mode, state dict)."""
    from tests.reference import train_single_process

    single = train_single_process(
        make_module or (lambda: EvalRegression(name)), global_batches, build_dataset(name), SEED
    )
    return single.module.model.eval(), single.state


def _global_batches(seen: list[list[int]]) -> list[list[int]]:
    """training_step records each micro-batch: MICRO consecutive records make one optimizer step's batch."""
    return [[i for part in seen[s : s + MICRO] for i in part] for s in range(0, len(seen), MICRO)]


def _check_training(result: dict, name: str, label: str) -> nn.Module:
    seen = result[0]["seen"]
    assert all(r["seen"] == seen for r in result), f"{label}: every stage and SP rank must see the same samples"
    model, reference = _reference_model(name, _global_batches(seen))
    keys = [k for k in reference if k.startswith("model.")]
    for rank, r in enumerate(result):
        for what in ("full", "module_state"):
            err, key = _max_rel_error({k: r[what][k] for k in keys}, {k: reference[k] for k in keys})
            assert err < REL_TOL, f"{label} rank {rank}, {what}: {key} off by relative error {err:.2e}"
    return model


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["timm_vit", "climax", "hf_vit"])
def test_automatic_stages_train_like_one_process(runs, name):
    _check_training([r[name] for r in runs], name, f"{name}, 2 stages x sp 2, no pipeline methods")


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_evaluation_through_the_stages_equals_one_process(runs):
    from tests.models import RandomTokens

    result = [r["timm_vit"] for r in runs]
    model = _check_training(result, "timm_vit", "timm_vit")
    data = RandomTokens()
    with torch.no_grad():
        pred = model(data.x[:VAL_SAMPLES])
        mse = F.mse_loss(pred, data.y[:VAL_SAMPLES]).item()
        predictions = model(data.x[:6])
    for rank, r in enumerate(result):
        assert r["validate"]["val_samples"] == VAL_SAMPLES, (
            f"rank {rank} counted {r['validate']['val_samples']} samples"
        )
        for key in ("val_loss", "val_mse"):
            assert r["validate"][key] == pytest.approx(mse, rel=1e-5), f"rank {rank}: {key}"
        assert r["test"]["test_loss"] == pytest.approx(mse, rel=1e-5)
        assert r["validate_without_stages"]["val_loss"] == pytest.approx(mse, rel=1e-5)  # after the fit, any layout
        torch.testing.assert_close(r["predict"], predictions, rtol=1e-5, atol=1e-6)
        # validation during fit (sanity check off, one run after the last step) logged the same on every rank
        assert r["fit_metrics"]["val_samples"] == VAL_SAMPLES and r["fit_metrics"]["val_loss"] == pytest.approx(
            mse, rel=1e-5
        )


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_checkpoint_resume_without_pipeline_methods(runs):
    from tests.models import RandomTokens

    result = [r["resume"] for r in runs]
    assert len(result[0]["seen"]) == STEPS * MICRO
    _check_training(result, "timm_vit", "resumed 2 stages x sp 2")
    model, _ = _reference_model("timm_vit", _global_batches(result[0]["first_seen"]))  # the checkpointed weights
    data = RandomTokens()
    with torch.no_grad():
        mse = F.mse_loss(model(data.x[:VAL_SAMPLES]), data.y[:VAL_SAMPLES]).item()
    for rank, r in enumerate(result):
        assert r["validate_from_checkpoint"]["val_loss"] == pytest.approx(mse, rel=1e-5), f"rank {rank}"


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_explicit_contract_trains_and_validates(runs):
    from tests.models import RandomTokens

    result = [r["contract"] for r in runs]
    seen = result[0]["seen"]  # pipeline_batch records each step's global batch
    assert len(seen) == STEPS and all(r["seen"] == seen for r in result)
    model, reference = _reference_model("timm_vit", seen, ContractRegression)
    keys = [k for k in reference if k.startswith("model.")]
    data = RandomTokens()
    with torch.no_grad():
        mse = F.mse_loss(model(data.x[:VAL_SAMPLES]), data.y[:VAL_SAMPLES]).item()
    for rank, r in enumerate(result):
        for what in ("full", "module_state"):
            err, key = _max_rel_error({k: r[what][k] for k in keys}, {k: reference[k] for k in keys})
            assert err < REL_TOL, f"explicit contract rank {rank}, {what}: {key} off by relative error {err:.2e}"
        # the module's own validation_step ran through the stages (sanity check, then after the last step)
        assert r["fit_metrics"]["val_samples"] == VAL_SAMPLES and r["fit_metrics"]["val_loss"] == pytest.approx(
            mse, rel=1e-5
        )


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_pipeline_with_data_parallel(runs):
    from tests.models import RandomTokens

    result = [r["dp"] for r in runs]
    # dp 2: ranks (0, 2) and (1, 3) are the two stages of one replica each; the global batch is both replicas' samples.
    seen = [a + b for a, b in zip(result[0]["seen"], result[1]["seen"])]
    assert result[2]["seen"] == result[0]["seen"] and result[3]["seen"] == result[1]["seen"]
    model, reference = _reference_model("timm_vit", _global_batches(seen))
    keys = [k for k in reference if k.startswith("model.")]
    for rank, r in enumerate(result):
        err, key = _max_rel_error({k: r["full"][k] for k in keys}, {k: reference[k] for k in keys})
        assert err < REL_TOL, f"pipeline x dp rank {rank}: {key} off by relative error {err:.2e}"
    data = RandomTokens()
    with torch.no_grad():
        mse = F.mse_loss(model(data.x[:VAL_SAMPLES]), data.y[:VAL_SAMPLES]).item()
    for rank, r in enumerate(result):
        assert r["fit_metrics"]["val_samples"] == VAL_SAMPLES, f"rank {rank}"
        assert r["fit_metrics"]["val_loss"] == pytest.approx(mse, rel=1e-5) and r["fit_metrics"][
            "val_mse"
        ] == pytest.approx(mse, rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_errors_before_the_first_step(runs):
    errors = runs[0]["errors"]
    assert (
        errors["leaky"].startswith("PipelineError")
        and "model.patch_embed.weight" in errors["leaky"]
        and "model.pos_embed" in errors["leaky"]
    )
    assert errors["skip"].startswith("PipelineError") and "skip connection" in errors["skip"], errors["skip"]
    assert "model.patch_embed.weight" in errors["skip"] and "stage 1" in errors["skip"]


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_pipeline_benchmark_smoke(tmp_path):
    """benchmarks/bench_pipeline.py (2 stages against ZeRO-3) runs end to end on 2 CPU processes; in fp32 the two
    train to the same losses."""
    import json
    import subprocess
    import sys

    from tests.dist_utils import REPO_ROOT, free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **DS_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO_ROOT / "benchmarks" / "bench_pipeline.py"), "--smoke", "--out", str(tmp_path), "--tag", "smoke"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads((tmp_path / "pipeline_smoke.json").read_text())["results"]}
    assert set(rows) == {"pipeline", "zero3"} and all(r["step_ms"] > 0 for r in rows.values())
    torch.testing.assert_close(
        torch.tensor(rows["pipeline"]["losses"]), torch.tensor(rows["zero3"]["losses"]), rtol=1e-5, atol=0
    )
    assert "| pipeline |" in (tmp_path / "pipeline_smoke.md").read_text()
