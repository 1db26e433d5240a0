"""Which strategy class runs: the engine picked from ``SeqParStrategy``'s arguments, and the ``"seqpar*"`` names
registered with Lightning's ``StrategyRegistry`` on ``import lightning_seqpar``."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_seqpar.strategies.base import SeqParStrategy

STRATEGY_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "seqpar": ("Sequence parallelism across the devices of each node (attention chosen from the model's heads)", {}),
    "seqpar_ulysses": ("Sequence parallelism with DeepSpeed-Ulysses attention", {"attention": "ulysses"}),
    "seqpar_lss": ("Sequence parallelism with LSS segment attention", {"attention": "lss"}),
    "seqpar_ring": ("Sequence parallelism with ring attention", {"attention": "ring"}),
    "seqpar_hybrid": ("Sequence parallelism, Ulysses within a node x ring across nodes", {"attention": "hybrid"}),
    **{
        f"seqpar_zero{stage}": (
            f"Sequence parallelism with DeepSpeed ZeRO-{stage} ({what} sharded)",
            {"zero_stage": stage},
        )
        for stage, what in (
            (1, "optimizer state"),
            (2, "optimizer state and gradients"),
            (3, "optimizer state, gradients and parameters"),
        )
    },
    "seqpar_fsdp": (
        "Sequence parallelism with FSDP2: parameters, gradients and optimizer state sharded",
        {"fsdp": True},
    ),
    "seqpar_zero3_offload": (
        "Sequence parallelism with DeepSpeed ZeRO-3, parameters and optimizer state in host memory",
        {"zero_stage": 3, "offload_optimizer": True, "offload_parameters": True},
    ),
}
"""Name -> (description, ``SeqParStrategy`` arguments): the one list of registered names."""


def check_pipeline_arguments(name: str, pipeline_stages: Any, micro_batches: Any) -> None:
    """Raise ValueError (naming the strategy class ``name``) unless ``pipeline_stages`` is a positive integer and
    ``micro_batches`` is None, or a positive integer with ``pipeline_stages > 1``."""
    if not isinstance(pipeline_stages, int) or pipeline_stages < 1:
        raise ValueError(f"{name}: pipeline_stages must be a positive integer, got {pipeline_stages!r}.")
    if micro_batches is not None and (not isinstance(micro_batches, int) or micro_batches < 1):
        raise ValueError(f"{name}: micro_batches must be a positive integer, got {micro_batches!r}.")
    if micro_batches is not None and pipeline_stages == 1:
        raise ValueError(
            f"{name}: micro_batches is for pipeline_stages > 1; use Trainer(accumulate_grad_batches=...) otherwise."
        )


def engine_class(*args: Any, **kwargs: Any) -> type[SeqParStrategy]:
    """The engine class a ``SeqParStrategy(*args, **kwargs)`` call builds: FSDP2 (``fsdp=True``; its constructor refuses
    DeepSpeed arguments), pipeline (``pipeline_stages > 1``), DeepSpeed ZeRO (``zero_stage != 0`` or a
    ``deepspeed_config``), else DDP. Invalid values go to the DDP class, whose constructor names them.

    Raises:
        TypeError: the arguments do not fit ``SeqParStrategy``'s signature.
    """
    from lightning_seqpar.strategies.base import SeqParStrategy
    from lightning_seqpar.strategies.ddp import SeqParDDPStrategy
    from lightning_seqpar.strategies.deepspeed import SeqParDeepSpeedStrategy
    from lightning_seqpar.strategies.deepspeed_pipeline import SeqParPipelineStrategy
    from lightning_seqpar.strategies.fsdp import SeqParFSDPStrategy

    bound = inspect.signature(SeqParStrategy.__init__).bind_partial(None, *args, **kwargs).arguments
    zero_stage, pipeline_stages = bound.get("zero_stage", 0), bound.get("pipeline_stages", 1)
    if bound.get("fsdp") is True:
        return SeqParFSDPStrategy
    if isinstance(pipeline_stages, int) and pipeline_stages > 1:
        return SeqParPipelineStrategy
    if zero_stage != 0 or bound.get("deepspeed_config") is not None:
        return SeqParDeepSpeedStrategy
    return SeqParDDPStrategy


def register_strategies(strategy_registry: Any) -> None:
    """Register every name of :data:`STRATEGY_NAMES` with ``strategy_registry`` (Lightning's ``StrategyRegistry``).

    Each name builds ``SeqParStrategy(**arguments)``, which picks the engine class (DDP, FSDP2, DeepSpeed ZeRO or
    pipeline).
    """
    from lightning_seqpar.strategies.base import SeqParStrategy

    for name, (description, arguments) in STRATEGY_NAMES.items():
        strategy_registry.register(name, SeqParStrategy, description=description, **arguments)
