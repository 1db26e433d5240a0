"""Attention: the local kernels one rank runs (:func:`local_attention`; flash-attn, torch SDPA, math) and the
distributed attention kinds over them (Ulysses, LSS, ring, hybrid), listed in one registry (:mod:`.registry`)."""

from lightning_seqpar.attention.hybrid import HybridAttention, build_hybrid_groups, hybrid_attention
from lightning_seqpar.attention.local import (
    BACKENDS,
    AttentionBackend,
    BackendUnavailableError,
    local_attention,
    math_attention,
    resolve_backend,
)
from lightning_seqpar.attention.lss import LSSAttention, lss_attention
from lightning_seqpar.attention.registry import (
    AttentionGroups,
    AttentionKind,
    UnknownAttentionKindError,
    attention_kind_names,
    check_attention_choice,
    choose_attention,
    get_attention_kind,
    register_attention_kind,
    unregister_attention_kind,
)
from lightning_seqpar.attention.ring import RING_BACKENDS, RingAttention, ring_attention
from lightning_seqpar.attention.ulysses import UlyssesAttention, ulysses_attention

__all__ = [
    "BACKENDS",
    "RING_BACKENDS",
    "AttentionBackend",
    "AttentionGroups",
    "AttentionKind",
    "BackendUnavailableError",
    "HybridAttention",
    "LSSAttention",
    "RingAttention",
    "UlyssesAttention",
    "UnknownAttentionKindError",
    "attention_kind_names",
    "build_hybrid_groups",
    "check_attention_choice",
    "choose_attention",
    "get_attention_kind",
    "hybrid_attention",
    "local_attention",
    "lss_attention",
    "math_attention",
    "register_attention_kind",
    "resolve_backend",
    "ring_attention",
    "ulysses_attention",
    "unregister_attention_kind",
]
