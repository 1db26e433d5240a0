"""Make a model sequence-parallel: apply a plan's roles to it, and the runtime its hooks share while a forward runs.

- :mod:`.apply`: :func:`apply_sequence_parallel` (the orchestrator) and :class:`AppliedPlan` (its undo);
- :mod:`.roles`: what each plan role does, one small class per role, in the order they are applied;
- :mod:`.runtime`: :class:`SequenceParallelRuntime`, the region (public ``enter`` / ``exit`` / ``region``) and the
  distributed attention calls inside it;
- :mod:`.arguments`: per-token tensors a block receives besides its tokens.
"""

from lightning_seqpar.parallelize.apply import AppliedPlan, apply_sequence_parallel, sync_rng_state
from lightning_seqpar.parallelize.arguments import shard_token_argument
from lightning_seqpar.parallelize.roles import ROLE_ORDER, RoleApplication
from lightning_seqpar.parallelize.runtime import NoDistributedAttentionError, SequenceParallelRuntime

__all__ = [
    "ROLE_ORDER",
    "AppliedPlan",
    "NoDistributedAttentionError",
    "RoleApplication",
    "SequenceParallelRuntime",
    "apply_sequence_parallel",
    "shard_token_argument",
    "sync_rng_state",
]
