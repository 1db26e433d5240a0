"""The strategy's model side: the plan applied to the LightningModule (tensor parallelism first, then sequence
parallelism), metrics reduced over ``dp``, meta-device modules materialised, the full state dict gathered.

What :class:`~lightning_seqpar.strategies.base.SeqParStrategy` does to the module in every engine's ``setup``, before
the engine wraps it (:meth:`ModuleSetup.prepare_module`): split the blocks over ``tp`` where
``tensor_parallel_size > 1`` (:mod:`lightning_seqpar.tensor_parallel`), infer or take the sequence-parallel plan,
choose the attention for ``attention="auto"`` from the head counts, add activation checkpointing and block compilation,
and apply the plan in place (:func:`~lightning_seqpar.parallelize.apply_sequence_parallel`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_seqpar import deepspeed_engine as ds
from lightning_seqpar.attention.local import check_backend_available
from lightning_seqpar.attention.registry import get_attention_kind
from lightning_seqpar.fsdp import has_meta_tensors
from lightning_seqpar.parallelize import AppliedPlan, apply_sequence_parallel
from lightning_seqpar.plan import SequenceParallelPlan, attention_head_counts, choose_attention, infer_plan
from lightning_seqpar.strategies.collectives import agree_on_scheduler_metrics
from lightning_seqpar.strategies.model_parallel import apply_tensor_parallel_to_module, has_dtensor_parameters
from lightning_seqpar.strategies.plan_roles import with_block_role, with_checkpoints
from lightning_seqpar.tensor_parallel.sequence import check_sequence_layout_holds_tokens
from lightning_seqpar.topology import Topology


class ModuleSetup(DDPStrategy):
    """The model hooks of :class:`~lightning_seqpar.strategies.base.SeqParStrategy` (the state is set by its
    ``__init__`` and ``setup_distributed``)."""

    topology: Topology | None = None
    applied_plan: AppliedPlan | None
    _plan: SequenceParallelPlan | None
    _restore_scheduler_step: Any
    _hybrid_groups: tuple[Any, Any] | None
    _zero_length_setting: bool | None

    def prepare_module(self, trainer: Trainer) -> None:
        """What every engine's ``setup`` does first: apply the plan, reduce metrics over ``dp``, step metric-driven
        schedulers on the world's mean of their metric, allow empty prediction shards. Then the engine wraps the
        module."""
        module = self.lightning_module
        module._device_mesh = self.device_mesh
        self._apply_plan(module)
        self._reduce_metrics_over_data_group(module)
        if trainer.state.fn == TrainerFn.FITTING and self._restore_scheduler_step is None:
            # ReduceLROnPlateau: every rank cuts its learning rate on the same value
            self._restore_scheduler_step = agree_on_scheduler_metrics(module, self.root_device)
        if trainer.state.fn == TrainerFn.PREDICTING:
            # Fewer samples than data-parallel ranks leave a prediction shard empty; prediction needs no step on every
            # rank, so that rank predicts nothing (Lightning refuses empty loaders unless told; restored at the end).
            self._zero_length_setting = module.allow_zero_length_dataloader_with_multiple_devices
            module.allow_zero_length_dataloader_with_multiple_devices = True

    def _apply_plan(self, module: LightningModule) -> None:
        if self.applied_plan is not None:
            return
        assert self.topology is not None
        # The local kernel must exist here (flash-attn installed, CUDA for the CUDA-only ones).
        check_backend_available(self.attention_backend, self.root_device.type, owner=type(self).__name__)
        if self.topology.tp > 1 and not has_dtensor_parameters(module):  # split once; it stays split after teardown
            if not has_meta_tensors(module):  # (a meta module is allocated after the split: model_to_device)
                module.to(self.root_device)  # split where it trains: the shards live there from the start
            apply_tensor_parallel_to_module(
                module, self.topology, self.tp_plan, type(self).__name__, sequence_parallel=self.tp_sequence_parallel
            )
        # Lightning broadcasts a module it does not wrap from rank 0 of the world: never DTensor shards (tp, FSDP2).
        shards = [n for n, p in module.named_parameters() if isinstance(p, DTensor)]
        if shards:
            ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
            module._ddp_params_and_buffers_to_ignore = ignored + [n for n in shards if n not in ignored]
        plan = self._plan if self._plan is not None else infer_plan(module)
        auto = self.attention == "auto"
        if auto:
            kind, degree, reason = choose_attention(
                attention_head_counts(module, plan.resolve(module)), self.topology.sp, self.attention_backend
            )
            rank_zero_info(f"{type(self).__name__}: attention='auto' chose {kind!r}: {reason}")
            self.attention, self.ulysses_degree = kind, degree
            self._hybrid_groups = self._build_hybrid_groups() if get_attention_kind(kind).uses_ulysses_degree else None
        if self.activation_checkpointing:
            plan = with_checkpoints(plan, module, self.activation_checkpointing)
        if self.compile_blocks:
            plan = with_block_role(plan, module, "compile")
        self.applied_plan = apply_sequence_parallel(
            module, plan, self.topology.sequence_group, attention=self.attention, backend=self.attention_backend,
            hybrid_groups=self._hybrid_groups,
            compile_options=self.compile_blocks if isinstance(self.compile_blocks, dict) else None,
        )
        self.applied_plan.runtime.dropout_fallback = auto
        if self.topology.tp > 1 and self.topology.sp > 1 and self.tp_sequence_parallel:
            tp = self.topology.tp  # every rank checks the whole layout: a short sp shard fails everywhere, none hangs
            self.applied_plan.runtime.check_layout = lambda layout: check_sequence_layout_holds_tokens(layout.lengths,
                                                                                                       tp)
        rank_zero_info(f"{type(self).__name__}: sequence-parallel plan of {type(module).__name__}:\n{plan}")

    @override
    def model_to_device(self) -> None:
        """Move the module to the root device; a module built on the meta device (``configure_model`` under
        ``torch.device("meta")``) is allocated and initialised instead
        (:func:`~lightning_seqpar.fsdp.materialize_meta_module`): here, after tensor parallelism split it, on the DDP
        engine; after sharding on the FSDP2 engine, so each rank allocates only its shards."""
        from lightning_seqpar.fsdp import materialize_meta_module

        assert self.model is not None
        if not has_meta_tensors(self.model):
            super().model_to_device()
        elif not self.uses_fsdp:
            # (the tp ranks share one random state since the split, so they initialise what tp replicates alike)
            materialize_meta_module(self.model, self.root_device)

    def _reduce_metrics_over_data_group(self, module: LightningModule) -> None:
        """torchmetrics sum their states over the world by default, which would count each sample once per SP rank."""
        from torchmetrics import Metric

        assert self.topology is not None
        for metric in module.modules():
            if isinstance(metric, Metric) and metric.process_group is None:
                metric.process_group = self.topology.data_group

    def full_state_dict(self) -> dict[str, Tensor]:
        """The LightningModule's full state dict on CPU (gathering ZeRO-3 partitions, and pipeline stages' layers, in
        the engines that shard them; collective there: call on every rank)."""
        module = self.lightning_module
        if has_dtensor_parameters(module):
            # Lightning's teardown moved the module to the CPU, where a CUDA mesh's shards cannot be gathered (GPUs).
            away = [p for p in module.parameters() if isinstance(p, DTensor) and p.device.type != self.root_device.type]
            if away:
                module.to(self.root_device)
            try:
                return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                        for k, v in module.state_dict().items()}
            finally:
                if away:
                    module.cpu()
        return ds.full_state_dict(module)

