"""lightning-seqpar: sequence-parallel training of long-sequence Vision Transformers as a Lightning strategy.

``import lightning_seqpar`` registers the strategy names (``"seqpar"``, ``"seqpar_ulysses"``, ``"seqpar_lss"``,
``"seqpar_ring"``, ``"seqpar_hybrid"``, ``"seqpar_zero1"``/``2``/``3``, ``"seqpar_zero3_offload"``) with Lightning,
so ``Trainer(strategy="seqpar")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_seqpar.adapters import UnsupportedAttentionError
from lightning_seqpar.deepspeed_engine import (
    DeepSpeedConfigError,
    consolidate_checkpoint,
)
from lightning_seqpar.parallelize import (
    AppliedPlan,
    NoDistributedAttentionError,
    apply_sequence_parallel,
)
from lightning_seqpar.pipeline import PipelineError
from lightning_seqpar.plan import (
    PlanError,
    SequenceParallelPlan,
    infer_plan,
    register_attention,
)
from lightning_seqpar.strategies import (
    SeqParDDPStrategy,
    SeqParDeepSpeedStrategy,
    SeqParFSDPStrategy,
    SeqParPipelineStrategy,
    SeqParStrategy,
    register_strategies,
)
from lightning_seqpar.tensor_parallel import TensorParallelError
from lightning_seqpar.topology import (
    DeepSpeedMPU,
    ParallelDims,
    Topology,
    TopologyError,
    build_hybrid_groups,
)

__version__ = "0.1.0"

register_strategies(StrategyRegistry)

__all__ = [
    "AppliedPlan",
    "DeepSpeedConfigError",
    "DeepSpeedMPU",
    "NoDistributedAttentionError",
    "ParallelDims",
    "PipelineError",
    "PlanError",
    "SeqParDDPStrategy",
    "SeqParDeepSpeedStrategy",
    "SeqParFSDPStrategy",
    "SeqParPipelineStrategy",
    "SeqParStrategy",
    "SequenceParallelPlan",
    "TensorParallelError",
    "Topology",
    "TopologyError",
    "UnsupportedAttentionError",
    "__version__",
    "apply_sequence_parallel",
    "build_hybrid_groups",
    "consolidate_checkpoint",
    "infer_plan",
    "register_attention",
]
