"""The DeepSpeed pipeline engine of SeqParStrategy: the block stack cut into the mesh's ``pp`` stages, each DataLoader
batch one optimizer step of micro-batches; evaluation runs through the stages too (see docs/sharding.md)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_seqpar import deepspeed_engine as ds
from lightning_seqpar import pipeline, pipeline_stages
from lightning_seqpar.strategies.data import continue_stopped_epoch
from lightning_seqpar.strategies.deepspeed import SeqParDeepSpeedStrategy


class SeqParPipelineStrategy(SeqParDeepSpeedStrategy):
    """Sequence parallelism inside DeepSpeed pipeline stages (``pipeline_stages > 1``, ZeRO 0 or 1).

    Takes :class:`~lightning_seqpar.strategies.base.SeqParStrategy`'s arguments; ``SeqParStrategy(pipeline_stages=...)``
    builds this class. Stages are the outermost (``pp``) mesh dimension; DeepSpeed's ``PipelineEngine`` builds its own
    grid with the same layout (checked by :func:`~lightning_seqpar.pipeline.pipeline_grid`). Stages run the module's
    own steps with the blocks they do not own skipped (:mod:`lightning_seqpar.pipeline_auto`), or its
    ``pipeline_layers()`` chain (:mod:`lightning_seqpar.pipeline`).

    Raises:
        ValueError: ZeRO 2/3 with pipeline stages, or the errors of :class:`SeqParDeepSpeedStrategy`.
        PipelineError: ``Trainer(accumulate_grad_batches > 1)`` (use ``micro_batches``), or a model the stages cannot
            cut.
    """

    @override
    def _init_engine(self, **engine_arguments: Any) -> None:
        super()._init_engine(**engine_arguments)
        self._pipeline: pipeline_stages.PipelineStages | None = None
        self._pipeline_bounds: Any = None  # the stage boundaries of the last fit, reused by evaluation
        self._stage_state_names: list[str] | None = None

    @property
    @override
    def handles_gradient_accumulation(self) -> bool:
        # One DataLoader batch is one step of micro-batches, run inside train_batch.
        return True

    # --- setup -------------------------------------------------------------------------------------------

    @override
    def _setup_evaluation(self) -> None:
        # Evaluation runs the module's own steps through the stages, split as the fit split them (if any).
        assert self.applied_plan is not None and self.topology is not None
        self._pipeline = pipeline_stages.PipelineStages.automatic(
            self.lightning_module, self.topology, self.applied_plan.runtime.exit, self._pipeline_bounds
        )
        self.applied_plan.add_undo(self._pipeline.remove)
        self._pipeline.check_weights()

    @override
    def _gradient_accumulation_steps(self, trainer: Trainer) -> int:
        accumulate = trainer.accumulate_grad_batches
        if accumulate != 1:
            raise pipeline.PipelineError(
                f"with pipeline_stages > 1 every DataLoader batch is one optimizer step, cut into micro-batches: set"
                f" SeqParStrategy(micro_batches={accumulate}) instead of Trainer(accumulate_grad_batches={accumulate})."
            )
        return self.micro_batches or 1

    @override
    def _config_zero_stage(self, trainer: Trainer) -> int:
        if trainer.gradient_clip_val and self.zero_stage == 0:
            # DeepSpeed 0.19.8's stage-0 pipeline clipping leaves later stages out of the norm; ZeRO-1's norm is exact.
            rank_zero_info(
                f"{type(self).__name__}: gradient clipping with pipeline stages runs with ZeRO-1 (exact gradient norm)."
            )
            return 1
        return self.zero_stage

    @override
    def _build_engine(self, optimizer: Any, config: dict[str, Any]) -> tuple[Any, Any]:
        assert self.applied_plan is not None and self.topology is not None
        module = self.lightning_module
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
        return engine, engine_optimizer

    @override
    def full_state_dict(self) -> dict[str, Tensor]:
        """The LightningModule's full state dict on CPU with each stage's trained layers gathered from the ranks that
        own them (collective over the ``pp`` group: call on every rank)."""
        state = super().full_state_dict()
        if self._stage_state_names is not None:
            assert self.topology is not None
            stages: list[dict[str, Tensor] | None] = [None] * self.topology.pp
            names = self._stage_state_names
            dist.all_gather_object(stages, {name: state[name] for name in names}, group=self.topology.pipeline_group)
            for stage_state in stages:  # each stage's own layers replace this rank's untrained copies
                state.update(stage_state or {})
        return state

    # --- steps -------------------------------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        # train_batch runs forward, backward and the step of all micro-batches: through the module's
        # pipeline_layers() chain, or through its own training_step on every stage (lightning_seqpar.pipeline_auto).
        assert self._pipeline is not None
        if self._pipeline.explicit:
            return pipeline.train_batch(self.model, self.lightning_module, args[0], self.micro_batches or 1)
        batch, batch_idx = args[0], (args[1] if len(args) > 1 else kwargs.get("batch_idx", 0))
        return self._pipeline.train(
            self.model, batch, batch_idx, self.micro_batches or 1, self.precision_plugin.train_step_context
        )

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        return closure_loss  # done inside train_batch

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        return closure()  # train_batch has stepped

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._pipeline is not None and self.deepspeed_engine is not None:
            self._pipeline.restore_full_weights()  # each rank trained one stage: bring the others' weights back

    def _pipeline_step(self, hook: str, context: Any, args: tuple, kwargs: dict) -> Any:
        """An evaluation step through the pipeline stages, forward only (see lightning_seqpar.pipeline_auto)."""
        assert self._pipeline is not None
        return self._pipeline.evaluate(hook, args[0], args[1:], kwargs, self.micro_batches or 1, context)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._pipeline_step("validation_step", self.precision_plugin.val_step_context, args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._pipeline_step("test_step", self.precision_plugin.test_step_context, args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._pipeline_step("predict_step", self.precision_plugin.predict_step_context, args, kwargs)

    # --- checkpoints ---------------------------------------------------------------------------------------

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self.deepspeed_engine is None:  # evaluation: the weights of every stage
            return continue_stopped_epoch(
                pipeline.load_pipeline_checkpoint(self.lightning_module, checkpoint_path, ds.CHECKPOINT_TAG)
            )
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
