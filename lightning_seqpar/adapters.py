"""Interception of a module's attention core, so that its own forward runs on token-sharded inputs with a distributed
core.

Intercept, don't imitate: the strategy never re-implements a third-party attention forward. While a module marked
``attention`` (or ``sdpa``) runs inside the sequence-parallel region, :class:`DistributedSDPA` (a
``TorchFunctionMode``, the mechanism of PyTorch's own ``context_parallel``) replaces only

- every ``torch.nn.functional.scaled_dot_product_attention`` call (timm with ``fused_attn``, Hugging Face with
  ``attn_implementation="sdpa"``, most modern code) by the distributed attention of the plan;
- the ``softmax(Q K^T) V`` core of attention written by hand (timm without ``fused_attn``, Hugging Face ``eager``,
  vit-pytorch): the batched ``Q K^T`` product gathers the keys of the whole sequence and the following
  ``P V`` product the values (LSS at the level of the two products, arXiv 2311.02382), so the module's own scale,
  masks, softmax and dropout run unchanged on scores ``[B, H, L_r, L]`` (a bias over all ``[L, L]`` token pairs
  added to them is cut to this rank's rows);
- ``torch.nn.functional.multi_head_attention_forward`` (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``):
  torch's own function runs with ``need_weights=False`` and its SDPA call made distributed.

Every keyword these calls receive is honoured (``is_causal``, ``scale``, ``dropout_p``, ``enable_gqa``) or refused
with :class:`UnsupportedAttentionError` naming it and saying what to do; values that change nothing
(``attn_mask=None``, ``is_causal=False``) pass. Letters: B batch, H heads, L tokens, L_r this rank's tokens, d head dim.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_seqpar.attention.local import causal_mask

log = logging.getLogger(__name__)


class UnsupportedAttentionError(ValueError):
    """Raised when an attention call uses an option its distributed version does not support."""


class AttentionRuntime(Protocol):
    """What the interception needs from the applied plan
    (:class:`~lightning_seqpar.parallelize.SequenceParallelRuntime`)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, dropout_p: float = 0.0,
               softmax_scale: float | None = None) -> Tensor: ...

    def token_lengths(self) -> tuple[int, int] | None: ...

    def gather_tokens(self, x: Tensor, dim: int, *, count: bool) -> Tensor: ...

    def token_offset(self) -> int: ...


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """The same tensor, or an alias of the same memory (ZeRO-3's module hooks hand each input over as a new
    tensor object, so ``self_attn(x, x, x)`` arrives as three aliases)."""
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def _check_token_count(what: str, tokens: int, lengths: tuple[int, int]) -> None:
    """Refuse an attention call whose token count is not this rank's share of the sharded sequence.

    Raises:
        UnsupportedAttentionError: ``tokens`` differs from ``L_r``: the module regroups its tokens (windowed
            attention, as in Swin or SAM, or tokens laid out as a ``[B, H, W, C]`` grid), so its attention is not
            over the sharded sequence.
    """
    local, total = lengths
    if tokens != local:
        raise UnsupportedAttentionError(
            f"{what} attends over {tokens} tokens per call inside the sequence-parallel region, while this rank holds"
            f" {local} of the sequence's {total} tokens: the module regroups its tokens (windowed attention as in"
            " Swin or SAM, or tokens laid out as a [B, H, W, C] grid), so its attention is not over the sharded"
            " sequence and cannot be made distributed. Use a model whose blocks attend globally over [B, L, D]"
            " tokens (ViT, DeiT, BEiT, EVA), or train this one without sequence parallelism."
        )


_MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm}
_ADDS = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.add_, Tensor.__iadd__}
_SDPA_PARAMETERS = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None
).parameters
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_warned_need_weights = False


