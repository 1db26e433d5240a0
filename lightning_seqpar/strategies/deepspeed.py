"""The DeepSpeed ZeRO engine of SeqParStrategy: the engine from the Trainer's settings on the mesh's ``dp_sp`` ranks,
its optimizer step, and sharded checkpoints (see docs/sharding.md)."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from typing_extensions import override

from lightning_seqpar import deepspeed_engine as ds
from lightning_seqpar import relayout
from lightning_seqpar.reliability import nonfinite_step_guard
from lightning_seqpar.strategies.base import SeqParStrategy
from lightning_seqpar.strategies.data import continue_stopped_epoch
from lightning_seqpar.strategies.registry import check_pipeline_arguments


class SeqParDeepSpeedStrategy(SeqParStrategy):
    """Sequence parallelism with a DeepSpeed ZeRO engine over the ``dp_sp`` ranks (DeepSpeed's mpu is the mesh's).

    Takes :class:`SeqParStrategy`'s arguments; ``SeqParStrategy(zero_stage=...)`` or
    ``SeqParStrategy(deepspeed_config=...)`` builds this class. ZeRO partitions over the flattened ``dp_sp`` mesh
    dimension (:class:`~lightning_seqpar.topology.DeepSpeedMPU`); Lightning owns the accumulation schedule and tells the
    engine each boundary. Checkpoints are DeepSpeed directories, re-laid out at load for another ``dp * sp`` or ZeRO
    stage.

    Raises:
        ValueError: ``pipeline_stages > 1`` with ZeRO 2/3, ``on_nonfinite="skip"`` (the engine has already accumulated
            the gradients), or an invalid ``pipeline_stages`` / ``micro_batches``.
        DeepSpeedConfigError: a ZeRO / offload / config combination DeepSpeed cannot run.
    """

    uses_deepspeed = True

    @override
    def _init_engine(self, *, zero_stage: Any, offload_optimizer: bool, offload_parameters: bool, pipeline_stages: Any,
                     micro_batches: Any, deepspeed_config: Any) -> None:
        name = type(self).__name__
        check_pipeline_arguments(name, pipeline_stages, micro_batches)
        self.deepspeed_config = ds.load_user_config(deepspeed_config)
        # Validates the combination now (the Trainer-derived keys are filled in at setup).
        merged = ds.build_config(
            zero_stage=zero_stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
            user_config=self.deepspeed_config,
        )
        self.zero_stage = int(merged["zero_optimization"].get("stage", 0))
        if pipeline_stages > 1 and self.zero_stage >= 2:
            raise ValueError(
                f"{name}: zero_stage={self.zero_stage} cannot be combined with pipeline_stages={pipeline_stages}:"
                " DeepSpeed's pipeline engine supports ZeRO 0 and 1 only (ZeRO-2/3 partition the gradients and"
                " parameters its stages exchange). Use zero_stage=1, or pipeline_stages=1 with ZeRO-3."
            )
        self.offload_optimizer, self.offload_parameters = offload_optimizer, offload_parameters
        self.pipeline_stages, self.micro_batches = pipeline_stages, micro_batches
        if self.on_nonfinite == "skip":
            raise ValueError(
                f"{name}: on_nonfinite='skip' is not available with DeepSpeed (zero_stage, pipeline_stages or"
                " deepspeed_config): its engine has already accumulated the gradients. Use 'raise' or 'stop'."
            )

    @property
    def deepspeed_engine(self) -> Any:
        """The DeepSpeed engine (``PipelineEngine`` with pipelines) while fitting, else None."""
        return self.model if hasattr(self.model, "save_checkpoint") else None

    # --- setup -------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer) -> None:
        self.prepare_module(trainer)
        _refuse_lr_finder(trainer, self.zero_stage, self.pipeline_stages)
        assert self.accelerator is not None and self.topology is not None
        self.accelerator.setup(trainer)
        if not isinstance(self.precision_plugin, DeepSpeedPrecision):
            self.precision_plugin = DeepSpeedPrecision(self.precision_plugin.precision)
        self.model = _convert_outside_metrics(self.precision_plugin, self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self._initialize_engine(trainer)
        else:
            self._setup_evaluation()
        self.setup_precision_plugin()
        self.barrier()

    def _setup_evaluation(self) -> None:
        """Before validate / test / predict: the ZeRO engine is for fitting; evaluation runs the plain module."""
        if ds.is_zero3_partitioned(self.lightning_module):
            raise ValueError(
                f"{type(self).__name__}: this {type(self.lightning_module).__name__} holds ZeRO-3 partitions from an"
                " earlier fit. To validate, test or predict, load the full weights into a fresh module first:"
                " fresh.load_state_dict(trainer.strategy.full_state_dict()) right after fit (on every rank), or"
                " lightning_seqpar.consolidate_checkpoint(checkpoint_dir) from a checkpoint."
            )

    def _gradient_accumulation_steps(self, trainer: Trainer) -> int:
        return trainer.accumulate_grad_batches

    def _config_zero_stage(self, trainer: Trainer) -> int:
        return self.zero_stage

    def _trainer_config(self, trainer: Trainer) -> dict[str, Any]:
        """The DeepSpeed config: Trainer settings, then the strategy's, then the explicit ``deepspeed_config``."""
        accumulate = self._gradient_accumulation_steps(trainer)
        algorithm = trainer.gradient_clip_algorithm
        return ds.build_config(
            zero_stage=self._config_zero_stage(trainer),
            offload_optimizer=self.offload_optimizer,
            offload_parameters=self.offload_parameters,
            precision=self.precision_plugin.precision,
            gradient_clip_val=trainer.gradient_clip_val,
            gradient_clip_algorithm=getattr(algorithm, "value", algorithm),
            gradient_accumulation_steps=accumulate,
            user_config=self.deepspeed_config,
        )

    def _client_optimizer(self, config: dict[str, Any]) -> tuple[Any, list]:
        """The one optimizer (None with an ``"optimizer"`` section) and at most one scheduler of
        configure_optimizers."""
        if "optimizer" in config:
            return None, []
        optimizers, schedulers = _init_optimizers_and_lr_schedulers(self.lightning_module)
        if len(optimizers) != 1 or len(schedulers) > 1:
            raise ValueError(
                f"{type(self).__name__} takes one optimizer and at most one LR scheduler from configure_optimizers;"
                f" got {len(optimizers)} and {len(schedulers)}."
            )
        return optimizers[0], schedulers

    def _build_engine(self, optimizer: Any, config: dict[str, Any]) -> tuple[Any, Any]:
        assert self.topology is not None
        return ds.initialize_engine(self.model, optimizer, config, self.topology.mpu)

    def _initialize_engine(self, trainer: Trainer) -> None:
        assert self.topology is not None
        config = self._trainer_config(trainer)
        self.zero_stage = int(config["zero_optimization"].get("stage", 0))
        optimizer, schedulers = self._client_optimizer(config)
        engine, engine_optimizer = self._build_engine(optimizer, config)
        if engine.lr_scheduler is not None:  # a "scheduler" section: Lightning steps it, per optimizer step
            schedulers = [LRSchedulerConfig(engine.lr_scheduler, interval="step")]
            engine.lr_scheduler = None
        self.model = engine
        self.optimizers = [engine_optimizer]
        self.lr_scheduler_configs = schedulers
        rank_zero_info(
            f"{type(self).__name__}: DeepSpeed ZeRO-{self.zero_stage} over {self.topology.dp * self.topology.sp} ranks"
            f" per stage, {self.topology.pp} pipeline stage(s)"
        )

    # --- steps -------------------------------------------------------------------------------------------

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """``engine.backward``, told whether this micro-batch ends the optimizer step, without dividing the loss by the
        accumulation count a second time.

        Lightning's closure has already divided the loss by ``accumulate_grad_batches``; DeepSpeed's ``backward``
        divides by ``gradient_accumulation_steps`` again unless ``scale_wrt_gas=False`` (which would halve the update
        at 2 accumulation steps). The boundary follows Lightning's schedule (it also steps on an epoch's last batch),
        so ZeRO reduces, clips and steps the gradient accumulated over the whole step, as single-process training does.
        """
        trainer = self.lightning_module.trainer
        engine = self.deepspeed_engine
        if engine is not None and trainer is not None and trainer.training:
            engine.set_gradient_accumulation_boundary(not trainer.fit_loop._should_accumulate())
        return super().backward(closure_loss, optimizer, *args, **{**kwargs, "scale_wrt_gas": False})

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning's no-sync context for accumulating micro-batches: the engine is told the boundary instead (ZeRO-2/3
        refuse ``no_sync``; ZeRO-1 and 0 reduce only at the boundary)."""
        yield

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        model = model or self.lightning_module
        trainer = self.lightning_module.trainer
        guarded = nonfinite_step_guard(
            closure,
            policy=self.on_nonfinite,
            parameters=lambda: (),  # gradients live in DeepSpeed's buffers; the guard checks the loss
            device=self.root_device,
            step=trainer.global_step,
            request_stop=lambda: setattr(trainer, "should_stop", True),
            zero_grad=lambda: None,
        )
        result = guarded()
        self.precision_plugin._after_closure(model, optimizer)
        if result is None:  # on_nonfinite="stop": leave without the step
            return None
        return self.model.step()

    # --- checkpoints: DeepSpeed writes each rank's partition itself ------------------------------------------

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass  # the engine loaded it (load_checkpoint)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pass  # the engine loaded it (load_checkpoint)

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return {}  # DeepSpeed writes each rank's optimizer partition itself (save_checkpoint)

    @override
    def parallel_settings(self) -> dict[str, Any]:
        """The base layout plus ``zero_stage`` and ``sequence_data_parallel_size`` (``dp * sp``: ZeRO's partitions)."""
        assert self.topology is not None
        return {
            **super().parallel_settings(),
            "zero_stage": self.zero_stage,
            "sequence_data_parallel_size": self.topology.dp * self.topology.sp,
        }

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint["seqpar"] = self.parallel_settings()
        if self.deepspeed_engine is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} writes through DeepSpeed, which takes no storage_options.")
        # A directory: every rank writes its ZeRO partition (or pipeline stage) under <filepath>/checkpoint/.
        filepath = self.broadcast(filepath)
        client_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.deepspeed_engine.save_checkpoint(filepath, client_state=client_state, tag=ds.CHECKPOINT_TAG)
        if self.is_global_zero:  # the client keys let a resume on another layout read Lightning's state back
            ds.write_layout(filepath, {**checkpoint["seqpar"], "client_keys": sorted(client_state)})
        self.barrier()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self.deepspeed_engine is None:
            raise ValueError(
                f"{type(self).__name__}: {checkpoint_path} is a DeepSpeed checkpoint, which loads while fitting only;"
                " to validate, test or predict, consolidate it (python -m lightning_seqpar.consolidate DIR OUT.pt) and"
                " load OUT.pt."
            )
        checkpoint_path = self.broadcast(checkpoint_path)
        if Path(checkpoint_path).is_file():
            raise ds.DeepSpeedConfigError(
                f"{checkpoint_path} is a single-file checkpoint of the DDP path (zero_stage=0); DeepSpeed resumes from"
                " its own shard directories. Resume it with SeqParStrategy(zero_stage=0), or start from its weights"
                " (the optimizer state restarts):"
                f" module.load_state_dict(torch.load({str(checkpoint_path)!r})['state_dict']) and fit without"
                " ckpt_path."
            )
        load_universal = bool(self.deepspeed_engine.config.get("checkpoint", {}).get("load_universal", False))
        layout = ds.read_layout(checkpoint_path)
        if ds.check_resume_layout(checkpoint_path, layout, self.parallel_settings(), load_universal=load_universal):
            assert layout is not None
            shards = Path(checkpoint_path) / ds.CHECKPOINT_TAG
            rank_zero_info(
                f"{type(self).__name__}: re-laying out {checkpoint_path} (ZeRO-{layout.get('zero_stage')} over"
                f" {layout.get('sequence_data_parallel_size')} ranks) for ZeRO-{self.zero_stage} over"
                f" {self.parallel_settings()['sequence_data_parallel_size']} ranks"
            )
            relayout.load_full_state(self.deepspeed_engine, relayout.read_full_state(shards))
            return continue_stopped_epoch(relayout.checkpoint_client_state(shards, layout.get("client_keys", [])))
        _, client_state = self.deepspeed_engine.load_checkpoint(
            checkpoint_path,
            tag=ds.CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=self.lightning_module.strict_loading,
        )
        if client_state is None:
            raise ValueError(
                f"{type(self).__name__}: DeepSpeed found no checkpoint under {checkpoint_path}/{ds.CHECKPOINT_TAG}."
            )
        return continue_stopped_epoch(client_state)


