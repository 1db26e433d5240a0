"""Transformer building blocks (timm-shaped attention, MLP, drop-path, pre-norm block) and sin-cos tables.

Letters in shape comments: B batch, L tokens, H heads, d head dim, D width.

`Attention` deliberately has the attribute layout of `timm.layers.Attention` (fused `qkv`, `num_heads`,
`head_dim`, `scale`, `q_norm`, `k_norm`, `attn_drop`, `norm`, `proj`, `proj_drop`) so that a
sequence-parallel strategy can swap it for a distributed attention that reuses its weights, without
timm being installed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "sincos_1d",
    "sincos_2d",
    "trunc_normal_init",
]


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """ViT default init for one module: truncated-normal Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        module.reset_parameters()


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Sin-cos table [N, dim] for N positions (MAE / ClimaX convention: sines first, then cosines).

    Raises:
        ValueError: when ``dim`` is odd.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.einsum("n,k->nk", positions.reshape(-1).astype(np.float64), omega)  # [N, dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """2-D sin-cos table [grid_h * grid_w, dim], row-major over the patch grid; half the width per axis.

    Raises:
        ValueError: when ``dim`` is not divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")  # [h, w] each
    return np.concatenate([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], axis=1)


class Attention(nn.Module):
    """Multi-head self-attention over tokens with a fused qkv projection, computed by torch SDPA.

    Raises:
        ValueError: when ``dim`` is not divisible by ``num_heads``.
    """

    fused_attn: bool = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention width {dim} is not divisible by num_heads={num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``[B, L, D]`` -> ``[B, L, D]``: multi-head self-attention through SDPA, ``attn_mask`` passed to it."""
        B, L, D = x.shape
        # [B, L, 3D] -> [3, B, H, L, d]
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )  # [B, H, L, d]
        # [B, H, L, d] -> [B, L, H d] (H d = D, or D / tp)
        x = x.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Two-layer GELU MLP applied to every token independently."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **factory)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, **factory)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D]`` -> ``[..., D]``: fc1 to ``hidden_dim``, GELU, dropout, fc2 back to ``D``, dropout."""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples with probability `drop_prob`.

    The mask has shape [B, 1, 1] and is drawn from the default generator, so under sequence parallelism the
    ranks that hold the tokens of one sample draw the same mask only if their RNG states agree.

    Raises:
        ValueError: when ``drop_prob`` is not in [0, 1).
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...]`` -> ``[B, ...]``: in training, each sample zeroed with ``drop_prob`` and the rest scaled by
        ``1 / (1 - drop_prob)``; the identity in evaluation."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """``drop_prob=<p>`` in the module's printout."""
        return f"drop_prob={self.drop_prob:g}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.attn = Attention(dim, num_heads, qkv_bias=True, proj_drop=drop, **factory)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.mlp = Mlp(dim, int(math.ceil(dim * mlp_ratio)), drop=drop, **factory)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, L, D]`` -> ``[B, L, D]``: ``x + attn(norm1(x))``, then ``+ mlp(norm2(x))``."""
        x = x + self.drop_path1(self.attn(self.norm1(x)))  # [B, L, D]
        return x + self.drop_path2(self.mlp(self.norm2(x)))
