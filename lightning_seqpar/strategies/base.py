"""SeqParStrategy: the shared base of the sequence-parallel strategies (topology, plan, data, non-finite policy), and
the constructor that picks the engine.

What every engine does, in order (:meth:`SeqParStrategy.setup_distributed`, then
:meth:`~lightning_seqpar.strategies.module_setup.ModuleSetup.prepare_module`):

1. initialise ``torch.distributed`` as DDP does, then build the :class:`~lightning_seqpar.topology.Topology`: one
   named DeviceMesh (``pp``, ``dp``, ``sp``, ``tp``, and the flattened ``dp_sp``), exposed to the LightningModule as
   ``self.device_mesh`` as Lightning's ``ModelParallelStrategy`` does;
2. find the transformer in the LightningModule (or take the given plan) and apply the plan in place: tokens are
   sharded on entry to the block stack, attention becomes distributed, tokens are gathered on exit;
3. hand the model to the engine (:mod:`~lightning_seqpar.strategies.ddp`,
   :mod:`~lightning_seqpar.strategies.deepspeed`, :mod:`~lightning_seqpar.strategies.deepspeed_pipeline`), which
   averages gradients over the ``dp_sp`` ranks, so one optimizer step equals single-device training on the global batch;
4. hand Lightning a sampler keyed to the ``dp`` coordinate, so all ranks of an SP group see the same samples.

``SeqParStrategy(...)`` builds the engine class its arguments ask for (as ``pathlib.Path`` builds a ``PosixPath``):
``fsdp=True`` -> :class:`~lightning_seqpar.strategies.fsdp.SeqParFSDPStrategy`,
``pipeline_stages > 1`` -> :class:`~lightning_seqpar.strategies.deepspeed_pipeline.SeqParPipelineStrategy`,
``zero_stage > 0`` or a ``deepspeed_config`` -> :class:`~lightning_seqpar.strategies.deepspeed.SeqParDeepSpeedStrategy`,
else :class:`~lightning_seqpar.strategies.ddp.SeqParDDPStrategy`; all are ``SeqParStrategy`` instances.
"""

from __future__ import annotations

import inspect
import sys
from abc import ABCMeta
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.distributed.device_mesh import DeviceMesh
from typing_extensions import override

from lightning_seqpar.attention.local import AttentionBackend
from lightning_seqpar.attention.registry import get_attention_kind
from lightning_seqpar.parallelize import AppliedPlan
from lightning_seqpar.plan import SequenceParallelPlan
from lightning_seqpar.reliability import NonFinitePolicy, nonfinite_step_guard
from lightning_seqpar.strategies import data
from lightning_seqpar.strategies.arguments import check_shared_arguments
from lightning_seqpar.strategies.collectives import DataParallelReductions
from lightning_seqpar.strategies.module_setup import ModuleSetup
from lightning_seqpar.strategies.plan_roles import ActivationCheckpointing
from lightning_seqpar.strategies.registry import engine_class
from lightning_seqpar.topology import ParallelDims, Topology


