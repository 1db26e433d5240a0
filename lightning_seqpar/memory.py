"""Memory savers for very long sequences on one device: fp32 master weights for a bf16 model, token-chunked
recomputation of token-local modules, and checkpointed blocks whose inputs wait in pinned host memory.

Letters in shape comments: B batch, L tokens, D width. Measured effects are in benchmarks/NOTES.md; the
memory model (bytes per token per block) is in docs/performance.md.

- :class:`MasterWeightAdamW` lets the model hold bf16 parameters (so the residual stream, the checkpointed
  block inputs and LayerNorm's saved inputs are bf16, and no fp32 copy is made under autocast) while the
  update is computed on fp32 master weights, as mixed-precision training does.
- :func:`chunk_module` runs a token-local module (an MLP) on slices of the token dimension, each under
  activation checkpointing, so the 4x-wide hidden activations exist for one slice at a time.
- :func:`offload_checkpoint` / :func:`checkpoint_module` recompute a block in backward with
  ``torch.utils.checkpoint`` and, for ``offload``, keep the block's input in pinned host memory in between.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "MasterWeightAdamW",
    "checkpoint_module",
    "checkpointed_chunks",
    "chunk_module",
    "offload_checkpoint",
    "save_attention_context",
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


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on fp32 copies of (bf16) model parameters; the model's parameters are overwritten after each step.

    Args:
        params: The model's parameters (an iterable of tensors or of param-group dicts), any dtype.
        **kwargs: AdamW options (``lr``, ``betas``, ``weight_decay``, ``fused``, ...).

    Memory per parameter: model copy (2 bytes in bf16) + master (4) + two moments (8) + transient fp32 grad (4).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], **kwargs) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._model_params: list[Tensor] = []
        master_groups = []
        for group in groups:
            model_params = [p for p in group["params"] if p.requires_grad]
            self._model_params += model_params
            masters = [p.detach().to(torch.float32, copy=True).requires_grad_(True) for p in model_params]
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)

    def _masters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masters = self._masters()
        for p, master in zip(self._model_params, masters, strict=True):
            master.grad = None if p.grad is None else p.grad.to(torch.float32)
        super().step()
        for p, master in zip(self._model_params, masters, strict=True):
            p.copy_(master)
            master.grad = None
        return loss


def checkpointed_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, chunks: int, dim: int = 1, out_dim: int | None = None) -> Tensor:
    """``fn(x)`` for a token-local ``fn``, computed on ``chunks`` slices of ``dim``, each recomputed in backward.

    Only the slices' inputs are saved, so ``fn``'s intermediates (an MLP's [B, L, 4D] hidden) exist for one
    slice at a time in forward and backward; the price is one more forward of ``fn``. ``out_dim`` is the token
    dimension of the output when it differs from the input's (ClimaX's variable aggregation: [B, V, L, D] -> [B, L, D]).
    """
    if chunks <= 1 or not torch.is_grad_enabled() or x.shape[dim] < chunks:
        return fn(x)
    pieces = x.chunk(chunks, dim)  # [B, L/chunks, D] views
    return torch.cat([checkpoint(fn, piece, use_reentrant=False) for piece in pieces], dim if out_dim is None else out_dim)


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


def chunk_module(module: nn.Module, chunks: int, dim: int = 1, out_dim: int | None = None) -> Callable[[], None]:
    """Make ``module`` (token-local, one tensor in, one out) run through :func:`checkpointed_chunks`; returns undo."""
    return wrap_forward(module, lambda inner: lambda x: checkpointed_chunks(inner, x, chunks, dim, out_dim))


def offload_checkpoint(fn: Callable[..., Tensor], x: Tensor, *args: Any, context_fn: Callable | None = None, **kwargs: Any) -> Tensor:
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
        *args, **kwargs: Further inputs of ``fn``.
        context_fn: Passed to ``torch.utils.checkpoint.checkpoint`` (e.g. :func:`save_attention_context`).
    """
    if not torch.is_grad_enabled():
        return fn(x, *args, **kwargs)
    pin = x.is_cuda  # pinned pages make the copies asynchronous; pinning needs a CUDA runtime
    options = {} if context_fn is None else {"context_fn": context_fn}
    with torch.autograd.graph.save_on_cpu(pin_memory=pin):
        return checkpoint(fn, x, *args, use_reentrant=False, **options, **kwargs)


def checkpoint_module(module: nn.Module, offload: bool = False, save_attention: bool = False) -> Callable[[], None]:
    """Recompute ``module``'s activations in backward; returns undo.

    Args:
        module: A block, one tensor in and one out (further positional and keyword inputs are passed through).
        offload: Keep the block's input in pinned host memory between forward and backward
            (:func:`offload_checkpoint`).
        save_attention: Keep the attention kernels' outputs instead of recomputing them
            (:func:`save_attention_context`); not combinable with ``offload``.
    """
    if offload and save_attention:
        raise ValueError("checkpoint_module: offload=True and save_attention=True cannot be combined; pick one.")
    def make(inner: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if not torch.is_grad_enabled():
                return inner(x, *args, **kwargs)
            if offload:
                return offload_checkpoint(inner, x, *args, **kwargs)
            if save_attention:
                return checkpoint(inner, x, *args, use_reentrant=False, context_fn=save_attention_context, **kwargs)
            return checkpoint(inner, x, *args, use_reentrant=False, **kwargs)

        return forward

    return wrap_forward(module, make)
