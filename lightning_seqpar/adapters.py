"""Distributed forwards for attention modules the strategy knows (torch MultiheadAttention, timm, vit-pytorch), and the interception of SDPA calls for those it does not.

Each adapter is ``fn(module, attend, *args, **kwargs)`` that reproduces the module's forward on token-sharded
inputs ``[B, L_r, D]`` using the module's own parameters, with ``attend(q, k, v, ...)`` (layout
``[B, L_r, H, d]``) in place of the attention core. Options the distributed version cannot honour
(masks, cross-attention, sequence-first layouts) raise :class:`UnsupportedAttentionError` naming the option.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

Attend = Callable[..., Tensor]


class UnsupportedAttentionError(ValueError):
    """Raised when an attention call uses an option its distributed version does not support."""


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """The same tensor, or an alias of the same memory (ZeRO-3's module hooks hand each input over as a new
    tensor object, so ``self_attn(x, x, x)`` arrives as three aliases)."""
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def _mha_forward(
    module: nn.MultiheadAttention,
    attend: Attend,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, None]:
    """``torch.nn.MultiheadAttention`` self-attention on ``[B, L_r, D]``; returns ``(output, None)``."""
    name = f"{type(module).__name__}"
    if not module.batch_first:
        raise UnsupportedAttentionError(
            f"{name}(batch_first=False) is not supported under sequence parallelism: build it with batch_first=True"
            " so tokens are dimension 1."
        )
    if key_padding_mask is not None or attn_mask is not None:
        raise UnsupportedAttentionError(
            f"{name} was called with key_padding_mask/attn_mask; masks are not supported by the distributed"
            " attention (use is_causal=True for causal masking, or no mask)."
        )
    if not (_same_tensor(query, key) and _same_tensor(key, value)):
        raise UnsupportedAttentionError(
            f"{name} was called as cross-attention (query, key, value differ); only self-attention over the"
            " sharded tokens can be made distributed. Leave this module out of the plan."
        )
    if module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
        raise UnsupportedAttentionError(f"{name} with add_bias_kv, add_zero_attn or kdim/vdim != embed_dim is not supported.")
    B, L_r, D = query.shape
    H = module.num_heads
    qkv = F.linear(query, module.in_proj_weight, module.in_proj_bias)  # [B, L_r, 3D]
    q, k, v = qkv.view(B, L_r, 3, H, D // H).unbind(2)  # [B, L_r, H, d] each
    dropout = module.dropout if module.training else 0.0
    out = attend(q, k, v, causal=is_causal, dropout_p=dropout)  # [B, L_r, H, d]
    out = module.out_proj(out.reshape(B, L_r, D))
    return out, None


def _is_timm_style(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "proj", None), nn.Module)
    )


def _timm_forward(module: nn.Module, attend: Attend, x: Tensor, attn_mask: Tensor | None = None, **kwargs) -> Tensor:
    """timm-style ``Attention`` (fused ``qkv`` Linear, ``q_norm``/``k_norm``, ``proj``) on ``[B, L_r, D]``."""
    if attn_mask is not None or any(v is not None for v in kwargs.values()):
        raise UnsupportedAttentionError(
            f"{type(module).__name__} was called with {'attn_mask' if attn_mask is not None else sorted(kwargs)}:"
            " masks are not supported by the distributed attention."
        )
    B, L_r, _ = x.shape
    H = module.num_heads
    qkv = module.qkv(x)  # [B, L_r, 3 * H * d]
    q, k, v = qkv.view(B, L_r, 3, H, -1).unbind(2)  # [B, L_r, H, d] each
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    attn_drop = getattr(module, "attn_drop", None)
    dropout = attn_drop.p if module.training and isinstance(attn_drop, nn.Dropout) else 0.0
    out = attend(q, k, v, dropout_p=dropout, softmax_scale=getattr(module, "scale", None))  # [B, L_r, H, d]
    out = out.reshape(B, L_r, -1)
    norm = getattr(module, "norm", None)
    if isinstance(norm, nn.Module):
        out = norm(out)
    out = module.proj(out)
    proj_drop = getattr(module, "proj_drop", None)
    return proj_drop(out) if isinstance(proj_drop, nn.Module) else out


def _is_vit_pytorch_style(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "to_qkv", None), nn.Linear)
        and isinstance(getattr(module, "heads", None), int)
        and isinstance(getattr(module, "attend", None), nn.Softmax)
        and isinstance(getattr(module, "to_out", None), nn.Module)
    )


def _vit_pytorch_forward(module: nn.Module, attend: Attend, x: Tensor) -> Tensor:
    """lucidrains' vit-pytorch ``Attention`` (pre-norm, ``to_qkv`` without bias, softmax by hand) on ``[B, L_r, D]``."""
    norm = getattr(module, "norm", None)
    if isinstance(norm, nn.Module):
        x = norm(x)
    B, L_r, _ = x.shape
    q, k, v = (t.view(B, L_r, module.heads, -1) for t in module.to_qkv(x).chunk(3, dim=-1))  # [B, L_r, H, d]
    dropout = getattr(module, "dropout", None)
    p = dropout.p if module.training and isinstance(dropout, nn.Dropout) else 0.0
    out = attend(q, k, v, dropout_p=p, softmax_scale=getattr(module, "scale", None))  # [B, L_r, H, d]
    return module.to_out(out.reshape(B, L_r, -1))


def builtin_adapter(module: nn.Module):
    """The built-in distributed forward for ``module``, or None if it is not an attention we know."""
    if isinstance(module, nn.MultiheadAttention):
        return _mha_forward
    if _is_timm_style(module):
        return _timm_forward
    if _is_vit_pytorch_style(module):
        return _vit_pytorch_forward
    return None


class DistributedSDPA(TorchFunctionMode):
    """While active, ``torch.nn.functional.scaled_dot_product_attention`` on ``[B, H, L_r, d]`` runs distributed.

    PyTorch's own ``context_parallel`` intercepts SDPA the same way. Other torch functions pass through.
    """

    def __init__(self, attend: Attend) -> None:
        super().__init__()
        self.attend = attend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self._sdpa(*args, **kwargs)

    def _sdpa(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        if attn_mask is not None:
            raise UnsupportedAttentionError(
                "scaled_dot_product_attention was called with attn_mask inside the sequence-parallel region;"
                " masks are not supported by the distributed attention (is_causal=True is)."
            )
        if query.dim() != 4:
            raise UnsupportedAttentionError(f"expected SDPA inputs [B, H, L, d], got {list(query.shape)}")
        if key.shape[1] != query.shape[1]:
            if not enable_gqa:
                raise UnsupportedAttentionError("SDPA with fewer key/value heads than query heads needs enable_gqa=True")
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        out = self.attend(
            query.transpose(1, 2),  # [B, L_r, H, d]
            key.transpose(1, 2),
            value.transpose(1, 2),
            causal=is_causal,
            dropout_p=dropout_p,
            softmax_scale=scale,
        )
        return out.transpose(1, 2)  # [B, H, L_r, d]


def disable_mha_fastpath() -> Callable[[], None]:
    """Turn off PyTorch's fused TransformerEncoderLayer/MHA inference path (it bypasses module forwards);
    returns a function restoring the previous setting."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    return lambda: torch.backends.mha.set_fastpath_enabled(previous)
