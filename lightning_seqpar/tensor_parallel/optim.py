"""Optimizers over a tensor-parallel model whose parameters are partly DTensors and partly plain tensors.

:func:`~lightning_seqpar.tensor_parallel.apply_tensor_parallel` turns the split projections of the blocks into
DTensors (sharded over ``tp``) and leaves the rest (patch embedding, norms, head) plain tensors. torch's optimizers
step a parameter group with one multi-tensor (``foreach``) kernel per device and dtype on CUDA, and such a kernel
refuses a list that mixes DTensors and plain tensors ("got mixed torch.Tensor and DTensor"). On the CPU the
per-parameter loop is the default, so the mix only fails on GPUs. FSDP2 makes every parameter a DTensor, so it has
no mix.
"""

from __future__ import annotations

import torch
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