def _refuse_lr_finder(trainer: Trainer, zero_stage: int, pipeline_stages: int) -> None:
    """The learning-rate finder drives the optimizer with its own torch LR scheduler, which DeepSpeed's optimizer
    (not a ``torch.optim.Optimizer``) cannot take: say so before the engine is built, instead of a TypeError inside
    it."""
    from lightning.pytorch.callbacks import LearningRateFinder

    if any(isinstance(callback, LearningRateFinder) for callback in trainer.callbacks):
        raise ValueError(
            f"SeqParStrategy(zero_stage={zero_stage}, pipeline_stages={pipeline_stages}): the learning-rate finder"
            " (Tuner.lr_find or the LearningRateFinder callback) cannot drive DeepSpeed's optimizer. Run the finder"
            " with SeqParStrategy(zero_stage=0, pipeline_stages=1) on the same model, data and sequence_parallel_size"
            " (ZeRO does not change the losses it measures), then train with the learning rate it suggests."
        )


def _convert_outside_metrics(precision_plugin: Any, module: Any) -> Any:
    """``precision_plugin.convert_module(module)`` with torchmetrics metrics left out.

    DeepSpeed's "true" precisions call ``module.to(dtype)``, which torchmetrics applies to metric states as well
    (it exempts ``.half()``/``.float()`` only): a float64 accumulator would become float32 and refuse the float64
    updates of the metric's own ``update`` (and a 16-bit one would lose the sums). Metrics keep their dtypes.
    """
    from torchmetrics import Metric

    parked = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent._modules.items()
        if isinstance(child, Metric)
    ]
    for parent, name, _ in parked:
        parent._modules[name] = None  # Module._apply skips empty slots
    try:
        return precision_plugin.convert_module(module)
    finally:
        for parent, name, child in parked:
            parent._modules[name] = child
