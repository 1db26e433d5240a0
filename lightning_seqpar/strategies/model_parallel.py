"""Tensor parallelism and FSDP2 as the strategies apply them: argument checks, the tensor-parallel split of the
LightningModule, gradient averaging of split parameters over ``dp_sp``, and the FSDP2 mixed-precision policy.

Order in ``SeqParStrategy.prepare_module`` (the one place, as torchtitan's ``parallelize``): tensor parallelism over
``tp`` first (so ``attention="auto"`` counts each rank's ``H / tp`` heads), then the sequence-parallel plan over ``sp``,
then the engine (DDP-style averaging over ``dp_sp``, or FSDP2 sharding over ``dp_sp``), then the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_seqpar.parallelize import sync_rng_state
from lightning_seqpar.tensor_parallel import apply_tensor_parallel, describe_plan
from lightning_seqpar.tensor_parallel.optim import clip_grad_norm_, clip_grad_value_, local_tensor
from lightning_seqpar.topology import Topology


def check_tensor_parallel_arguments(name: str, tensor_parallel_size: Any, tp_plan: Any, *, zero_stage: Any,
                                    pipeline_stages: Any, deepspeed_config: Any) -> None:
    """Raise ValueError (naming the strategy class ``name``) unless ``tensor_parallel_size`` is a positive integer,
    ``tp_plan`` is None or a dict of ``ParallelStyle``, and ``tensor_parallel_size > 1`` comes without DeepSpeed
    (``zero_stage``, ``pipeline_stages > 1``, ``deepspeed_config``), which splits no DTensor parameters."""
    if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or tensor_parallel_size < 1:
        raise ValueError(
            f"{name}: tensor_parallel_size must be a positive integer (1 means disabled), got {tensor_parallel_size!r}."
        )
    if tp_plan is not None:
        if not isinstance(tp_plan, Mapping) or not all(isinstance(s, ParallelStyle) for s in tp_plan.values()):
            raise ValueError(
                f"{name}: tp_plan must be a dict {{module path: ParallelStyle}} (torch.distributed.tensor.parallel's"
                f" ColwiseParallel(), RowwiseParallel(), ...), got {tp_plan!r}."
            )
        if tensor_parallel_size == 1:
            raise ValueError(
                f"{name}: tp_plan is given but tensor_parallel_size=1; set tensor_parallel_size > 1 to use it."
            )
    if tensor_parallel_size > 1:
        used = [f"{k}={v!r}" for k, v, off in (("zero_stage", zero_stage, 0), ("pipeline_stages", pipeline_stages, 1))
                if v != off] + (["deepspeed_config"] if deepspeed_config is not None else [])
        if used:
            raise ValueError(
                f"{name}: tensor_parallel_size={tensor_parallel_size} cannot run with DeepSpeed ({', '.join(used)}):"
                " its ZeRO and pipeline engines do not handle DTensor parameters. Use fsdp=True for sharded parameters"
                " and optimizer state with tensor parallelism, or drop tensor_parallel_size to use DeepSpeed."
            )


def apply_tensor_parallel_to_module(module: nn.Module, topology: Topology, tp_plan: Mapping[str, ParallelStyle] | None,
                                    owner: str, sequence_parallel: bool = True) -> None:
    """Split ``module``'s transformer blocks over the topology's ``tp`` ranks
    (:func:`~lightning_seqpar.tensor_parallel.apply_tensor_parallel`, with ``sequence_parallel`` for the activations
    between the projections), then give the ``tp`` ranks one random state, so they draw the same dropout masks (and
    masking noise) in the replicated parts. A collective over ``tp``; nothing when ``tp`` is 1."""
    if topology.tp == 1:
        return
    plan = apply_tensor_parallel(module, topology.mesh["tp"], tp_plan, sequence_parallel=sequence_parallel)
    sync_rng_state(topology.tensor_group)
    rank_zero_info(f"{owner}: tensor-parallel plan over tp={topology.tp} ranks:\n{describe_plan(plan)}")


def has_dtensor_parameters(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def broadcast_module_state(module: nn.Module, group: ProcessGroup) -> None:
    """Give every rank of ``group`` the parameters and buffers of its first rank (local shards of DTensors), what
    ``DistributedDataParallel`` does when it wraps a module. The ranks of ``group`` must hold the same shard layout
    (one ``tp`` rank each, as ``dp_sp`` groups do)."""
    if dist.get_world_size(group) == 1:
        return
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(local_tensor(tensor).data, src=source, group=group)


def average_gradients(parameters: Iterable[Tensor], group: ProcessGroup) -> None:
    """Average the gradients (their local shards, for DTensors) over ``group``: one flat all-reduce per dtype and
    device. Every rank of ``group`` must hold gradients for the same parameters, in the same order and shapes."""
    size = dist.get_world_size(group)
    if size == 1:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            grad = local_tensor(p.grad)
            buckets.setdefault((grad.dtype, grad.device), []).append(grad)
    for grads in buckets.values():
        flat = _flatten_dense_tensors(grads)  # [sum of numel]
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)


def unsplit_over_tensor_parallel(parameters: Iterable[Tensor]) -> list[Tensor]:
    """The parameters that tensor parallelism does not split: plain tensors, and DTensors whose mesh has no ``tp``
    dimension (FSDP2 over ``dp_sp`` only) or that are ``Replicate`` on it."""
    from torch.distributed.tensor import Replicate

    unsplit = []
    for p in parameters:
        names = p.device_mesh.mesh_dim_names or () if isinstance(p, DTensor) else ()
        if not isinstance(p, DTensor) or "tp" not in names or isinstance(p.placements[names.index("tp")], Replicate):
            unsplit.append(p)
    return unsplit


def average_unsplit_gradients_over_tensor_parallel(parameters: Iterable[Tensor], tensor_group: ProcessGroup) -> None:
    """Average over the ``tp`` ranks the gradients of the parameters tensor parallelism does not split.

    Megatron-style tensor parallelism leaves them with equal gradients on every ``tp`` rank (the column-wise layers
    all-reduce their input gradients), so the average changes nothing there but rounding. It is what makes other
    splits over the ``tp`` ranks correct: channel-parallel variable aggregation (D-CHAG, arXiv 2506.21411) on the
    ``tp`` group gives each rank the gradient of its own channels only, scaled by the group size by the all-gather's
    backward; averaging over the group sums them into the single-device gradient. Local shards for FSDP2's
    DTensors (every ``tp`` rank holds the same ``dp_sp`` shard of them)."""
    average_gradients(unsplit_over_tensor_parallel(parameters), tensor_group)


def clip_dtensor_gradients(precision_plugin: Any) -> None:
    """Make ``precision_plugin`` (the Trainer's) clip gradients with
    :func:`~lightning_seqpar.tensor_parallel.optim.clip_grad_norm_` and
    :func:`~lightning_seqpar.tensor_parallel.optim.clip_grad_value_`, which take plain tensors beside DTensors of
    several meshes (``gradient_clip_val`` with tensor parallelism or FSDP2; torch's own fails on that mix). The norm is
    that of the whole model, as one process computes it; it is a collective, which Lightning calls on every rank."""

    def clip_grad_by_norm(optimizer: Any, clip_val: float) -> None:
        clip_grad_norm_(precision_plugin.main_params(optimizer), clip_val)

    def clip_grad_by_value(optimizer: Any, clip_val: float) -> None:
        clip_grad_value_(precision_plugin.main_params(optimizer), clip_val)

    precision_plugin.clip_grad_by_norm = clip_grad_by_norm  # this Trainer's plugin only (not its class)
    precision_plugin.clip_grad_by_value = clip_grad_by_value


def mixed_precision_dtypes(precision: str) -> tuple[torch.dtype | None, torch.dtype | None]:
    """``(param_dtype, reduce_dtype)`` of FSDP2's ``MixedPrecisionPolicy`` for a Lightning precision string:
    ``"bf16-mixed"`` -> (bf16, fp32), ``"16-mixed"`` -> (fp16, fp32), otherwise (None, None) (the stored dtype,
    which ``"bf16-true"`` / ``"16-true"`` already set on the module)."""
    if precision in ("bf16-mixed", "bf16"):
        return torch.bfloat16, torch.float32
    if precision in ("16-mixed", "16"):
        return torch.float16, torch.float32
    return None, None
