"""Megatron-LM sequence parallelism inside tensor parallelism: the activations between the split projections (the
residual stream, the norms, layer scales and dropouts) sharded over the ``tp`` ranks along the tokens, instead of
replicated (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198,
section 4.2.2; the ``SequenceParallel`` style of ``torch.distributed.tensor.parallel``).

Per block, with T = tp and L_r the tokens this rank's ``sp`` shard holds (all of them when sp = 1)::

    x [B, L_r/T, D] -> norm1 (SequenceParallel) -> all-gather over tp -> qkv (column) -> attention on H/T heads
      -> proj (row) -> reduce-scatter over tp -> [B, L_r/T, D] + x -> norm2 -> all-gather -> fc1 -> fc2
      -> reduce-scatter -> + residual

Each all-reduce of plain tensor parallelism becomes an all-gather and a reduce-scatter of the same total volume,
and every activation outside the projections shrinks T-fold. The first block takes this rank's 1/T of the tokens
it is given (backward: all-gather), the last block all-gathers its output over tp (backward: this rank's slice), so
the model outside the block stack, and the sequence-parallel shard and gather over ``sp``, see the replicated
``[B, L_r, D]`` they see without it.

Token counts need not divide by T: shards follow ``torch.chunk`` (the first ranks one token more, a trailing rank
possibly none), as DTensor's ``Shard(1)`` does. The all-gathers need the whole count L_r, which a rank cannot infer
from its own shard; :class:`TokenCount` carries it from the first block to the column-parallel inputs of the same
forward.

Parameters the split leaves whole inside the blocks (norms, layer scales: every parameter of such a module 1-D)
become ``Replicate`` DTensors of ``SequenceParallel``, whose gradients DTensor sums over the ``tp`` ranks (each
rank saw only its tokens). A block holding another parameter outside the projections (one directly on the block,
as BEiT's ``gamma_1``, or a 2-D one) is refused: it would see only this rank's tokens and nothing would sum its
gradient.

Letters: B batch, L_r tokens of this sp rank, T = tp, D width, H heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel

from lightning_seqpar.tensor_parallel.styles import (
    FusedColwiseParallel,
    MultiheadAttentionParallel,
    TensorParallelError,
)
from lightning_seqpar.wrapping import map_first_tensor_argument, map_first_tensor_output, wrap_forward

TOKEN_DIM = 1


class TokenCount:
    """The token count L_r of the current forward's replicated ``[B, L_r, ..]`` block input, set by the first block
    (:func:`shard_block_stack`) and read by every all-gather of the same forward, which needs it for uneven shards."""

    def __init__(self) -> None:
        self.length: int | None = None

    def sharded(self, local: Tensor, mesh: DeviceMesh, where: str) -> DTensor:
        """``local`` (this rank's ``[B, L_r/T, ..]``, or a DTensor sharded so) as a DTensor ``Shard(1)`` of the whole
        ``[B, L_r, ..]``.

        Raises:
            TensorParallelError: No first block ran in this forward (a split module called outside the block
                stack), or ``local`` is not this rank's share of L_r tokens.
        """
        if isinstance(local, DTensor):  # a user's own SequenceParallel (use_local_output=False) handed it on
            local = local.to_local()
        if self.length is None:
            raise TensorParallelError(
                f"{where} runs with its input sharded over the tokens (tp_sequence_parallel), but the block stack's"
                " first block has not run in this forward; call the split blocks in order, or build the strategy"
                " with tp_sequence_parallel=False (sequence_parallel=False in apply_tensor_parallel)."
            )
        shape = (*local.shape[:TOKEN_DIM], self.length, *local.shape[TOKEN_DIM + 1:])
        expected = _chunk_sizes(self.length, mesh.size())[mesh.get_local_rank()]
        if local.shape[TOKEN_DIM] != expected:
            raise TensorParallelError(
                f"{where} got {local.shape[TOKEN_DIM]} tokens on tensor-parallel rank {mesh.get_local_rank()}, but"
                f" its share of the block stack's {self.length} tokens is {expected}: the blocks changed the token"
                " count, which tp_sequence_parallel does not support; build the strategy with"
                " tp_sequence_parallel=False (sequence_parallel=False in apply_tensor_parallel)."
            )
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, mesh, [Shard(TOKEN_DIM)], run_check=False, shape=torch.Size(shape),
                                  stride=stride)

    def gathered(self, x: Tensor, mesh: DeviceMesh, where: str) -> DTensor:
        """``x`` (this rank's token shard, plain or a ``Shard(1)`` DTensor; see :meth:`sharded`) all-gathered over
        ``tp`` into a ``Replicate`` DTensor of the whole ``[B, L_r, ..]`` with a contiguous local tensor; backward
        reduce-scatters (or slices) its gradient."""
        return _contiguous(self.sharded(x, mesh, where).redistribute(placements=[Replicate()]))


def check_every_rank_holds_tokens(length: int, tensor_parallel_size: int, where: str) -> None:
    """Raise unless ``torch.chunk``'s split of ``length`` tokens over ``tensor_parallel_size`` ranks leaves every rank
    at least one token (DTensor's all-gather of a shard with no tokens waits forever: 1 token over 2 ranks, 9 over 4
    as 3, 3, 3, 0).

    Raises:
        TensorParallelError: Naming the block, the count, the split and what to do.
    """
    sizes = _chunk_sizes(length, tensor_parallel_size)
    if 0 in sizes:
        raise TensorParallelError(
            f"{where} got {length} tokens (on this sequence-parallel rank), which tp_sequence_parallel splits over"
            f" tensor_parallel_size={tensor_parallel_size} as {sizes}: a tensor-parallel rank without tokens cannot"
            f" take part in the token all-gathers. Give the block stack at least {_least_tokens(tensor_parallel_size)}"
            " tokens per sequence-parallel rank, or build the strategy with tp_sequence_parallel=False"
            " (sequence_parallel=False in apply_tensor_parallel; activations replicated over tp, any token count)."
        )


def check_sequence_layout_holds_tokens(lengths: Sequence[int], tensor_parallel_size: int) -> None:
    """Raise unless every sequence-parallel shard of ``lengths`` (the whole layout, the same on every rank) leaves
    each of its ``tensor_parallel_size`` ranks at least one token: checked where the sequence is split over ``sp``,
    so that every rank refuses it, rather than only the ranks whose shard is short while the others wait for them in
    the attention's collectives.

    Raises:
        TensorParallelError: With the sequence length, both splits and the smallest safe length.
    """
    splits = [_chunk_sizes(n, tensor_parallel_size) for n in lengths]
    if any(0 in split for split in splits):
        total, sp = sum(lengths), len(lengths)
        least = _least_tokens(tensor_parallel_size)
        safe = least * sp  # the sp split gives each rank n // sp tokens or one more: the least n with all >= least
        raise TensorParallelError(
            f"the sequence of {total} tokens is split over sequence_parallel_size={sp} as {list(lengths)} and then"
            f" over tensor_parallel_size={tensor_parallel_size} as {splits}: a tensor-parallel rank without tokens"
            f" cannot take part in the token all-gathers. Give the blocks at least {safe} tokens (each sequence-"
            f"parallel rank {least} or more), lower sequence_parallel_size, or build the strategy with"
            " tp_sequence_parallel=False (activations replicated over tp, any token count)."
        )


def _least_tokens(parts: int) -> int:
    """The smallest token count from which on every count leaves no rank of ``parts`` empty."""
    length = parts
    while any(0 in _chunk_sizes(n, parts) for n in range(length, length + parts * parts)):
        length += 1
    return length


def _chunk_sizes(length: int, parts: int) -> list[int]:
    """Tokens per rank of ``Shard``'s split (``torch.chunk``): ``ceil(L / T)`` each until the tokens run out."""
    size = -(-length // parts)
    return [max(0, min(size, length - i * size)) for i in range(parts)]


class _TokenShardedInput:
    """Mixin for column-parallel styles: the input arrives as this rank's token shard ``[B, L_r/T, D_in]`` and is
    all-gathered over ``tp`` (whole ``L_r`` known from :class:`TokenCount`) before the projection; backward
    reduce-scatters its gradient."""

    tokens: TokenCount

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tokens = self.tokens

        def prepare(input_layouts, desired_input_layouts, mod, inputs, mesh):  # ColwiseParallel's hook signature
            return tokens.gathered(inputs[0], mesh, type(mod).__name__)  # (its desired layout is Replicate)

        self._prepare_input_fn = prepare  # read by ColwiseParallel._apply
        return super()._apply(module, device_mesh)  # type: ignore[misc]


class TokenShardedColwiseParallel(_TokenShardedInput, ColwiseParallel):
    """``ColwiseParallel`` whose input is sharded over ``tp`` along the tokens (see :class:`_TokenShardedInput`)."""

    def __init__(self, tokens: TokenCount, **kwargs: Any) -> None:
        super().__init__(input_layouts=Shard(TOKEN_DIM), **kwargs)
        self.tokens = tokens

    def __repr__(self) -> str:
        return "ColwiseParallel(input_layouts=Shard(1))"


class TokenShardedFusedColwiseParallel(_TokenShardedInput, FusedColwiseParallel):
    """:class:`FusedColwiseParallel` whose input is sharded over ``tp`` along the tokens."""

    def __init__(self, tokens: TokenCount, chunks: int = 3, **kwargs: Any) -> None:
        super().__init__(chunks=chunks, input_layouts=Shard(TOKEN_DIM), **kwargs)
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"FusedColwiseParallel(chunks={self.chunks}, input_layouts=Shard(1))"


class ReplicatedSequenceParallel(SequenceParallel):
    """torch's ``SequenceParallel`` (input and output ``[B, L_r/T, ..]`` plain tensors, parameters ``Replicate``
    DTensors whose gradients are summed over ``tp``), with the parameters broadcast from the mesh's first rank
    rather than assumed equal (torch's style assumes ones-initialised norms; layer scales are not)."""

    def __init__(self) -> None:
        super().__init__(sequence_dim=TOKEN_DIM, use_local_output=True)

    def _replicate_module_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for p_name, param in module.named_parameters(recurse=False):
            replicated = distribute_tensor(param.detach(), device_mesh, [Replicate()], src_data_rank=0)
            module.register_parameter(p_name, nn.Parameter(replicated, requires_grad=param.requires_grad))

    def __repr__(self) -> str:
        return "SequenceParallel(sequence_dim=1)"


def token_sharded_plan(
    plan: Mapping[str, ParallelStyle], tokens: TokenCount, block_pattern: str
) -> tuple[dict[str, ParallelStyle], list[str]]:
    """``plan`` with the activations between its projections sharded over the tokens, and the module patterns at
    whose entry the tokens are all-gathered.

    A column-parallel projection inside a submodule of the block (``blocks.*.attn.qkv``, ``blocks.*.mlp.fc1``)
    takes replicated input, and the submodule (``blocks.*.attn``) gets the all-gather at its entry, as a
    ``Replicate`` DTensor, so that its own forward reads the whole ``[B, L_r, D]`` shape and q, k and v share one
    all-gather (torchtitan's ``PrepareModuleInput`` before attention). A column-parallel projection directly on the
    block (torch's ``linear1``) all-gathers its own input (:class:`TokenShardedColwiseParallel`). A plan written for
    token-sharded inputs already (``ColwiseParallel(input_layouts=Shard(1))``, Megatron-style) is gathered the same
    way. Row-parallel outputs are reduce-scattered (``RowwiseParallel(output_layouts=Shard(1))``, kept where the plan
    says so); ``SequenceParallel`` entries are kept.

    Args:
        plan: The tensor-parallel plan (globbed paths).
        tokens: The block stack's :class:`TokenCount`.
        block_pattern: The plan's pattern of one block, e.g. ``"blocks.*"``.

    Returns:
        ``(plan, gather patterns)``.

    Raises:
        TensorParallelError: A style this conversion does not know (a ``PrepareModuleInput``, a column-parallel
            style with its own input layout); the message says to pass ``tp_sequence_parallel=False``.
    """
    out: dict[str, ParallelStyle] = {}
    gathers: list[str] = []
    for path, style in plan.items():
        parent = path.rpartition(".")[0]
        if isinstance(style, MultiheadAttentionParallel):
            out[path] = MultiheadAttentionParallel(tokens=tokens)
        elif isinstance(style, ColwiseParallel) and style.input_layouts in ((Replicate(),), (Shard(TOKEN_DIM),)):
            # (a Megatron-style plan's ColwiseParallel(input_layouts=Shard(1)) is gathered the same way)
            if parent != block_pattern:
                out[path] = style if style.input_layouts == (Replicate(),) else _replicated_input(style)
                if parent not in gathers:
                    gathers.append(parent)
                continue
            kwargs = {"output_layouts": style.output_layouts[0], "use_local_output": style.use_local_output}
            out[path] = (TokenShardedFusedColwiseParallel(tokens, style.chunks, **kwargs)
                         if isinstance(style, FusedColwiseParallel) else TokenShardedColwiseParallel(tokens, **kwargs))
        elif isinstance(style, RowwiseParallel) and style.output_layouts == (Replicate(),):
            out[path] = RowwiseParallel(input_layouts=style.input_layouts[0], output_layouts=Shard(TOKEN_DIM),
                                        use_local_output=style.use_local_output)
        elif isinstance(style, RowwiseParallel) and style.output_layouts == (Shard(TOKEN_DIM),):
            out[path] = style  # already reduce-scatters over the tokens
        elif isinstance(style, SequenceParallel):
            out[path] = style
        else:
            raise TensorParallelError(
                f"tp_sequence_parallel cannot convert the tp_plan entry {path!r}: {style!r}; it converts"
                " ColwiseParallel / RowwiseParallel with replicated inputs and outputs, FusedColwiseParallel,"
                " MultiheadAttentionParallel and SequenceParallel. Pass tp_sequence_parallel=False to apply this"
                " plan as it is."
            )
    return out, gathers


def _replicated_input(style: ColwiseParallel) -> ColwiseParallel:
    """``style`` taking the replicated input a gather at its parent's entry hands on."""
    kwargs = {"output_layouts": style.output_layouts[0], "use_local_output": style.use_local_output}
    if isinstance(style, FusedColwiseParallel):
        return FusedColwiseParallel(chunks=style.chunks, **kwargs)
    return ColwiseParallel(**kwargs)


def gather_tokens_at_entry(module: nn.Module, mesh: DeviceMesh, tokens: TokenCount, where: str) -> Callable[[], None]:
    """Make ``module``'s first tensor input, this rank's ``[B, L_r/T, D]``, arrive as the whole ``[B, L_r, D]``
    (a ``Replicate`` DTensor: one all-gather over ``tp``; backward, the column-parallel projections' partial
    input gradients are reduce-scattered). Returns the undo."""

    def no_tensor() -> TensorParallelError:
        return TensorParallelError(f"{where} was called without a tensor input to gather over tp.")

    def make(inner: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = map_first_tensor_argument(args, kwargs, lambda x: tokens.gathered(x, mesh, where),
                                                     no_tensor)
            return inner(*args, **kwargs)

        return forward

    return wrap_forward(module, make)


def token_local_modules(block: nn.Module, where: str) -> list[str]:
    """The block-relative paths of ``block``'s modules that hold plain (not yet split) parameters and run on each
    token alone: norms and layer scales, whose own parameters are all 1-D and which hold no split module. Call it
    after the projections are split (their parameters are DTensors then).

    Raises:
        TensorParallelError: The block holds another plain parameter (directly on the block, as BEiT's
            ``gamma_1``; 2-D; or on a module above split projections), naming it and what to do.
    """
    found: list[str] = []
    for path, module in block.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]
        if not own:
            continue
        splits_below = any(isinstance(p, DTensor) for p in module.parameters())
        if path and not splits_below and all(p.dim() == 1 for _, p in own):
            found.append(path)
            continue
        name = f"{where}.{path}" if path else where
        if path and splits_below:
            check_no_parameters_beside_split_projections(block, where)  # raises: no tp_sequence_parallel advice
        raise TensorParallelError(
            f"{name} ({type(module).__name__}) holds parameters {[n for n, _ in own]} outside the tensor-parallel"
            " projections that are not a norm or a layer scale; with tp_sequence_parallel each rank would run them"
            " on its share of the tokens only. Build the strategy with tp_sequence_parallel=False"
            " (sequence_parallel=False in apply_tensor_parallel; activations replicated over tp), or move them into a"
            " submodule whose parameters are all 1-D."
        )
    return found


def check_no_parameters_beside_split_projections(block: nn.Module, where: str) -> None:
    """Refuse a module inside ``block`` (not the block itself) that holds its own plain parameters of more than one
    element beside split projections below it, as timm Eva's attention holds ``q_bias`` / ``v_bias`` for its fused
    ``qkv``: its forward uses them with the split weights or over all heads, which no ``tp`` rank holds, whether the
    activations are sharded over ``tp`` or replicated. Call it after the projections are split. A scalar (a learned
    temperature) passes.

    Raises:
        TensorParallelError: naming the module, its parameters, the split modules below and what to do.
    """
    for path, module in block.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor) and p.numel() > 1]
        split = sorted({n.rsplit(".", 1)[0] for n, p in module.named_parameters() if isinstance(p, DTensor)})
        if path and own and split:
            raise TensorParallelError(
                f"{where}.{path} ({type(module).__name__}) holds parameters {own} beside the projections tensor"
                f" parallelism splits below it ({', '.join(split)}); its forward would use them whole with the split"
                " weights or heads (as timm Eva's q_bias / v_bias with its fused qkv), which no tp rank holds, with"
                " sharded or replicated activations alike. Build the model without them (timm Eva: qkv_bias=False),"
                " move them into the split projection (a Linear's bias), or pass a tp_plan that leaves this module"
                " unsplit."
            )


def shard_block_stack(stack: nn.Module, mesh: DeviceMesh, tokens: TokenCount, where: str) -> list[Callable[[], None]]:
    """Wrap the forwards of the first and last block of ``stack``: the first records L_r and keeps this rank's
    ``[B, L_r/T, D]`` of its first tensor input (backward: all-gather), the last all-gathers its first tensor output
    back to ``[B, L_r, D]`` (backward: this rank's slice). The wrappers run inside the blocks' hooks, so the
    sequence-parallel shard (a pre-hook) comes before and its gather (a hook) after. Returns the undos."""
    blocks = list(stack)
    first, last = f"{where}.0", f"{where}.{len(blocks) - 1}"

    def shard(x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise TensorParallelError(f"{first} got a {tuple(x.shape)} input; [B, L, D] expected.")
        tokens.length = x.shape[TOKEN_DIM]
        check_every_rank_holds_tokens(tokens.length, mesh.size(), first)
        whole = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return whole.redistribute(placements=[Shard(TOKEN_DIM)]).to_local()

    def no_tensor() -> TensorParallelError:
        return TensorParallelError(f"{first} was called without a tensor input to shard over tp.")

    def not_a_tensor(out: Any) -> TensorParallelError:
        return TensorParallelError(
            f"{last} returned {type(out).__name__}; tp_sequence_parallel gathers a block's tensor output (or the"
            " first element of a tuple)."
        )

    def make_entry(inner: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = map_first_tensor_argument(args, kwargs, shard, no_tensor)
            return inner(*args, **kwargs)

        return forward

    def make_exit(inner: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            gather = lambda y: tokens.gathered(y, mesh, last).to_local()  # noqa: E731
            return map_first_tensor_output(inner(*args, **kwargs), gather, not_a_tensor)

        return forward

    return [wrap_forward(blocks[0], make_entry), wrap_forward(blocks[-1], make_exit)]


def _contiguous(x: DTensor) -> DTensor:
    """``x`` with a contiguous local tensor. An all-gather of uneven shards cuts the padding off the gathered tensor
    along the tokens, which leaves it strided where torch 2.11's DTensor ``linear`` views it flat (an error on two
    H200s with 129 tokens); a copy only then."""
    # (DTensor.contiguous() looks at the DTensor's own strides, contiguous here, and returns it as it is; clone with a
    # memory format copies the local tensor, and passes gradients, Partial ones too, through unchanged)
    return x if x.to_local().is_contiguous() else x.clone(memory_format=torch.contiguous_format)
