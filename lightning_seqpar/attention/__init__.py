"""Attention kernels: the single-device choice (:func:`local_attention`) and the distributed ones (Ulysses, LSS, ring, hybrid)."""

from lightning_seqpar.attention.local import (
    AttentionBackend,
    BackendUnavailableError,
    local_attention,
    math_attention,
    resolve_backend,
)
from lightning_seqpar.attention.hybrid import HybridAttention, build_hybrid_groups, hybrid_attention
from lightning_seqpar.attention.lss import LSSAttention, lss_attention
from lightning_seqpar.attention.ring import RingAttention, ring_attention
from lightning_seqpar.attention.ulysses import UlyssesAttention, ulysses_attention

__all__ = [
    "AttentionBackend",
    "BackendUnavailableError",
    "HybridAttention",
    "LSSAttention",
    "RingAttention",
    "UlyssesAttention",
    "build_hybrid_groups",
    "hybrid_attention",
    "local_attention",
    "lss_attention",
    "math_attention",
    "resolve_backend",
    "ring_attention",
    "ulysses_attention",
]
