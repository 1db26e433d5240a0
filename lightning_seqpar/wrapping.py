"""Forward wrapping and activation checkpointing: how the plan and the pipeline change what a module's forward does.

:func:`wrap_forward` replaces one instance's ``forward`` (classes, parameters and state-dict keys untouched) and
returns the undo; everything else here is built on it: :func:`checkpoint_module` (full, selective or host-offloaded
recomputation of a block in backward), :func:`chunk_module` / :func:`checkpointed_chunks` (a token-local module run
on slices of the tokens, each recomputed in backward). Used by the plan roles (:mod:`lightning_seqpar.parallelize`),
the pipeline stages and models that chunk a module themselves.

Letters in shape comments: B batch, V variables, L tokens, D width, H heads, d head dim. Measured effects are in
benchmarks/NOTES.md; the memory model (bytes per token per block) is in docs/performance.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "checkpoint_module",
    "checkpointed_chunks",
    "chunk_module",
    "offload_checkpoint",
    "save_attention_context",
    "wrap_forward",
]

_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)


def save_attention_context():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint``: keep the fused attention kernels' outputs
    (output and log-sum-exp, ``[B, L, H, d]`` + ``[B, H, L]``) and recompute everything else, so backward
    runs the quadratic attention forward once instead of twice, at the cost of 2 D bytes per token per block in bf16.
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpointed_chunks(
    fn: Callable[[Tensor], Tensor], x: Tensor, chunks: int, dim: int = 1, out_dim: int | None = None
) -> Tensor:
    """``fn(x)`` for a token-local ``fn``, computed on ``chunks`` slices of ``dim``, each recomputed in backward.

    Only the slices' inputs are saved, so ``fn``'s intermediates (an MLP's [B, L, 4D] hidden) exist for one
    slice at a time in forward and backward; the price is one more forward of ``fn``. ``out_dim`` is the token
    dimension of the output when it differs from the input's (ClimaX's variable aggregation: [B, V, L, D] -> [B, L, D]).
    """
    if chunks <= 1 or not torch.is_grad_enabled() or x.shape[dim] < chunks:
        return fn(x)
    pieces = x.chunk(chunks, dim)  # [B, L/chunks, D] views
    return torch.cat(
        [checkpoint(fn, piece, use_reentrant=False) for piece in pieces], dim if out_dim is None else out_dim
    )


def wrap_forward(module: nn.Module, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Replace ``module``'s forward (on the instance) with ``make(current forward)``; return the undo.

    Classes, parameters and state-dict keys are untouched; wrappers stack and unwind in reverse order.
    """
    had_own = "forward" in module.__dict__
    inner = module.forward
    wrapped = make(inner)
    # torch.compile hands the function back unchanged under TORCHDYNAMO_DISABLE=1; a bound method takes no wraps().
    module.forward = wrapped if wrapped is inner else functools.wraps(inner)(wrapped)

    def undo() -> None:
        if had_own:
            module.forward = inner
        else:
            del module.forward

    return undo


def map_first_tensor_argument(args: tuple, kwargs: dict, transform: Callable[[Tensor], Tensor],
                              error: Callable[[], Exception]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a module call with ``transform`` applied to its first tensor argument: ``args[0]``,
    else the first tensor keyword argument.

    Raises:
        Exception: ``error()`` when the call has no such tensor.
    """
    if args and isinstance(args[0], Tensor):
        return (transform(args[0]), *args[1:]), kwargs
    for name, value in kwargs.items():
        if isinstance(value, Tensor):
            return args, {**kwargs, name: transform(value)}
    raise error()


def map_first_tensor_output(output: Any, transform: Callable[[Tensor], Tensor],
                            error: Callable[[Any], Exception]) -> Any:
    """A module's output with ``transform`` applied to it (a tensor) or to its first element (a tuple or list).

    Raises:
        Exception: ``error(output)`` for any other output.
    """
    if isinstance(output, Tensor):
        return transform(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return type(output)([transform(output[0]), *output[1:]])
    raise error(output)


def chunk_module(module: nn.Module, chunks: int, dim: int = 1, out_dim: int | None = None) -> Callable[[], None]:
    """Make ``module`` (token-local, one tensor in, one out) run through :func:`checkpointed_chunks`; returns undo."""
    return wrap_forward(module, lambda inner: lambda x: checkpointed_chunks(inner, x, chunks, dim, out_dim))


def offload_checkpoint(
    fn: Callable[..., Tensor], x: Tensor, *args: Any, context_fn: Callable | None = None, **kwargs: Any
) -> Tensor:
    """``fn(x, *args, **kwargs)`` recomputed in backward, with ``x`` (and any tensor in ``args``) kept in host memory.

    This is ``torch.utils.checkpoint.checkpoint(fn, x, ..., use_reentrant=False)`` inside
    ``torch.autograd.graph.save_on_cpu(pin_memory=True)``: the non-reentrant checkpoint saves its inputs through
    the ambient saved-tensor hooks, which copy them to pinned host memory (asynchronously, stream-ordered) and back
    when backward recomputes the block, while the block's own intermediates are not saved at all (the
    checkpoint's hooks are innermost). Because torch's checkpoint does the recomputation, gradients reach the
    parameters through the outer backward exactly once, so DDP's reducer and DeepSpeed ZeRO's hooks see an
    ordinary backward (a reentrant ``backward()`` inside backward breaks both).

    Args:
        fn: The block, e.g. ``[B, L, D] -> [B, L, D]``.
        x: Its input.
        *args: Further positional inputs of ``fn``.
        **kwargs: Keyword inputs of ``fn``.
        context_fn: Passed to ``torch.utils.checkpoint.checkpoint`` (e.g. :func:`save_attention_context`).
    """
    if not torch.is_grad_enabled():
        return fn(x, *args, **kwargs)
    pin = x.is_cuda  # pinned pages make the copies asynchronous; pinning needs a CUDA runtime
    options = {} if context_fn is None else {"context_fn": context_fn}
    with torch.autograd.graph.save_on_cpu(pin_memory=pin):
        return checkpoint(fn, x, *args, use_reentrant=False, **options, **kwargs)


def checkpoint_module(module: nn.Module, offload: bool = False, save_attention: bool = False) -> Callable[[], None]:
    """Recompute ``module``'s activations in backward (``torch.utils.checkpoint``, non-reentrant); returns undo.

    The one checkpoint wrapper of the package: the plan roles ``checkpoint`` / ``checkpoint_save_attention`` /
    ``checkpoint_offload`` and the benchmarks use it. Without grad enabled (evaluation) the forward runs plainly.

    Args:
        module: A block (e.g. ``[B, L, D] -> [B, L, D]``); its inputs are passed through unchanged.
        offload: Keep the block's first input in pinned host memory between forward and backward
            (:func:`offload_checkpoint`); the block must take a tensor as its first positional input.
        save_attention: Keep the attention kernels' outputs instead of recomputing them
            (:func:`save_attention_context`).

    Raises:
        ValueError: ``offload`` and ``save_attention`` together.
    """
    if offload and save_attention:
        raise ValueError("checkpoint_module: offload=True and save_attention=True cannot be combined; pick one.")
    options: dict[str, Any] = {"context_fn": save_attention_context} if save_attention else {}

    def make(inner: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def forward(*args: Any, **kwargs: Any) -> Tensor:
            if not torch.is_grad_enabled():
                return inner(*args, **kwargs)
            if offload:
                return offload_checkpoint(inner, *args, **kwargs)
            return checkpoint(inner, *args, use_reentrant=False, **options, **kwargs)

        return forward

    return wrap_forward(module, make)
