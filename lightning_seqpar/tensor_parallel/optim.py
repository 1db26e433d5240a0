"""Optimizers over a tensor-parallel model whose parameters are partly DTensors and partly plain tensors.

:func:`~lightning_seqpar.tensor_parallel.apply_tensor_parallel` turns the split projections of the blocks into
DTensors (sharded over ``tp``) and leaves the rest (patch embedding, norms, head) plain tensors. torch's optimizers
step a parameter group with one multi-tensor (``foreach``) kernel per device and dtype on CUDA, and such a kernel
refuses a list that mixes DTensors and plain tensors ("got mixed torch.Tensor and DTensor"). On the CPU the
per-parameter loop is the default, so the mix only fails on GPUs. FSDP2 makes every parameter a DTensor, so it has
no mix.

Gradient clipping meets the same mix on every device: ``torch.nn.utils.clip_grad_norm_`` stacks the per-parameter
norms, which fails for DTensors beside plain tensors ("got mixed torch.Tensor and DTensor") and for DTensors of two
meshes (FSDP2 with tensor parallelism: the split projections live on the 2-D ``(dp_sp, tp)`` mesh, the rest on
``dp_sp``). :func:`clip_grad_norm_` and :func:`clip_grad_value_` clip such a model as one process clips the whole one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


def mixes_dtensors(params) -> bool:
    """True when ``params`` (an iterable of tensors) holds both DTensors and plain tensors."""
    kinds = {isinstance(p, DTensor) for p in params}
    return len(kinds) == 2


def step_per_parameter_where_mixed(optimizer: torch.optim.Optimizer) -> list[int]:
    """Make every parameter group that mixes DTensors and plain tensors step parameter by parameter.

    Sets ``foreach=False`` on those groups (the same update, one parameter at a time; torch reads the flag at every
    ``step``). Groups of one kind keep their settings.

    Args:
        optimizer: a torch optimizer over (part of) a tensor-parallel model.

    Returns:
        The indices of the groups changed.

    Raises:
        ValueError: when such a group asks for a fused kernel (``fused=True``), which cannot run on the mix: build
            the optimizer without ``fused=True``, or shard every parameter (FSDP2).
    """
    changed = []
    for index, group in enumerate(optimizer.param_groups):
        if not mixes_dtensors(group["params"]):
            continue
        if group.get("fused"):
            raise ValueError(
                f"{type(optimizer).__name__} parameter group {index} has fused=True, but it holds both tensor-parallel "
                "DTensors and plain tensors, which a fused kernel cannot step. Build the optimizer without fused=True "
                "or shard every parameter with FSDP2 (lightning_seqpar.fsdp.apply_fsdp)."
            )
        if group.get("foreach") is not False:
            group["foreach"] = False
            changed.append(index)
    return changed


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def total_grad_norm(parameters: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of all gradients of ``parameters`` taken as one vector: what one process holding the
    whole model computes.

    Plain tensors' gradients count as they are (each rank holds the whole, replicated gradient); the gradients of
    DTensors are grouped by mesh and each group's norm is made whole over its mesh (a collective: call on every rank
    of those meshes), so a shard counts once and a replicated DTensor once.

    Args:
        parameters: tensors (plain or DTensor) whose ``.grad`` to measure; those without a gradient are skipped.
        norm_type: the p of the p-norm (``float("inf")`` for the largest absolute value).

    Returns:
        A 0-dim plain tensor on the gradients' device (0 when no parameter has a gradient).
    """
    plain: list[Tensor] = []
    by_mesh: dict = {}
    for p in parameters:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            by_mesh.setdefault(p.grad.device_mesh, []).append(p.grad)
        else:
            plain.append(p.grad)
    norms = [torch.nn.utils.get_total_norm(plain, norm_type)] if plain else []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose parameters mix plain tensors and DTensors (of one or
    several meshes): scale every gradient by ``max_norm / (total + 1e-6)`` where that is below 1.

    Args:
        parameters: the parameters whose gradients to clip, in place.
        max_norm: the largest total norm allowed.
        norm_type: as in :func:`total_grad_norm`.

    Returns:
        The total norm before clipping (0-dim plain tensor), as torch's returns it.
    """
    parameters = [p for p in parameters if p.grad is not None]
    total = total_grad_norm(parameters, norm_type)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's clip_grads_with_norm_
    for p in parameters:
        grad = local_tensor(p.grad)  # the same factor on every shard: scaling the shards scales the whole
        grad.mul_(coefficient.to(grad.device, grad.dtype))
    return total


def clip_grad_value_(parameters: Iterable[Tensor], clip_value: float) -> None:
    """``torch.nn.utils.clip_grad_value_`` for a mix of plain tensors and DTensors: clamp every gradient element to
    ``[-clip_value, clip_value]``.

    Clamping is elementwise, so clamping each rank's shard clamps the whole; but a ``Partial`` gradient (a
    ``SequenceParallel`` norm's under Megatron-LM sequence parallelism: each ``tp`` rank holds the sum over its own
    tokens) is not the gradient until summed, so it is made ``Replicate`` first (a collective over those mesh dims;
    ``p.grad`` is replaced by the summed DTensor)."""
    from torch.distributed.tensor import Replicate

    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor) and any(placement.is_partial() for placement in grad.placements):
            grad = grad.redistribute(grad.device_mesh,
                                     [Replicate() if pl.is_partial() else pl for pl in grad.placements])
            p.grad = grad
        local_tensor(grad).clamp_(min=-clip_value, max=clip_value)
