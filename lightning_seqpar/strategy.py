"""SeqParStrategy: the Lightning strategy that makes a LightningModule's transformer sequence-parallel.

What it does, in order (see :meth:`SeqParStrategy.setup_distributed` and :meth:`SeqParStrategy.setup`):

1. initialise ``torch.distributed`` as DDP does, then build the :class:`~lightning_seqpar.topology.Topology`
   (sequence, data and sequence-data groups);
2. find the transformer in the LightningModule (or take the given plan) and apply the plan in place:
   tokens are sharded on entry to the block stack, attention becomes distributed, tokens are gathered on exit;
3. wrap the module in ``DistributedDataParallel`` over the sequence-data group, so gradients are averaged
   over ``dp * sp`` ranks, which makes one optimizer step equal to single-device training on the global batch;
4. hand Lightning a sampler keyed to the data-parallel rank, so all ranks of an SP group see the same samples.

With ``zero_stage > 0``, ``pipeline_stages > 1`` or a ``deepspeed_config``, step 3 hands the model to a DeepSpeed
engine instead (:mod:`lightning_seqpar.deepspeed_engine`, :mod:`lightning_seqpar.pipeline`), on the same groups:
ZeRO partitions over the sequence-data group, pipeline stages are the outermost dimension of the topology.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_seqpar.attention.hybrid import build_hybrid_groups
from lightning_seqpar.attention.local import AttentionBackend, check_backend_available
from lightning_seqpar.attention.registry import check_attention_choice, get_attention_kind
from lightning_seqpar import deepspeed_engine as ds
from lightning_seqpar import pipeline, pipeline_stages
from lightning_seqpar.parallelize import AppliedPlan, apply_sequence_parallel
from lightning_seqpar.plan import PlanError, SequenceParallelPlan, attention_head_counts, block_paths, choose_attention, infer_plan
from lightning_seqpar import checks, sampling
from lightning_seqpar.resumable import ResumableDataLoader, make_resumable
from lightning_seqpar.strategy_deepspeed import DeepSpeedEngineMixin
from lightning_seqpar.reliability import NONFINITE_POLICIES, NonFinitePolicy, check_topology, nonfinite_step_guard
from lightning_seqpar.topology import ParallelDims, Topology

log = logging.getLogger(__name__)

class SeqParStrategy(DeepSpeedEngineMixin, DDPStrategy):
    """Sequence-parallel training: the tokens of every sample are split across the ranks of a sequence-parallel group.

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
            them), or a kind added with :func:`~lightning_seqpar.attention.register_attention_kind`. See
            docs/choosing-attention.md.
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
        timeout: Timeout of every collective, as a ``timedelta`` or seconds: a rank that dies makes the others
            fail after this long instead of hanging.
        on_nonfinite: When the loss or a gradient is NaN/inf on any rank: ``"raise"`` on every rank, ``"skip"`` the
            step on every rank, ``"stop"`` training, or ``"ignore"``. The ranks agree before acting, so none diverges.
        zero_stage: DeepSpeed ZeRO stage over the ``dp * sp`` ranks of a stage: 1 partitions optimizer state,
            2 also gradients, 3 also parameters; 0 with ``pipeline_stages=1`` and no ``deepspeed_config`` is the
            DDP path. See docs/sharding.md for the memory per GPU.
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
        **kwargs: Passed to :class:`torch.nn.parallel.DistributedDataParallel` (e.g. ``static_graph=True``).
    """

    strategy_name = "seqpar"

    def __init__(
        self,
        sequence_parallel_size: int | None = None,
        attention: str = "auto",
        ulysses_degree: int | None = None,
        attention_backend: AttentionBackend = "auto",
        plan: dict[str, str | list[str]] | None = None,
        activation_checkpointing: bool | Literal["full", "save_attention", "offload"] = False,
        compile_blocks: bool | dict[str, Any] = False,
        process_group_backend: str | None = None,
        timeout: timedelta | float = timedelta(minutes=30),
        on_nonfinite: NonFinitePolicy = "raise",
        zero_stage: ds.ZeroStage = 0,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        pipeline_stages: int = 1,
        micro_batches: int | None = None,
        deepspeed_config: str | dict[str, Any] | None = None,
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
        if sequence_parallel_size is not None and (not isinstance(sequence_parallel_size, int) or sequence_parallel_size < 1):
            raise ValueError(f"SeqParStrategy: sequence_parallel_size must be a positive integer, got {sequence_parallel_size!r}.")
        check_attention_choice(attention, attention_backend, ulysses_degree, owner="SeqParStrategy")
        self.ulysses_degree = ulysses_degree
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"SeqParStrategy: on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {on_nonfinite!r}.")
        self.on_nonfinite = on_nonfinite
        self._sequence_parallel_size = sequence_parallel_size
        self.attention = attention
        self.attention_backend = attention_backend
        self._plan = SequenceParallelPlan(plan) if plan is not None else None
        if activation_checkpointing not in (False, True, "full", "save_attention", "offload"):
            raise ValueError(
                "SeqParStrategy: activation_checkpointing must be False, True, 'full', 'save_attention' or 'offload',"
                f" got {activation_checkpointing!r}."
            )
        self.activation_checkpointing = activation_checkpointing
        if not isinstance(compile_blocks, (bool, dict)):
            raise ValueError(
                f"SeqParStrategy: compile_blocks must be True, False or a dict of torch.compile options, got {compile_blocks!r}."
            )
        self.compile_blocks = compile_blocks
        self.topology: Topology | None = None
        self.applied_plan: AppliedPlan | None = None
        self._data_seed: int | None = None
        self._hybrid_groups = None
        self._pipeline: pipeline_stages.PipelineStages | None = None
        self._padding_steps: Any = None  # the padding_step context while an evaluation shard pads
        self._checked_batches: set[tuple] = set()
        self._zero_length_setting: bool | None = None
        self._init_deepspeed_settings(zero_stage, offload_optimizer, offload_parameters, pipeline_stages, micro_batches, deepspeed_config)

    # --- process groups ------------------------------------------------------------------------------

    @property
    def sequence_parallel_size(self) -> int:
        if self._sequence_parallel_size:
            return self._sequence_parallel_size
        per_stage, rest = divmod(self.num_processes, self.pipeline_stages)
        return per_stage if per_stage and not rest else self.num_processes

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        dims = ParallelDims(
            world_size=self.world_size, sequence_parallel_size=self.sequence_parallel_size, pipeline_parallel_size=self.pipeline_stages
        )
        self.topology = Topology(dims, backend=self._process_group_backend, timeout=self._timeout)
        self._ddp_kwargs["process_group"] = self.topology.sequence_data_group
        uses_subgroups = self.attention != "auto" and get_attention_kind(self.attention).uses_ulysses_degree
        self._hybrid_groups = self._build_hybrid_groups() if uses_subgroups else None
        self._data_seed = self._agree_on_data_seed()
        rank_zero_info(f"SeqParStrategy: {self.topology.describe()}, attention={self.attention}")

    def _build_hybrid_groups(self):
        """The (Ulysses, ring) sub-groups of this rank's SP group; every rank creates every SP group's."""
        assert self.topology is not None
        sp = self.topology.sp
        degree = self.ulysses_degree or min(sp, self.num_processes)
        if sp % degree:
            raise ValueError(
                f"SeqParStrategy: ulysses_degree={degree} does not divide sequence_parallel_size={sp}; choose a"
                " divisor (ulysses_degree x ring degree = sequence_parallel_size)."
            )
        mine = None
        for ranks in self.topology.dims.sequence_groups():
            groups = build_hybrid_groups(ranks, degree, backend=self._process_group_backend, timeout=self._timeout)
            if self.global_rank in ranks:
                mine = groups
        rank_zero_info(f"SeqParStrategy: hybrid attention, Ulysses degree {degree} x ring degree {sp // degree}")
        return mine

    def _agree_on_data_seed(self) -> int:
        """One seed per SP group for data-loader workers, so every rank of the group draws the same samples."""
        assert self.topology is not None
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=self.root_device)
        group = self.topology.sequence_group
        dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
        if self.topology.pp > 1:  # every stage must draw the samples stage 0 draws
            group = self.topology.pipeline_group
            dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
        return int(seed.item())

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
        return {"num_replicas": self.topology.dp, "rank": self.topology.dp_rank}

    # --- the model -------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer) -> None:
        self._apply_plan(self.lightning_module)
        self._reduce_metrics_over_data_group(self.lightning_module)
        if trainer.state.fn == TrainerFn.PREDICTING:
            # Fewer samples than data-parallel ranks leave a prediction shard empty; prediction needs no step on every
            # rank, so that rank predicts nothing (Lightning refuses empty loaders unless told; restored at the end).
            module = self.lightning_module
            self._zero_length_setting = module.allow_zero_length_dataloader_with_multiple_devices
            module.allow_zero_length_dataloader_with_multiple_devices = True
        if self.uses_deepspeed:
            _refuse_lr_finder(trainer, self.zero_stage, self.pipeline_stages)
            self._setup_deepspeed(trainer)
        else:
            super().setup(trainer)

    def _apply_plan(self, module: LightningModule) -> None:
        if self.applied_plan is not None:
            return
        assert self.topology is not None
        self._check_backend()
        plan = self._plan if self._plan is not None else infer_plan(module)
        auto = self.attention == "auto"
        if auto:
            kind, degree, reason = choose_attention(
                attention_head_counts(module, plan.resolve(module)), self.topology.sp, self.attention_backend
            )
            rank_zero_info(f"SeqParStrategy: attention='auto' chose {kind!r}: {reason}")
            self.attention, self.ulysses_degree = kind, degree
            self._hybrid_groups = self._build_hybrid_groups() if get_attention_kind(kind).uses_ulysses_degree else None
        if self.activation_checkpointing:
            plan = _with_checkpoints(plan, module, self.activation_checkpointing)
        if self.compile_blocks:
            plan = _with_block_role(plan, module, "compile")
        self.applied_plan = apply_sequence_parallel(
            module, plan, self.topology.sequence_group, attention=self.attention, backend=self.attention_backend,
            hybrid_groups=self._hybrid_groups,
            compile_options=self.compile_blocks if isinstance(self.compile_blocks, dict) else None,
        )
        self.applied_plan.runtime.dropout_fallback = auto
        rank_zero_info(f"SeqParStrategy: sequence-parallel plan of {type(module).__name__}:\n{plan}")

    def _check_backend(self) -> None:
        check_backend_available(self.attention_backend, self.root_device.type, owner="SeqParStrategy")

    def _reduce_metrics_over_data_group(self, module: LightningModule) -> None:
        """torchmetrics sum their states over the world by default, which would count each sample once per SP rank."""
        from torchmetrics import Metric

        assert self.topology is not None
        for metric in module.modules():
            if isinstance(metric, Metric) and metric.process_group is None:
                metric.process_group = self.topology.data_group

    @override
    def teardown(self) -> None:
        self._end_padding_steps()  # an evaluation that failed in a padding step leaves module.log wrapped
        if self.applied_plan is not None:
            self.applied_plan.remove()
            self.applied_plan = None
        super().teardown()

    @property
    @override
    def handles_gradient_accumulation(self) -> bool:
        # Lightning owns the accumulation schedule on every path but the pipeline's (where one DataLoader batch is one
        # step of micro-batches): it divides the loss by accumulate_grad_batches once, and steps on the last batch of
        # an epoch too, as single-process training does. The DeepSpeed engine is told each boundary (see
        # DeepSpeedEngineMixin._deepspeed_backward).
        return self.uses_deepspeed and self.pipeline_stages > 1

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return self.uses_deepspeed

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return not self.uses_deepspeed

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if not self.uses_deepspeed:
            super().load_model_state_dict(checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if not self.uses_deepspeed:
            super().load_optimizer_state_dict(checkpoint)

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        # DeepSpeed writes each rank's optimizer partition itself (save_checkpoint).
        return {} if self.uses_deepspeed else super().optimizer_state(optimizer)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.uses_deepspeed and self.pipeline_stages > 1:
            # train_batch runs forward, backward and the step of all micro-batches: through the module's
            # pipeline_layers() chain, or through its own training_step on every stage (lightning_seqpar.pipeline_auto).
            if self._pipeline.explicit:
                return pipeline.train_batch(self.model, self.lightning_module, args[0], self.micro_batches or 1)
            batch, batch_idx = args[0], (args[1] if len(args) > 1 else kwargs.get("batch_idx", 0))
            return self._pipeline.train(self.model, batch, batch_idx, self.micro_batches or 1, self.precision_plugin.train_step_context)
        return super().training_step(*args, **kwargs)

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._pipeline is not None and self.deepspeed_engine is not None:
            self._pipeline.restore_full_weights()  # each rank trained one stage: bring the others' weights back

    def _pipeline_step(self, hook: str, context: Any, args: tuple, kwargs: dict) -> Any:
        """An evaluation step through the pipeline stages, forward only (see lightning_seqpar.pipeline_auto)."""
        return self._pipeline.evaluate(hook, args[0], args[1:], kwargs, self.micro_batches or 1, context)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipeline_stages > 1:
            return self._pipeline_step("validation_step", self.precision_plugin.val_step_context, args, kwargs)
        return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipeline_stages > 1:
            return self._pipeline_step("test_step", self.precision_plugin.test_step_context, args, kwargs)
        return super().test_step(*args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipeline_stages > 1:
            return self._pipeline_step("predict_step", self.precision_plugin.predict_step_context, args, kwargs)
        return super().predict_step(*args, **kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if self.uses_deepspeed and self.pipeline_stages > 1:
            return closure_loss  # done inside train_batch
        if self.uses_deepspeed:
            kwargs = self._deepspeed_backward_kwargs(kwargs)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    # --- steps and checkpoints ----------------------------------------------------------------------------

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.uses_deepspeed:
            return self._deepspeed_optimizer_step(optimizer, closure, model)
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

    def parallel_settings(self) -> dict[str, Any]:
        """The layout recorded in every checkpoint under ``"seqpar"``."""
        assert self.topology is not None
        settings = {
            "world_size": self.world_size,
            "sequence_parallel_size": self.topology.sp,
            "data_parallel_size": self.topology.dp,
            "pipeline_parallel_size": self.topology.pp,
            "attention": self.attention,
        }
        if self.uses_deepspeed:
            settings |= {"zero_stage": self.zero_stage, "sequence_data_parallel_size": self.topology.dp * self.topology.sp}
        return settings

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint["seqpar"] = self.parallel_settings()
        if self.deepspeed_engine is None:
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        else:
            self._save_deepspeed_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self.uses_deepspeed:
            return self._load_deepspeed_checkpoint(checkpoint_path)
        # A directory of ZeRO shards cannot feed the DDP path's optimizer: this raises with the command that can.
        ds.check_resume_layout(checkpoint_path, ds.read_layout(checkpoint_path), self.parallel_settings(), load_universal=False)
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        for difference in check_topology(checkpoint.get("seqpar"), self.parallel_settings()):
            # Weights are replicated here, so any layout can resume; the global batch may change with dp.
            rank_zero_info(f"SeqParStrategy: resuming {checkpoint_path} with a different layout: {difference}")
        return checkpoint

    # --- collectives Lightning asks for -----------------------------------------------------------------
    # Values (logged metrics, gathered outputs) reduce over the data-parallel group: the ranks of an SP group hold
    # the same value. Decisions reduce over the world, and ``broadcast`` / ``barrier`` (DDPStrategy's) span the
    # world with ``src`` a global rank, so every rank of every SP group, pipeline stage and replica acts alike.

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any = "mean") -> Tensor | Any:
        """Reduce over the data-parallel group by default: the ranks of an SP group hold the same value."""
        if group is None and self.topology is not None:
            group = self.topology.data_group
        if isinstance(tensor, Tensor) and not tensor.is_floating_point() and str(reduce_op).lower() in ("mean", "avg", "reduceop.avg"):
            # An integer mean floors: Lightning's epoch mean divides the mean of the summed values by the mean of the
            # (integer) batch counts, which is off when the ranks ran different numbers of samples (evaluation shards).
            tensor = tensor.double()
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """``all`` (or ``any``) of ``decision`` over every rank of the world: ModelCheckpoint's top-k and file checks,
        EarlyStopping and others act on it on every rank, so every rank must get the same answer.

        Lightning's version sums through :meth:`reduce` (here the data-parallel group, dp of the world's ranks) and
        compares with the world size, which is never reached once ``sequence_parallel_size > 1``: "all ranks agree"
        would always be False. The decision is counted over the group it is reduced over instead: the world, which
        also covers pipeline stages and ranks outside this rank's data-parallel group.
        """
        if not dist.is_available() or not dist.is_initialized():
            return bool(decision)
        votes = torch.tensor(int(bool(decision)), device=self.root_device)
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)  # the default group: the world
        return bool(votes.item() == dist.get_world_size()) if all else bool(votes.item() > 0)

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        """Gather over the data-parallel group by default, so each sample appears once."""
        if group is None and self.topology is not None:
            group = self.topology.data_group
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Key every loader to the data-parallel rank (:mod:`lightning_seqpar.sampling`): a user's training sampler
        keyed to the global rank is re-keyed, evaluation loaders get contiguous non-overlapping shards (every sample
        counted once); seed data-loader workers per data-parallel rank, identically on every rank of an SP group;
        make map-style training loaders resumable mid-epoch (see :mod:`lightning_seqpar.resumable`). Then check that
        the ranks of each SP group (and pipeline) have loaders of the same length."""
        if isinstance(dataloader, DataLoader) and self.topology is not None and self._data_seed is not None:
            replica = self.topology.dp_rank  # the same on every SP rank and pipeline stage of a replica
            stage = self.lightning_module.trainer.state.stage if self.lightning_module is not None else None
            if stage is None or stage == RunningStage.TRAINING:
                dataloader = sampling.rekey_sampler(dataloader, self.topology.dp, replica)
            else:
                dataloader = sampling.shard_for_evaluation(dataloader, self.topology.dp, replica, pad=stage != RunningStage.PREDICTING)
            dataloader.generator = torch.Generator().manual_seed(self._data_seed + replica)
            init_fn = dataloader.worker_init_fn
            if isinstance(init_fn, partial) and init_fn.func is pl_worker_init_function:
                dataloader.worker_init_fn = partial(pl_worker_init_function, rank=replica)
            if stage is None or stage == RunningStage.TRAINING:
                dataloader = make_resumable(dataloader)
        if self.topology is not None:
            checks.check_loader_lengths(dataloader, self.topology, self.root_device)
        return dataloader

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """Move the batch; on an evaluation shard's padding batch, keep the step out of logged sums and metrics
        (:func:`~lightning_seqpar.sampling.padding_step`); check the first batch of each loader across the SP group."""
        batch = super().batch_to_device(batch, device, dataloader_idx)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or self.topology is None:
            return batch
        if trainer.state.stage == RunningStage.TRAINING:
            combined = getattr(trainer.fit_loop, "_combined_loader", None)
            for loader in combined.flattened if combined is not None else []:
                if isinstance(loader, ResumableDataLoader):
                    loader.mark_delivered()  # the epoch position a checkpoint records (see resumable.py)
        elif trainer.state.stage in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING, RunningStage.TESTING):
            loader = _evaluation_loader(trainer, dataloader_idx)
            padding = isinstance(loader, sampling.EvalShardDataLoader) and loader.next_is_padding()
            if padding and self._padding_steps is None:
                self._padding_steps = sampling.padding_step(self.lightning_module)
                self._padding_steps.__enter__()
            elif not padding:
                self._end_padding_steps()
        key = (str(trainer.state.stage), dataloader_idx, trainer.current_epoch)
        if key not in self._checked_batches:
            self._checked_batches.add(key)
            checks.check_same_batch(batch, self.topology, f"{trainer.state.stage} dataloader {dataloader_idx}", self.root_device)
        return batch

    def _end_padding_steps(self) -> None:
        if self._padding_steps is not None:
            self._padding_steps.__exit__(None, None, None)
            self._padding_steps = None

    @override
    def on_validation_end(self) -> None:
        self._end_padding_steps()
        super().on_validation_end()

    @override
    def on_test_end(self) -> None:
        self._end_padding_steps()
        super().on_test_end()

    @override
    def on_predict_end(self) -> None:
        if self._zero_length_setting is not None and self.lightning_module is not None:
            self.lightning_module.allow_zero_length_dataloader_with_multiple_devices = self._zero_length_setting
            self._zero_length_setting = None
        super().on_predict_end()

    def gather_predictions(self, predictions: list[Any]) -> list[Any]:
        """All data-parallel ranks' ``trainer.predict`` outputs, in dataset order, on every rank (collective over the
        data-parallel group; call on every rank). Each rank predicts a contiguous shard and the shards follow the
        rank order, so the batches of rank 0, then rank 1, ... are the samples in order (batch boundaries may differ
        from one process; concatenate along the batch dimension to compare)."""
        assert self.topology is not None
        shards: list[Any] = [None] * self.topology.dp
        dist.all_gather_object(shards, list(predictions or []), group=self.topology.data_group)
        return [batch for shard in shards for batch in shard]

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "seqpar", cls, description="Sequence parallelism across the devices of each node (attention chosen from the model's heads)"
        )
        strategy_registry.register(
            "seqpar_ulysses", cls, description="Sequence parallelism with DeepSpeed-Ulysses attention", attention="ulysses"
        )
        strategy_registry.register(
            "seqpar_lss", cls, description="Sequence parallelism with LSS segment attention", attention="lss"
        )
        strategy_registry.register(
            "seqpar_ring", cls, description="Sequence parallelism with ring attention", attention="ring"
        )
        strategy_registry.register(
            "seqpar_hybrid", cls, description="Sequence parallelism, Ulysses within a node x ring across nodes", attention="hybrid"
        )
        for stage, what in ((1, "optimizer state"), (2, "optimizer state and gradients"), (3, "optimizer state, gradients and parameters")):
            strategy_registry.register(
                f"seqpar_zero{stage}", cls, description=f"Sequence parallelism with DeepSpeed ZeRO-{stage} ({what} sharded)", zero_stage=stage
            )
        strategy_registry.register(
            "seqpar_zero3_offload",
            cls,
            description="Sequence parallelism with DeepSpeed ZeRO-3, parameters and optimizer state in host memory",
            zero_stage=3,
            offload_optimizer=True,
            offload_parameters=True,
        )


