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
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from lightning_seqpar.adapters import DistributedSDPA, UnsupportedAttentionError, disable_mha_fastpath
from lightning_seqpar.attention import AttentionBackend, hybrid_attention, lss_attention, ring_attention, ulysses_attention
from lightning_seqpar.memory import checkpoint_module, chunk_module, wrap_forward
from lightning_seqpar.comm import SequenceLayout, all_gather_sequence, gather_sequence, group_rank, group_size, shard_sequence
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
    dropout_fallback: bool = False
    _restore_fastpath: Callable[[], None] | None = field(default=None, repr=False)
    _outer_rng: tuple[Tensor, Tensor | None] | None = field(default=None, repr=False)
    _rng_device: torch.device | None = field(default=None, repr=False)

    @torch.compiler.disable
    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, dropout_p: float = 0.0, softmax_scale: float | None = None) -> Tensor:
        """Distributed attention on ``[B, L_r, H, d]`` with this plan's kernel and the current layout.

        Never traced by ``torch.compile``: a compiled block breaks its graph here and calls this eagerly, so the
        collectives run on the process group exactly as in an uncompiled model.
        """
        self._check_in_region()
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
        kind = self.attention
        if self.dropout_fallback and dropout_p > 0.0 and kind in ("ring", "hybrid"):
            kind = "lss"  # attention="auto" chose a ring, which has no dropout; LSS has, and no head limit
        if kind == "hybrid":
            assert self.hybrid_groups is not None, "hybrid attention needs its Ulysses and ring groups"
            return hybrid_attention(q, k, v, *self.hybrid_groups, **options)
        kernel = {"ulysses": ulysses_attention, "lss": lss_attention, "ring": ring_attention}[kind]
        return kernel(q, k, v, self.group, **options)

    def _check_in_region(self) -> None:
        in_backward = torch._C._current_graph_task_id() != -1  # activation-checkpoint recomputation
        if not self.active and not in_backward:
            raise NoDistributedAttentionError(
                "a distributed attention ran outside the sequence-parallel region (no shard point ran before it),"
                " so its tokens were never split: the plan's shard_input/shard_output module is not called on the"
                " way to this attention. Put the shard point on a module that runs before it."
            )

    def token_lengths(self) -> tuple[int, int] | None:
        """``(L_r, L)``: this rank's and the whole sequence's token counts in the current region, or None outside."""
        if self.layout is None or not (self.active or torch._C._current_graph_task_id() != -1):
            return None
        return self.layout.lengths[group_rank(self.group)], self.layout.total

    @torch.compiler.disable
    def gather_tokens(self, x: Tensor, dim: int, *, count: bool) -> Tensor:
        """All-gather this rank's tokens of ``x`` along ``dim`` (``[.., L_r, ..] -> [.., L, ..]``, reduce-scatter in
        backward); ``count`` records one distributed attention call (the keys of a hand-written ``Q K^T``)."""
        self._check_in_region()
        if count:
            self.attention_calls += 1
        return all_gather_sequence(x.contiguous(), self.group, dim % x.dim(), self.layout)

    def shard(self, x: Tensor, dim: int) -> Tensor:
        world = group_size(self.group)
        dim = dim % x.dim()
        ParallelDims(world_size=world, sequence_parallel_size=world).check_sequence_length(x.shape[dim])
        self.layout = SequenceLayout.even(x.shape[dim], world)
        self.attention_calls = 0
        self.active = True
        self._fork_rng(x.device)
        if self._restore_fastpath is None:
            self._restore_fastpath = disable_mha_fastpath()
        return shard_sequence(x, self.group, dim, self.layout)

    def gather(self, x: Tensor, dim: int) -> Tensor:
        if self.attention_calls == 0:
            raise NoDistributedAttentionError(
                "the sequence-parallel region ran but no attention in it was made distributed, so every rank"
                " attended only to its own tokens. No scaled_dot_product_attention call and no batched"
                " (Q K^T, P V) matmul pair ran inside a module marked 'attention'/'sdpa' (e.g. attention written"
                " with einsum, or an attention module the plan does not mark): register a forward with"
                " lightning_seqpar.register_attention(cls, forward), mark the module that attends 'attention', or"
                " pass an explicit plan."
            )
        self.end_region()
        return gather_sequence(x, self.group, dim % x.dim(), self.layout)

    def _fork_rng(self, device: torch.device) -> None:
        """Give the region a random stream of this rank's own, and keep the one outside the region untouched.

        Outside the region every rank of the group computes the same thing on the same sample and must draw the
        same numbers (ViTMAE's random masking, drop-path masks of a whole sample); inside, each rank holds other
        tokens, and a shared stream would give every token shard the same dropout pattern. The outer state is
        restored at the gather, so the draws outside the region are those of single-device training.
        """
        self._restore_rng()  # a region left by an exception: back to the stream all ranks share
        cuda = device.type == "cuda"
        outer = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
        seed = int(torch.randint(0, 2**62, (1,)).item()) + 1_000_003 * group_rank(self.group)
        torch.set_rng_state(torch.Generator().manual_seed(seed).get_state())
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        self._outer_rng, self._rng_device = outer, device

    def _restore_rng(self) -> None:
        if self._outer_rng is None:
            return
        cpu, cuda = self._outer_rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self._rng_device)
        self._outer_rng = None

    def end_region(self) -> None:
        self.active = False
        self._restore_rng()
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
    """Make the attention module at ``path`` distributed: its registered adapter if one was registered for its
    class, else its own forward with the attention core intercepted (:class:`~lightning_seqpar.adapters.DistributedSDPA`)."""
    adapter = attention_adapter(module)
    if adapter is None:
        apply_sdpa(applied, module, path)
        return
    attend = applied.runtime.attend
    applied._wrap_forward(module, lambda inner: lambda *a, **kw: adapter(module, attend, *a, **kw))


