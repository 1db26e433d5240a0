"""Apply a sequence-parallel plan to a model in place, and take it off again.

The model's classes, parameters and state-dict keys are untouched: shard and gather points are forward hooks, and
attention, SDPA interception, sliced parameters, compilation and activation checkpointing wrap the instance's
``forward`` (:func:`~lightning_seqpar.wrapping.wrap_forward`). Each role applies itself
(:mod:`lightning_seqpar.parallelize.roles`, in the order of :data:`~lightning_seqpar.parallelize.roles.ROLE_ORDER`);
:meth:`AppliedPlan.remove` restores the plain model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from lightning_seqpar.attention import AttentionBackend
from lightning_seqpar.attention.registry import UnknownAttentionKindError, get_attention_kind
from lightning_seqpar.comm import group_size
from lightning_seqpar.parallelize.roles import ROLE_ORDER
from lightning_seqpar.parallelize.runtime import SequenceParallelRuntime
from lightning_seqpar.plan import PlanError, Role, SequenceParallelPlan
from lightning_seqpar.wrapping import wrap_forward


class AppliedPlan:
    """The result of :func:`apply_sequence_parallel`: the plan that was applied, its runtime, and how to take it off.

    Attributes:
        plan: The plan as given.
        resolved: ``(concrete path, role)`` pairs, globs expanded against the model.
        runtime: The :class:`~lightning_seqpar.parallelize.SequenceParallelRuntime` its hooks share.
        compile_options: Keyword arguments of ``torch.compile`` for the ``compile`` role.
    """

    def __init__(self, plan: SequenceParallelPlan, resolved: list[tuple[str, Role]], runtime: SequenceParallelRuntime,
                 compile_options: dict[str, Any] | None = None) -> None:
        self.plan, self.resolved, self.runtime = plan, resolved, runtime
        self.compile_options = dict(compile_options or {})
        self._undo: list[Callable[[], None]] = []

    def add_undo(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` when the plan is removed (after everything added later: undos unwind in reverse order),
        e.g. a hook handle's ``remove`` or a pipeline stage's cleanup."""
        self._undo.append(undo)

    def wrap_forward(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """Replace ``module``'s forward with ``make(current forward)`` until the plan is removed
        (:func:`~lightning_seqpar.wrapping.wrap_forward`)."""
        self.add_undo(wrap_forward(module, make))

    def remove(self) -> None:
        """Restore the plain model (hooks removed, forwards unwrapped) and leave any region still open."""
        while self._undo:
            self._undo.pop()()
        self.runtime.exit()


def apply_sequence_parallel(
    root: nn.Module,
    plan: SequenceParallelPlan,
    group: ProcessGroup,
    *,
    attention: str = "ulysses",
    backend: AttentionBackend = "auto",
    hybrid_groups: tuple[ProcessGroup, ProcessGroup] | None = None,
    compile_options: dict[str, Any] | None = None,
) -> AppliedPlan:
    """Make ``root`` sequence-parallel over ``group`` in place according to ``plan``.

    Inside the region the plan marks, every rank of ``group`` holds its slice of the tokens (``[B, L, D] ->
    [B, L_r, D]``, the sum of the L_r is L, uneven splits allowed) and every attention core the plan marks runs as
    the distributed attention ``attention`` over the whole sequence; the gather point all-gathers the tokens back
    (``[B, L_r, D] -> [B, L, D]``). Forward and gradients equal those of the plain model on one device (up to
    float rounding). The sequence-parallel scheme follows the long-sequence ViT recipe of arXiv 2405.15780
    (DeepSpeed-Ulysses, arXiv 2309.14509; LSS, arXiv 2311.02382).

    Args:
        root: The model (paths in ``plan`` are relative to it).
        plan: What to do where; see :mod:`lightning_seqpar.plan`.
        group: The sequence-parallel process group (P ranks; rank order is token order).
        attention: The distributed attention kind, a name in :mod:`lightning_seqpar.attention.registry`
            (``"ulysses"``, ``"lss"``, ``"ring"``, ``"hybrid"`` or one registered by the user).
        backend: The local kernel the kind runs on (:data:`~lightning_seqpar.attention.local.BACKENDS`).
        hybrid_groups: ``(ulysses_group, ring_group)`` for a kind on Ulysses x ring sub-groups (``"hybrid"``),
            see :func:`~lightning_seqpar.attention.build_hybrid_groups`.
        compile_options: Keyword arguments of ``torch.compile`` for the modules marked ``compile``.

    Returns:
        The applied plan; call ``.remove()`` to restore the plain model.

    Raises:
        PlanError: ``attention`` is not a registered kind, a hybrid kind has no ``hybrid_groups``, ``backend`` is not
            one the kind runs on, or the plan does not fit the model (:meth:`SequenceParallelPlan.resolve`).
        UnsupportedAttentionError: A module marked ``sdpa``/``attention`` holds a sequence-first
            ``nn.MultiheadAttention``.

    A collective: every rank of ``group`` must call it (the group takes its first rank's random state, see
    :func:`sync_rng_state`).
    """
    try:
        kind = get_attention_kind(attention)
        kind.check_backend(backend)
    except (UnknownAttentionKindError, ValueError) as error:
        raise PlanError(str(error)) from None
    if kind.uses_ulysses_degree and hybrid_groups is None:
        raise PlanError(
            f"attention={attention!r} needs hybrid_groups=(ulysses_group, ring_group) from build_hybrid_groups."
        )
    resolved = plan.resolve(root)
    runtime = SequenceParallelRuntime(group, attention, backend, hybrid_groups=hybrid_groups)
    applied = AppliedPlan(plan, resolved, runtime, compile_options)
    for application in ROLE_ORDER:
        for path, role in resolved:
            if role.kind in application.kinds:
                application.apply(applied, root, path, role)
    sync_rng_state(group)
    return applied


def sync_rng_state(group: ProcessGroup) -> None:
    """Give every rank of ``group`` the random state of its first rank (CPU, and the current CUDA device on NCCL).

    The model runs replicated outside the sequence-parallel region, so the ranks of a group must draw the same
    numbers there (ViTMAE's random masking draws its noise before the first block): a seed that differs per rank
    (``seed_everything(seed + rank)``) would give each rank's token shard a different sample. One broadcast of the
    CPU generator state (and one of the CUDA one) over ``group``.
    """
    if group_size(group) == 1:
        return
    cuda = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    source = dist.get_global_rank(group, 0)
    states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if cuda else [])
    for i, state in enumerate(states):
        buffer = state.to(device)
        dist.broadcast(buffer, src=source, group=group)
        states[i] = buffer.cpu()
    torch.set_rng_state(states[0])
    if cuda:
        torch.cuda.set_rng_state(states[1], device)
