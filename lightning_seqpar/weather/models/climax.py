"""ClimaX-style weather ViT (arXiv 2301.10343): per-variable tokens, variable aggregation, ViT blocks, pixel head.

Letters in shape comments: B batch, V variables present, V_all default variables, V_out output variables,
H x W grid (``Hg x Wg`` where it would clash with heads), p patch size, L tokens = ceil(Hg/p) * ceil(Wg/p),
L_r this rank's tokens under sequence parallelism (L_r = L on one device), H heads, d head dim, D width.

The model is plain single-device PyTorch. `ClimaX.sequence_parallel_plan` tells a sequence-parallel strategy
where the token dimension is sharded (right after the pixels are cut into patches), which parameter is indexed
by token (`pos_embed`), which modules attend across tokens (`blocks.*.attn`) and where the tokens are gathered
again (after the prediction head). Everything in between is token-local; docs/model.md explains the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_seqpar.weather.models.aggregation import HierarchicalAggregation, PartialKind, VariableAggregation
from lightning_seqpar.weather.models.layers import Block, sincos_1d, sincos_2d, trunc_normal_init

__all__ = ["ClimaX", "Patchify", "VariableAggregation", "VariableTokenEmbed"]

LEAD_TIME_SCALE_HOURS = 100.0
"""Lead times enter the lead-time embedding as hours / 100, so a 6 h to 10 day range maps to about 0.06 to 2.4."""


class Patchify(nn.Module):
    """Cuts every variable's field into non-overlapping p x p patches, padding the grid when p does not divide it.

    Grids that are not a multiple of p (0.25 deg is 721 x 1440) are padded at the bottom and on the right by
    replicating the last row / column (values stay in the data's range, unlike zeros, which would be the
    climatological mean after normalisation); `ClimaX.unpatchify` crops the padding away again.
    """

    def __init__(self, img_size: tuple[int, int], patch_size: int) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.patch_size = patch_size
        self.grid_size = (-(-self.img_size[0] // patch_size), -(-self.img_size[1] // patch_size))  # ceil
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: Tensor) -> Tensor:
        B, V, Hg, Wg = x.shape
        if (Hg, Wg) != self.img_size:
            raise ValueError(f"ClimaX was built for a {self.img_size} grid but got input of shape {tuple(x.shape)}")
        p = self.patch_size
        (h, w) = self.grid_size
        pad_h, pad_w = h * p - Hg, w * p - Wg
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")  # [B, V, h*p, w*p]
        x = x.reshape(B, V, h, p, w, p).permute(0, 1, 2, 4, 3, 5)  # [B, V, h, w, p, p]
        return x.reshape(B, V, h * w, p * p)  # [B, V, L, p*p]

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, grid_size={self.grid_size}"


class VariableTokenEmbed(nn.Module):
    """One linear patch embedding per variable (a p x p stride-p conv per variable), batched as one einsum.

    The weights of all default variables live in one [V_all, p*p, D] tensor, so 48 variables cost one batched
    matmul instead of 48 small convolutions; the variables present are picked by index.
    """

    def __init__(
        self,
        num_variables: int,
        patch_size: int,
        embed_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_variables, patch_size * patch_size, embed_dim, **factory))
        self.bias = nn.Parameter(torch.empty(num_variables, embed_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, patches: Tensor, var_ids: Tensor) -> Tensor:
        weight = self.weight[var_ids]  # [V, p*p, D]
        tokens = torch.einsum("bvlk,vkd->bvld", patches.to(weight.dtype), weight)  # [B, V, L_r, D]
        return tokens + self.bias[var_ids].unsqueeze(1)  # + [V, 1, D]


class ClimaX(nn.Module):
    """ClimaX-style forecasting ViT over any subset of `default_variables` on a fixed grid.

    Args:
        default_variables: names of every variable the model knows; each gets its own patch embedding, variable
            embedding and output channels. Inputs and outputs name a subset of them at call time.
        img_size: grid (latitudes, longitudes) of the inputs, e.g. (32, 64) at 5.625 deg or (721, 1440) at 0.25
            deg. Grids not divisible by `patch_size` are padded (see `Patchify`).
        patch_size: side p of the square patches; one token per patch.
        embed_dim: token width D; divisible by 4 (2-D sin-cos table) and by `num_heads`.
        depth: number of transformer blocks.
        decoder_depth: number of Linear(D, D) + GELU layers in the prediction head before its output layer.
        num_heads: attention heads in the blocks and in the variable aggregation.
        mlp_ratio: MLP hidden width as a multiple of D.
        drop_path: stochastic-depth rate of the last block (linearly increasing from 0 over the blocks).
        drop_rate: dropout after the embeddings and inside attention projection / MLP.
        aggregation_chunk_tokens: aggregate the variables of at most this many tokens at a time (recomputed in
            backward), which bounds the [B, V, L, D] key/value projection; None aggregates all tokens at once.
        aggregation: ``"flat"`` (ClimaX: one cross-attention over all V variable tokens of a patch) or
            ``"hierarchical"`` (D-CHAG, arXiv 2506.21411: partial aggregation of groups of
            `aggregation_group_size` variables, each group tokenised and aggregated on its own and recomputed in
            backward, then a cross-attention over the groups; see `HierarchicalAggregation`). Only the
            hierarchical form can be split across ranks by channel (`set_channel_parallel`).
        aggregation_group_size: variables per group of the hierarchical aggregation.
        partial_aggregation: ``"cross_attention"`` or ``"linear"``, the per-group aggregation of the hierarchical form.
        device: where the parameters are created (use "meta" to build without memory, then `to_empty` and
            `init_weights`).
        dtype: parameter dtype.

    Attributes:
        config: the constructor arguments above except ``device`` and ``dtype``, as plain lists and numbers;
            ``ClimaX(**model.config)`` builds the same architecture (a ForecastModule checkpoint stores it).
    """

    def __init__(
        self,
        default_variables: Sequence[str],
        img_size: tuple[int, int],
        patch_size: int = 2,
        embed_dim: int = 1024,
        depth: int = 8,
        decoder_depth: int = 2,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        drop_rate: float = 0.0,
        aggregation_chunk_tokens: int | None = 16384,
        aggregation: Literal["flat", "hierarchical"] = "flat",
        aggregation_group_size: int = 8,
        partial_aggregation: PartialKind = "cross_attention",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = {  # the constructor's arguments (not device/dtype): what a checkpoint needs to rebuild the model
            "default_variables": [str(v) for v in default_variables], "img_size": [int(img_size[0]), int(img_size[1])],
            "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "decoder_depth": decoder_depth,
            "num_heads": num_heads, "mlp_ratio": mlp_ratio, "drop_path": drop_path, "drop_rate": drop_rate,
            "aggregation_chunk_tokens": aggregation_chunk_tokens,
        }
        if aggregation != "flat":  # flat configurations stay exactly as before (and load into older versions)
            self.config.update(aggregation=aggregation, aggregation_group_size=aggregation_group_size,
                               partial_aggregation=partial_aggregation)
        self.default_variables = list(default_variables)
        if not self.default_variables:
            raise ValueError("ClimaX needs at least one default variable")
        if len(set(self.default_variables)) != len(self.default_variables):
            raise ValueError(f"default_variables has duplicates: {self.default_variables}")
        if embed_dim % 4 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by 4 and by num_heads={num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.var_index = {name: i for i, name in enumerate(self.default_variables)}
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        num_vars = len(self.default_variables)

        self.patchify = Patchify(self.img_size, patch_size)
        self.token_embed = VariableTokenEmbed(num_vars, patch_size, embed_dim, **factory)
        self.var_embed = nn.Parameter(torch.empty(1, num_vars, embed_dim, **factory))  # [1, V_all, D]
        self.aggregation = aggregation
        self.var_agg: nn.Module
        if aggregation == "flat":
            self.var_agg = VariableAggregation(embed_dim, num_heads, chunk_tokens=aggregation_chunk_tokens, **factory)
        elif aggregation == "hierarchical":
            self.var_agg = HierarchicalAggregation(
                embed_dim,
                num_heads,
                aggregation_group_size,
                partial_aggregation,
                chunk_tokens=aggregation_chunk_tokens,
                **factory,
            )
        else:
            raise ValueError(f"aggregation must be 'flat' or 'hierarchical', got {aggregation!r}")
        self.pos_embed = nn.Parameter(torch.empty(1, self.patchify.num_patches, embed_dim, **factory))  # [1, L, D]
        self.lead_time_embed = nn.Linear(1, embed_dim, **factory)
        self.pos_drop = nn.Dropout(drop_rate)

        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, drop=drop_rate, drop_path=r, **factory) for r in rates]
        )
        self.norm = nn.LayerNorm(embed_dim, **factory)
        head: list[nn.Module] = []
        for _ in range(decoder_depth):
            head += [nn.Linear(embed_dim, embed_dim, **factory), nn.GELU()]
        head.append(nn.Linear(embed_dim, num_vars * patch_size * patch_size, **factory))
        self.head = nn.Sequential(*head)
        self._var_id_cache: dict[tuple[tuple[str, ...], torch.device], Tensor] = {}
        self.init_weights()

    @property
    def num_patches(self) -> int:
        """Number of tokens L of one sample."""
        return self.patchify.num_patches

    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after `to_empty` when the model was built on the meta device."""
        self.apply(trunc_normal_init)
        self.token_embed.reset_parameters()
        self.var_agg.reset_parameters()
        h, w = self.patchify.grid_size
        with torch.no_grad():
            pos = sincos_2d(self.embed_dim, h, w)  # [L, D]
            self.pos_embed.copy_(torch.from_numpy(pos).to(self.pos_embed.dtype).unsqueeze(0))
            var = sincos_1d(self.embed_dim, np.arange(len(self.default_variables)))  # [V_all, D]
            self.var_embed.copy_(torch.from_numpy(var).to(self.var_embed.dtype).unsqueeze(0))

    def no_weight_decay(self) -> set[str]:
        """Parameters that are embeddings or biases and so take no weight decay (timm convention; 1-D ones are
        implied)."""
        queries = {"var_agg.query"} if self.aggregation == "flat" else {"var_agg.partial.query", "var_agg.final.query"}
        return {"pos_embed", "var_embed", "token_embed.bias", *queries}

    def set_channel_parallel(self, group: ProcessGroup | None) -> None:
        """Split the variable groups of the hierarchical aggregation across the ranks of ``group`` (None: undo).

        Each rank then tokenises and partially aggregates only its share of the variable groups and one all-gather
        brings the partial aggregates together before the final cross-attention (D-CHAG, arXiv 2506.21411). The
        ranks of ``group`` must hold the same samples. When ``group`` is also the sequence-parallel group,
        `sequence_parallel_plan` moves the token shard from after `patchify` to after `var_agg`, so that every
        rank aggregates its channels of all L tokens before the tokens are split; docs/model.md says when this pays.

        Raises:
            ValueError: the model was built with ``aggregation="flat"``.
        """
        if not isinstance(self.var_agg, HierarchicalAggregation):
            raise ValueError("channel parallelism needs ClimaX(aggregation='hierarchical'); this model aggregates flat")
        self.var_agg.set_channel_group(group)

    def sequence_parallel_plan(self) -> dict[str, str]:
        """Where a sequence-parallel strategy shards, swaps and gathers; paths are relative to this module.

        - `patchify` output [B, V, L, p*p] is split along L: the per-variable embedding, variable aggregation,
          position and lead-time embeddings then run on L_r tokens, and the [B, V, L, D] token tensor (the
          largest activation of the model) is never built whole on any rank.
        - `pos_embed` [1, L, D] is sliced to the rank's tokens while `ClimaX.forward` runs.
        - `blocks.*.attn` are the only modules that mix tokens.
        - `head` output [B, L_r, V_all*p*p] is gathered along L: the final norm and the head stay token-local
          and split across ranks, and for the usual V_all*p*p <= D the gathered tensor is smaller than [B, L, D].

        Under channel parallelism (`set_channel_parallel`) the shard point is `var_agg`'s output [B, L, D] instead:
        the ranks split the variables, not the tokens, until the aggregation is done.
        """
        channel_parallel = getattr(self.var_agg, "channel_group", None) is not None
        return {
            **({"var_agg": "shard_output:1"} if channel_parallel else {"patchify": "shard_output:2"}),
            "pos_embed": "sequence_parameter:1",
            "blocks.*.attn": "attention",
            "head": "gather_output:1",
        }

    def variable_ids(self, variables: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """Indices into `default_variables` of the named variables, as an int64 tensor on `device`."""
        device = torch.device(device if device is not None else self.var_embed.device)
        key = (tuple(variables), device)
        if key not in self._var_id_cache:
            unknown = [v for v in variables if v not in self.var_index]
            if unknown:
                raise KeyError(f"ClimaX does not know variables {unknown}; default_variables={self.default_variables}")
            ids = [self.var_index[v] for v in variables]
            self._var_id_cache[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._var_id_cache[key]

    def tokenize(self, patches: Tensor, var_ids: Tensor) -> Tensor:
        """Per-variable tokens with their variable embedding: [B, V, L_r, p*p] -> [B, V, L_r, D]."""
        tokens = self.token_embed(patches, var_ids)  # [B, V, L_r, D]
        return tokens + self.var_embed[:, var_ids].unsqueeze(2)  # + [1, V, 1, D]

    def embed(self, patches: Tensor, var_ids: Tensor, lead_time_hours: Tensor) -> Tensor:
        """Token-local embedding of (this rank's) patches: [B, V, L_r, p*p] -> [B, L_r, D]."""
        if isinstance(self.var_agg, HierarchicalAggregation):
            x = self.var_agg(patches, var_ids, self.tokenize)  # [B, L_r, D], one variable group at a time
        else:
            x = self.var_agg(self.tokenize(patches, var_ids))  # [B, V, L_r, D] -> [B, L_r, D]
        pos_embed = self.pos_embed  # [1, L_r, D]: a sequence-parallel strategy slices it to this rank's tokens
        if pos_embed.shape[1] != x.shape[1]:
            raise RuntimeError(
                f"pos_embed has {pos_embed.shape[1]} tokens but this rank holds {x.shape[1]}: a sequence-parallel "
                "strategy must slice `pos_embed` as `sequence_parallel_plan()` says"
            )
        lead = lead_time_hours.to(x.dtype).unsqueeze(-1) / LEAD_TIME_SCALE_HOURS  # [B, 1]
        x = x + pos_embed + self.lead_time_embed(lead).unsqueeze(1)  # + [B, 1, D]
        return self.pos_drop(x)

    def unpatchify(self, pred: Tensor, out_ids: Tensor) -> Tensor:
        """Per-token pixel predictions back to fields, keeping `out_ids`: [B, L, V_all*p*p] -> [B, V_out, Hg, Wg]."""
        B = pred.shape[0]
        p = self.patch_size
        h, w = self.patchify.grid_size
        pred = pred.reshape(B, h, w, len(self.default_variables), p, p)[:, :, :, out_ids]  # [B, h, w, V_out, p, p]
        pred = pred.permute(0, 3, 1, 4, 2, 5).reshape(B, len(out_ids), h * p, w * p)  # [B, V_out, h*p, w*p]
        return pred[..., : self.img_size[0], : self.img_size[1]]  # crop the padding

    def forward(
        self,
        x: Tensor,
        lead_time_hours: Tensor,
        variables: Sequence[str],
        out_variables: Sequence[str],
    ) -> Tensor:
        """Forecast `out_variables` at `lead_time_hours` ahead: x [B, V, Hg, Wg], lead [B] -> [B, V_out, Hg, Wg]."""
        if x.ndim != 4 or x.shape[1] != len(variables):
            raise ValueError(
                f"expected input [B, V={len(variables)}, H, W] for variables {list(variables)}, got {tuple(x.shape)}"
            )
        var_ids = self.variable_ids(variables, x.device)
        out_ids = self.variable_ids(out_variables, x.device)
        patches = self.patchify(x)  # [B, V, L, p*p]; sequence-parallel: sharded to [B, V, L_r, p*p] here
        x = self.embed(patches, var_ids, lead_time_hours)  # [B, L_r, D]
        for block in self.blocks:
            x = block(x)  # [B, L_r, D]; only block.attn sees all L tokens
        pred = self.head(self.norm(x))  # [B, L_r, V_all*p*p]; sequence-parallel: gathered to L here
        return self.unpatchify(pred, out_ids)