def apply_sdpa(applied: AppliedPlan, module: nn.Module, path: str = "") -> None:
    """Run ``module``'s own forward with its attention core (SDPA, a hand-written ``softmax(Q K^T) V``, torch's
    multi-head attention) made distributed."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.MultiheadAttention) and not sub.batch_first:
            where = ".".join(p for p in (path, name) if p) or type(module).__name__
            raise UnsupportedAttentionError(
                f"{where} is nn.MultiheadAttention(batch_first=False) (sequence-first [L, B, D]); under sequence"
                " parallelism tokens are dimension 1: build it (or its TransformerEncoderLayer) with batch_first=True."
            )

    def make(inner):
        def forward(*args, **kwargs):
            with DistributedSDPA(applied.runtime):
                return inner(*args, **kwargs)

        return forward

    applied._wrap_forward(module, make)


def apply_shard_arguments(applied: AppliedPlan, module: nn.Module, path: str) -> None:
    """Slice the per-token tensors ``module`` receives besides its tokens (rotary embeddings, per-token biases) to
    this rank's tokens, and refuse those that cannot follow the token sharding (see :func:`shard_token_argument`)."""
    runtime = applied.runtime

    def hook(m, args, kwargs):
        if not runtime.active or runtime.layout is None:
            return None
        # The tokens themselves: the argument the shard point shards (see _first_tensor_arg).
        first = 0 if args and isinstance(args[0], Tensor) else None
        skip = None if first is not None else next((k for k, v in kwargs.items() if isinstance(v, Tensor)), None)
        tokens = args[0] if first is not None else kwargs.get(skip)
        batch = tokens.shape[0] if isinstance(tokens, Tensor) else None
        # torch's convention: with is_causal=True a mask is only a hint of causality (torch asks for one and drops it).
        hint = kwargs.get("is_causal") is True
        new_args = tuple(a if i == first else _map_tensors(a, f"{path} argument {i}", runtime, batch, hint) for i, a in enumerate(args))
        new_kwargs = {k: v if k == skip else _map_tensors(v, f"{path} argument {k!r}", runtime, batch, hint) for k, v in kwargs.items()}
        return new_args, new_kwargs

    applied._undo.append(module.register_forward_pre_hook(hook, with_kwargs=True).remove)


def _map_tensors(value: Any, name: str, runtime: SequenceParallelRuntime, batch: int | None, causal_hint: bool) -> Any:
    if isinstance(value, Tensor):
        return shard_token_argument(value, name, runtime, batch, causal_hint)
    if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value):
        return type(value)(_map_tensors(v, f"{name}[{i}]", runtime, batch, causal_hint) for i, v in enumerate(value))
    return value


