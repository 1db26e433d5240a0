"""What each plan role does to the model: one small class per role (see :mod:`lightning_seqpar.plan` for the roles).

Every class applies one role at one module (or parameter) of an :class:`~lightning_seqpar.parallelize.AppliedPlan`,
through its undoable operations only (``applied.wrap_forward``, ``applied.add_undo``), so that
:meth:`AppliedPlan.remove` gives the plain model back. :data:`ROLE_ORDER` is the order in which they are applied;
:func:`~lightning_seqpar.parallelize.apply_sequence_parallel` walks it and nothing else.

Letters: B batch, L tokens, L_r this rank's tokens, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lightning_seqpar.adapters import DistributedSDPA, UnsupportedAttentionError
from lightning_seqpar.comm import shard_sequence
from lightning_seqpar.parallelize.arguments import shard_arguments_hook
from lightning_seqpar.parallelize.draws import share_drop_path_draws
from lightning_seqpar.parallelize.runtime import _in_backward
from lightning_seqpar.plan import ROLE_KINDS, PlanError, Role, attention_adapter
from lightning_seqpar.wrapping import (
    checkpoint_module,
    chunk_module,
    map_first_tensor_argument,
    map_first_tensor_output,
)

if TYPE_CHECKING:
    from lightning_seqpar.parallelize.apply import AppliedPlan


class RoleApplication:
    """How the roles named in :attr:`kinds` change the model."""

    kinds: ClassVar[tuple[str, ...]] = ()
    targets_parameter: ClassVar[bool] = False  # the role's path names a parameter, not a module

    def apply(self, applied: AppliedPlan, root: nn.Module, path: str, role: Role) -> None:
        """Apply ``role`` at ``path`` (relative to ``root``) of the model of ``applied``."""
        raise NotImplementedError


class AttentionRole(RoleApplication):
    """``attention``: the forward registered for the module's class with
    :func:`~lightning_seqpar.plan.register_attention` runs instead of its own, calling the plan's distributed
    attention; a module with no registered forward runs its own with its attention core intercepted
    (:class:`SdpaRole`)."""

    kinds = ("attention",)

    def apply(self, applied: AppliedPlan, root: nn.Module, path: str, role: Role) -> None:
        module = root.get_submodule(path)
        adapter = attention_adapter(module)
        if adapter is None:
            SdpaRole().apply(applied, root, path, role)
            return
        attend = applied.runtime.attend
        applied.wrap_forward(module, lambda inner: lambda *a, **kw: adapter(module, attend, *a, **kw))


class SdpaRole(RoleApplication):
    """``sdpa``: the module's own forward runs with every attention core inside it (SDPA, a hand-written
    ``softmax(Q K^T) V``, torch's multi-head attention) made distributed
    (:class:`~lightning_seqpar.adapters.DistributedSDPA`).

    Raises:
        UnsupportedAttentionError: The module holds an ``nn.MultiheadAttention(batch_first=False)``, whose tokens
            are dimension 0.
    """

    kinds = ("sdpa",)

    def apply(self, applied: AppliedPlan, root: nn.Module, path: str, role: Role) -> None:
        module = root.get_submodule(path)
        for name, sub in module.named_modules():
            if isinstance(sub, nn.MultiheadAttention) and not sub.batch_first:
                where = ".".join(p for p in (path, name) if p) or type(module).__name__
                raise UnsupportedAttentionError(
                    f"{where} is nn.MultiheadAttention(batch_first=False) (sequence-first [L, B, D]); under sequence"
                    " parallelism tokens are dimension 1: build it (or its TransformerEncoderLayer) with"
                    " batch_first=True."
                )
        runtime = applied.runtime

        def make(inner: Callable) -> Callable:
            def forward(*args: Any, **kwargs: Any) -> Any:
                with DistributedSDPA(runtime):
                    return inner(*args, **kwargs)

            return forward

        applied.wrap_forward(module, make)


class ChunkRole(RoleApplication):
    """``chunk:N``: the token-local module runs on N slices of its tokens (dim 1), each recomputed in backward
    (:func:`~lightning_seqpar.wrapping.chunk_module`)."""

    kinds = ("chunk",)

    def apply(self, applied: AppliedPlan, root: nn.Module, path: str, role: Role) -> None:
        applied.add_undo(chunk_module(root.get_submodule(path), role.dim, dim=1))


class CompileRole(RoleApplication):
    """``compile``: the module's current forward (attention adapters already inside it) through
    ``torch.compile(**applied.compile_options)``; the distributed attention stays eager (never traced)."""

    kinds = ("compile",)

    def apply(self, applied: AppliedPlan, root: nn.Module, path: str, role: Role) -> None:
        options = applied.compile_options
        applied.wrap_forward(root.get_submodule(path), lambda inner: torch.compile(inner, **options))


class CheckpointRole(RoleApplication):
    """``checkpoint`` / ``checkpoint_save_attention`` / ``checkpoint_offload``: activation checkpointing of the
    block, plain, keeping the attention kernels' outputs, or with its input in pinned host memory
    (:func:`~lightning_seqpar.wrapping.checkpoint_module`)."""

    kinds = ("checkpoint", "checkpoint_save_attention", "checkpoint_offload")

    def apply(self, applied: AppliedPlan, root: nn.Module, path: str, role: Role) -> None:
        applied.add_undo(checkpoint_module(
            root.get_submodule(path), offload=role.kind == "checkpoint_offload",
            save_attention=role.kind == "checkpoint_save_attention",
        ))


class SequenceParameterRole(RoleApplication):
    """``sequence_parameter:DIM``: a parameter indexed by token position (a position embedding used after the shard)
    is sliced to this rank's tokens along DIM, ``[.., L, ..] -> [.., L_r, ..]``, while its owner module runs;
    gradients flow back to the full parameter."""

    kinds = ("sequence_parameter",)
    targets_parameter = True

    def apply(self, applied: AppliedPlan, root: nn.Module, path: str, role: Role) -> None:
        owner_path, _, name = path.rpartition(".")
        owner = root.get_submodule(owner_path)
        runtime, dim = applied.runtime, role.dim

        def make(inner: Callable) -> Callable:
            def forward(*args: Any, **kwargs: Any) -> Any:
                full = owner._parameters[name]
                owner._parameters[name] = shard_sequence(full, runtime.group, dim)
                try:
                    return inner(*args, **kwargs)
                finally:
                    owner._parameters[name] = full

            return forward

        applied.wrap_forward(owner, make)


class ShardGatherRole(RoleApplication):
    """``shard_input`` / ``shard_output`` / ``gather_input`` / ``gather_output`` ``:DIM``: the region's entry and exit.

    A shard point keeps this rank's tokens of the module's first tensor input (pre-hook) or of its output (hook) and
    enters the region (:meth:`~lightning_seqpar.parallelize.SequenceParallelRuntime.shard`); a gather point
    all-gathers them and leaves it (:meth:`~lightning_seqpar.parallelize.SequenceParallelRuntime.gather`).

    Raises:
        PlanError: At run time, when the module is called without a tensor argument or returns no tensor.
    """

    kinds = ("shard_input", "shard_output", "gather_input", "gather_output")

    def apply(self, applied: AppliedPlan, root: nn.Module, path: str, role: Role) -> None:
        module, runtime, dim = root.get_submodule(path), applied.runtime, role.dim
        point = runtime.shard if role.kind.startswith("shard") else runtime.gather
        if role.kind.endswith("_input"):
            handle = module.register_forward_pre_hook(
                lambda m, args, kwargs: map_first_tensor_argument(args, kwargs, lambda t: point(t, dim), _no_argument),
                with_kwargs=True,
            )
        else:
            handle = module.register_forward_hook(
                lambda m, args, out: map_first_tensor_output(out, lambda t: point(t, dim), _no_output)
            )
        applied.add_undo(handle.remove)


class ShardArgumentsRole(RoleApplication):
    """``shard_arguments``: the block's per-token tensors besides its tokens follow the token sharding, or are
    refused by name (:func:`~lightning_seqpar.parallelize.arguments.shard_token_argument`); its drop-path modules
    draw the same per-sample numbers on every rank (:mod:`~lightning_seqpar.parallelize.draws`); a shape error
    raised inside the region gets a note naming the block."""

    kinds = ("shard_arguments",)

    def apply(self, applied: AppliedPlan, root: nn.Module, path: str, role: Role) -> None:
        block, runtime = root.get_submodule(path), applied.runtime
        hook = shard_arguments_hook(runtime, path)
        applied.add_undo(block.register_forward_pre_hook(hook, with_kwargs=True).remove)

        def make(inner: Callable) -> Callable:
            def forward(*args: Any, **kwargs: Any) -> Any:
                try:
                    return inner(*args, **kwargs)
                except RuntimeError as error:  # a shape error of a block that assumes the whole sequence
                    if runtime.active and runtime.layout is not None and not getattr(error, "_seqpar_noted", False):
                        error._seqpar_noted = True
                        error.add_note(_whole_sequence_note(path, runtime.layout.total, runtime.layout.lengths))
                    raise

            return forward

        applied.wrap_forward(block, make)
        # Stochastic depth inside the block draws per sample: the ranks holding one sample's tokens must agree.
        share_drop_path_draws(block, runtime.group, lambda: runtime.active or _in_backward(), applied.wrap_forward)


def _whole_sequence_note(path: str, total: int, lengths: tuple[int, ...]) -> str:
    return (
        f"lightning_seqpar: {path} raised this inside the sequence-parallel region, where each rank holds a slice of"
        f" the {total} tokens ({list(lengths)} per rank). A block that assumes the whole sequence (one that reshapes"
        " its tokens into an H x W grid or into windows, as Swin's windowed and shifted-window attention does, or"
        " that merges patches) cannot be sequence-parallel: use a model whose blocks attend globally over [B, L, D]"
        " tokens (ViT, DeiT, BEiT, EVA, Dinov2), or train this one without sequence parallelism."
    )


# Innermost first. Attention adapters and SDPA interception wrap the module's own forward; token chunking and
# torch.compile come next, then activation checkpointing around them (so recomputation in backward re-enters the
# compiled block and the distributed attention); sliced parameters; the shard and gather hooks outermost (they run
# once per forward, never during recomputation); the per-token arguments last, after the shard point of the same
# block, so that the layout of the forward is known when they are sliced.
ROLE_ORDER: tuple[RoleApplication, ...] = (
    AttentionRole(), SdpaRole(), ChunkRole(), CompileRole(), CheckpointRole(), SequenceParameterRole(),
    ShardGatherRole(), ShardArgumentsRole(),
)

_covered = [kind for application in ROLE_ORDER for kind in application.kinds]
assert sorted(_covered) == sorted(ROLE_KINDS), (
    f"plan roles without exactly one application: {set(ROLE_KINDS) ^ set(_covered)}"
)


def _no_argument() -> PlanError:
    return PlanError("a shard_input/gather_input module was called without a tensor argument")


def _no_output(output: Any) -> PlanError:
    return PlanError(f"a shard_output/gather_output module returned {type(output).__name__}, not a tensor or tuple")
