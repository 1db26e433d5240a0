"""SeqParStrategy beyond the training contract: resume that continues exactly, validate/test/predict with full
outputs, activation checkpointing, Trainer-level errors, and launching through torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.dist_utils import REPO_ROOT, free_port, run_distributed

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(1200)]


def _trainer(tmp, **kwargs):
    from lightning.pytorch import Trainer

    from lightning_seqpar import SeqParStrategy

    strategy_kwargs = kwargs.pop("strategy_kwargs", {})
    return Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=SeqParStrategy(timeout=300, **strategy_kwargs),
        default_root_dir=tmp,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


WORLD = 2


def features_worker(tmp: str) -> dict:
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, Subset

    from tests.models import LossRecorder, RandomTokens, RegressionModule, build_model


    data = lambda: DataLoader(Subset(RandomTokens(), range(8)), batch_size=2)  # noqa: E731
    out = {}

    # Uninterrupted: 2 epochs of 4 steps.
    seed_everything(7)
    rec, module = LossRecorder(), RegressionModule()
    _trainer(tmp, max_epochs=2, callbacks=[rec], enable_checkpointing=False).fit(module, data())
    out["uninterrupted"] = rec.losses
    out["uninterrupted_seen"] = module.seen

    # Interrupted after epoch 1, then resumed from the checkpoint written on rank 0.
    seed_everything(7)
    rec1 = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=os.path.join(tmp, "ckpt"), save_last=True)
    _trainer(tmp, max_epochs=1, callbacks=[rec1, ckpt]).fit(RegressionModule(), data())
    seed_everything(7)  # the relaunched command seeds as the first run did ...
    torch.manual_seed(123)  # ... but the RNG state differs: the checkpoint must carry what matters
    rec2 = LossRecorder()
    module = RegressionModule()
    _trainer(tmp, max_epochs=2, callbacks=[rec2], enable_checkpointing=False).fit(
        module, data(), ckpt_path=ckpt.last_model_path
    )
    out["resumed"] = rec1.losses + rec2.losses

    # Interrupted in the middle of epoch 2 (after global step 6 of 8): the resumed run takes batches 7 and 8 of
    # that epoch, neither repeating nor skipping a sample.
    seed_everything(7)
    rec3, first = LossRecorder(), RegressionModule()
    mid = ModelCheckpoint(dirpath=os.path.join(tmp, "mid"), every_n_train_steps=6, save_top_k=-1)
    _trainer(tmp, max_steps=6, callbacks=[rec3, mid]).fit(first, data())
    seed_everything(7)
    torch.manual_seed(321)
    rec4, second = LossRecorder(), RegressionModule()
    _trainer(tmp, max_epochs=2, callbacks=[rec4], enable_checkpointing=False).fit(
        second, data(), ckpt_path=mid.best_model_path or mid.last_model_path
    )
    out["mid_epoch_losses"] = rec3.losses + rec4.losses
    out["mid_epoch_seen"] = first.seen + second.seen
    out["checkpoint_keys"] = sorted(torch.load(ckpt.last_model_path, weights_only=False)["state_dict"])

    # The checkpoint loads into the plain model and gives the same predictions as the trained one.
    plain = build_model("timm_vit")
    plain.load_state_dict({k.removeprefix("model."): v for k, v in module.state_dict().items()})
    x = RandomTokens().x[:4]
    trainer = _trainer(tmp)
    predictions = trainer.predict(module, DataLoader(Subset(RandomTokens(), range(4)), batch_size=2))
    out["predict_error"] = (torch.cat(predictions) - plain(x)).abs().max().item()
    out["predict_shape"] = list(torch.cat(predictions).shape)
    out["validate"] = trainer.validate(module, DataLoader(Subset(RandomTokens(), range(4)), batch_size=2))[0][
        "val_loss"
    ]
    out["validate_plain"] = torch.nn.functional.mse_loss(plain(x), RandomTokens().y[:4]).item()

    # Activation checkpointing gives the same training as without.
    for checkpointing in (False, True):
        seed_everything(7)
        rec = LossRecorder()
        trainer = _trainer(tmp, max_steps=3, callbacks=[rec], enable_checkpointing=False,
                           strategy_kwargs={"activation_checkpointing": checkpointing})
        trainer.fit(RegressionModule(), data())
        out[f"checkpointing_{checkpointing}"] = rec.losses

    # Errors that name the problem and the fix.
    errors = {}
    for name, kwargs, model in (
        ("sp_not_dividing_world", {"sequence_parallel_size": 4}, "timm_vit"),
        ("backend_unavailable", {"attention_backend": "flash_attn"}, "timm_vit"),
    ):
        try:
            _trainer(tmp, max_steps=1, enable_checkpointing=False, strategy_kwargs=kwargs).fit(
                RegressionModule(model), data()
            )
            errors[name] = None
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return run_distributed(
        "tests.test_strategy_features:features_worker", 2, timeout=400, tmp=str(tmp_path_factory.mktemp("features"))
    )


def test_resume_continues_exactly(features):
    for r in features:
        assert len(r["uninterrupted"]) == 8
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(r["uninterrupted"]), rtol=1e-6, atol=1e-7)


def test_mid_epoch_resume_neither_repeats_nor_skips(features):
    for r in features:
        assert r["mid_epoch_seen"] == r["uninterrupted_seen"]
        torch.testing.assert_close(
            torch.tensor(r["mid_epoch_losses"]), torch.tensor(r["uninterrupted"]), rtol=1e-6, atol=1e-7
        )


def test_checkpoint_has_plain_keys(features):
    assert "model.blocks.0.attn.qkv.weight" in features[0]["checkpoint_keys"]
    assert not any("forward" in k or "_orig" in k for k in features[0]["checkpoint_keys"])


def test_predict_and_validate_return_full_outputs(features):
    for r in features:
        assert r["predict_shape"] == [4, 13, 3]
        assert r["predict_error"] < 1e-5
        assert abs(r["validate"] - r["validate_plain"]) < 1e-5 * max(1.0, abs(r["validate_plain"]))


def test_activation_checkpointing_same_losses(features):
    for r in features:
        torch.testing.assert_close(
            torch.tensor(r["checkpointing_True"]), torch.tensor(r["checkpointing_False"]), rtol=1e-6, atol=1e-7
        )


def test_trainer_level_errors(features):
    errors = features[0]["errors"]
    assert (
        "TopologyError" in errors["sp_not_dividing_world"]
        and "world_size=2 is not divisible" in errors["sp_not_dividing_world"]
    )
    assert errors["backend_unavailable"].startswith("BackendUnavailableError")
    assert "attention_backend='flash_attn'" in errors["backend_unavailable"]
    assert "flash-attn is not installed" in errors["backend_unavailable"]


def test_strategy_argument_errors():
    from lightning_seqpar import SeqParStrategy

    with pytest.raises(ValueError, match="attention must be 'auto', 'ulysses', 'lss', 'ring' or 'hybrid', got 'star'"):
        SeqParStrategy(attention="star")
    with pytest.raises(
        ValueError, match="attention='ring' runs its own block kernels; attention_backend must be one of auto, math"
    ):
        SeqParStrategy(attention="ring", attention_backend="sdpa_efficient")
    with pytest.raises(
        ValueError,
        match="activation_checkpointing must be False, True, 'full', 'save_attention' or 'offload', got 'some'",
    ):
        SeqParStrategy(activation_checkpointing="some")
    with pytest.raises(ValueError, match="ulysses_degree=2 is only for attention='hybrid'"):
        SeqParStrategy(attention="ulysses", ulysses_degree=2)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        SeqParStrategy(attention_backend="xformers")
    with pytest.raises(ValueError, match="sequence_parallel_size must be a positive integer, got 0"):
        SeqParStrategy(sequence_parallel_size=0)
    with pytest.raises(
        ValueError, match="compile_blocks must be True, False or a dict of torch.compile options, got 'yes'"
    ):
        SeqParStrategy(compile_blocks="yes")


def test_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_seqpar  # noqa: F401

    assert StrategyRegistry["seqpar_lss"]["init_params"] == {"attention": "lss"}
    assert {"seqpar", "seqpar_ulysses", "seqpar_lss", "seqpar_ring", "seqpar_hybrid"} <= set(StrategyRegistry)


def test_torchrun_launch(tmp_path):
    """The user-guide example under torchrun (TorchElastic environment), 2 processes, sp = 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO_ROOT / "examples" / "own_model.py")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final train_loss" in proc.stdout
    assert "encoder.layers.0.self_attn  attention" in proc.stdout


