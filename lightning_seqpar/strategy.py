"""Where ``SeqParStrategy`` lived before the engines were split: re-exports :mod:`lightning_seqpar.strategies`."""

from lightning_seqpar.strategies import (
    SeqParDDPStrategy,
    SeqParDeepSpeedStrategy,
    SeqParPipelineStrategy,
    SeqParStrategy,
)
from lightning_seqpar.strategies.plan_roles import with_block_role as _with_block_role  # noqa: F401 (the old private name)
from lightning_seqpar.strategies.plan_roles import with_checkpoints as _with_checkpoints  # noqa: F401 (the old private name)

__all__ = ["SeqParDDPStrategy", "SeqParDeepSpeedStrategy", "SeqParPipelineStrategy", "SeqParStrategy"]
