"""lightning-seqpar: sequence-parallel training of long-sequence Vision Transformers as a Lightning strategy.

``import lightning_seqpar`` registers the strategy names ``"seqpar"``, ``"seqpar_ulysses"`` and
``"seqpar_lss"`` with Lightning, so ``Trainer(strategy="seqpar")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_seqpar.adapters import UnsupportedAttentionError
from lightning_seqpar.parallelize import AppliedPlan, NoDistributedAttentionError, apply_sequence_parallel
from lightning_seqpar.plan import PlanError, SequenceParallelPlan, infer_plan, register_attention
from lightning_seqpar.strategy import SeqParStrategy
from lightning_seqpar.topology import DeepSpeedMPU, ParallelDims, Topology, TopologyError

__version__ = "0.1.0"

SeqParStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "AppliedPlan",
    "DeepSpeedMPU",
    "NoDistributedAttentionError",
    "ParallelDims",
    "PlanError",
    "SeqParStrategy",
    "SequenceParallelPlan",
    "Topology",
    "TopologyError",
    "UnsupportedAttentionError",
    "__version__",
    "apply_sequence_parallel",
    "infer_plan",
    "register_attention",
]
