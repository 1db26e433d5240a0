"""The strategy's additions to a sequence-parallel plan: activation checkpointing and compilation of every transformer
block."""

from __future__ import annotations

from typing import Literal

from torch import nn

from lightning_seqpar.plan import PlanError, SequenceParallelPlan, block_paths

ActivationCheckpointing = bool | Literal["full", "save_attention", "offload"]
ACTIVATION_CHECKPOINTING: tuple[object, ...] = (False, True, "full", "save_attention", "offload")
_CHECKPOINT_ROLES = {
    True: "checkpoint",
    "full": "checkpoint",
    "save_attention": "checkpoint_save_attention",
    "offload": "checkpoint_offload",
}


def with_checkpoints(
    plan: SequenceParallelPlan, module: nn.Module, mode: ActivationCheckpointing = True
) -> SequenceParallelPlan:
    """``plan`` with every transformer block marked for activation checkpointing in ``mode``
    (``True``/``"full"``, ``"save_attention"`` or ``"offload"``).

    Raises:
        PlanError: ``module`` has no stack of transformer blocks.
    """
    return with_block_role(plan, module, _CHECKPOINT_ROLES[mode])


def with_block_role(plan: SequenceParallelPlan, module: nn.Module, role: str) -> SequenceParallelPlan:
    """``plan`` with ``role`` added to every transformer block (the children of the largest block stack).

    Raises:
        PlanError: ``module`` has no stack of transformer blocks.
    """
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
