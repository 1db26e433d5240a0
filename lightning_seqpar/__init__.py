"""lightning-seqpar: sequence-parallel training of long-sequence Vision Transformers as a Lightning strategy."""

from lightning_seqpar.topology import DeepSpeedMPU, ParallelDims, Topology, TopologyError

__version__ = "0.1.0"

__all__ = ["DeepSpeedMPU", "ParallelDims", "Topology", "TopologyError", "__version__"]