def _refuse_lr_finder(trainer: Trainer, zero_stage: int, pipeline_stages: int) -> None:
    """The learning-rate finder drives the optimizer with its own torch LR scheduler, which DeepSpeed's optimizer
    (not a ``torch.optim.Optimizer``) cannot take: say so before the engine is built, instead of a TypeError inside it."""
    from lightning.pytorch.callbacks import LearningRateFinder

    if any(isinstance(callback, LearningRateFinder) for callback in trainer.callbacks):
        raise ValueError(
            f"SeqParStrategy(zero_stage={zero_stage}, pipeline_stages={pipeline_stages}): the learning-rate finder"
            " (Tuner.lr_find or the LearningRateFinder callback) cannot drive DeepSpeed's optimizer. Run the finder with"
            " SeqParStrategy(zero_stage=0, pipeline_stages=1) on the same model, data and sequence_parallel_size (ZeRO"
            " does not change the losses it measures), then train with the learning rate it suggests."
        )


def _evaluation_loader(trainer: Trainer, dataloader_idx: int) -> Any:
    """The processed loader the running validation or test loop is drawing from."""
    combined = getattr(trainer._evaluation_loop, "_combined_loader", None)
    loaders = combined.flattened if combined is not None else []
    return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None


def _with_checkpoints(plan: SequenceParallelPlan, module: torch.nn.Module, mode: bool | str = True) -> SequenceParallelPlan:
    """``plan`` with every transformer block marked for activation checkpointing in ``mode``."""
    role = {True: "checkpoint", "full": "checkpoint", "save_attention": "checkpoint_save_attention", "offload": "checkpoint_offload"}[mode]
    return _with_block_role(plan, module, role)


def _with_block_role(plan: SequenceParallelPlan, module: torch.nn.Module, role: str) -> SequenceParallelPlan:
    """``plan`` with ``role`` added to every transformer block (the children of the largest block stack)."""
    paths = block_paths(module)
    if not paths:
        raise PlanError(
            f"SeqParStrategy: no stack of transformer blocks found in {type(module).__name__} to apply {role!r} to;"
            " mark the blocks in an explicit plan instead."
        )
    merged = plan.to_dict()
    for path in paths:
        merged[path] = f"{merged[path]}, {role}" if path in merged else role
    return SequenceParallelPlan(merged)