class _SelectsEngine(ABCMeta):
    """``SeqParStrategy(...)`` builds the engine class :func:`~lightning_seqpar.strategies.registry.engine_class` picks
    (a metaclass rather than ``__new__``, so LightningCLI / jsonargparse read the arguments of ``__init__``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is SeqParStrategy:
            cls = engine_class(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class SeqParStrategy(data.DataHooks, ModuleSetup, DataParallelReductions, metaclass=_SelectsEngine):
    """Sequence-parallel training: the tokens of every sample are split across the ranks of a sequence-parallel group.

    Constructing ``SeqParStrategy(...)`` returns the engine class the arguments select (module docstring).

    Args:
        sequence_parallel_size: Ranks that share one sample's tokens; default: the devices of one node, so the
            all-to-all stays on the fast intra-node links. ``world_size`` must be a multiple of it; the
            remaining factor is data parallelism.
        attention: Distributed attention: ``"auto"`` (default: chosen at setup from the model's head counts,
            logged with the reason on rank 0: Ulysses when every attention has at least ``sequence_parallel_size``
            heads, else hybrid with the largest Ulysses degree that divides ``sequence_parallel_size`` and is at
            most the fewest heads (ring alone when that is 1), LSS when the backend cannot run a ring or no head
            count is found; calls with attention dropout then use LSS, as the ring has no dropout), ``"ulysses"``
            (all-to-all between token and head shards; needs at least ``sequence_parallel_size`` heads), ``"lss"``
            (local queries, gathered keys and values), ``"ring"`` (key/value blocks passed around the group,
            overlapped with compute) or ``"hybrid"`` (Ulysses inside groups of ``ulysses_degree`` ranks, ring across
            them: the mesh's ``sp`` dimension unflattened into ``ring x ulysses``), or a kind added with
            :func:`~lightning_seqpar.attention.register_attention_kind`. See docs/choosing-attention.md.
        ulysses_degree: For ``attention="hybrid"``: ranks per Ulysses group (must divide
            ``sequence_parallel_size``); default: the devices of one node, so the all-to-all stays intra-node
            and the ring crosses nodes.
        attention_backend: Local attention kernel: ``"auto"`` (flash-attn on CUDA when installed, else SDPA),
            ``"flash_attn"``, ``"sdpa"``, ``"sdpa_cudnn"``, ``"sdpa_flash"``, ``"sdpa_efficient"`` or ``"math"``.
        plan: Explicit plan ``{module path: role(s)}`` (see :mod:`lightning_seqpar.plan`); default: the model's own
            ``sequence_parallel_plan()``, else the one :func:`~lightning_seqpar.plan.infer_plan` finds.
        activation_checkpointing: Recompute each transformer block's activations in backward (less memory for
            long sequences, about a third more compute): ``True`` / ``"full"``; ``"save_attention"`` keeps the
            attention outputs so backward does not rerun attention; ``"offload"`` also keeps the block inputs in
            pinned host memory (the leanest; see docs/performance.md).
        compile_blocks: ``torch.compile`` each transformer block (the blocks activation checkpointing wraps):
            LayerNorm, GELU, biases and residual additions are fused around the matrix products, while the
            distributed attention stays eager, so its collectives and kernel are unchanged. ``True``, or a dict of
            ``torch.compile`` keyword arguments (e.g. ``{"mode": "max-autotune-no-cudagraphs"}``). The first
            steps pay the compilation; see docs/performance.md for what it buys.
        process_group_backend: ``"nccl"`` or ``"gloo"``; default: NCCL on CUDA, gloo on CPU.
        timeout: Timeout of every collective (every group of the mesh), as a ``timedelta`` or seconds: a rank that
            dies makes the others fail after this long instead of hanging.
        on_nonfinite: When the loss or a gradient is NaN/inf on any rank: ``"raise"`` on every rank, ``"skip"`` the
            step on every rank (DDP engine only), ``"stop"`` training, or ``"ignore"``. The ranks agree before acting.
        zero_stage: DeepSpeed ZeRO stage over the ``dp * sp`` ranks of a stage: 1 partitions optimizer state,
            2 also gradients, 3 also parameters; 0 with ``pipeline_stages=1`` and no ``deepspeed_config`` is the
            DDP engine. See docs/sharding.md for the memory per GPU.
        offload_optimizer: Keep optimizer state and fp32 master weights in host memory (ZeRO >= 1); needs a
            DeepSpeed CPU optimizer (``DeepSpeedCPUAdam`` in ``configure_optimizers``, or an ``"optimizer"`` section).
        offload_parameters: Keep parameters in host memory between uses (ZeRO-3).
        pipeline_stages: DeepSpeed pipeline stages the block stack is cut into (1 means disabled), with ZeRO 0 or 1.
            Stages run the module's own steps with the blocks they do not own skipped
            (:mod:`lightning_seqpar.pipeline_auto`), or its ``pipeline_layers()`` chain when it defines one
            (:mod:`lightning_seqpar.pipeline`); validation, test and predict run through the stages too.
        micro_batches: With pipelines: micro-batches each DataLoader batch is cut into (default 1), in training
            and evaluation.
        deepspeed_config: A DeepSpeed config (dict or JSON path) whose keys override the ones derived from the
            Trainer; it may not set ``train_batch_size``.
        tensor_parallel_size: Ranks that split each transformer block's weights (the mesh's innermost ``tp``
            dimension; 1 means disabled): Megatron-style through ``torch.distributed.tensor.parallel``, applied
            before the sequence-parallel plan, so sequence parallelism runs on each rank's ``H / tp`` heads
            (docs/tensor-parallel.md). Not with DeepSpeed (``zero_stage``, ``pipeline_stages``).
        tp_plan: ``{module path: ParallelStyle}`` replacing the inferred tensor-parallel plan
            (:func:`~lightning_seqpar.tensor_parallel.apply_tensor_parallel`).
        tp_sequence_parallel: With ``tensor_parallel_size > 1``: shard the activations between the split
            projections (residual stream, norms, layer scales) over the ``tp`` ranks along the tokens, Megatron-LM's
            sequence parallelism (arXiv 2205.05198; :mod:`lightning_seqpar.tensor_parallel.sequence`), which divides
            their memory by ``tp`` at the same communication volume. ``False`` keeps them replicated on every ``tp``
            rank (for blocks with parameters outside the projections other than norms and layer scales).
        fsdp: Shard parameters, gradients and optimizer state with FSDP2 (``fully_shard``) over the ``dp_sp``
            ranks instead of replicating them (the torch-native alternative to ZeRO-3), with the mixed-precision
            policy of the Trainer's precision; 2-D with ``tensor_parallel_size``.
        **kwargs: Passed to :class:`torch.nn.parallel.DistributedDataParallel` (e.g. ``static_graph=True``).

    Raises:
        ValueError: an argument out of its range, or a combination the selected engine cannot run.
    """

    strategy_name = "seqpar"
    uses_deepspeed = False
    """True for the DeepSpeed engines (ZeRO and pipeline)."""
    uses_fsdp = False
    """True for the FSDP2 engine."""

    def __init__(
        self,
        sequence_parallel_size: int | None = None,
        attention: str = "auto",
        ulysses_degree: int | None = None,
        attention_backend: AttentionBackend = "auto",
        plan: dict[str, str | list[str]] | None = None,
        activation_checkpointing: ActivationCheckpointing = False,
        compile_blocks: bool | dict[str, Any] = False,
        process_group_backend: str | None = None,
        timeout: timedelta | float = timedelta(minutes=30),
        on_nonfinite: NonFinitePolicy = "raise",
        zero_stage: Literal[0, 1, 2, 3] = 0,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        pipeline_stages: int = 1,
        micro_batches: int | None = None,
        deepspeed_config: str | dict[str, Any] | None = None,
        tensor_parallel_size: int = 1,
        tp_plan: dict[str, Any] | None = None,
        tp_sequence_parallel: bool = True,
        fsdp: bool = False,
        accelerator=None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment=None,
        checkpoint_io=None,
        precision_plugin=None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=float(timeout))
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            **kwargs,
        )
        check_shared_arguments(
            type(self).__name__,
            sequence_parallel_size=sequence_parallel_size,
            attention=attention,
            ulysses_degree=ulysses_degree,
            attention_backend=attention_backend,
            activation_checkpointing=activation_checkpointing,
            compile_blocks=compile_blocks,
            on_nonfinite=on_nonfinite,
            tensor_parallel_size=tensor_parallel_size,
            tp_plan=tp_plan,
            tp_sequence_parallel=tp_sequence_parallel,
            zero_stage=zero_stage,
            pipeline_stages=pipeline_stages,
            deepspeed_config=deepspeed_config,
            fsdp=fsdp,
            uses_fsdp=self.uses_fsdp,
        )
        self.tensor_parallel_size, self.tp_plan = tensor_parallel_size, tp_plan
        self.tp_sequence_parallel = tp_sequence_parallel
        self.ulysses_degree = ulysses_degree
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self._sequence_parallel_size = sequence_parallel_size
        self.attention = attention
        self.attention_backend = attention_backend
        self._plan = SequenceParallelPlan(plan) if plan is not None else None
        self.activation_checkpointing = activation_checkpointing
        self.compile_blocks = compile_blocks
        self.topology: Topology | None = None
        self.applied_plan: AppliedPlan | None = None
        self._hybrid_groups: tuple[Any, Any] | None = None
        self._data_seed: int | None = None
        self._padding_steps = data.PaddingSteps()
        self._batch_checks = data.BatchChecks()
        self._zero_length_setting: bool | None = None
        self._restore_scheduler_step: Any = None
        self.pipeline_stages: int = 1
        self.zero_stage: int = 0
        self._init_engine(
            zero_stage=zero_stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
            pipeline_stages=pipeline_stages, micro_batches=micro_batches, deepspeed_config=deepspeed_config,
        )

    def _init_engine(self, **engine_arguments: Any) -> None:
        """Validate and keep the engine's own arguments (``zero_stage``, ``offload_*``, ``pipeline_stages``,
        ``micro_batches``, ``deepspeed_config``); called at the end of ``__init__``, after the shared settings."""
        raise NotImplementedError(f"{type(self).__name__} is not an engine class; construct SeqParStrategy(...).")

    # --- process groups ------------------------------------------------------------------------------

    @property
    def sequence_parallel_size(self) -> int:
        """The ``sp`` size: the given one, else the processes of one node (divided among the pipeline stages and the
        tensor-parallel ranks)."""
        if self._sequence_parallel_size:
            return self._sequence_parallel_size
        per_stage, rest = divmod(self.num_processes, self.pipeline_stages * self.tensor_parallel_size)
        return per_stage if per_stage and not rest else max(self.num_processes // self.tensor_parallel_size, 1)

    @property
    def device_mesh(self) -> DeviceMesh:
        """The topology's DeviceMesh, dimensions ``("pp", "dp", "sp", "tp")`` (also ``LightningModule.device_mesh``).

        Raises:
            RuntimeError: before ``setup_distributed`` (as Lightning's ``ModelParallelStrategy``).
        """
        if self.topology is None:
            raise RuntimeError("Accessing the device mesh before processes have initialized is not allowed.")
        return self.topology.mesh

    def _parallel_dims(self) -> ParallelDims:
        """The layout of ``world_size`` processes; raises :class:`TopologyError` naming every factor if it does not
        factor."""
        return ParallelDims(
            world_size=self.world_size,
            sequence_parallel_size=self.sequence_parallel_size,
            pipeline_parallel_size=self.pipeline_stages,
            tensor_parallel_size=self.tensor_parallel_size,
        )

    @override
    def _configure_launcher(self) -> None:
        # Lightning calls this in the Trainer's constructor, once the devices and nodes are known and before any process
        # starts: a layout that does not factor is one error in the user's process, not one traceback per rank.
        self._parallel_dims()
        super()._configure_launcher()

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        dims = self._parallel_dims()
        self.topology = Topology(
            dims, backend=self._process_group_backend, timeout=self._timeout, device_type=self.root_device.type
        )
        if self.lightning_module is not None:  # users read it in configure_model, as with ModelParallelStrategy
            self.lightning_module._device_mesh = self.topology.mesh
        if self.attention != "auto" and get_attention_kind(self.attention).uses_ulysses_degree:
            self._hybrid_groups = self._build_hybrid_groups()
        self._data_seed = data.agree_on_data_seed(self.topology, self.root_device)
        rank_zero_info(f"{type(self).__name__}: {self.topology.describe()}, attention={self.attention}")

    def _build_hybrid_groups(self) -> tuple[Any, Any]:
        """``(ulysses_group, ring_group)`` of this rank: the mesh's ``sp`` unflattened into ``ring x ulysses``."""
        assert self.topology is not None
        degree = self.ulysses_degree or min(self.topology.sp, self.num_processes)
        groups = self.topology.hybrid_groups(degree)
        rank_zero_info(
            f"{type(self).__name__}: hybrid attention, Ulysses degree {degree} x ring degree"
            f" {self.topology.sp // degree}"
        )
        return groups

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        assert self.topology is not None, "distributed_sampler_kwargs needs setup_distributed() first"
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.state.stage not in (None, RunningStage.TRAINING):
            # Evaluation: Lightning's sampler only gives the order; process_dataloader cuts it into one contiguous,
            # non-overlapping shard per data-parallel rank (Lightning's own would repeat samples, or fail with fewer
            # samples than ranks).
            return {"num_replicas": 1, "rank": 0}
        data_parallel_mesh = self.device_mesh["dp"]  # as Lightning's ModelParallelStrategy
        return {"num_replicas": data_parallel_mesh.size(), "rank": data_parallel_mesh.get_local_rank()}

    @override
    def teardown(self) -> None:
        self._padding_steps.end()  # an evaluation that failed in a padding step leaves module.log wrapped
        if self._restore_scheduler_step is not None:
            self._restore_scheduler_step()
            self._restore_scheduler_step = None
        if self.applied_plan is not None:
            self.applied_plan.remove()
            self.applied_plan = None
        failing = sys.exc_info()[1]  # Lightning tears down inside its `except` when fit/validate/... raised
        try:
            super().teardown()
        except RuntimeError as error:
            if failing is None:
                raise
            # Moving DTensor parameters to the CPU swaps them, which fails while the traceback of the first error
            # still holds their autograd graph ("Couldn't swap LayerNorm.weight"); Lightning would raise that instead
            # of the first error, so the first error goes on and this one is only reported.
            rank_zero_warn(f"{type(self).__name__}: teardown after {type(failing).__name__} also failed: {error}")

    def guard_parameter_step(self, closure: Any, optimizer: Any) -> Any:
        """``closure`` under the non-finite policy, checking the gradients of ``optimizer``'s parameters (the engines
        whose gradients live on the parameters: DDP and FSDP2)."""
        trainer = self.lightning_module.trainer
        return nonfinite_step_guard(
            closure,
            policy=self.on_nonfinite,
            parameters=lambda: (p for group in optimizer.param_groups for p in group["params"]),
            device=self.root_device,
            step=trainer.global_step,
            request_stop=lambda: setattr(trainer, "should_stop", True),
            zero_grad=lambda: optimizer.zero_grad(set_to_none=True),
        )

    def parallel_settings(self) -> dict[str, Any]:
        """The layout recorded in every checkpoint under ``"seqpar"`` (sizes of the mesh and the attention)."""
        assert self.topology is not None
        return {
            "world_size": self.world_size,
            "sequence_parallel_size": self.topology.sp,
            "data_parallel_size": self.topology.dp,
            "pipeline_parallel_size": self.topology.pp,
            "tensor_parallel_size": self.topology.tp,
            "attention": self.attention,
        }

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register every ``"seqpar*"`` name (:mod:`lightning_seqpar.strategies.registry`)."""
        from lightning_seqpar.strategies.registry import register_strategies

        register_strategies(strategy_registry)


# inspect.signature(SeqParStrategy) would otherwise report the metaclass's (*args, **kwargs).
SeqParStrategy.__signature__ = inspect.signature(SeqParStrategy.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(SeqParStrategy.__init__).parameters.values())[1:]
)
