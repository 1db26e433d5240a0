"""The FSDP2 engine of SeqParStrategy: ``fully_shard`` over the mesh's ``dp_sp`` ranks (2-D with tensor parallelism),
checkpoints as ``torch.distributed.checkpoint`` directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_seqpar import fsdp as fsdp2
from lightning_seqpar.strategies.base import SeqParStrategy
from lightning_seqpar.strategies.data import continue_stopped_epoch
from lightning_seqpar.strategies.model_parallel import (
    average_unsplit_gradients_over_tensor_parallel,
    clip_dtensor_gradients,
    mixed_precision_dtypes,
)
from lightning_seqpar.strategies.registry import check_pipeline_arguments

_LIGHTNING_STATE_FILE = "lightning_state.pt"
"""The Trainer's own entries of a checkpoint (loops, callbacks, epoch), written by rank 0 next to the DCP shards."""


class SeqParFSDPStrategy(SeqParStrategy):
    """Sequence parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``) over the ``dp_sp`` ranks
    (``fsdp=True``).

    Each transformer block is one FSDP2 unit, and each child module of the LightningModule that holds parameters a
    root unit around them (:func:`lightning_seqpar.fsdp.apply_fsdp`; Lightning calls ``training_step``, not the
    LightningModule, so the children ``training_step`` calls are the roots whose call gathers their parameters;
    parameters registered on the LightningModule itself are refused): parameters, gradients and optimizer state are
    sharded over the ``dp * sp`` ranks of a stage, gradients reduce-scattered as averages, so one optimizer step equals
    single-device training on the global batch (the torch-native counterpart of ZeRO-3). With
    ``tensor_parallel_size > 1`` the tensor-parallel DTensors are sharded again over ``dp_sp`` (FSDP2 x TP, as
    Lightning's ``ModelParallelStrategy``). The Trainer's precision gives the ``MixedPrecisionPolicy``: ``"bf16-mixed"``
    gathers parameters in bf16 and reduces gradients in fp32; fp32 master weights and optimizer state stay sharded.

    Checkpoints are directories: the model and optimizer in ``torch.distributed.checkpoint`` format, keyed and laid out
    as on a single device (:func:`lightning_seqpar.fsdp.save_checkpoint`), so they load at another (dp, sp, tp) layout;
    ``lightning_seqpar.fsdp.consolidate_checkpoint`` turns them into one file.

    Raises:
        ValueError: a DeepSpeed argument (``zero_stage``, ``pipeline_stages > 1``, ``deepspeed_config``, offloading);
            at setup, parameters registered on the LightningModule itself.
    """

    uses_fsdp = True

    @override
    def _init_engine(self, *, zero_stage: Any, offload_optimizer: bool, offload_parameters: bool, pipeline_stages: Any,
                     micro_batches: Any, deepspeed_config: Any) -> None:
        name = type(self).__name__
        check_pipeline_arguments(name, pipeline_stages, micro_batches)
        used = [f"{k}={v!r}" for k, v, off in (("zero_stage", zero_stage, 0), ("pipeline_stages", pipeline_stages, 1),
                                                ("offload_optimizer", offload_optimizer, False),
                                                ("offload_parameters", offload_parameters, False)) if v != off]
        if deepspeed_config is not None:
            used.append("deepspeed_config")
        if used:
            raise ValueError(
                f"{name} (fsdp=True) shards with FSDP2; {', '.join(used)}"
                f" {'configures' if len(used) == 1 else 'configure'} DeepSpeed. Choose one: drop fsdp=True to use"
                " DeepSpeed ZeRO / pipelines, or drop the DeepSpeed arguments."
            )

    @override
    def setup(self, trainer: Trainer) -> None:
        self.prepare_module(trainer)  # tensor parallelism, then the sequence-parallel plan
        super().setup(trainer)  # DDPStrategy.setup: _setup_model (FSDP2 here), then the optimizers
        clip_dtensor_gradients(self.precision_plugin)  # gradient_clip_val over DTensors of two meshes (with tp)

    @override
    def _setup_model(self, model: Any) -> Any:
        assert self.topology is not None
        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        param_dtype, reduce_dtype = mixed_precision_dtypes(precision)
        own = [name for name, _ in model.named_parameters(recurse=False)]
        if own:
            raise ValueError(
                f"{type(self).__name__}: parameters {own} are registered on the LightningModule itself; FSDP2 gathers a"
                " module's parameters when the module is called, and Lightning calls training_step, not the"
                " LightningModule. Move them into a submodule (e.g. self.model) that training_step calls."
            )
        # Lightning calls training_step, not the LightningModule, so each child the step calls is an FSDP2 root (its
        # call gathers its parameters); the blocks inside are units of their own.
        for child in model.children():
            if any(True for _ in child.parameters()):
                fsdp2.apply_fsdp(child, self.topology.dp_sp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        if fsdp2.has_meta_tensors(model):  # built on the meta device: allocate and initialise only this rank's shards
            fsdp2.materialize_meta_module(model, self.root_device)
        rank_zero_info(
            f"{type(self).__name__}: FSDP2 over dp_sp={self.topology.dp_sp_mesh.size()} ranks"
            f" (precision {precision}: param_dtype={param_dtype}, reduce_dtype={reduce_dtype})"
        )
        return model  # fully_shard changes the module in place

    @override
    def _register_ddp_hooks(self) -> None:
        """No DDP communication hooks: FSDP2 reduces the gradients."""

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.topology is not None and self.topology.tp > 1:
            inner = closure

            def closure() -> Any:  # FSDP2 reduced over dp_sp during backward; the unsplit parameters also over tp
                result = inner()
                average_unsplit_gradients_over_tensor_parallel(
                    [p for group in optimizer.param_groups for p in group["params"]], self.topology.tensor_group
                )
                return result

        guarded = self.guard_parameter_step(closure, optimizer)
        return super().optimizer_step(optimizer, guarded, model, **kwargs)

    # --- checkpoints: a DCP directory, written and read by every rank ------------------------------------------

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """Resume after ``setup``: the shards load into the sharded module and its optimizer."""
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Empty: the sharded weights go to the DCP directory in :meth:`save_checkpoint`."""
        return {}

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Empty: the sharded optimizer state goes to the DCP directory in :meth:`save_checkpoint`."""
        return {}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write ``filepath`` as a directory: the model and optimizer shards of every rank (DCP; the model's only for a
        weights-only save), and rank 0's ``lightning_state.pt`` with the Trainer's other entries and the layout under
        ``"seqpar"``."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint does not take storage_options (got {storage_options!r})."
            )
        path = Path(filepath)
        if path.is_file():
            raise FileExistsError(f"{type(self).__name__}: {path} is a file; FSDP2 checkpoints are directories.")
        optimizers = self.optimizers
        if len(optimizers) > 1:
            raise NotImplementedError(
                f"{type(self).__name__}: checkpoints of more than one optimizer are not supported."
            )
        # weights_only (Lightning leaves "optimizer_states" out of the checkpoint): the model's shards only
        keep_optimizer = bool(optimizers) and "optimizer_states" in checkpoint
        fsdp2.save_checkpoint(path, self.lightning_module, optimizers[0] if keep_optimizer else None)
        checkpoint = dict(checkpoint)  # its state_dict and optimizer_states are empty (see above)
        checkpoint["seqpar"] = self.parallel_settings()
        if self.is_global_zero:
            torch.save(checkpoint, path / _LIGHTNING_STATE_FILE)
        self.barrier("SeqParFSDPStrategy.save_checkpoint")

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the model and optimizer shards into this run's layout (a collective), and return the Trainer's
        entries."""
        path = Path(checkpoint_path)
        if not (path / _LIGHTNING_STATE_FILE).is_file():
            raise FileNotFoundError(
                f"{type(self).__name__}: {path} is not a checkpoint of this engine (a directory with"
                f" {_LIGHTNING_STATE_FILE} and DCP shards); to start from a single-file checkpoint, load its state_dict"
                " into the module before fit."
            )
        checkpoint = torch.load(path / _LIGHTNING_STATE_FILE, map_location="cpu", weights_only=False)
        optimizers = self.optimizers
        # A weights-only directory holds no optimizer shards; resuming fit from it then fails in Lightning's own
        # check ("checkpoint contains only the model ... save_weights_only"), evaluation loads the weights.
        with_optimizer = bool(optimizers) and "optimizer_states" in checkpoint
        fsdp2.load_checkpoint(path, self.lightning_module, optimizers[0] if with_optimizer else None)
        saved = checkpoint.get("seqpar") or {}
        if saved and saved != self.parallel_settings():
            rank_zero_info(f"{type(self).__name__}: resumed {path} saved at {saved} into {self.parallel_settings()}")
        return continue_stopped_epoch(checkpoint)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Nothing: :meth:`load_checkpoint` loaded the weights."""

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """Nothing: :meth:`load_checkpoint` loaded the optimizer state."""

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            import shutil

            shutil.rmtree(filepath, ignore_errors=True)
