"""Block kernels that return the log-sum-exp, the pieces ring attention merges: plain torch, PyTorch's flash op, and
cuDNN.

Every kernel computes the attention of queries ``[B, L_q, H, d]`` over one key/value block ``[B, L_k, H, d]`` and
returns the block's output in float32 (float64 for float64 inputs) with its log-sum-exp ``[B, H, L_q]`` (natural
log of the sum of ``exp(scale * q k^T)`` over the block's keys). Its backward takes the *final* output and
log-sum-exp of the whole row (FlashAttention-2's backward, arXiv 2307.08691), so that blocks can be recomputed
one at a time and their gradients summed.

Kernels (:data:`BLOCK_KERNELS`):

- ``math``: einsum and a float32 softmax, any device and dtype (the exact reference the CPU tests use).
- ``sdpa_flash``: ``torch.ops.aten._scaled_dot_product_flash_attention`` (FlashAttention-2; CUDA, fp16/bf16,
  d a multiple of 8 up to 256).
- ``sdpa_cudnn``: ``torch.ops.aten._scaled_dot_product_cudnn_attention`` with ``compute_log_sumexp=True`` and its
  backward (cuDNN 9 fused attention; CUDA sm80+, fp16/bf16, d a multiple of 8 up to 128), the kernel PyTorch's
  own ``context_parallel`` ring uses; about 1.5x faster than the flash op on Hopper at d = 64. Where cuDNN
  refuses a shape at run time, :func:`block_forward` and :func:`block_backward` fall back to the flash op (or math)
  when ``fallback`` is set, with one warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

BLOCK_KERNELS = ("math", "sdpa_flash", "sdpa_cudnn")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial outputs and log-sum-exps are merged in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def flash_runs(q: Tensor) -> bool:
    """Whether PyTorch's flash op takes these inputs (fp16/bf16 CUDA, head dim a multiple of 8 up to 256)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def cudnn_runs(q: Tensor) -> bool:
    """Whether cuDNN fused attention should take these inputs: fp16/bf16 on an sm80+ GPU, head dim a multiple of 8
    up to 128, and cuDNN attention not switched off (``torch.backends.cuda.enable_cudnn_sdp(False)``)."""
    if not (flash_runs(q) and q.shape[-1] <= 128):
        return False
    if not (torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled()):
        return False
    return torch.cuda.get_device_capability(q.device) >= (8, 0)


# ---------------------------------------------------------------------------------------------------------
# math: plain torch.
# ---------------------------------------------------------------------------------------------------------


def _scores(q: Tensor, k: Tensor, scale: float, diagonal: bool) -> Tensor:
    """``[B, L_q, H, d] x [B, L_k, H, d] -> [B, H, L_q, L_k]`` in the compute dtype, top-left causal when
    ``diagonal``."""
    dtype = compute_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
    if diagonal:
        keep = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def math_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, diagonal: bool) -> tuple[Tensor, Tensor]:
    """Reference block kernel in plain PyTorch: attention of ``q`` [B, L_q, H, d] over ``k``, ``v`` [B, L_k, H, d].

    Returns ``(out [B, L_q, H, d], lse [B, H, L_q])`` in the compute dtype (float32 for half inputs), the log-sum-exp
    being what the ring merge of arXiv 2310.01889 needs; ``diagonal`` masks top-left causal within the block.
    """
    scores = _scores(q, k, scale, diagonal)  # [B, H, L_q, L_k]
    lse = scores.logsumexp(dim=-1)  # [B, H, L_q]
    probs = (scores - lse.unsqueeze(-1)).exp()
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(probs.dtype)), lse


def math_backward(
    q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, out: Tensor, lse: Tensor, scale: float, diagonal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)``, each shaped like its input, of :func:`math_forward` from ``grad_out`` and the saved
    ``out`` / ``lse`` (FlashAttention-2's recomputation, arXiv 2307.08691: probabilities rebuilt from the lse)."""
    dtype = compute_dtype(q.dtype)
    q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))
    delta = (grad_out * out.to(dtype)).sum(dim=-1).transpose(1, 2)  # rowsum(dO * O): [B, H, L_q]
    probs = (_scores(q, k, scale, diagonal) - lse.unsqueeze(-1)).exp()  # [B, H, L_q, L_k]
    grad_v = torch.einsum("bhqk,bqhd->bkhd", probs, grad_out)  # [B, L_k, H, d]
    grad_probs = torch.einsum("bqhd,bkhd->bhqk", grad_out, v)  # [B, H, L_q, L_k]
    grad_scores = probs * (grad_probs - delta.unsqueeze(-1)) * scale
    grad_q = torch.einsum("bhqk,bkhd->bqhd", grad_scores, k)  # [B, L_q, H, d]
    grad_k = torch.einsum("bhqk,bqhd->bkhd", grad_scores, q)  # [B, L_k, H, d]
    return grad_q, grad_k, grad_v


# ---------------------------------------------------------------------------------------------------------
# sdpa_flash: PyTorch's FlashAttention-2 op. The ops take [B, H, L, d]: transposed views, no copies.
# ---------------------------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor]:
    """Philox seed and offset for a backward without dropout (never read, but the ops take them)."""
    return torch.zeros(2, dtype=torch.uint64, device=device), torch.zeros((), dtype=torch.uint64, device=device)


def flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, diagonal: bool) -> tuple[Tensor, Tensor]:
    """:func:`math_forward` on PyTorch's FlashAttention-2 op (CUDA, fp16/bf16): ``(out [B, L_q, H, d] float32,
    lse [B, H, L_q] float32)``."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, diagonal, False, scale=scale
    )  # [B, H, L_q, d], [B, H, L_q]
    return out.transpose(1, 2).float(), lse[..., : q.shape[1]].float()


def flash_backward(
    q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, out: Tensor, lse: Tensor, scale: float, diagonal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` [B, L, H, d] of :func:`flash_forward` through the op's own backward (no dropout)."""
    seed, offset = _rng_state(q.device)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse.contiguous(), None, None, q.shape[1], k.shape[1], 0.0, diagonal, seed, offset, scale=scale,
    )
    return tuple(g.transpose(1, 2) for g in grads)  # [B, L, H, d] each


# ---------------------------------------------------------------------------------------------------------
# sdpa_cudnn: the cuDNN op under SDPA. Its log-sum-exp is [B, H, L_q, 1] in float32.
# ---------------------------------------------------------------------------------------------------------


def cudnn_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, diagonal: bool) -> tuple[Tensor, Tensor]:
    """:func:`math_forward` on the cuDNN attention op under SDPA (CUDA, fp16/bf16; ``compute_log_sumexp=True``, as
    PyTorch's context parallelism uses it): ``(out [B, L_q, H, d] float32, lse [B, H, L_q] float32)``."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, diagonal, False, scale=scale
    )  # [B, H, L_q, d], [B, H, L_q, 1]
    return out.transpose(1, 2).float(), lse.reshape(q.shape[0], q.shape[2], q.shape[1]).float()


def cudnn_backward(
    q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, out: Tensor, lse: Tensor, scale: float, diagonal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` [B, L, H, d] of :func:`cudnn_forward` through the cuDNN op's backward (no dropout)."""
    seed, offset = (torch.zeros((), dtype=torch.int64, device=q.device) for _ in range(2))
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse.float().unsqueeze(-1).contiguous(), seed, offset, None, None, None, q.shape[1], k.shape[1], 0.0,
        diagonal, scale=scale,
    )
    return tuple(g.transpose(1, 2) for g in grads)  # [B, L, H, d] each


def _kernel(kernel: str, backward: bool):
    """The function of ``kernel``, looked up at call time (so that a test can stand in for one)."""
    if kernel not in BLOCK_KERNELS:
        raise ValueError(f"unknown block kernel {kernel!r}; choose one of {', '.join(BLOCK_KERNELS)}.")
    return globals()[
        {"math": "math", "sdpa_flash": "flash", "sdpa_cudnn": "cudnn"}[kernel]
        + ("_backward" if backward else "_forward")
    ]


_warned: set[str] = set()


def _fallback_kernel(q: Tensor) -> str:
    return "sdpa_flash" if flash_runs(q) else "math"


def _warn_fallback(err: Exception, q: Tensor, k: Tensor, where: str) -> None:
    key = f"{where}{tuple(q.shape)}{tuple(k.shape)}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"cuDNN attention refused a ring block ({where}; q {list(q.shape)}, k {list(k.shape)}, {q.dtype}): {err}."
            f" Using the {_fallback_kernel(q)} kernel for it; pass backend='sdpa_flash' to skip cuDNN.",
            RuntimeWarning,
            stacklevel=3,
        )


def block_forward(
    kernel: str, q: Tensor, k: Tensor, v: Tensor, scale: float, diagonal: bool, fallback: bool = False
) -> tuple[Tensor, Tensor]:
    """Output ``[B, L_q, H, d]`` (compute dtype) and log-sum-exp ``[B, H, L_q]`` of ``q`` over one block.

    ``diagonal``: top-left causal mask inside the block (L_q = L_k there). ``fallback``: where cuDNN raises,
    use the flash op (or math) for this block instead of raising.
    """
    if kernel == "sdpa_cudnn" and fallback:
        try:
            return cudnn_forward(q, k, v, scale, diagonal)
        except RuntimeError as err:
            _warn_fallback(err, q, k, "forward")
            kernel = _fallback_kernel(q)
    return _kernel(kernel, backward=False)(q, k, v, scale, diagonal)


def block_backward(
    kernel: str, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, out: Tensor, lse: Tensor, scale: float,
    diagonal: bool, fallback: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq ``[B, L_q, H, d]``, dk and dv ``[B, L_k, H, d]`` of one block from the final ``out`` and ``lse`` of its rows.

    Any kernel may take the output and log-sum-exp another kernel produced (both are exact up to rounding)."""
    if kernel == "sdpa_cudnn" and fallback:
        try:
            return cudnn_backward(q, k, v, grad_out, out, lse, scale, diagonal)
        except RuntimeError as err:
            _warn_fallback(err, q, k, "backward")
            kernel = _fallback_kernel(q)
    return _kernel(kernel, backward=True)(q, k, v, grad_out, out, lse, scale, diagonal)


def merge_block(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Online softmax: merge a block's output ``[B, L_q, H, d]`` and LSE ``[B, H, L_q]`` into the running ones
    (compute dtype); rows no block has reached yet hold LSE ``-inf`` and output 0."""
    merged = torch.logaddexp(lse, block_lse)  # [B, H, L_q]
    old_weight = (lse - merged).exp().transpose(1, 2).unsqueeze(-1)  # [B, L_q, H, 1]
    block_weight = (block_lse - merged).exp().transpose(1, 2).unsqueeze(-1)
    return out * old_weight + block_out * block_weight, merged
