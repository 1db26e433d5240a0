"""The Lightning strategies: a shared base (topology, plan, data, non-finite policy) and one class per engine.

``SeqParStrategy(...)`` builds :class:`SeqParDDPStrategy`, :class:`SeqParFSDPStrategy`, :class:`SeqParDeepSpeedStrategy`
(ZeRO) or :class:`SeqParPipelineStrategy` from its arguments; ``import lightning_seqpar`` registers the ``"seqpar*"``
names.
"""

from lightning_seqpar.strategies.base import SeqParStrategy
from lightning_seqpar.strategies.ddp import SeqParDDPStrategy
from lightning_seqpar.strategies.deepspeed import SeqParDeepSpeedStrategy
from lightning_seqpar.strategies.deepspeed_pipeline import SeqParPipelineStrategy
from lightning_seqpar.strategies.fsdp import SeqParFSDPStrategy
from lightning_seqpar.strategies.registry import (
    STRATEGY_NAMES,
    engine_class,
    register_strategies,
)

__all__ = [
    "STRATEGY_NAMES",
    "SeqParDDPStrategy",
    "SeqParDeepSpeedStrategy",
    "SeqParFSDPStrategy",
    "SeqParPipelineStrategy",
    "SeqParStrategy",
    "engine_class",
    "register_strategies",
]
