"""Validation of the arguments every engine of ``SeqParStrategy`` shares (the engines check their own in
``_init_engine``)."""

from __future__ import annotations

from typing import Any

from lightning_seqpar.attention.registry import check_attention_choice
from lightning_seqpar.reliability import NONFINITE_POLICIES
from lightning_seqpar.strategies.model_parallel import check_tensor_parallel_arguments
from lightning_seqpar.strategies.plan_roles import ACTIVATION_CHECKPOINTING


def check_shared_arguments(
    name: str,
    *,
    sequence_parallel_size: Any,
    attention: str,
    ulysses_degree: Any,
    attention_backend: str,
    activation_checkpointing: Any,
    compile_blocks: Any,
    on_nonfinite: Any,
    tensor_parallel_size: Any,
    tp_plan: Any,
    tp_sequence_parallel: Any,
    zero_stage: Any,
    pipeline_stages: Any,
    deepspeed_config: Any,
    fsdp: bool,
    uses_fsdp: bool,
) -> None:
    """Check the shared arguments of :class:`~lightning_seqpar.strategies.base.SeqParStrategy`; every argument but
    ``name`` and ``uses_fsdp`` is the constructor argument of the same name (documented there).

    Args:
        name: The engine class's name, which starts every message.
        uses_fsdp: Whether the engine class being built shards with FSDP2.

    Raises:
        ValueError: an argument out of its range (``sequence_parallel_size``, ``attention``, ``on_nonfinite``,
            ``activation_checkpointing``, ``compile_blocks``, the tensor-parallel arguments), or ``fsdp=True`` on an
            engine class that does not shard with FSDP2.
    """
    if sequence_parallel_size is not None and (
        not isinstance(sequence_parallel_size, int) or sequence_parallel_size < 1
    ):
        raise ValueError(f"{name}: sequence_parallel_size must be a positive integer, got {sequence_parallel_size!r}.")
    check_attention_choice(attention, attention_backend, ulysses_degree, owner=name)
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"{name}: on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {on_nonfinite!r}.")
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"{name}: activation_checkpointing must be False, True, 'full', 'save_attention' or 'offload',"
            f" got {activation_checkpointing!r}."
        )
    if not isinstance(compile_blocks, (bool, dict)):
        raise ValueError(  # noqa: TRY004
            f"{name}: compile_blocks must be True, False or a dict of torch.compile options, got {compile_blocks!r}."
        )
    if not isinstance(tp_sequence_parallel, bool):
        raise ValueError(f"{name}: tp_sequence_parallel must be True or False, got {tp_sequence_parallel!r}.")
    check_tensor_parallel_arguments(
        name,
        tensor_parallel_size,
        tp_plan,
        zero_stage=zero_stage,
        pipeline_stages=pipeline_stages,
        deepspeed_config=deepspeed_config,
    )
    if fsdp and not uses_fsdp:
        raise ValueError(
            f"{name} does not shard with FSDP2; construct SeqParStrategy(fsdp=True, ...), which builds"
            " SeqParFSDPStrategy."
        )
