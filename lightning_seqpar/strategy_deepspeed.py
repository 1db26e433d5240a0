"""The DeepSpeed half of SeqParStrategy: settings, engine creation from the Trainer, its optimizer step, sharded checkpoints.

:class:`~lightning_seqpar.strategy.SeqParStrategy` inherits these helpers and calls them from its Lightning hooks
when ``zero_stage > 0``, ``pipeline_stages > 1`` or a ``deepspeed_config`` is given (``self.uses_deepspeed``); the
hooks themselves stay in strategy.py, so the DDP path reads in one place. See docs/sharding.md.
"""

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

from lightning_seqpar import deepspeed_engine as ds
from lightning_seqpar import pipeline, pipeline_stages, relayout
from lightning_seqpar.reliability import nonfinite_step_guard


class DeepSpeedEngineMixin:
    """DeepSpeed helpers of :class:`~lightning_seqpar.strategy.SeqParStrategy` (mixed into it; not a strategy alone)."""

    def _init_deepspeed_settings(self, zero_stage, offload_optimizer, offload_parameters, pipeline_stages, micro_batches, deepspeed_config) -> None:
        if not isinstance(pipeline_stages, int) or pipeline_stages < 1:
            raise ValueError(f"SeqParStrategy: pipeline_stages must be a positive integer, got {pipeline_stages!r}.")
        if micro_batches is not None and (not isinstance(micro_batches, int) or micro_batches < 1):
            raise ValueError(f"SeqParStrategy: micro_batches must be a positive integer, got {micro_batches!r}.")
        if micro_batches is not None and pipeline_stages == 1:
            raise ValueError("SeqParStrategy: micro_batches is for pipeline_stages > 1; use Trainer(accumulate_grad_batches=...) otherwise.")
        self.deepspeed_config = ds.load_user_config(deepspeed_config)
        # Validates the combination now (the Trainer-derived keys are filled in at setup).
        merged = ds.build_config(
            zero_stage=zero_stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
            user_config=self.deepspeed_config,
        )
        self.zero_stage = int(merged["zero_optimization"].get("stage", 0))
        if pipeline_stages > 1 and self.zero_stage >= 2:
            raise ValueError(
                f"SeqParStrategy: zero_stage={self.zero_stage} cannot be combined with pipeline_stages={pipeline_stages}:"
                " DeepSpeed's pipeline engine supports ZeRO 0 and 1 only (ZeRO-2/3 partition the gradients and"
                " parameters its stages exchange). Use zero_stage=1, or pipeline_stages=1 with ZeRO-3."
            )
        self.offload_optimizer, self.offload_parameters = offload_optimizer, offload_parameters
        self.pipeline_stages, self.micro_batches = pipeline_stages, micro_batches
        self.uses_deepspeed = zero_stage != 0 or pipeline_stages > 1 or deepspeed_config is not None
        if self.uses_deepspeed and self.on_nonfinite == "skip":
            raise ValueError(
                "SeqParStrategy: on_nonfinite='skip' is not available with DeepSpeed (zero_stage, pipeline_stages or"
                " deepspeed_config): its engine has already accumulated the gradients. Use 'raise' or 'stop'."
            )

    # --- the engine ---------------------------------------------------------------------------------------

    @property
    def deepspeed_engine(self) -> Any:
        """The DeepSpeed engine (``PipelineEngine`` with pipelines) while fitting with DeepSpeed, else None."""
        return self.model if self.uses_deepspeed and hasattr(self.model, "save_checkpoint") else None

    def _setup_deepspeed(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.topology is not None
        self.accelerator.setup(trainer)
        if not isinstance(self.precision_plugin, DeepSpeedPrecision):
            self.precision_plugin = DeepSpeedPrecision(self.precision_plugin.precision)
        self.model = _convert_outside_metrics(self.precision_plugin, self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self._initialize_engine(trainer)
        elif self.pipeline_stages > 1:
            # Evaluation runs the module's own steps through the stages, split as the fit split them (if any).
            assert self.applied_plan is not None and self.topology is not None
            bounds = getattr(self, "_pipeline_bounds", None)
            self._pipeline = pipeline_stages.PipelineStages.automatic(self.lightning_module, self.topology, self.applied_plan.runtime.exit, bounds)
            self.applied_plan.add_undo(self._pipeline.remove)
            self._pipeline.check_weights()
        elif ds.is_zero3_partitioned(self.lightning_module):
            raise ValueError(
                f"SeqParStrategy: this {type(self.lightning_module).__name__} holds ZeRO-3 partitions from an earlier fit."
                " To validate, test or predict, load the full weights into a fresh module first:"
                " fresh.load_state_dict(trainer.strategy.full_state_dict()) right after fit (on every rank), or"
                " lightning_seqpar.consolidate_checkpoint(checkpoint_dir) from a checkpoint."
            )
        self.setup_precision_plugin()
        self.barrier()

    def _trainer_config(self, trainer: Trainer) -> dict[str, Any]:
        """The DeepSpeed config: Trainer settings, then the strategy's, then the explicit ``deepspeed_config``."""
        accumulate = trainer.accumulate_grad_batches
        if self.pipeline_stages > 1:
            if accumulate != 1:
                raise pipeline.PipelineError(
                    f"with pipeline_stages > 1 every DataLoader batch is one optimizer step, cut into micro-batches: set"
                    f" SeqParStrategy(micro_batches={accumulate}) instead of Trainer(accumulate_grad_batches={accumulate})."
                )
            accumulate = self.micro_batches or 1
        algorithm = trainer.gradient_clip_algorithm
        zero_stage = self.zero_stage
        if self.pipeline_stages > 1 and trainer.gradient_clip_val and zero_stage == 0:
            # DeepSpeed 0.19.8's stage-0 pipeline clipping leaves later stages out of the norm; ZeRO-1's norm is exact.
            rank_zero_info("SeqParStrategy: gradient clipping with pipeline stages runs with ZeRO-1 (exact gradient norm).")
            zero_stage = 1
        return ds.build_config(
            zero_stage=zero_stage,
            offload_optimizer=self.offload_optimizer,
            offload_parameters=self.offload_parameters,
            precision=self.precision_plugin.precision,
            gradient_clip_val=trainer.gradient_clip_val,
            gradient_clip_algorithm=getattr(algorithm, "value", algorithm),
            gradient_accumulation_steps=accumulate,
            user_config=self.deepspeed_config,
        )

    def _initialize_engine(self, trainer: Trainer) -> None:
        assert self.topology is not None
        module = self.lightning_module
        config = self._trainer_config(trainer)
        self.zero_stage = int(config["zero_optimization"].get("stage", 0))
        optimizer, schedulers = None, []
        if "optimizer" not in config:
            optimizers, schedulers = _init_optimizers_and_lr_schedulers(module)
            if len(optimizers) != 1 or len(schedulers) > 1:
                raise ValueError(
                    f"SeqParStrategy with DeepSpeed takes one optimizer and at most one LR scheduler from configure_optimizers;"
                    f" got {len(optimizers)} and {len(schedulers)}."
                )
            optimizer = optimizers[0]
        if self.pipeline_stages > 1:
            assert self.applied_plan is not None
            net, self._pipeline = pipeline_stages.build_training_stages(module, self.topology, self.applied_plan)
            self._pipeline_bounds = self._pipeline.bounds
            # The names (in the LightningModule) of what this rank's stage trains: full_state_dict merges by them.
            local = {id(t) for t in [*net.parameters(), *net.buffers()]}
            self._stage_state_names = [name for name, t in module.state_dict(keep_vars=True).items() if id(t) in local]
            if optimizer is not None:
                ds.restrict_optimizer(optimizer, net.parameters())
            engine, engine_optimizer = ds.initialize_engine(net, optimizer, config, mpu=None)
            self._pipeline.match_engine_dtype(net)
            if not self._pipeline.explicit:
                self._pipeline.guard_first_step(engine)
        else:
            engine, engine_optimizer = ds.initialize_engine(self.model, optimizer, config, self.topology.mpu)
        if engine.lr_scheduler is not None:  # a "scheduler" section: Lightning steps it, per optimizer step
            schedulers = [LRSchedulerConfig(engine.lr_scheduler, interval="step")]
            engine.lr_scheduler = None
        self.model = engine
        self.optimizers = [engine_optimizer]
        self.lr_scheduler_configs = schedulers
        rank_zero_info(
            f"SeqParStrategy: DeepSpeed ZeRO-{self.zero_stage} over {self.topology.dp * self.topology.sp} ranks per stage,"
            f" {self.topology.pp} pipeline stage(s)"
        )

    def full_state_dict(self) -> dict[str, Tensor]:
        """The LightningModule's full state dict on CPU, gathering ZeRO-3 partitions and, with pipeline stages, each
        stage's trained layers from the ranks that own them (call on every rank)."""
        state = ds.full_state_dict(self.lightning_module)
        names = getattr(self, "_stage_state_names", None)
        if self.pipeline_stages > 1 and names is not None:
            assert self.topology is not None
            import torch.distributed as dist

            stages: list[dict[str, Tensor] | None] = [None] * self.topology.pp
            dist.all_gather_object(stages, {name: state[name] for name in names}, group=self.topology.pipeline_group)
            for stage_state in stages:  # each stage's own layers replace this rank's untrained copies
                state.update(stage_state or {})
        return state

    def _deepspeed_backward_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Before ``engine.backward``: tell the engine whether this micro-batch ends the optimizer step, and keep it
        from dividing the loss by the accumulation count a second time.

        Lightning's closure has already divided the loss by ``accumulate_grad_batches``; DeepSpeed's ``backward``
        divides by ``gradient_accumulation_steps`` again unless ``scale_wrt_gas=False`` (which would halve the update
        at 2 accumulation steps). The boundary follows Lightning's schedule (it also steps on an epoch's last batch),
        so ZeRO reduces, clips and steps the gradient accumulated over the whole step, as single-process training does.
        """
        trainer = self.lightning_module.trainer
        engine = self.deepspeed_engine
        if engine is not None and trainer is not None and trainer.training:
            engine.set_gradient_accumulation_boundary(not trainer.fit_loop._should_accumulate())
        return {**kwargs, "scale_wrt_gas": False}

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning's no-sync context for accumulating micro-batches. With DeepSpeed the engine is told the boundary
        instead (ZeRO-2/3 refuse ``no_sync``; ZeRO-1 and 0 reduce only at the boundary)."""
        if self.uses_deepspeed:
            yield
        else:
            with super().block_backward_sync():  # type: ignore[misc]
                yield

    def _deepspeed_optimizer_step(self, optimizer: Any, closure: Any, model: Any) -> Any:
        model = model or self.lightning_module
        if self.pipeline_stages > 1:
            return closure()
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

    def _save_deepspeed_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None) -> None:
        if storage_options is not None:
            raise TypeError("SeqParStrategy with DeepSpeed writes through DeepSpeed, which takes no storage_options.")
        # A directory: every rank writes its ZeRO partition (or pipeline stage) under <filepath>/checkpoint/.
        filepath = self.broadcast(filepath)
        client_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.deepspeed_engine.save_checkpoint(filepath, client_state=client_state, tag=ds.CHECKPOINT_TAG)
        if self.is_global_zero:  # the client keys let a resume on another layout read Lightning's state back
            ds.write_layout(filepath, {**checkpoint["seqpar"], "client_keys": sorted(client_state)})
        self.barrier()

    def _load_deepspeed_checkpoint(self, checkpoint_path: Any) -> dict[str, Any]:
        if self.deepspeed_engine is None and self.pipeline_stages > 1:  # evaluation: the weights of every stage
            return pipeline.load_pipeline_checkpoint(self.lightning_module, checkpoint_path, ds.CHECKPOINT_TAG)
        if self.deepspeed_engine is None:
            raise ValueError(
                f"SeqParStrategy: {checkpoint_path} is a DeepSpeed checkpoint, which loads while fitting only; to validate,"
                " test or predict, consolidate it (python -m lightning_seqpar.consolidate DIR OUT.pt) and load OUT.pt."
            )
        checkpoint_path = self.broadcast(checkpoint_path)
        if Path(checkpoint_path).is_file():
            raise ds.DeepSpeedConfigError(
                f"{checkpoint_path} is a single-file checkpoint of the DDP path (zero_stage=0); DeepSpeed resumes from its own"
                " shard directories. Resume it with SeqParStrategy(zero_stage=0), or start from its weights (the optimizer"
                f" state restarts): module.load_state_dict(torch.load({str(checkpoint_path)!r})['state_dict']) and fit"
                " without ckpt_path."
            )
        load_universal = bool(self.deepspeed_engine.config.get("checkpoint", {}).get("load_universal", False))
        layout = ds.read_layout(checkpoint_path)
        if ds.check_resume_layout(checkpoint_path, layout, self.parallel_settings(), load_universal=load_universal):
            assert layout is not None
            shards = Path(checkpoint_path) / ds.CHECKPOINT_TAG
            rank_zero_info(
                f"SeqParStrategy: re-laying out {checkpoint_path} (ZeRO-{layout.get('zero_stage')} over"
                f" {layout.get('sequence_data_parallel_size')} ranks) for ZeRO-{self.zero_stage} over"
                f" {self.parallel_settings()['sequence_data_parallel_size']} ranks"
            )
            relayout.load_full_state(self.deepspeed_engine, relayout.read_full_state(shards))
            return relayout.checkpoint_client_state(shards, layout.get("client_keys", []))
        _, client_state = self.deepspeed_engine.load_checkpoint(
            checkpoint_path,
            tag=ds.CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=self.lightning_module.strict_loading,
        )
        if client_state is None:
            raise ValueError(f"SeqParStrategy: DeepSpeed found no checkpoint under {checkpoint_path}/{ds.CHECKPOINT_TAG}.")
        return client_state


def _convert_outside_metrics(precision_plugin: Any, module: Any) -> Any:
    """``precision_plugin.convert_module(module)`` with torchmetrics metrics left out.

    DeepSpeed's "true" precisions call ``module.to(dtype)``, which torchmetrics applies to metric states as well
    (it exempts ``.half()``/``.float()`` only): a float64 accumulator would become float32 and refuse the float64
    updates of the metric's own ``update`` (and a 16-bit one would lose the sums). Metrics keep their dtypes.
    """
    from torchmetrics import Metric

    parked = [(parent, name, child) for parent in module.modules() for name, child in parent._modules.items() if isinstance(child, Metric)]
    for parent, name, _ in parked:
        parent._modules[name] = None  # Module._apply skips empty slots
    try:
        return precision_plugin.convert_module(module)
    finally:
        for parent, name, child in parked:
            parent._modules[name] = child