class DistributedSDPA(TorchFunctionMode):
    """While active, the attention core of the running module is made distributed (see the module docstring).

    Args:
        runtime: The applied plan's runtime: its ``attend`` (``[B, L_r, H, d]`` q, k, v -> out), the token lengths
            ``(L_r, L)`` of the current region and an autograd-aware token gather. An object with only ``attend``
            (older callers) intercepts SDPA alone.

    Other torch functions pass through unchanged.
    """

    def __init__(self, runtime: AttentionRuntime | Callable[..., Tensor]) -> None:
        super().__init__()
        self.runtime = runtime
        self.attend = runtime if callable(runtime) and not hasattr(runtime, "attend") else runtime.attend
        self._pending_scores: list[tuple[torch.Size, int]] = []  # batch shape and L of gathered Q K^T products

    def _token_lengths(self) -> tuple[int, int] | None:
        """``(L_r, L)`` inside the region (see :class:`AttentionRuntime`); None outside it or for a plain attention
        callable, which holds no layout."""
        return self.runtime.token_lengths() if hasattr(self.runtime, "token_lengths") else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self._multi_head_attention(func, args, kwargs)
        if func in _MATMULS and len(args) == 2 and not kwargs:
            return self._matmul(func, *args)
        if func in _ADDS and self._pending_scores and len(args) >= 2:
            return func(*self._bias_rows(args[0], args[1]), *args[2:], **kwargs)
        return func(*args, **kwargs)

    def _bias_rows(self, a: Any, b: Any) -> tuple[Any, Any]:
        """Between a gathered ``Q K^T`` and its ``P V``: a bias over all token pairs ``[.., L, L]`` added to the
        scores ``[.., L_r, L]`` (Hugging Face BEiT's relative position bias in eager attention) is cut to the rows of
        this rank's queries, as the scores are."""
        lengths = self._token_lengths()
        if lengths is None or not (isinstance(a, Tensor) and isinstance(b, Tensor)) or min(a.dim(), b.dim()) < 2:
            return a, b
        local, total = lengths
        if local == total:
            return a, b
        if a.shape[-2:] == (local, total) and b.shape[-2:] == (total, total):
            return a, b.narrow(-2, self.runtime.token_offset(), local)
        if b.shape[-2:] == (local, total) and a.shape[-2:] == (total, total):
            return a.narrow(-2, self.runtime.token_offset(), local), b
        return a, b

    # --- SDPA ---------------------------------------------------------------------------------------------

    def _sdpa(self, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        options = dict(zip(list(_SDPA_PARAMETERS)[3:], args)) | kwargs
        unknown = sorted(set(options) - set(_SDPA_PARAMETERS))
        if unknown:
            changing = [name for name in unknown if options[name] not in (None, False, 0, 0.0)]
            if changing:
                raise UnsupportedAttentionError(
                    f"scaled_dot_product_attention was called with {changing} inside the sequence-parallel region; the"
                    " distributed attention does not implement these options. Call it without them, or leave this"
                    " module out of the plan."
                )
        if key.shape[-2] != query.shape[-2] or value.shape[-2] != key.shape[-2]:
            raise UnsupportedAttentionError(
                f"scaled_dot_product_attention got {query.shape[-2]} query and {key.shape[-2]} key tokens inside the"
                " sequence-parallel region: cross-attention (keys from another sequence, a cache or extra key"
                " tokens) cannot follow the token sharding. Leave this module out of the plan."
            )
        lengths = self._token_lengths()
        if lengths is not None:
            _check_token_count("scaled_dot_product_attention", query.shape[-2], lengths)
        attn_mask = options.get("attn_mask")
        if lengths is not None and (attn_mask is not None or query.dim() != 4):
            return self._sdpa_gathered(query, key, value, attn_mask, options, lengths)
        if attn_mask is not None:
            raise UnsupportedAttentionError(
                "scaled_dot_product_attention was called with attn_mask inside the sequence-parallel region by a"
                " runtime that cannot gather keys; use is_causal=True for causal masking, or no mask."
            )
        if query.dim() != 4:
            raise UnsupportedAttentionError(f"expected SDPA inputs [B, H, L, d], got {list(query.shape)}")
        if key.shape[1] != query.shape[1]:
            if not options.get("enable_gqa", False):
                raise UnsupportedAttentionError(
                    "SDPA with fewer key/value heads than query heads needs enable_gqa=True"
                )
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)  # [B, H, L_r, d]
        out = self.attend(
            query.transpose(1, 2),  # [B, H, L_r, d] -> [B, L_r, H, d]
            key.transpose(1, 2),
            value.transpose(1, 2),
            causal=bool(options.get("is_causal", False)),
            dropout_p=float(options.get("dropout_p", 0.0)),
            softmax_scale=options.get("scale"),
        )
        return out.transpose(1, 2)  # [B, H, L_r, d]

    def _sdpa_gathered(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                       options: dict[str, Any], lengths: tuple[int, int]) -> Tensor:
        """SDPA with a mask or bias (relative position biases, padding masks), or on inputs that are not
        ``[B, H, L, d]`` (heads folded into the batch): this rank's queries ``[*, L_r, d]`` attend to the keys and
        values of the whole sequence, all-gathered to ``[*, L, d]`` (LSS, arXiv 2311.02382), with the mask's rows
        of this rank's queries; torch's own SDPA computes it, so the module's mask, scale, GQA and dropout semantics
        are kept exactly.

        The mask (broadcastable to ``[*, L_q, L_k]``) must cover the keys of the whole sequence (``L_k`` = L, or 1)
        and either every query (``L_q`` = L: its rows of this rank's tokens are taken) or this rank's (``L_q`` = L_r,
        as a block argument over token pairs arrives after ``shard_arguments``), or broadcast (``L_q`` = 1).

        Raises:
            UnsupportedAttentionError: The mask's key or query dimension is another length (a mask built from this
                rank's token count is wrong for the whole sequence).
        """
        local, total = lengths
        is_causal = bool(options.get("is_causal", False))
        if attn_mask is not None:
            rows = attn_mask.shape[-2] if attn_mask.dim() >= 2 else 1
            if attn_mask.shape[-1] not in (total, 1) or rows not in (total, local, 1):
                raise UnsupportedAttentionError(
                    f"scaled_dot_product_attention got an attn_mask of shape {list(attn_mask.shape)} inside the"
                    f" sequence-parallel region, where this rank holds {local} of the sequence's {total} tokens: a"
                    f" mask or bias must cover the whole sequence (last dimensions [{total}, {total}] or"
                    f" [{local}, {total}]). One built from the token count the module sees (here {local}) is"
                    " wrong under sequence parallelism: build it for the whole sequence (e.g. pass it to the block"
                    " as an argument), or leave this module out of the plan."
                )
            if rows == total and total != local:
                attn_mask = attn_mask.narrow(-2, self.runtime.token_offset(), local)  # this rank's query rows
        elif is_causal:
            # SDPA's is_causal aligns the top-left corner; this rank's queries sit at token offset..offset+L_r-1.
            attn_mask = causal_mask(self.runtime.token_offset(), local, total, query.device)  # [L_r, L]
            is_causal = False
        key = self.runtime.gather_tokens(key, -2, count=True)  # [*, L, d]
        value = self.runtime.gather_tokens(value, -2, count=False)
        extra = {"enable_gqa": True} if options.get("enable_gqa", False) else {}
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=float(options.get("dropout_p", 0.0)),
            is_causal=is_causal, scale=options.get("scale"), **extra,
        )

    # --- torch.nn.MultiheadAttention ------------------------------------------------------------------------

    def _multi_head_attention(self, func, args: tuple, kwargs: dict):
        """Run torch's own ``multi_head_attention_forward`` with its SDPA call made distributed."""
        global _warned_need_weights
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        # With is_causal=True (and no padding mask) torch treats attn_mask as a hint only and drops it.
        if a["key_padding_mask"] is not None or (a["attn_mask"] is not None and not a["is_causal"]):
            raise UnsupportedAttentionError(
                "nn.MultiheadAttention was called with key_padding_mask/attn_mask; masks are not supported by the"
                " distributed attention (a mask over all L x L token pairs is not sharded with the tokens). Use"
                " is_causal=True for causal masking, or no mask."
            )
        if not (_same_tensor(a["query"], a["key"]) and _same_tensor(a["key"], a["value"])):
            raise UnsupportedAttentionError(
                "nn.MultiheadAttention was called as cross-attention (query, key, value differ); only self-attention"
                " over the sharded tokens can be made distributed. Leave this module out of the plan."
            )
        if a["bias_k"] is not None or a["add_zero_attn"] or a["use_separate_proj_weight"]:
            raise UnsupportedAttentionError(
                "nn.MultiheadAttention with add_bias_kv, add_zero_attn or kdim/vdim != embed_dim is not supported under"
                " sequence parallelism (they add key tokens or projections that are not sharded with the tokens)."
            )
        if a["need_weights"]:
            if not _warned_need_weights:
                log.warning(
                    "nn.MultiheadAttention(need_weights=True) under sequence parallelism: the [B, L, L] attention"
                    " weights are never built, the weights returned are None. Pass need_weights=False to silence this."
                )
                _warned_need_weights = True
            a["need_weights"] = False
        # Under a TorchFunctionMode torch runs multi_head_attention_forward with the mode switched off, so its SDPA
        # call is reached through the module-level name it looks up when it runs, for the length of this call only
        # (and restored while the distributed attention runs, whose local kernel calls the real SDPA).
        original = F.scaled_dot_product_attention

        def distributed_sdpa(*sdpa_args, **sdpa_kwargs):
            F.scaled_dot_product_attention = original
            try:
                return self._sdpa(*sdpa_args, **sdpa_kwargs)
            finally:
                F.scaled_dot_product_attention = distributed_sdpa

        F.scaled_dot_product_attention = distributed_sdpa
        try:
            out, _ = func(*bound.args, **bound.kwargs)
        finally:
            F.scaled_dot_product_attention = original
        return out, None

    # --- softmax(Q K^T) V written by hand -----------------------------------------------------------------

    def _matmul(self, func, a: Tensor, b: Tensor):
        lengths = self._token_lengths()
        if (
            lengths is None
            or not (isinstance(a, Tensor) and isinstance(b, Tensor))
            or a.dim() < 3
            or a.dim() != b.dim()
        ):
            return func(a, b)
        local, total = lengths
        batch = a.shape[:-2]
        if b.shape[:-2] != batch:
            return func(a, b)
        if (
            self._pending_scores
            and self._pending_scores[-1] == (batch, total)
            and a.shape[-1] == total
            and b.shape[-2] == local
        ):
            # P V: probabilities [*, L_r, L] times this rank's values [*, L_r, d] -> gather the values to [*, L, d].
            self._pending_scores.pop()
            return func(a, self.runtime.gather_tokens(b, -2, count=False))
        if a.shape[-2] == local and b.shape[-1] == local and a.shape[-1] == b.shape[-2]:
            # Q K^T: queries [*, L_r, d] times this rank's keys [*, d, L_r] -> gather the keys to [*, d, L]:
            # the scores [*, L_r, L] hold every key, so the module's softmax over the last dimension is exact.
            self._pending_scores.append((batch, total))
            return func(a, self.runtime.gather_tokens(b, -1, count=True))
        return func(a, b)


def disable_mha_fastpath() -> Callable[[], None]:
    """Turn off PyTorch's fused TransformerEncoderLayer/MHA inference path (it bypasses module forwards);
    returns a function restoring the previous setting."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    return lambda: torch.backends.mha.set_fastpath_enabled(previous)
