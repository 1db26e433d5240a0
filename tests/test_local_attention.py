"""Local attention kernels: the backends agree, forced backends fail clearly where they cannot run, shapes are
checked."""

from __future__ import annotations

import pytest
import torch

from lightning_seqpar.attention import BackendUnavailableError, local_attention, resolve_backend
from lightning_seqpar.comm import split_sizes


def _qkv(B=2, Lq=9, Lk=9, H=3, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, Lq, H, d, generator=g, dtype=dtype),
        torch.randn(B, Lk, H, d, generator=g, dtype=dtype),
        torch.randn(B, Lk, H, d, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_math(causal):
    q, k, v = _qkv()
    a = local_attention(q, k, v, causal=causal, backend="sdpa")
    b = local_attention(q, k, v, causal=causal, backend="math")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a.shape == q.shape


def test_softmax_scale_is_used():
    q, k, v = _qkv()
    a = local_attention(q, k, v, softmax_scale=0.01, backend="math")
    b = local_attention(q * 0.01 * 4, k, v, backend="math")  # default scale 1/sqrt(16) = 1/4
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_is_sdpa_on_cpu():
    q, _, _ = _qkv()
    assert resolve_backend("auto", q) == "sdpa"


def test_flash_attn_forced_on_cpu_fp32_explains_why():
    q, k, v = _qkv()
    with pytest.raises(
        BackendUnavailableError, match="'flash_attn' cannot run here: .*needs CUDA.*needs float16 or bfloat16"
    ):
        local_attention(q, k, v, backend="flash_attn")


def test_cuda_sdpa_kernel_forced_on_cpu():
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailableError, match="'sdpa_cudnn' is a CUDA kernel but the inputs are on cpu"):
        local_attention(q, k, v, backend="sdpa_cudnn")


def test_unknown_backend():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        local_attention(q, k, v, backend="xformers")


def test_shape_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"must agree on batch, heads and head dim"):
        local_attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match=r"expected q, k, v of shape \[B, L, H, d\]"):
        local_attention(q[0], k, v)


def test_split_sizes_uneven():
    assert split_sizes(197, 4) == [50, 49, 49, 49]
    assert split_sizes(6, 4) == [2, 2, 1, 1]
    assert sum(split_sizes(1000003, 7)) == 1000003
    with pytest.raises(ValueError, match="cannot split into 0 parts"):
        split_sizes(3, 0)


@pytest.mark.parametrize("name", ["local", "ulysses", "lss", "ring"])
def test_mismatched_dtypes_are_named(name):
    from lightning_seqpar.attention import lss_attention, ring_attention, ulysses_attention

    q, k, v = _qkv()
    fn = {
        "local": lambda *t: local_attention(*t),
        "ulysses": lambda *t: ulysses_attention(*t, None),
        "lss": lambda *t: lss_attention(*t, None),
        "ring": lambda *t: ring_attention(*t, None),
    }[name]
    with pytest.raises(
        ValueError, match=r"q, k and v must share one dtype and device, got q torch.float32 on cpu, k torch.bfloat16"
    ):
        fn(q, k.bfloat16(), v)


def test_math_kernel_keeps_float64():
    """The math kernel is the reference of the distributed tests: it must not round float64 inputs to float32."""
    q, k, v = (t.double() for t in _qkv())
    out = local_attention(q, k, v, backend="math")
    assert out.dtype == torch.float64
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    assert (out - expected).abs().max().item() < 1e-12


def test_strategy_backend_check_uses_the_same_rules():
    """The strategy's check before any tensor exists and resolve_backend read one list of rules (backend_problems)."""
    from lightning_seqpar.attention.local import backend_problems, check_backend_available

    with pytest.raises(
        BackendUnavailableError,
        match=r"SeqParStrategy\(attention_backend='sdpa_cudnn'\): 'sdpa_cudnn' is a CUDA kernel but the inputs are on"
              r" cpu, or use attention_backend='auto'",
    ):
        check_backend_available("sdpa_cudnn", "cpu", "SeqParStrategy")
    with pytest.raises(BackendUnavailableError, match="the inputs are on cpu, flash-attn needs CUDA"):
        check_backend_available("flash_attn", "cpu", "SeqParStrategy")
    for backend in ("auto", "sdpa", "math"):
        check_backend_available(backend, "cpu", "SeqParStrategy")
    assert backend_problems("sdpa_cudnn", "cuda") == [] and backend_problems("sdpa_cudnn", "cpu")
    assert "the inputs are torch.float32, flash-attn needs float16 or bfloat16" in backend_problems(
        "flash_attn", "cuda", torch.float32
    )
