"""Per-token tensors a block receives besides its tokens (rotary tables, per-token biases): sliced with the tokens, or
refused.

The plan role ``shard_arguments`` installs :func:`shard_arguments_hook` on a block; every tensor argument but the
tokens goes through :func:`shard_token_argument`. Letters: B batch, L tokens, L_r this rank's tokens, H heads,
d head dim, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from lightning_seqpar.adapters import UnsupportedAttentionError
from lightning_seqpar.comm import shard_sequence
from lightning_seqpar.parallelize.runtime import SequenceParallelRuntime


def shard_arguments_hook(
    runtime: SequenceParallelRuntime, path: str
) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
    """A forward pre-hook (``with_kwargs=True``) for the block at ``path``: inside the region, every tensor argument
    but the tokens (the first tensor, which the shard point shards) goes through :func:`shard_token_argument`;
    outside it, the call is unchanged."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not runtime.active or runtime.layout is None:
            return None
        # The tokens themselves: the first tensor argument, positional or keyword.
        first = 0 if args and isinstance(args[0], Tensor) else None
        skip = None if first is not None else next((k for k, v in kwargs.items() if isinstance(v, Tensor)), None)
        tokens = args[0] if first is not None else kwargs.get(skip)
        batch = tokens.shape[0] if isinstance(tokens, Tensor) else None
        # torch's convention: with is_causal=True a mask is only a hint of causality (torch asks for one and drops it).
        hint = kwargs.get("is_causal") is True
        new_args = tuple(
            a if i == first else _map_tensors(a, f"{path} argument {i}", runtime, batch, hint)
            for i, a in enumerate(args)
        )
        new_kwargs = {
            k: v if k == skip else _map_tensors(v, f"{path} argument {k!r}", runtime, batch, hint)
            for k, v in kwargs.items()
        }
        return new_args, new_kwargs

    return hook


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
