"""Tensor-parallel styles the torch ones lack: fused projections split by head, and ``nn.MultiheadAttention``.

Letters: B batch, L tokens (L_r under sequence parallelism), H heads, H_t = H / tp heads per tensor-parallel rank,
d head dim, D width (= H d), c fused chunks (3 for qkv, 2 for a SwiGLU gate/value pair), T = tp.

A fused projection stores c projections one after another, ``weight = [W_0; W_1; ..; W_{c-1}]`` of shape
``[c D, D_in]`` (timm's ``qkv``: ``[q; k; v]``, each head-major ``[H, d]``). ``ColwiseParallel`` would give rank 0
the first ``c D / T`` rows (with c = 3, T = 2: all of q and half of k), so :class:`FusedColwiseParallel` first
reorders the rows so that each rank's contiguous block holds its slice of every chunk::

    original  [q_0 q_1 | k_0 k_1 | v_0 v_1]     (q_r = the rows of rank r's heads)
    permuted  [q_0 k_0 v_0 | q_1 k_1 v_1]       -> Shard(0): rank r holds [q_r k_r v_r] = its H_t heads of q, k, v

and the module's own forward (``qkv(x).reshape(B, L, 3, H_t, d)``) reads its heads' q, k and v. State-dict hooks
convert back, so checkpoints hold the original single-device layout and load at any tensor-parallel size
(Megatron-LM splits its fused ``query_key_value`` the same way, by giving it a head-major layout).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

log = logging.getLogger(__name__)

ROW_LAYOUT_ATTRIBUTE = "_seqpar_row_layout"
"""Set on a module whose parameters were reordered: ``{parameter name: permutation}`` with
``parameter[i] = original[permutation[i]]`` along dim 0 (read by :mod:`lightning_seqpar.fsdp` for optimizer state)."""


class TensorParallelError(ValueError):
    """Raised when a model cannot be split over the tensor-parallel ranks as asked."""


def fused_row_permutation(rows: int, chunks: int, tensor_parallel_size: int) -> Tensor:
    """Row order ``[chunk 0 of rank 0, .., chunk c-1 of rank 0, chunk 0 of rank 1, ..]`` of a fused ``[c D, ..]``
    tensor.

    Returns ``perm`` (int64, ``[c D]``) with ``permuted = original[perm]``; ``original = permuted[argsort(perm)]``.

    Raises:
        TensorParallelError: ``rows`` is not ``chunks`` times a multiple of ``tensor_parallel_size``.
    """
    if rows % (chunks * tensor_parallel_size):
        raise TensorParallelError(
            f"a fused projection of {rows} rows in {chunks} chunks cannot be split over tensor_parallel_size="
            f"{tensor_parallel_size}: each chunk's {rows // chunks} rows must divide by it."
        )
    per_rank = rows // chunks // tensor_parallel_size
    index = torch.arange(rows).view(chunks, tensor_parallel_size, per_rank)  # [c, T, D/T]
    return index.transpose(0, 1).reshape(rows)  # [T, c, D/T] -> rank-major


def reorder_rows(t: Tensor, index: Tensor, like: Tensor | None = None) -> Tensor:
    """``t[index]`` along dim 0 for a plain tensor or a DTensor, laid out like ``like`` (or, for a DTensor ``t``,
    ``Shard(0)`` over each dimension of its mesh).

    A DTensor is gathered whole first (one layer at a time, in state-dict hooks): a row permutation that mixes the
    ranks' rows is no placement DTensor can express, so it cannot be done shard by shard.
    """
    with torch.no_grad():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        out = full[index.to(full.device)]
        target = like if like is not None else t
        if not isinstance(target, DTensor):
            return out
        mesh = target.device_mesh
        placements = target.placements if like is not None else [Shard(0)] * mesh.ndim
        return distribute_tensor(out.to(target.device), mesh, placements, src_data_rank=None)


def register_row_layout(module: nn.Module, names: tuple[str, ...], permutation: Tensor) -> None:
    """Record that ``module``'s parameters ``names`` are stored with rows ``original[permutation]``, and convert in
    its state dict: ``state_dict()`` returns the original rows, ``load_state_dict`` takes them (any tensor-parallel
    size, plain tensors or DTensors) and reorders them into the parameters' current layout."""
    inverse = torch.argsort(permutation)
    setattr(module, ROW_LAYOUT_ATTRIBUTE, {name: permutation for name in names})

    def to_original(mod, state_dict, prefix, local_metadata):
        for name in names:
            key = prefix + name
            if key in state_dict and state_dict[key] is not None:
                state_dict[key] = reorder_rows(state_dict[key], inverse)

    def from_original(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in names:
            key = prefix + name
            if key in state_dict and state_dict[key] is not None:
                state_dict[key] = reorder_rows(state_dict[key], permutation, like=getattr(mod, name))

    module.register_state_dict_post_hook(to_original)
    module.register_load_state_dict_pre_hook(from_original)


class FusedColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` for a Linear that computes ``chunks`` projections at once (timm ``qkv``: 3), split so that
    every rank holds its heads' rows of each chunk (see the module docstring). Input: replicated ``[B, L, D_in]``;
    output: this rank's ``[B, L, c D / T]`` as ``[chunk 0 | .. | chunk c-1]`` of its heads (a plain tensor).

    Args:
        chunks: How many projections the weight stacks along dim 0.
        **kwargs: Those of ``ColwiseParallel`` (``input_layouts``, ``output_layouts``, ``use_local_output``).
    """

    def __init__(self, chunks: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunks = chunks

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        names = tuple(n for n, _ in module.named_parameters(recurse=False))
        permutation = fused_row_permutation(module.weight.shape[0], self.chunks, device_mesh.size())
        for pname in names:
            param = getattr(module, pname)
            permuted = distribute_tensor(param.detach()[permutation.to(param.device)], device_mesh, [Shard(0)],
                                         src_data_rank=self.src_data_rank)
            module.register_parameter(pname, nn.Parameter(permuted, requires_grad=param.requires_grad))
        register_row_layout(module, names, permutation)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TensorParallelError(f"FusedColwiseParallel needs an nn.Linear, got {type(module).__name__}.")
        return super()._apply(module, device_mesh)

    def __repr__(self) -> str:
        return f"FusedColwiseParallel(chunks={self.chunks})"


_warned_need_weights = False


class MultiheadAttentionParallel(ParallelStyle):
    """Tensor parallelism of ``nn.MultiheadAttention`` (self-attention, ``kdim = vdim = embed_dim``): the fused
    ``in_proj_weight [3D, D]`` split by head as in :class:`FusedColwiseParallel`, ``out_proj`` row-wise, and a
    forward that runs this rank's ``H_t`` heads through ``F.scaled_dot_product_attention`` (which the
    sequence-parallel interception makes distributed). torch's ``multi_head_attention_forward`` cannot run on a
    column shard (it takes the head width from the full input width), hence this forward; it supports what the
    sequence-parallel path supports: no masks (``is_causal=True`` honoured), no ``add_bias_kv``/``add_zero_attn``,
    ``need_weights`` ignored (``None`` returned, with a warning once).

    Args:
        tokens: Under Megatron-LM sequence parallelism (:mod:`lightning_seqpar.tensor_parallel.sequence`), the
            :class:`~lightning_seqpar.tensor_parallel.sequence.TokenCount` of the block stack: the input is then this
            rank's ``[B, L_r/T, D]`` (all-gathered before the projection) and the output is reduce-scattered back to
            it. Needs ``batch_first=True``.
    """

    def __init__(self, tokens: Any = None) -> None:
        super().__init__()
        self.tokens = tokens

    def __repr__(self) -> str:
        return "MultiheadAttentionParallel(" + ("input and output sharded over tokens)" if self.tokens else ")")

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.MultiheadAttention):
            raise TensorParallelError(
                f"MultiheadAttentionParallel needs an nn.MultiheadAttention, got {type(module).__name__}."
            )
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            raise TensorParallelError(
                "nn.MultiheadAttention with kdim/vdim != embed_dim, add_bias_kv or add_zero_attn is not supported"
                " under tensor parallelism; leave it out of the tp_plan."
            )
        tp = device_mesh.size()
        permutation = fused_row_permutation(3 * module.embed_dim, 3, tp)
        names = tuple(n for n in ("in_proj_weight", "in_proj_bias") if getattr(module, n) is not None)
        for name in names:
            param = getattr(module, name)
            permuted = distribute_tensor(param.detach()[permutation.to(param.device)], device_mesh, [Shard(0)])
            module.register_parameter(name, nn.Parameter(permuted, requires_grad=param.requires_grad))
        if self.tokens is not None and not module.batch_first:
            raise TensorParallelError(
                "nn.MultiheadAttention(batch_first=False) cannot have its tokens sharded over tp (tokens are"
                " dimension 0): build it with batch_first=True, or use tp_sequence_parallel=False."
            )
        register_row_layout(module, names, permutation)
        rowwise = RowwiseParallel() if self.tokens is None else RowwiseParallel(output_layouts=Shard(1))
        parallelize_module(module.out_proj, device_mesh, rowwise)
        module.num_heads //= tp
        tokens = self.tokens
        module.forward = lambda *args, **kwargs: _multihead_attention_forward(
            module, device_mesh, tokens, *args, **kwargs)
        return module


def _multihead_attention_forward(
    module: nn.MultiheadAttention,
    mesh: DeviceMesh,
    tokens: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, None]:
    global _warned_need_weights
    if key_padding_mask is not None or (attn_mask is not None and not is_causal):
        raise TensorParallelError(
            "a tensor-parallel nn.MultiheadAttention was called with key_padding_mask/attn_mask, which it does not"
            " support; use is_causal=True for causal masking, or leave this module out of the tp_plan."
        )
    if not (query is key and key is value):
        raise TensorParallelError(
            "a tensor-parallel nn.MultiheadAttention supports self-attention only (query is key is value)."
        )
    if need_weights and not _warned_need_weights:
        log.warning(
            "tensor-parallel nn.MultiheadAttention: need_weights=True is ignored (the weights returned are None)."
        )
        _warned_need_weights = True
    x = query if module.batch_first else query.transpose(0, 1)  # [B, L, D], or [B, L_r/T, D] with tokens
    if tokens is None:
        replicated = DTensor.from_local(x, mesh, [Replicate()], run_check=False)  # backward all-reduces dx over tp
    else:  # all-gather the tokens over tp; backward reduce-scatters dx
        replicated = tokens.gathered(x, mesh, "nn.MultiheadAttention")
    B, L, _ = replicated.shape
    H_t, d = module.num_heads, module.head_dim
    qkv = F.linear(replicated, module.in_proj_weight, module.in_proj_bias).to_local()  # [B, L, 3 H_t d] as [q|k|v]
    q, k, v = qkv.view(B, L, 3, H_t, d).permute(2, 0, 3, 1, 4)  # [3, B, H_t, L, d]
    out = F.scaled_dot_product_attention(
        q, k, v, dropout_p=module.dropout if module.training else 0.0, is_causal=is_causal
    )
    # row-parallel: all-reduce -> [B, L, D], or reduce-scatter -> [B, L_r/T, D] with tokens
    out = module.out_proj(out.transpose(1, 2).reshape(B, L, H_t * d))
    return (out if module.batch_first else out.transpose(0, 1)), None
