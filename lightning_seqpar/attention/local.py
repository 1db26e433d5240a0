"""Single-device attention kernels and the choice between them: flash-attn, torch SDPA (cuDNN / flash / efficient), or
math.

All kernels take and return the layout of the distributed attentions: q ``[B, L_q, H, d]``, k and v
``[B, L_k, H, d]``, output ``[B, L_q, H, d]``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionBackend = Literal["auto", "flash_attn", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math"]
"""Local attention kernels: ``auto`` picks flash-attn when it is installed and the inputs are fp16/bf16 on CUDA,
else torch SDPA (which picks cuDNN or flash on Hopper); ``sdpa_*`` force one SDPA kernel (CUDA only);
``math`` is a plain softmax(QK^T)V that runs anywhere."""

BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


class BackendUnavailableError(RuntimeError):
    """Raised when a forced attention backend cannot run on these inputs or this machine."""


@functools.cache
def flash_attn_installed() -> bool:
    """True when the optional ``flash_attn`` package is importable (``pip install "lightning-seqpar[flash]"``)."""
    return importlib.util.find_spec("flash_attn") is not None


def check_same_dtype_device(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise a ValueError naming the tensors when q, k and v differ in dtype or device."""
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must share one dtype and device, got q {q.dtype} on {q.device}, k {k.dtype} on {k.device},"
            f" v {v.dtype} on {v.device}. Cast them together (e.g. run the block under one autocast) and keep the"
            " model and its inputs on the same device."
        )


def causal_mask(query_offset: int, queries: int, keys: int, device: torch.device) -> Tensor:
    """Boolean ``[queries, keys]`` mask (True = attend) of causal attention for a slice of the queries: query i, at
    position ``query_offset + i`` of the sequence, sees keys ``0 .. query_offset + i`` (``query_offset=0`` with
    ``queries == keys`` is SDPA's ``is_causal=True``)."""
    query_pos = torch.arange(queries, device=device) + query_offset
    return torch.arange(keys, device=device)[None, :] <= query_pos[:, None]


def backend_problems(
    backend: str, device_type: str, dtype: torch.dtype | None = None, *, has_mask: bool = False
) -> list[str]:
    """Why the local kernel ``backend`` cannot run on inputs on ``device_type`` of ``dtype`` (None: not known yet,
    e.g. when the strategy checks its arguments); empty when it can. The one list of these rules."""
    problems = []
    if backend == "flash_attn":
        if not flash_attn_installed():
            problems.append("flash-attn is not installed (pip install 'lightning-seqpar[flash]')")
        if device_type != "cuda":
            problems.append(f"the inputs are on {device_type}, flash-attn needs CUDA")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            problems.append(f"the inputs are {dtype}, flash-attn needs float16 or bfloat16")
        if has_mask:
            problems.append("an explicit attention mask is not supported by flash-attn")
    elif backend.startswith("sdpa_") and device_type != "cuda":
        problems.append(f"{backend!r} is a CUDA kernel but the inputs are on {device_type}")
    return problems


def check_backend_available(backend: str, device_type: str, owner: str) -> None:
    """Raise :class:`BackendUnavailableError` (prefixed with ``owner``) when the forced local kernel ``backend``
    cannot run on ``device_type`` (see :func:`backend_problems`); used before any tensor exists."""
    problems = backend_problems(backend, device_type)
    if problems:
        raise BackendUnavailableError(
            f"{owner}(attention_backend={backend!r}): {'; '.join(problems)}, or use attention_backend='auto'"
            " ('sdpa' or 'math' also run off CUDA)."
        )


def resolve_backend(backend: str, q: Tensor, *, has_mask: bool = False) -> str:
    """Return the concrete local kernel ``backend`` means for ``q``, or raise :class:`BackendUnavailableError`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    half = q.dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        if flash_attn_installed() and q.is_cuda and half and not has_mask and q.shape[-1] <= 256:
            return "flash_attn"
        return "sdpa"
    problems = backend_problems(backend, q.device.type, q.dtype, has_mask=has_mask)
    if problems and backend == "flash_attn":
        raise BackendUnavailableError(
            "attention backend 'flash_attn' cannot run here: " + "; ".join(problems)
            + ". Use backend='auto' to fall back to torch SDPA."
        )
    if problems:
        raise BackendUnavailableError(
            f"attention backend {'; '.join(problems)}; use backend='sdpa' or 'math' on this device."
        )
    return backend


_SDPA_KERNELS = {
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
}


def _sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    if backend not in _SDPA_KERNELS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _SDPA_KERNELS[backend])])


def math_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale) v in plain torch ops, softmax in float32 or wider (float64 inputs stay float64);
    ``[B, L_q, H, d] -> [B, L_q, H, d]``."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)  # [B, H, L_q, L_k]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    if causal:
        keep = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = scores.softmax(dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    attn_mask: Tensor | None = None,
    backend: AttentionBackend = "auto",
) -> Tensor:
    """Attention on one device: ``[B, L_q, H, d]`` queries over ``[B, L_k, H, d]`` keys and values.

    Args:
        q: Queries ``[B, L_q, H, d]``.
        k: Keys ``[B, L_k, H, d]``.
        v: Values ``[B, L_k, H, d]``.
        dropout_p: Dropout on the attention probabilities (pass 0.0 in evaluation).
        softmax_scale: Scale of ``q k^T``; default ``1 / sqrt(d)``.
        causal: Mask keys after each query (top-left aligned: query i sees keys 0..i).
        attn_mask: Optional boolean (True = attend) or additive mask broadcastable to ``[B, H, L_q, L_k]``.
        backend: Which kernel; see :data:`AttentionBackend`.

    Returns:
        ``[B, L_q, H, d]``.

    Raises:
        BackendUnavailableError: A forced backend cannot run on these inputs.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q, k, v of shape [B, L, H, d], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    check_same_dtype_device(q, k, v)
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q {list(q.shape)}, k {list(k.shape)} and v {list(v.shape)} must agree on batch, heads and head dim"
            " (and k, v on tokens)."
        )
    chosen = resolve_backend(backend, q, has_mask=attn_mask is not None)
    if chosen == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)
    if chosen == "math":
        return math_attention(
            q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, attn_mask=attn_mask
        )
    if causal and attn_mask is not None:
        raise ValueError("pass either causal=True or attn_mask, not both")
    with _sdpa_context(chosen):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [B, H, L_q, d]
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=causal,
            scale=softmax_scale,
        )
    return out.transpose(1, 2)  # [B, L_q, H, d]
