"""The DDP engine of SeqParStrategy: ``DistributedDataParallel`` over the mesh's ``dp_sp`` ranks, single-file
checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_seqpar import deepspeed_engine as ds
from lightning_seqpar import fsdp as fsdp2
from lightning_seqpar.strategies.base import SeqParStrategy
from lightning_seqpar.strategies.data import continue_stopped_epoch
from lightning_seqpar.strategies.model_parallel import (
    average_gradients,
    average_unsplit_gradients_over_tensor_parallel,
    broadcast_module_state,
    clip_dtensor_gradients,
)
from lightning_seqpar.strategies.registry import check_pipeline_arguments
from lightning_seqpar.tensor_parallel.optim import step_per_parameter_where_mixed


class SeqParDDPStrategy(SeqParStrategy):
    """Sequence parallelism with ``DistributedDataParallel`` over the ``dp_sp`` ranks (``zero_stage=0``, one stage).

    Gradients are averaged over the ``dp * sp`` ranks of the flattened ``dp_sp`` mesh dimension, which makes one
    optimizer step equal to single-device training on the global batch. Takes :class:`SeqParStrategy`'s arguments;
    ``SeqParStrategy(...)`` builds this class when no DeepSpeed or FSDP2 setting is given.

    With ``tensor_parallel_size > 1`` the split parameters are DTensors, which ``DistributedDataParallel`` cannot
    bucket: the module is then not wrapped; its parameters are broadcast from the first rank of each ``dp_sp`` group
    (as DDP does), and after the last backward of each optimizer step the gradients' local shards are averaged over
    ``dp_sp`` in one flat all-reduce per dtype. Checkpoints then hold whole tensors (gathered over ``tp``), the
    optimizer state too (keyed by parameter name), so they resume at any tensor-parallel size.

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
                " deepspeed_config need DeepSpeed: construct SeqParStrategy(...) with them, which builds the DeepSpeed"
                " engine."
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
        if self.topology is not None and self.topology.tp > 1:
            # Split projections are DTensors beside plain parameters; CUDA's multi-tensor (foreach) optimizer kernels
            # refuse that mix (seen with the real timm ViT on 2 H200s), so those groups step parameter by parameter.
            for optimizer in self.optimizers:
                step_per_parameter_where_mixed(optimizer)
            clip_dtensor_gradients(self.precision_plugin)  # gradient_clip_val over DTensors beside plain tensors

    @override
    def _setup_model(self, model: Any) -> Any:
        assert self.topology is not None
        if self.topology.tp == 1:
            return super()._setup_model(model)
        broadcast_module_state(model, self.topology.sequence_data_group)
        rank_zero_info(
            f"{type(self).__name__}: tensor parallelism: gradients averaged over dp_sp after backward, without DDP"
        )
        return model

    @override
    def _register_ddp_hooks(self) -> None:
        if self.topology is None or self.topology.tp == 1:  # no DDP wrapper (and so no communication hooks) with tp
            super()._register_ddp_hooks()

    def _averaging(self, closure: Any, optimizer: Any) -> Any:
        """``closure`` followed, with tensor parallelism (no DDP wrapper), by the gradient average over ``dp_sp``, and
        that of the parameters ``tp`` does not split over ``tp``
        (:func:`~lightning_seqpar.strategies.model_parallel.average_unsplit_gradients_over_tensor_parallel`)."""
        if self.topology is None or self.topology.tp == 1:
            return closure

        def run() -> Any:
            result = closure()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            average_gradients(params, self.topology.sequence_data_group)
            average_unsplit_gradients_over_tensor_parallel(params, self.topology.tensor_group)
            return result

        return run

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        guarded = self.guard_parameter_step(self._averaging(closure, optimizer), optimizer)
        return super().optimizer_step(optimizer, guarded, model, **kwargs)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state dict, with tensor-parallel DTensors gathered into whole tensors (a collective over ``tp``:
        Lightning calls this on every rank)."""
        return (
            self.full_state_dict()
            if self.topology is not None and self.topology.tp > 1
            else super().lightning_module_state_dict()
        )

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """With tensor parallelism: the whole optimizer state in the single-device layout, keyed by parameter name
        (:func:`lightning_seqpar.fsdp.full_optimizer_state`, a collective over ``tp``: Lightning calls this on every
        rank), so that the checkpoint resumes at any tensor-parallel size; otherwise the optimizer's own."""
        if self.topology is not None and self.topology.tp > 1:
            return fsdp2.full_optimizer_state(self.lightning_module, optimizer)
        return super().optimizer_state(optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """Name-keyed states (saved with tensor parallelism) load at this run's layout; a state in the optimizer's
        own numbering loads as usual without tensor parallelism and is renamed by parameter order with it."""
        saved = checkpoint.get("optimizer_states", [])
        name_keyed = any(isinstance(k, str) for state in saved for k in state.get("state", {}))
        if not name_keyed and (self.topology is None or self.topology.tp == 1):
            return super().load_optimizer_state_dict(checkpoint)
        if len(saved) != len(self.optimizers):
            raise ValueError(
                f"{type(self).__name__}: the checkpoint holds {len(saved)} optimizer states for"
                f" {len(self.optimizers)} optimizers."
            )
        for optimizer, state in zip(self.optimizers, saved):
            fsdp2.load_full_optimizer_state(self.lightning_module, optimizer, state)
        return None

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if self.topology is None or self.topology.tp == 1:
            return super().load_model_state_dict(checkpoint, strict=strict)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Whole tensors into this run's tp shards (fused rows reordered by the tensor-parallel state-dict hooks).
        set_model_state_dict(self.lightning_module, dict(checkpoint["state_dict"]),
                             options=StateDictOptions(full_state_dict=True, strict=strict))
        return None

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint["seqpar"] = self.parallel_settings()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if (Path(checkpoint_path) / "lightning_state.pt").is_file():
            raise ValueError(
                f"{type(self).__name__}: {checkpoint_path} is a checkpoint directory of the FSDP2 engine (DCP shards"
                " and lightning_state.pt); resume it with SeqParStrategy(fsdp=True, ...) (any dp, sp, tp), or turn it"
                " into one file with lightning_seqpar.fsdp.consolidate_checkpoint and load its weights."
            )
        # A directory of ZeRO shards cannot feed this engine's optimizer: this raises with the command that can.
        ds.check_resume_layout(
            checkpoint_path, ds.read_layout(checkpoint_path), self.parallel_settings(), load_universal=False
        )
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        for difference in ds.layout_differences(checkpoint.get("seqpar"), self.parallel_settings()):
            # Weights are replicated here, so any layout can resume; the global batch may change with dp.
            rank_zero_info(f"{type(self).__name__}: resuming {checkpoint_path} with a different layout: {difference}")
        return continue_stopped_epoch(checkpoint)
