"""Megatron-style tensor parallelism of transformer blocks through ``torch.distributed.tensor.parallel``.

:func:`apply_tensor_parallel` splits the blocks of a model over a ``tp`` DeviceMesh (plans found per block kind:
timm-style, Hugging Face ViT/ViTMAE/Dinov2, torch ``nn.TransformerEncoderLayer``, the bundled ClimaX blocks), with
fused projections split by head (:class:`FusedColwiseParallel`) and checkpoints kept in the single-device layout.
"""

from lightning_seqpar.tensor_parallel.plan import (
    TensorParallelPlan,
    apply_tensor_parallel,
    block_plan,
    check_heads,
    describe_plan,
    infer_tensor_parallel_plan,
    localize_heads,
)
from lightning_seqpar.tensor_parallel.styles import (
    FusedColwiseParallel,
    MultiheadAttentionParallel,
    TensorParallelError,
    fused_row_permutation,
    register_row_layout,
    reorder_rows,
)

__all__ = [
    "FusedColwiseParallel",
    "MultiheadAttentionParallel",
    "TensorParallelError",
    "TensorParallelPlan",
    "apply_tensor_parallel",
    "block_plan",
    "check_heads",
    "describe_plan",
    "fused_row_permutation",
    "infer_tensor_parallel_plan",
    "localize_heads",
    "register_row_layout",
    "reorder_rows",
]