# A tensor with a dimension this much shorter than the sequence (at most L / 8 shorter, and longer than any rank's
# slice) looks like a per-token tensor that skips the class/register tokens (timm's rotary tables with
# num_prefix_tokens > 0; timm has 1 class token and up to 16 register tokens).
_PREFIX_TOKENS_LIMIT = 16


def shard_token_argument(t: Tensor, name: str, runtime: SequenceParallelRuntime, batch: int | None,
                         causal_hint: bool = False) -> Tensor:
    """This rank's part of a tensor a block receives besides its ``[B, L_r, D]`` tokens.

    - One dimension of the full length L (rotary tables ``[L, d]`` or ``[H, L, d]``, per-token biases ``[B, L, D]``):
      sliced to this rank's tokens along it, with the layout of the tokens.
    - Two or more (a mask or position bias over token pairs ``[.., L, L]``), or one of ``L - k`` for a few prefix
      tokens k (a table that skips the class/register tokens, which the module applies to "all but its first k
      tokens", wrong on every rank but the first): :class:`UnsupportedAttentionError` naming the argument.
    - None: passed unchanged (not per-token, e.g. a ``[B, D]`` conditioning vector).

    A mask over token pairs passed with ``is_causal=True`` is passed unchanged: torch's modules take it as a hint of
    causality only (``nn.TransformerEncoderLayer``), and the SDPA interception refuses it where it would be used.
    """
    assert runtime.layout is not None
    total, lengths = runtime.layout.total, runtime.layout.lengths
    dims = [i for i, n in enumerate(t.shape) if n == total]
    if len(dims) > 1 and batch == total and t.dim() > 2 and t.shape[0] == batch:
        dims = dims[1:]  # the batch dimension happens to equal L
    if len(dims) > 1 and causal_hint:
        return t
    if len(dims) > 1:
        raise UnsupportedAttentionError(
            f"{name} has shape {list(t.shape)} with {len(dims)} dimensions of the sequence length {total}: a mask or"
            " bias over token pairs cannot follow the token sharding (the distributed attention takes no mask)."
            " Drop it (use is_causal=True for causal masking) or leave these blocks out of the plan."
        )
    # A dimension a few rows short of L (and longer than any rank's slice): a table that skips the prefix tokens.
    # Checked before an exact match, since such a table can also have a feature dimension that happens to equal L.
    skip_limit = min(_PREFIX_TOKENS_LIMIT, total // 8)  # a few prefix tokens, few next to the sequence
    near = [n for n in t.shape if max(lengths) < n < total and total - n <= skip_limit]
    if near and len(lengths) > 1:
        raise UnsupportedAttentionError(
            f"{name} has shape {list(t.shape)}: a per-token tensor of {near[0]} rows for a sequence of {total} tokens,"
            f" i.e. one that skips {total - near[0]} prefix (class/register) token(s). The module applies it to all"
            " but the first tokens it holds, which is right only on the rank that holds the prefix tokens, so it"
            " cannot follow the token sharding. Use a model without prefix tokens here (e.g. timm class_token=False,"
            " num_reg_tokens=0, global_pool='avg'), or pass a table with one row per token."
        )
    if dims:
        return shard_sequence(t, runtime.group, dims[0], runtime.layout)
    return t


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

    A collective: every rank of ``group`` must call it (the group takes its first rank's random state, see
    :func:`sync_rng_state`).
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
        apply_sdpa(applied, root.get_submodule(path), path)
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
    for path, _ in by_kind("shard_arguments"):  # after shard_input: the layout of this forward is known
        apply_shard_arguments(applied, root.get_submodule(path), path)
    sync_rng_state(group)
    return applied


def sync_rng_state(group: ProcessGroup) -> None:
    """Give every rank of ``group`` the random state of its first rank (CPU, and the current CUDA device on NCCL).

    The model runs replicated outside the sequence-parallel region, so the ranks of a group must draw the same
    numbers there (ViTMAE's random masking draws its noise before the first block): a seed that differs per rank
    (``seed_everything(seed + rank)``) would give each rank's token shard a different sample.
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
