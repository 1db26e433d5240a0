"""The workloads the benchmark scripts share: their sizes, the model FLOPs they count, and the models with their
random data (the generic ViT and ClimaX), plus the SDPA kernel choice of a plain model.

Model FLOPs per training step (recomputation not counted): 3 x forward, forward per block =
24 L D^2 (qkv 6 L D^2, proj 2 L D^2, MLP 16 L D^2) + 4 L^2 D (Q K^T and P V). ClimaX adds its embedding and
head (see :func:`climax_flops`). ``bench_single_gpu.py``, ``bench_multi_gpu.py``, ``bench_pipeline.py``,
``bench_peers.py`` and ``profile_step.py`` import it from this folder.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from lightning_seqpar.weather.models.layers import Block  # noqa: E402

K = 1024
OUT_DIM = 16  # regression target per token (a 4 x 4 patch), so input and target stay small next to [L, D]


# ---------------------------------------------------------------------------------------------------------
# Sizes and FLOPs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    width: int = 1024
    depth: int = 8
    heads: int = 16
    variables: int = 48
    speed_lengths: tuple[int, ...] = (16 * K, 64 * K)
    math_length: int = 4 * K
    ladder_lengths: tuple[int, ...] = (32 * K, 64 * K)
    largest_lengths: tuple[int, ...] = (128 * K, 256 * K, 512 * K, 1024 * K)
    climax_largest: tuple[int, ...] = (16 * K, 32 * K, 64 * K, 128 * K, 256 * K)
    warmup: int = 2
    timed: int = 10
    mlp_chunks: int = 16

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            width=64,
            depth=2,
            heads=4,
            variables=3,
            speed_lengths=(256, 512),
            math_length=128,
            ladder_lengths=(256, 512),
            largest_lengths=(256, 512, 1024, 2048),
            climax_largest=(256, 512),
            warmup=1,
            timed=2,
            mlp_chunks=4,
        )


def vit_flops(length: int, width: int, depth: int) -> float:
    """Model FLOPs of one training step of the block stack: 3 x depth x (24 L D^2 + 4 L^2 D)."""
    return 3.0 * depth * (24.0 * length * width**2 + 4.0 * length**2 * width)


def climax_flops(length: int, width: int, depth: int, variables: int, patch: int = 2, decoder_depth: int = 2) -> float:
    """Blocks as :func:`vit_flops`, plus per-variable patch embedding (2 V L p^2 D), variable aggregation
    (key/value projection 4 V L D^2, output projection 2 L D^2, attention over variables 4 V L D) and the head
    (decoder_depth x 2 L D^2 + 2 L D V p^2); training = 3 x forward."""
    L, D, V, p2 = length, width, variables, patch * patch
    extra = (
        2 * V * L * p2 * D
        + 4 * V * L * D**2
        + 2 * L * D**2
        + 4 * V * L * D
        + decoder_depth * 2 * L * D**2
        + 2 * L * D * V * p2
    )
    return vit_flops(length, width, depth) + 3.0 * extra


# ---------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------


class GenericViT(nn.Module):
    """``depth`` pre-norm blocks (LayerNorm, fused qkv / proj, 4x GELU MLP) on token embeddings [B, L, D], then a
    LayerNorm and a linear head to ``OUT_DIM`` values per token."""

    def __init__(self, width: int, depth: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.blocks = nn.ModuleList(Block(width, heads, 4.0, **factory) for _ in range(depth))
        self.norm = nn.LayerNorm(width, **factory)
        self.head = nn.Linear(width, OUT_DIM, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, OUT_DIM]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def climax_grid(length: int) -> tuple[int, int]:
    """A patch grid h x w = length with h <= w, both powers of two when length is."""
    h = 2 ** (int(math.log2(length)) // 2)
    while length % h:
        h //= 2
    return h, length // h


def build(kind: str, sizes: Sizes, length: int, device: torch.device, dtype=None):
    """(model, inputs tuple, target) with random data; the seed fixes the weights."""
    torch.manual_seed(0)
    if kind == "vit":
        model = GenericViT(sizes.width, sizes.depth, sizes.heads, device=device, dtype=dtype)
        x = torch.randn(1, length, sizes.width, device=device, dtype=dtype or torch.float32)  # [B, L, D]
        y = torch.randn(1, length, OUT_DIM, device=device)
        return model, (x,), y
    from lightning_seqpar.weather.models.climax import ClimaX

    names = [f"var{i}" for i in range(sizes.variables)]
    h, w = climax_grid(length)
    aggregation = {"aggregation": "hierarchical", "aggregation_group_size": sizes.aggregation_group_size} if getattr(
        sizes, "climax_aggregation", "flat") == "hierarchical" else {}
    model = ClimaX(names, (2 * h, 2 * w), patch_size=2, embed_dim=sizes.width, depth=sizes.depth,
                   num_heads=sizes.heads, drop_path=0.0, device=device, dtype=dtype, **aggregation)
    x = torch.randn(1, len(names), 2 * h, 2 * w, device=device)  # [B, V, Hg, Wg]
    lead = torch.full((1,), 72.0, device=device)
    y = torch.randn(1, len(names), 2 * h, 2 * w, device=device)
    return model, (x, lead, names, names), y


def sdpa_context(backend: str):
    """The SDPA kernel choice of the plain model, matching local_attention's backends."""
    names = {
        "sdpa_cudnn": "CUDNN_ATTENTION",
        "sdpa_flash": "FLASH_ATTENTION",
        "sdpa_efficient": "EFFICIENT_ATTENTION",
        "math": "MATH",
    }
    if backend not in names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, names[backend])])

