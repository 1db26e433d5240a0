"""Attention kernels: the single-device choice (:func:`local_attention`) and the distributed wrappers (Ulysses, LSS)."""

from lightning_seqpar.attention.local import (
    AttentionBackend,
    BackendUnavailableError,
    local_attention,
    math_attention,
    resolve_backend,
)
from lightning_seqpar.attention.lss import LSSAttention, lss_attention
from lightning_seqpar.attention.ulysses import UlyssesAttention, ulysses_attention

__all__ = [
    "AttentionBackend",
    "BackendUnavailableError",
    "LSSAttention",
    "UlyssesAttention",
    "local_attention",
    "lss_attention",
    "math_attention",
    "resolve_backend",
    "ulysses_attention",
]
