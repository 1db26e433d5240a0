"""The sequence-parallel plan of a model: which module shards the tokens, which gathers them, which attentions become
distributed.

A plan is a mapping from a dotted path in the model (``fnmatch`` globs allowed) to one or more roles::

    {
        "blocks.0": "shard_input:1",          # split the first input of blocks.0 along dim 1
        "blocks.*.attn": "attention",         # make each block's attention core distributed
        "blocks.11": "gather_output:1",       # all-gather the output of the last block along dim 1
    }

Roles (``DIM`` defaults to 1, the token dimension of ``[B, L, D]``):

``shard_input:DIM`` / ``shard_output:DIM``
    Keep this rank's slice of tokens of the module's first input / its output.
``gather_input:DIM`` / ``gather_output:DIM``
    All-gather the tokens of the module's first input / its output.
``attention``
    This module attends across tokens and is made distributed: its own forward runs, and only its attention core
    is replaced (every ``scaled_dot_product_attention`` call, a hand-written ``softmax(Q K^T) V``, torch's
    multi-head attention; see :mod:`lightning_seqpar.adapters`), or the forward given to
    :func:`register_attention` for its class runs instead.
``sdpa``
    The same interception for every attention core that runs while this module runs (a whole block whose
    attention submodule has no recognisable name).
``shard_arguments``
    Tensors this module receives besides its tokens that are indexed by token (rotary tables passed as
    ``rope=``, per-token biases) are sliced to this rank's tokens; masks over token pairs, and tables that skip
    the prefix tokens, are refused with an error that names the argument.
``sequence_parameter:DIM``
    A parameter (path names the parameter) indexed by token position along ``DIM``, such as a position
    embedding used after the shard: it is sliced to this rank's tokens while its owner module runs.
``checkpoint`` / ``checkpoint_save_attention`` / ``checkpoint_offload``
    Recompute this module's activations in backward (activation checkpointing); ``_save_attention`` keeps the
    attention kernels' outputs (backward runs attention once, not twice); ``_offload`` keeps the block's
    input in pinned host memory. The last two need a block with one tensor input.
``chunk:N``
    Run this token-local module (e.g. an MLP) on N slices of the tokens, each recomputed in backward, so its
    wide hidden activations exist for one slice at a time.
``compile``
    Run this module's forward through ``torch.compile`` (LayerNorm, GELU, biases and residual additions fused
    around the matrix products). The distributed attention inside it stays eager (never traced), so the
    collectives and the attention kernel are the ones an uncompiled run uses. Activation checkpointing of the
    same module wraps the compiled forward, so recomputation runs the compiled code too.

What each role does to the model is one small class per role in :mod:`lightning_seqpar.parallelize.roles`
(applied in the order given there by :func:`~lightning_seqpar.parallelize.apply_sequence_parallel`).

A plan is printable (``print(plan)``) and YAML-friendly (roles are strings; several roles are separated by
commas). :func:`infer_plan` builds one for a model that does not supply its own.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

from torch import nn

from lightning_seqpar.attention.registry import choose_attention

RoleKind = Literal[
    "shard_input", "shard_output", "gather_input", "gather_output", "attention", "sdpa", "shard_arguments",
    "sequence_parameter", "checkpoint", "checkpoint_save_attention", "checkpoint_offload", "chunk", "compile",
]
ROLE_KINDS: tuple[str, ...] = get_args(RoleKind)
_DIM_ROLES = {"shard_input", "shard_output", "gather_input", "gather_output", "sequence_parameter", "chunk"}

__all__ = [
    "ROLE_KINDS", "PlanError", "Role", "SequenceParallelPlan", "attention_adapter", "attention_head_counts",
    "block_paths", "choose_attention", "find_block_stacks", "infer_plan", "is_attention_module", "register_attention",
]

PlanLike = Union["SequenceParallelPlan", Mapping[str, str | Sequence[str]]]


class PlanError(ValueError):
    """Raised when a plan is malformed or does not fit the model."""


@dataclass(frozen=True)
class Role:
    """One thing the strategy does at a module or parameter."""

    kind: str
    dim: int | None = None

    @classmethod
    def parse(cls, text: str) -> Role:
        name, _, dim = text.strip().partition(":")
        if name not in ROLE_KINDS:
            raise PlanError(
                f"unknown plan role {text.strip()!r}; roles are {', '.join(ROLE_KINDS)} (with ':DIM' for shard/gather)."
            )
        if name in _DIM_ROLES:
            try:
                value = int(dim) if dim else (None if name == "chunk" else 1)
                if value is None or (name == "chunk" and value < 1):
                    raise ValueError
                return cls(name, value)
            except ValueError:
                what = "a positive number of slices" if name == "chunk" else "an integer"
                raise PlanError(f"plan role {text.strip()!r}: the value after ':' must be {what}.") from None
        if dim:
            raise PlanError(f"plan role {name!r} takes no dimension, got {text.strip()!r}.")
        return cls(name)

    def __str__(self) -> str:
        return f"{self.kind}:{self.dim}" if self.dim is not None else self.kind


class SequenceParallelPlan(Mapping[str, tuple[Role, ...]]):
    """An ordered mapping ``path -> roles``. Build it from a dict of strings; print it to read it."""

    def __init__(self, entries: PlanLike) -> None:
        self._entries: dict[str, tuple[Role, ...]] = {}
        for path, roles in entries.items():
            if isinstance(roles, str):
                roles = [r for r in roles.split(",") if r.strip()]
            parsed = tuple(r if isinstance(r, Role) else Role.parse(r) for r in roles)
            if not parsed:
                raise PlanError(f"plan entry {path!r} has no role.")
            self._entries[path] = self._entries.get(path, ()) + parsed

    def __getitem__(self, path: str) -> tuple[Role, ...]:
        return self._entries[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def to_dict(self) -> dict[str, str]:
        """The plan as plain strings (what a YAML recipe would hold)."""
        return {path: ", ".join(str(r) for r in roles) for path, roles in self._entries.items()}

    def with_prefix(self, prefix: str) -> SequenceParallelPlan:
        return SequenceParallelPlan({f"{prefix}.{p}" if prefix else p: r for p, r in self._entries.items()})

    def __str__(self) -> str:
        width = max((len(p) for p in self._entries), default=4)
        lines = [f"{'path'.ljust(width)}  roles", f"{'-' * width}  -----"]
        lines += [f"{p.ljust(width)}  {', '.join(str(r) for r in roles)}" for p, roles in self._entries.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SequenceParallelPlan({self.to_dict()!r})"

    def resolve(self, root: nn.Module) -> list[tuple[str, Role]]:
        """Expand globs against ``root``; return ``(concrete path, role)`` pairs, checked against the model."""
        modules = dict(root.named_modules())
        parameters = dict(root.named_parameters())
        resolved: list[tuple[str, Role]] = []
        for pattern, roles in self._entries.items():
            for role in roles:
                pool = parameters if role.kind == "sequence_parameter" else modules
                matches = [p for p in pool if fnmatch.fnmatchcase(p, pattern)]
                if not matches:
                    what = "parameter" if role.kind == "sequence_parameter" else "module"
                    raise PlanError(
                        f"plan entry {pattern!r} ({role}) matches no {what} of {type(root).__name__}."
                        f" Print the model's named_{what}s() to find the right path."
                    )
                resolved.extend((m, role) for m in matches)
        for path, role in resolved:
            if role.kind in (_DIM_ROLES | {"compile"}) - {"sequence_parameter", "chunk"} and isinstance(
                modules[path], (nn.ModuleList, nn.ModuleDict)
            ):
                raise PlanError(
                    f"plan entry {path!r} ({role}) is a {type(modules[path]).__name__}, which is never called, so the"
                    " role would never take effect there. Put it on the module that runs the blocks (or on each block)."
                )
        kinds = {role.kind for _, role in resolved}
        if not kinds & {"shard_input", "shard_output"} or not kinds & {"gather_input", "gather_output"}:
            raise PlanError(
                "a sequence-parallel plan needs a shard point (shard_input/shard_output) and a gather point"
                f" (gather_input/gather_output); got roles {sorted(kinds)}."
            )
        if not kinds & {"attention", "sdpa"}:
            raise PlanError("a sequence-parallel plan needs at least one 'attention' or 'sdpa' entry.")
        return resolved


# ---------------------------------------------------------------------------------------------------------
# Finding the transformer in a user's model.
# ---------------------------------------------------------------------------------------------------------

_ATTENTION_ADAPTERS: dict[type, Callable[..., Any]] = {}


def register_attention(cls: type, distributed_forward: Callable[..., Any]) -> None:
    """Teach the strategy a new attention class.

    Args:
        cls: The attention module class (matched with ``isinstance``).
        distributed_forward: ``fn(module, attend, *args, **kwargs) -> output`` that runs ``module`` on
            token-sharded inputs, calling ``attend(q, k, v, causal=False, dropout_p=0.0, softmax_scale=None)``
            (all ``[B, L_r, H, d]``) in place of its attention core.
    """
    _ATTENTION_ADAPTERS[cls] = distributed_forward


def attention_adapter(module: nn.Module) -> Callable[..., Any] | None:
    """The forward registered for ``module``'s class with :func:`register_attention`, or None (then the module's
    own forward runs with its attention core intercepted)."""
    for cls, fn in _ATTENTION_ADAPTERS.items():
        if isinstance(module, cls):
            return fn
    return None


def is_attention_module(module: nn.Module) -> bool:
    """Whether ``module`` looks like the attention of a transformer block: a registered class,
    ``nn.MultiheadAttention``, or a class whose name contains "Attention" (timm ``Attention``/``EvaAttention``,
    Hugging Face ``ViTAttention``/``Dinov2Attention``, vit-pytorch ``Attention``)."""
    return (
        attention_adapter(module) is not None
        or isinstance(module, nn.MultiheadAttention)
        or "attention" in type(module).__name__.lower()
    )


def _outermost_attentions(block: nn.Module) -> list[str]:
    """Paths (relative to ``block``) of its attention modules, skipping those nested in another one."""
    found: list[str] = []
    for path, module in block.named_modules():
        if path and is_attention_module(module) and not any(path.startswith(f"{p}.") for p in found):
            found.append(path)
    return found


def find_block_stacks(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """ModuleLists / Sequentials of at least two children that all share one class, largest first."""
    stacks = []
    for path, module in root.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            classes = {type(child) for child in module}
            if len(classes) == 1 and sum(1 for _ in next(iter(module)).parameters()) > 0:
                stacks.append((path, module))
    return sorted(stacks, key=lambda item: -sum(p.numel() for p in item[1].parameters()))


def _declared_plan(root: nn.Module) -> SequenceParallelPlan | None:
    """A plan the model declares itself through a ``sequence_parallel_plan()`` method (outermost wins)."""
    for path, module in root.named_modules():
        declare = getattr(type(module), "sequence_parallel_plan", None)
        if callable(declare):
            return SequenceParallelPlan(module.sequence_parallel_plan()).with_prefix(path)
    return None


def infer_plan(root: nn.Module) -> SequenceParallelPlan:
    """Build the plan for ``root``: the model's own ``sequence_parallel_plan()`` if it has one, else the largest
    stack of repeated blocks, sharded on entry and gathered on exit, per-token arguments of every block sharded
    with the tokens, and the attention core of each block's attention module (or of the whole block, where no
    submodule is recognisably its attention) made distributed.

    Raises:
        PlanError: No block stack was found.
    """
    declared = _declared_plan(root)
    if declared is not None:
        return declared
    stacks = find_block_stacks(root)
    if not stacks:
        raise PlanError(
            f"found no stack of repeated transformer blocks (an nn.ModuleList or nn.Sequential of one block class)"
            f" in {type(root).__name__}. Pass an explicit plan, e.g. SeqParStrategy(plan={{'encoder.layers.0':"
            " 'shard_input:1', 'encoder.layers.*': 'sdpa', 'encoder.layers.11': 'gather_output:1'}), or define"
            " sequence_parallel_plan() on your model (see docs/user-guide.md)."
        )
    path, stack = stacks[0]
    prefix = f"{path}." if path else ""
    # Blocks that are plain containers (vit-pytorch's ModuleList([attn, ff])) are never called themselves:
    # the region is then the module that owns the stack and loops over it.
    containers = isinstance(stack[0], (nn.ModuleList, nn.ModuleDict))
    if containers and not path:
        raise PlanError(
            f"the block stack of {type(root).__name__} holds containers and has no owner to shard at; pass an explicit"
            " plan."
        )
    entry, exit_ = (path.rpartition(".")[0],) * 2 if containers else (f"{prefix}0", f"{prefix}{len(stack) - 1}")
    if containers and not entry:
        raise PlanError(
            f"the block stack '{path}' holds containers (never called themselves) and belongs to the root module;"
            " pass an explicit plan with shard and gather points on modules that are called."
        )
    entries: dict[str, list[str]] = {entry: ["shard_input:1"]}
    for i, block in enumerate(stack):
        block_path = f"{prefix}{i}"
        if not containers:  # rotary tables and other per-token tensors handed to every block
            entries.setdefault(block_path, []).append("shard_arguments")
        attentions = [f"{block_path}.{p}" for p in _outermost_attentions(block)]
        for attention_path in attentions:
            entries.setdefault(attention_path, []).append("attention")
        if not attentions:
            entries.setdefault(entry if containers else block_path, []).append("sdpa")
    entries.setdefault(exit_, []).append("gather_output:1")
    return SequenceParallelPlan(entries)


def block_paths(root: nn.Module) -> list[str]:
    """Paths of the blocks activation checkpointing wraps: the children of the model's largest block stack."""
    stacks = find_block_stacks(root)
    if not stacks:
        return []
    path, stack = stacks[0]
    prefix = f"{path}." if path else ""
    return [f"{prefix}{i}" for i in range(len(stack))]


# ---------------------------------------------------------------------------------------------------------
# attention="auto": the head counts the choice of attention kind reads (choose_attention, in the attention registry).
# ---------------------------------------------------------------------------------------------------------

_HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "heads", "n_heads", "n_head")


def attention_head_counts(root: nn.Module, resolved: list[tuple[str, Role]]) -> list[int]:
    """The head counts of the attention modules the plan makes distributed (attributes ``num_heads`` (timm, torch),
    ``num_attention_heads`` (Hugging Face), ``heads`` (vit-pytorch), ``n_heads``/``n_head``)."""
    counts = []
    for path, role in resolved:
        if role.kind not in ("attention", "sdpa"):
            continue
        for sub in root.get_submodule(path).modules():
            for name in _HEAD_ATTRIBUTES:
                value = getattr(sub, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    counts.append(value)
                    break
    return counts
