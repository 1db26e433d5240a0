"""Bundled reference models: the ClimaX-style weather ViT and the transformer layers it is built from."""

from lightning_seqpar.weather.models.aggregation import HierarchicalAggregation, VariableAggregation
from lightning_seqpar.weather.models.climax import ClimaX, Patchify, VariableTokenEmbed
from lightning_seqpar.weather.models.layers import Attention, Block, DropPath, Mlp

__all__ = [
    "Attention",
    "Block",
    "ClimaX",
    "DropPath",
    "HierarchicalAggregation",
    "Mlp",
    "Patchify",
    "VariableAggregation",
    "VariableTokenEmbed",
]
