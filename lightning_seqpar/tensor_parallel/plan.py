"""The tensor-parallel plan of a model: which projections are split column-wise and row-wise, found per block kind.

Megatron-LM's split of a transformer block (Shoeybi et al., arXiv 1909.08053, section 3): the projections that fan
out (q, k, v; the MLP's first Linear) are split column-wise, each rank computing its own heads / hidden units from
the replicated input, and those that fan in (the attention output; the MLP's second Linear) row-wise, their
partial sums all-reduced. One all-reduce per attention and per MLP in forward, one in backward (the column-wise
input's gradient). Activations between blocks stay replicated over the tensor-parallel ranks, so the
sequence-parallel shard and gather of :mod:`lightning_seqpar.parallelize` (over the ``sp`` ranks) work unchanged,
with any token count. The norms run replicated (their gradients come out identical on every tensor-parallel rank,
because the column-wise input's gradient is all-reduced); per-head norms (timm ``q_norm``/``k_norm``) see only
their rank's heads and are ``SequenceParallel`` over the head dimension, which sums their gradients.

A plan is a dict ``module path (globs allowed) -> ParallelStyle``, as torchtitan's and ``parallelize_module``'s::

    {"blocks.*.attn.qkv": FusedColwiseParallel(chunks=3), "blocks.*.attn.proj": RowwiseParallel(),
     "blocks.*.mlp.fc1": ColwiseParallel(), "blocks.*.mlp.fc2": RowwiseParallel()}

Letters: B batch, L tokens, H heads, H_t = H / tp, d head dim, D width, T = tp.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lightning_seqpar.plan import find_block_stacks, is_attention_module
from lightning_seqpar.tensor_parallel.sequence import (
    ReplicatedSequenceParallel,
    TokenCount,
    check_no_parameters_beside_split_projections,
    gather_tokens_at_entry,
    shard_block_stack,
    token_local_modules,
    token_sharded_plan,
)
from lightning_seqpar.tensor_parallel.styles import (
    FusedColwiseParallel,
    MultiheadAttentionParallel,
    TensorParallelError,
)
from lightning_seqpar.wrapping import wrap_forward

TensorParallelPlan = dict[str, ParallelStyle]

# Per block kind, paths relative to one block. The first table whose required paths all exist wins; "?"-prefixed
# entries are applied where present (with parameters). Attention and MLP are matched separately.
_ATTENTION_TABLES: list[tuple[str, dict[str, str]]] = [
    (
        "timm-style attention (fused qkv)",
        {"attn.qkv": "fused:3", "attn.proj": "rowwise", "?attn.q_norm": "head_norm:1", "?attn.k_norm": "head_norm:1"},
    ),
    (
        "Hugging Face ViT/ViTMAE/Dinov2 attention (transformers 5)",
        {
            "attention.q_proj": "colwise",
            "attention.k_proj": "colwise",
            "attention.v_proj": "colwise",
            "attention.o_proj": "rowwise",
        },
    ),
    (
        "Llama-style self_attn.q_proj/k_proj/v_proj/o_proj",
        {
            "self_attn.q_proj": "colwise",
            "self_attn.k_proj": "colwise",
            "self_attn.v_proj": "colwise",
            "self_attn.o_proj": "rowwise",
        },
    ),
    (
        "Hugging Face ViT/ViTMAE/Dinov2 attention (transformers 4)",
        {
            "attention.attention.query": "colwise",
            "attention.attention.key": "colwise",
            "attention.attention.value": "colwise",
            "attention.output.dense": "rowwise",
        },
    ),
    (
        "CLIP/SigLIP-style self_attn.q_proj/k_proj/v_proj/out_proj",
        {
            "self_attn.q_proj": "colwise",
            "self_attn.k_proj": "colwise",
            "self_attn.v_proj": "colwise",
            "self_attn.out_proj": "rowwise",
        },
    ),
    ("torch nn.MultiheadAttention", {"self_attn": "multihead_attention"}),
]
_MLP_TABLES: list[tuple[str, dict[str, str]]] = [
    ("timm SwiGLU MLP", {"mlp.fc1_g": "colwise", "mlp.fc1_x": "colwise", "mlp.fc2": "rowwise"}),
    ("timm-style MLP", {"mlp.fc1": "colwise", "mlp.fc2": "rowwise"}),
    (
        "gated MLP (Hugging Face Dinov2 SwiGLU, Llama)",
        {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"},
    ),
    ("Hugging Face Dinov2 SwiGLU MLP (transformers 4)", {"mlp.weights_in": "fused:2", "mlp.weights_out": "rowwise"}),
    ("Hugging Face ViT MLP", {"intermediate.dense": "colwise", "output.dense": "rowwise"}),
    ("torch TransformerEncoderLayer MLP", {"linear1": "colwise", "linear2": "rowwise"}),
]
# Modules between a column- and a row-wise projection that would need the whole width (timm's scale_norm).
_WHOLE_WIDTH_NORMS = ("attn.norm", "mlp.norm")
_HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "heads", "n_heads", "n_head")
_HEAD_WIDTH_ATTRIBUTES = ("all_head_size", "attn_dim", "inner_dim")


def make_style(name: str) -> ParallelStyle:
    """The ParallelStyle of a table entry: ``colwise``, ``rowwise``, ``fused:C``, ``head_norm:DIM``,
    ``multihead_attention``."""
    kind, _, arg = name.partition(":")
    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        return RowwiseParallel()
    if kind == "fused":
        return FusedColwiseParallel(chunks=int(arg))
    if kind == "head_norm":  # a norm over d applied per head: its input is split along the head dimension
        return SequenceParallel(sequence_dim=int(arg), use_local_output=True)
    if kind == "multihead_attention":
        return MultiheadAttentionParallel()
    raise TensorParallelError(f"unknown tensor-parallel style {name!r}")


def _has(block: nn.Module, path: str, with_parameters: bool = False) -> bool:
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return False
    return not with_parameters or any(True for _ in module.parameters())


def _fits(block: nn.Module, path: str, style: str) -> bool:
    """``path`` exists in ``block``, and is an ``nn.MultiheadAttention`` where the style is one (another attention
    class under the same name, as CLIP's ``self_attn``, is no match)."""
    if not _has(block, path):
        return False
    return style != "multihead_attention" or isinstance(block.get_submodule(path), nn.MultiheadAttention)


def _match(block: nn.Module, tables: list[tuple[str, dict[str, str]]]) -> tuple[str, dict[str, str]] | None:
    for kind, table in tables:
        required = [p for p in table if not p.startswith("?")]
        if all(_fits(block, p, table[p]) for p in required):
            return kind, {
                p.lstrip("?"): s for p, s in table.items() if not p.startswith("?") or _has(block, p[1:], True)
            }
    return None


def block_plan(block: nn.Module, where: str = "block") -> tuple[str, dict[str, str]]:
    """``(kinds, {relative path: style name})`` for one transformer block.

    Raises:
        TensorParallelError: The block's attention or MLP is of no known kind, or has a norm over the whole width
            between its projections; the message names the block and says how to pass a ``tp_plan``.
    """
    found = []
    for part, tables in (("attention", _ATTENTION_TABLES), ("MLP", _MLP_TABLES)):
        hit = _match(block, tables)
        if hit is None:
            children = ", ".join(n for n, _ in block.named_modules() if n and n.count(".") < 3)
            raise TensorParallelError(
                f"{where} ({type(block).__name__}) has no {part} of a kind tensor parallelism knows (timm-style"
                f" attn.qkv/attn.proj and mlp.fc1/mlp.fc2, Hugging Face attention.q_proj/k_proj/v_proj/o_proj,"
                f" CLIP/SigLIP self_attn.q_proj/k_proj/v_proj/out_proj, torch nn.MultiheadAttention self_attn and"
                f" linear1/linear2); its modules are: {children}. Pass tp_plan={{path: ParallelStyle}}."
            )
        found.append(hit)
    for path in _WHOLE_WIDTH_NORMS:
        if _has(block, path, with_parameters=True):
            raise TensorParallelError(
                f"{where}.{path} ({type(block.get_submodule(path)).__name__}) normalises over the whole width between a"
                " column- and a row-parallel projection, which no tensor-parallel rank holds; build the model without"
                " it (timm scale_norm=False) or pass your own tp_plan."
            )
    return " + ".join(k for k, _ in found), {**found[0][1], **found[1][1]}


def infer_tensor_parallel_plan(model: nn.Module) -> TensorParallelPlan:
    """The plan for the largest stack of repeated blocks of ``model`` (:func:`lightning_seqpar.plan.find_block_stacks`),
    one entry per block-relative path, globbed over the blocks: ``{"blocks.*.attn.qkv": FusedColwiseParallel(3), ..}``.
    Modules outside the blocks (embeddings, heads) stay replicated.

    Raises:
        TensorParallelError: No block stack, or blocks of an unknown kind (see :func:`block_plan`).
    """
    stacks = find_block_stacks(model)
    if not stacks:
        raise TensorParallelError(
            f"found no stack of repeated transformer blocks in {type(model).__name__} to split; pass"
            " tp_plan={path: ParallelStyle}."
        )
    path, stack = stacks[0]
    plan: dict[str, str] | None = None
    for i, block in enumerate(stack):
        _, entries = block_plan(block, f"{path}.{i}" if path else str(i))
        if plan is not None and entries != plan:
            raise TensorParallelError(
                f"blocks of {path or type(model).__name__} need different tensor-parallel plans; pass tp_plan."
            )
        plan = entries
    prefix = f"{path}.*." if path else "*."
    return {prefix + p: make_style(s) for p, s in (plan or {}).items()}


def check_heads(
    model: nn.Module, plan: Mapping[str, ParallelStyle], tensor_parallel_size: int
) -> list[tuple[str, nn.Module]]:
    """The attention modules whose heads the plan splits (the nearest attention-like ancestor with a head-count
    attribute of each column-parallel projection, or a planned ``nn.MultiheadAttention``), after checking that
    their head counts and widths divide by ``tensor_parallel_size``.

    Raises:
        TensorParallelError: Naming the module, its head count (or width) and ``tensor_parallel_size``.
    """
    modules = dict(model.named_modules())
    split: dict[str, nn.Module] = {}
    columns: dict[str, nn.Linear] = {}
    for pattern, style in plan.items():
        for path in (p for p in modules if fnmatch.fnmatchcase(p, pattern)):
            if isinstance(style, MultiheadAttentionParallel):
                split[path] = modules[path]
                continue
            if not isinstance(style, ColwiseParallel):
                continue
            if isinstance(modules[path], nn.Linear):
                columns[path] = modules[path]
            parts = path.split(".")
            for cut in range(len(parts) - 1, 0, -1):
                ancestor_path = ".".join(parts[:cut])
                ancestor = modules[ancestor_path]
                if is_attention_module(ancestor) and any(
                    isinstance(getattr(ancestor, a, None), int) for a in _HEAD_ATTRIBUTES
                ):
                    split[ancestor_path] = ancestor
                    break
    for path, module in split.items():
        for attribute in _HEAD_ATTRIBUTES:
            heads = getattr(module, attribute, None)
            if isinstance(heads, int) and heads % tensor_parallel_size:
                raise TensorParallelError(
                    f"{path} ({type(module).__name__}) has {attribute}={heads} heads, which do not divide by"
                    f" tensor_parallel_size={tensor_parallel_size}: every tensor-parallel rank must hold whole heads."
                    f" Choose a tensor_parallel_size that divides {heads}."
                )
    for path, linear in columns.items():
        if linear.out_features % tensor_parallel_size:
            raise TensorParallelError(
                f"{path} has {linear.out_features} output features, which do not divide by tensor_parallel_size="
                f"{tensor_parallel_size}."
            )
    return list(split.items())


def localize_heads(module: nn.Module, tensor_parallel_size: int) -> None:
    """Divide ``module``'s head-count and head-width attributes (``num_heads``, ``num_attention_heads``,
    ``all_head_size``, ``attn_dim``, ..) by ``tensor_parallel_size``, so its own forward reshapes its local
    ``[B, L, H_t d]`` projections into ``H_t`` heads. ``nn.MultiheadAttention`` does this in its style."""
    if isinstance(module, nn.MultiheadAttention):
        return
    for attribute in _HEAD_ATTRIBUTES + _HEAD_WIDTH_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(module, attribute, value // tensor_parallel_size)


def apply_tensor_parallel(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    tp_plan: Mapping[str, ParallelStyle] | None = None,
    sequence_parallel: bool = True,
) -> TensorParallelPlan:
    """Split ``model``'s transformer blocks over the ranks of ``tp_mesh`` in place (Megatron-style, see the module
    docstring), with the activations between the projections sharded over the tokens (Megatron-LM sequence
    parallelism, :mod:`lightning_seqpar.tensor_parallel.sequence`) unless ``sequence_parallel=False``.

    Call it on every rank of the mesh, before sequence parallelism
    (:func:`~lightning_seqpar.parallelize.apply_sequence_parallel`, which then runs its distributed attention on each
    rank's ``H / tp`` heads), before FSDP2 (:func:`~lightning_seqpar.fsdp.apply_fsdp`) and before the optimizer is
    built. Parameters that are split become DTensors on ``tp_mesh`` (with ``sequence_parallel``, the blocks' norms and
    layer scales ``Replicate`` DTensors); the input of the block stack and its output stay plain, replicated
    ``[B, L, D]`` tensors, so the rest of the model is unchanged. All tensor-parallel ranks must hold the same initial
    weights (they are taken from the mesh's first rank) and draw the same dropout masks outside attention.

    Args:
        model: The model; paths in ``tp_plan`` are relative to it.
        tp_mesh: A one-dimensional mesh of the tensor-parallel ranks (the strategy's ``device_mesh["tp"]``).
        tp_plan: ``{module path (globs allowed): ParallelStyle}``, replacing the inferred plan
            (:func:`infer_tensor_parallel_plan`). Attention modules above its column-parallel projections get
            local head counts as in the inferred plan.
        sequence_parallel: Shard the residual stream, norms and layer scales of the largest block stack over the
            ``tp`` ranks along the tokens (arXiv 2205.05198): activation memory between the projections / tp, the
            same communication volume. ``False`` keeps them replicated on every ``tp`` rank.

    Returns:
        The plan that was applied (print it to read it).

    Raises:
        TensorParallelError: Unknown block kinds, head counts or widths that do not divide by the mesh size, a
            mesh that is not one-dimensional; with ``sequence_parallel``, a plan style it cannot convert or a block
            parameter outside the projections that is not a norm or layer scale
            (:func:`~lightning_seqpar.tensor_parallel.sequence.token_local_modules`).
    """
    if tp_mesh.ndim != 1:
        raise TensorParallelError(
            f"apply_tensor_parallel needs a one-dimensional mesh (device_mesh['tp']), got {tp_mesh.ndim} dimensions."
        )
    size = tp_mesh.size()
    plan = dict(infer_tensor_parallel_plan(model) if tp_plan is None else tp_plan)
    if size == 1:
        return plan
    attentions = check_heads(model, plan, size)
    if not sequence_parallel:
        parallelize_module(model, tp_mesh, plan)
        stacks = find_block_stacks(model)
        for stack_path, stack in stacks[:1]:
            for i, block in enumerate(stack):
                check_no_parameters_beside_split_projections(block, f"{stack_path}.{i}" if stack_path else str(i))
    else:
        stack_path, stack = _largest_stack(model)
        tokens = TokenCount()
        prefix = f"{stack_path}.*." if stack_path else "*."
        plan, gathers = token_sharded_plan(plan, tokens, prefix[:-1])
        parallelize_module(model, tp_mesh, plan)
        modules = dict(model.named_modules())
        for pattern in gathers:
            for path in (p for p in modules if fnmatch.fnmatchcase(p, pattern)):
                gather_tokens_at_entry(modules[path], tp_mesh, tokens, path)
        norms: dict[str, ParallelStyle] = {}
        for i, block in enumerate(stack):
            where = f"{stack_path}.{i}" if stack_path else str(i)
            for path in token_local_modules(block, where):
                norms[f"{where}.{path}"] = plan[prefix + path] = ReplicatedSequenceParallel()
        parallelize_module(model, tp_mesh, norms)
        shard_block_stack(stack, tp_mesh, tokens, stack_path or type(model).__name__)
    for path, attention in attentions:
        localize_heads(attention, size)
        if not isinstance(attention, nn.MultiheadAttention):
            _explain_width_errors(attention, path, size)
    return plan


def _largest_stack(model: nn.Module) -> tuple[str, nn.Module]:
    stacks = find_block_stacks(model)
    if not stacks:
        raise TensorParallelError(
            f"found no stack of repeated transformer blocks in {type(model).__name__} to shard the tokens of over tp;"
            " pass sequence_parallel=False (tp_sequence_parallel=False on the strategy)."
        )
    return stacks[0]


def _explain_width_errors(module: nn.Module, path: str, tensor_parallel_size: int) -> None:
    """Turn the reshape error of an attention whose forward reshapes its heads to the input width (``reshape(B, N, C)``,
    older timm) into a :class:`TensorParallelError` that says so; its own forward still runs."""

    def make(inner):
        def forward(*args, **kwargs):
            try:
                return inner(*args, **kwargs)
            except RuntimeError as error:
                if "is invalid for input of size" not in str(error):
                    raise
                raise TensorParallelError(
                    f"{path} ({type(module).__name__}) failed under tensor parallelism: {error}. Each rank holds"
                    f" 1/{tensor_parallel_size} of the heads, so an attention that reshapes its output to the input"
                    " width (reshape(B, N, C)) cannot run split; it must use its head attributes or -1"
                    " (reshape(B, N, num_heads * head_dim), as timm's attn_dim does), or be left out via tp_plan."
                ) from error

        return forward

    wrap_forward(module, make)


def describe_plan(plan: Mapping[str, ParallelStyle]) -> str:
    """The plan as a two-column table (path, style)."""
    width = max((len(p) for p in plan), default=4)
    return "\n".join([f"{'path'.ljust(width)}  style"] + [f"{p.ljust(width)}  {s!r}" for p, s in plan.items()])
