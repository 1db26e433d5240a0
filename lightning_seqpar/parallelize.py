"""Apply a sequence-parallel plan to a model in place, and undo it: hooks for shard/gather, wrapped forwards for attention.

The model's classes, parameters and state-dict keys are untouched: shard and gather points are forward
hooks, and attention, SDPA interception, sliced parameters and activation checkpointing wrap the
instance's ``forward``. :meth:`AppliedPlan.remove` restores the plain model.

Order of application (see :func:`apply_sequence_parallel`): attention adapters first (innermost), then SDPA
interception, token chunking and ``torch.compile`` of whole blocks, then their activation checkpointing (so
recomputation in backward re-enters the compiled block and the distributed attention), then sliced parameters,
then the shard and gather hooks (outermost, so they run once per forward and never during recomputation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from lightning_seqpar.adapters import DistributedSDPA, disable_mha_fastpath
from lightning_seqpar.attention import AttentionBackend, hybrid_attention, lss_attention, ring_attention, ulysses_attention
from lightning_seqpar.memory import checkpoint_module, chunk_module, wrap_forward
from lightning_seqpar.comm import SequenceLayout, gather_sequence, group_rank, group_size, shard_sequence
from lightning_seqpar.plan import PlanError, Role, SequenceParallelPlan, attention_adapter
from lightning_seqpar.topology import ParallelDims

_KERNELS = ("ulysses", "lss", "ring", "hybrid")


class NoDistributedAttentionError(RuntimeError):
    """Raised when the sequence-parallel region ran without any attention being made distributed."""


@dataclass
class SequenceParallelRuntime:
    """State shared by the hooks of one applied plan: the group, the kernel, and the current token layout.

    Attributes:
        group: The sequence-parallel process group.
        attention: ``"ulysses"``, ``"lss"``, ``"ring"`` or ``"hybrid"``.
        backend: Local attention kernel.
        layout: How the tokens of the current forward are split (set at the shard point).
        attention_calls: Distributed attention calls since the last shard (checked at the gather point).
    """

    group: ProcessGroup
    attention: str = "ulysses"
    backend: AttentionBackend = "auto"
    layout: SequenceLayout | None = None
    attention_calls: int = 0
    active: bool = False
    hybrid_groups: tuple[ProcessGroup, ProcessGroup] | None = None
    _restore_fastpath: Callable[[], None] | None = field(default=None, repr=False)

    @torch.compiler.disable
    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, dropout_p: float = 0.0, softmax_scale: float | None = None) -> Tensor:
        """Distributed attention on ``[B, L_r, H, d]`` with this plan's kernel and the current layout.

        Never traced by ``torch.compile``: a compiled block breaks its graph here and calls this eagerly, so the
        collectives run on the process group exactly as in an uncompiled model.
        """
        in_backward = torch._C._current_graph_task_id() != -1  # activation-checkpoint recomputation
        if not self.active and not in_backward:
            raise NoDistributedAttentionError(
                "a distributed attention ran outside the sequence-parallel region (no shard point ran before it),"
                " so its tokens were never split: the plan's shard_input/shard_output module is not called on the"
                " way to this attention. Put the shard point on a module that runs before it."
            )
        self.attention_calls += 1
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):
            # What SDPA does under autocast (it is on autocast's lower-precision list): q, k and v in the autocast
            # dtype, also when a q/k normalisation left them in float32 next to a bf16 v. Casting before the
            # collectives also halves the bytes they move.
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        layout = self.layout
        lengths = layout.lengths if layout is not None and layout.lengths[group_rank(self.group)] == q.shape[1] else None
        options = dict(dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, backend=self.backend, sequence_lengths=lengths)
        if self.attention == "hybrid":
            assert self.hybrid_groups is not None, "hybrid attention needs its Ulysses and ring groups"
            return hybrid_attention(q, k, v, *self.hybrid_groups, **options)
        kernel = {"ulysses": ulysses_attention, "lss": lss_attention, "ring": ring_attention}[self.attention]
        return kernel(q, k, v, self.group, **options)

    def shard(self, x: Tensor, dim: int) -> Tensor:
        world = group_size(self.group)
        dim = dim % x.dim()
        ParallelDims(world_size=world, sequence_parallel_size=world).check_sequence_length(x.shape[dim])
        self.layout = SequenceLayout.even(x.shape[dim], world)
        self.attention_calls = 0
        self.active = True
        if self._restore_fastpath is None:
            self._restore_fastpath = disable_mha_fastpath()
        return shard_sequence(x, self.group, dim, self.layout)

    def gather(self, x: Tensor, dim: int) -> Tensor:
        if self.attention_calls == 0:
            raise NoDistributedAttentionError(
                "the sequence-parallel region ran but no attention in it was made distributed, so every rank"
                " attended only to its own tokens. The attention computes softmax by hand or is an unknown"
                " class: register it with lightning_seqpar.register_attention(cls, forward), mark its block"
                " 'sdpa' if it calls torch.nn.functional.scaled_dot_product_attention, or pass an explicit plan."
            )
        self.end_region()
        return gather_sequence(x, self.group, dim % x.dim(), self.layout)

    def end_region(self) -> None:
        self.active = False
        if self._restore_fastpath is not None:
            self._restore_fastpath()
            self._restore_fastpath = None


def _first_tensor_arg(args: tuple, kwargs: dict, transform: Callable[[Tensor], Tensor]) -> tuple[tuple, dict]:
    if args and isinstance(args[0], Tensor):
        return (transform(args[0]), *args[1:]), kwargs
    for name, value in kwargs.items():
        if isinstance(value, Tensor):
            return args, {**kwargs, name: transform(value)}
    raise PlanError("a shard_input/gather_input module was called without a tensor argument")


def _map_output(output, transform: Callable[[Tensor], Tensor]):
    if isinstance(output, Tensor):
        return transform(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return type(output)([transform(output[0]), *output[1:]])
    raise PlanError(f"a shard_output/gather_output module returned {type(output).__name__}, not a tensor or tuple")


class AppliedPlan:
    """The result of :func:`apply_sequence_parallel`: the plan that was applied and how to take it off."""

    def __init__(self, plan: SequenceParallelPlan, resolved: list[tuple[str, Role]], runtime: SequenceParallelRuntime) -> None:
        self.plan, self.resolved, self.runtime = plan, resolved, runtime
        self._undo: list[Callable[[], None]] = []

    def remove(self) -> None:
        """Restore the plain model (hooks removed, forwards unwrapped)."""
        while self._undo:
            self._undo.pop()()
        self.runtime.end_region()

    def _wrap_forward(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        self._undo.append(wrap_forward(module, make))


def apply_attention(applied: AppliedPlan, module: nn.Module, path: str) -> None:
    adapter = attention_adapter(module)
    if adapter is None:
        raise PlanError(
            f"{path} ({type(module).__name__}) is marked 'attention' but no adapter knows this class: register one"
            " with lightning_seqpar.register_attention, or mark its block 'sdpa' if it calls scaled_dot_product_attention."
        )
    attend = applied.runtime.attend
    applied._wrap_forward(module, lambda inner: lambda *a, **kw: adapter(module, attend, *a, **kw))


def apply_sdpa(applied: AppliedPlan, module: nn.Module) -> None:
    def make(inner):
        def forward(*args, **kwargs):
            with DistributedSDPA(applied.runtime.attend):
                return inner(*args, **kwargs)

        return forward

    applied._wrap_forward(module, make)


def apply_compile(applied: AppliedPlan, module: nn.Module, options: dict[str, Any]) -> None:
    """Compile ``module``'s current forward (attention adapters already inside it) with ``torch.compile(**options)``."""
    applied._wrap_forward(module, lambda inner: torch.compile(inner, **options))


