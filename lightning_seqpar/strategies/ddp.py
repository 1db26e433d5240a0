"""The DDP engine of SeqParStrategy: ``DistributedDataParallel`` over the mesh's ``dp_sp`` ranks, single-file checkpoints."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_seqpar import deepspeed_engine as ds
from lightning_seqpar.reliability import nonfinite_step_guard
from lightning_seqpar.strategies.base import SeqParStrategy
from lightning_seqpar.strategies.registry import check_pipeline_arguments


class SeqParDDPStrategy(SeqParStrategy):
    """Sequence parallelism with ``DistributedDataParallel`` over the ``dp_sp`` ranks (``zero_stage=0``, one stage).

    Gradients are averaged over the ``dp * sp`` ranks of the flattened ``dp_sp`` mesh dimension, which makes one
    optimizer step equal to single-device training on the global batch. Takes :class:`SeqParStrategy`'s arguments;
    ``SeqParStrategy(...)`` builds this class when no DeepSpeed setting is given.

    Raises:
        ValueError: a DeepSpeed argument (``zero_stage``, ``pipeline_stages > 1``, ``deepspeed_config``) is given.
        DeepSpeedConfigError: ``offload_optimizer`` or ``offload_parameters`` without ZeRO.
    """

    @override
    def _init_engine(self, *, zero_stage: Any, offload_optimizer: bool, offload_parameters: bool, pipeline_stages: Any,
                     micro_batches: Any, deepspeed_config: Any) -> None:
        name = type(self).__name__
        check_pipeline_arguments(name, pipeline_stages, micro_batches)
        ds.build_config(zero_stage=0, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters)
        if zero_stage != 0 or pipeline_stages != 1 or deepspeed_config is not None:
            raise ValueError(
                f"{name} is the DDP engine; zero_stage={zero_stage!r}, pipeline_stages={pipeline_stages!r} and"
                " deepspeed_config need DeepSpeed: construct SeqParStrategy(...) with them, which builds the DeepSpeed engine."
            )

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        assert self.topology is not None
        self._ddp_kwargs["process_group"] = self.topology.sequence_data_group  # the dp_sp mesh dimension

    @override
    def setup(self, trainer: Trainer) -> None:
        self.prepare_module(trainer)
        super().setup(trainer)  # DDPStrategy: wrap in DistributedDataParallel (process_group: dp_sp)

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        trainer = self.lightning_module.trainer
        guarded = nonfinite_step_guard(
            closure,
            policy=self.on_nonfinite,
            parameters=lambda: (p for group in optimizer.param_groups for p in group["params"]),
            device=self.root_device,
            step=trainer.global_step,
            request_stop=lambda: setattr(trainer, "should_stop", True),
            zero_grad=lambda: optimizer.zero_grad(set_to_none=True),
        )
        return super().optimizer_step(optimizer, guarded, model, **kwargs)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint["seqpar"] = self.parallel_settings()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # A directory of ZeRO shards cannot feed this engine's optimizer: this raises with the command that can.
        ds.check_resume_layout(checkpoint_path, ds.read_layout(checkpoint_path), self.parallel_settings(), load_universal=False)
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        for difference in ds.layout_differences(checkpoint.get("seqpar"), self.parallel_settings()):
            # Weights are replicated here, so any layout can resume; the global batch may change with dp.
            rank_zero_info(f"{type(self).__name__}: resuming {checkpoint_path} with a different layout: {difference}")
        return checkpoint