def test_strategy_builds_one_class_per_engine():
    """``SeqParStrategy(...)`` and every registered name build the engine class their arguments select; all are
    ``SeqParStrategy`` instances, and an engine class refuses another engine's arguments."""
    import inspect

    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_seqpar import (
        SeqParDDPStrategy,
        SeqParDeepSpeedStrategy,
        SeqParFSDPStrategy,
        SeqParPipelineStrategy,
        SeqParStrategy,
    )
    from lightning_seqpar.strategies import STRATEGY_NAMES

    assert type(SeqParStrategy()) is SeqParDDPStrategy
    assert type(SeqParStrategy(2, "ulysses")) is SeqParDDPStrategy  # positional arguments still bind
    assert type(SeqParStrategy(zero_stage=1)) is SeqParDeepSpeedStrategy
    assert type(SeqParStrategy(deepspeed_config={"zero_optimization": {"stage": 0}})) is SeqParDeepSpeedStrategy
    assert type(SeqParStrategy(pipeline_stages=2, micro_batches=2)) is SeqParPipelineStrategy
    expected = {"seqpar_zero1": SeqParDeepSpeedStrategy, "seqpar_zero2": SeqParDeepSpeedStrategy,
                "seqpar_zero3": SeqParDeepSpeedStrategy, "seqpar_zero3_offload": SeqParDeepSpeedStrategy,
                "seqpar_fsdp": SeqParFSDPStrategy}
    for name in STRATEGY_NAMES:
        strategy = StrategyRegistry.get(name)
        assert type(strategy) is expected.get(name, SeqParDDPStrategy), name
        assert isinstance(strategy, SeqParStrategy)
    assert "zero_stage" in inspect.signature(SeqParStrategy).parameters  # what LightningCLI reads
    with pytest.raises(ValueError, match=r"SeqParDDPStrategy is the DDP engine; zero_stage=1"):
        SeqParDDPStrategy(zero_stage=1)
    with pytest.raises(RuntimeError, match="device mesh before processes have initialized"):
        _ = SeqParStrategy().device_mesh
