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

    Per-token tensors index tokens by their rows (the second-to-last dimension), as rotary tables ``[L, d]`` /
    ``[H, L, d]``, per-token biases ``[B, L, D]`` and biases or masks over token pairs ``[.., L, L]`` (queries by
    row, keys by column) do:

    - Rows of the full length L: sliced to this rank's tokens along them, with the layout of the tokens (a pair
      tensor becomes ``[.., L_r, L]``: this rank's queries against every key, what the attention interception of
      :mod:`lightning_seqpar.adapters` applies it to). This also holds when another dimension happens to equal L
      (a rotary table ``[L, d]`` with ``d = L``).
    - Rows of ``L - k`` for a few prefix tokens k (a table that skips the class/register tokens, which the module
      applies to "all but its first k tokens", wrong on every rank but the first): :class:`UnsupportedAttentionError`
      naming the argument.
    - Otherwise, a dimension of length L elsewhere (a 1-D ``[L]`` tensor): sliced along it; none: passed unchanged
      (not per-token, e.g. a ``[B, D]`` conditioning vector).

    A mask over token pairs passed with ``is_causal=True`` is passed unchanged: torch's modules take it as a hint of
    causality only (``nn.TransformerEncoderLayer``), and the attention interception refuses it where it would be used.
    """
    assert runtime.layout is not None
    total, lengths = runtime.layout.total, runtime.layout.lengths
    dims = [i for i, n in enumerate(t.shape) if n == total]
    if len(dims) > 1 and batch == total and t.dim() > 2 and t.shape[0] == batch:
        dims = dims[1:]  # the batch dimension happens to equal L
    if len(dims) > 1 and causal_hint:
        return t
    rows = t.dim() - 2 if t.dim() >= 2 else 0
    if rows in dims:
        return shard_sequence(t, runtime.group, rows, runtime.layout)
    # Rows a few short of L (and more than any rank's slice): a table that skips the prefix tokens.
    skip_limit = min(_PREFIX_TOKENS_LIMIT, total // 8)  # a few prefix tokens, few next to the sequence
    short = t.shape[rows] if t.dim() else 0
    if max(lengths) < short < total and total - short <= skip_limit and len(lengths) > 1:
        raise UnsupportedAttentionError(
            f"{name} has shape {list(t.shape)}: a per-token tensor of {short} rows for a sequence of {total} tokens,"
            f" i.e. one that skips {total - short} prefix (class/register) token(s). The module applies it to all"
            " but the first tokens it holds, which is right only on the rank that holds the prefix tokens, so it"
            " cannot follow the token sharding. Use a model without prefix tokens here (e.g. timm class_token=False,"
            " num_reg_tokens=0, global_pool='avg'), or pass a table with one row per token."
        )
    if dims:
        return shard_sequence(t, runtime.group, dims[0], runtime.layout)
    return t
