"""Cheap agreement checks within a sequence-parallel group: the same loader lengths, the same first batch.

Every rank of a sequence-parallel (SP) group holds a slice of the same sample, and every pipeline stage of a
replica the same micro-batches. If their loaders disagree (a sampler keyed to the global rank, a per-rank
dataset, a ``drop_last`` on one rank) training silently mixes tokens of different samples in one attention, and
evaluation hangs until the collective timeout. These checks turn both into an error that names the ranks: one
all-gather of one number per loader at setup, and one of two numbers for the first batch of each loader per epoch.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_seqpar.sampling import SamplerLayoutError
from lightning_seqpar.topology import Topology


def _groups(topology: Topology) -> list[tuple[str, Any]]:
    """The groups whose ranks must agree: the SP group, and with pipelines the stages of this replica."""
    groups = []
    if topology.sp > 1:
        groups.append(("sequence-parallel", topology.sequence_group))
    if topology.pp > 1:
        groups.append(("pipeline", topology.pipeline_group))
    return groups


def _gather(value: Tensor, group: Any) -> list[Tensor]:
    values = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(values, value.contiguous(), group=group)
    return values


def _disagreement(values: list[Tensor], group: Any) -> str | None:
    if all(torch.equal(values[0], v) for v in values[1:]):
        return None
    ranks = dist.get_process_group_ranks(group)
    return ", ".join(f"global rank {rank}: {v.tolist()}" for rank, v in zip(ranks, values))


def check_loader_lengths(loader: Any, topology: Topology, device: torch.device) -> None:
    """Raise :class:`~lightning_seqpar.sampling.SamplerLayoutError` if the ranks of an SP group (or pipeline) have
    loaders of different lengths (collective over those groups; -1 stands for a loader without a length)."""
    try:
        length = len(loader)
    except TypeError:
        length = -1
    for name, group in _groups(topology):
        values = _gather(torch.tensor([length], dtype=torch.int64, device=device), group)
        differing = _disagreement(values, group)
        if differing:
            raise SamplerLayoutError(
                f"the ranks of one {name} group have DataLoaders of different lengths ({differing}); they share every"
                " sample, so they must load the same batches. Key samplers to the data-parallel rank"
                " (trainer.strategy.distributed_sampler_kwargs), not to the global rank, and give every rank the same"
                " dataset."
            )


def batch_checksum(batch: Any) -> Tensor:
    """Two float64 numbers that change when any value, order or shape in ``batch`` does: the sum of every tensor
    weighted by position (so a permutation shows), and a CRC of the shapes, dtypes and non-tensor leaves."""
    total = torch.zeros((), dtype=torch.float64)
    layout = 0

    def visit(x: Any) -> None:
        nonlocal total, layout
        if isinstance(x, Tensor):
            flat = torch.nan_to_num(x.detach().reshape(-1).double().cpu(), nan=0.0, posinf=1.0, neginf=-1.0)
            weights = torch.arange(flat.numel(), dtype=torch.float64) % 1021 + 1
            total = total + (flat * weights).sum()
            layout = zlib.crc32(f"{tuple(x.shape)}{x.dtype}".encode(), layout)
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                layout = zlib.crc32(str(key).encode(), layout)
                visit(x[key])
        elif isinstance(x, (list, tuple)):
            for item in x:
                visit(item)
        else:
            layout = zlib.crc32(repr(x).encode(), layout)

    visit(batch)
    return torch.stack([total, torch.tensor(float(layout), dtype=torch.float64)])


def check_same_batch(batch: Any, topology: Topology, what: str, device: torch.device) -> None:
    """Raise :class:`~lightning_seqpar.sampling.SamplerLayoutError` if the ranks of an SP group (or pipeline) hold
    different batches (collective over those groups)."""
    groups = _groups(topology)
    if not groups:
        return
    checksum = batch_checksum(batch).to(device)
    for name, group in groups:
        differing = _disagreement(_gather(checksum, group), group)
        if differing:
            raise SamplerLayoutError(
                f"the ranks of one {name} group received different batches from the {what} (checksums: {differing}). They"
                " share every sample, so their loaders must yield the same batches: key samplers to the data-parallel"
                " rank (trainer.strategy.distributed_sampler_kwargs), not the global rank, and seed any randomness in"
                " the dataset identically on these ranks."
            )