def apply_checkpoint(applied: AppliedPlan, module: nn.Module, kind: str = "checkpoint") -> None:
    if kind != "checkpoint":
        # Selective (keep attention outputs) or host-offloaded recomputation: see lightning_seqpar.memory.
        applied._undo.append(
            checkpoint_module(module, offload=kind == "checkpoint_offload", save_attention=kind == "checkpoint_save_attention")
        )
        return

    def make(inner):
        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return inner(*args, **kwargs)
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)

        return forward

    applied._wrap_forward(module, make)


def apply_sequence_parameter(applied: AppliedPlan, root: nn.Module, path: str, dim: int) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = root.get_submodule(owner_path)
    runtime = applied.runtime

    def make(inner):
        def forward(*args, **kwargs):
            full = owner._parameters[name]
            # [.., L, ..] -> [.., L_r, ..] while the owner runs; gradients flow back to the full parameter.
            owner._parameters[name] = shard_sequence(full, runtime.group, dim)
            try:
                return inner(*args, **kwargs)
            finally:
                owner._parameters[name] = full

        return forward

    applied._wrap_forward(owner, make)


def apply_shard_gather(applied: AppliedPlan, module: nn.Module, role: Role) -> None:
    runtime, dim = applied.runtime, role.dim
    if role.kind == "shard_input":
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: _first_tensor_arg(args, kwargs, lambda t: runtime.shard(t, dim)), with_kwargs=True
        )
    elif role.kind == "gather_input":
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: _first_tensor_arg(args, kwargs, lambda t: runtime.gather(t, dim)), with_kwargs=True
        )
    elif role.kind == "shard_output":
        handle = module.register_forward_hook(lambda m, args, out: _map_output(out, lambda t: runtime.shard(t, dim)))
    else:
        handle = module.register_forward_hook(lambda m, args, out: _map_output(out, lambda t: runtime.gather(t, dim)))
    applied._undo.append(handle.remove)


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

    Args:
        root: The model (paths in ``plan`` are relative to it).
        plan: What to do where; see :mod:`lightning_seqpar.plan`.
        group: The sequence-parallel process group.
        attention: Distributed attention kernel: ``"ulysses"``, ``"lss"``, ``"ring"`` or ``"hybrid"``.
        backend: Local attention kernel.
        hybrid_groups: ``(ulysses_group, ring_group)`` for ``attention="hybrid"``
            (see :func:`~lightning_seqpar.attention.build_hybrid_groups`).
        compile_options: Keyword arguments of ``torch.compile`` for the modules marked ``compile``.

    Returns:
        The applied plan; call ``.remove()`` to restore the plain model.
    """
    if attention not in _KERNELS:
        raise PlanError(f"unknown sequence-parallel attention {attention!r}; choose one of {', '.join(_KERNELS)}.")
    if attention == "hybrid" and hybrid_groups is None:
        raise PlanError("attention='hybrid' needs hybrid_groups=(ulysses_group, ring_group) from build_hybrid_groups.")
    resolved = plan.resolve(root)
    runtime = SequenceParallelRuntime(group, attention, backend, hybrid_groups=hybrid_groups)
    applied = AppliedPlan(plan, resolved, runtime)
    by_kind = lambda *kinds: [(p, r) for p, r in resolved if r.kind in kinds]  # noqa: E731
    for path, _ in by_kind("attention"):
        apply_attention(applied, root.get_submodule(path), path)
    for path, _ in by_kind("sdpa"):
        apply_sdpa(applied, root.get_submodule(path))
    for path, role in by_kind("chunk"):
        applied._undo.append(chunk_module(root.get_submodule(path), role.dim, dim=1))
    for path, _ in by_kind("compile"):  # inside checkpointing, so recomputation reuses the compiled code
        apply_compile(applied, root.get_submodule(path), compile_options or {})
    for path, role in by_kind("checkpoint", "checkpoint_save_attention", "checkpoint_offload"):
        apply_checkpoint(applied, root.get_submodule(path), role.kind)
    for path, role in by_kind("sequence_parameter"):
        apply_sequence_parameter(applied, root, path, role.dim)
    for path, role in by_kind("shard_input", "shard_output", "gather_input", "gather_output"):
        apply_shard_gather(applied, root.get_submodule(path), role)
    return applied
