"""Guards that keep the ranks of a run consistent: one decision on non-finite steps, and the same data on the ranks that
share a sample.

A NaN on one rank must not make that rank skip a step the others take: the ranks of a run would then hold
different weights from that step on, silently. :func:`nonfinite_step_guard` agrees on one flag over the
whole world (one all-reduce of a single number per step) before anyone acts on it.

Every rank of a sequence-parallel (SP) group holds a slice of the same sample, and every pipeline stage of a
replica the same micro-batches. If their loaders disagree (a sampler keyed to the global rank, a per-rank
dataset, a ``drop_last`` on one rank) training silently mixes tokens of different samples in one attention, and
evaluation hangs until the collective timeout. :func:`check_loader_lengths` and :func:`check_same_batch` turn both
into an error that names the ranks: one all-gather of one number per loader at setup, and one of two numbers for
the first batch of each loader per epoch.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_seqpar.sampling import SamplerLayoutError
from lightning_seqpar.topology import Topology

log = logging.getLogger(__name__)

NonFinitePolicy = Literal["raise", "skip", "stop", "ignore"]
"""What to do when the loss or a gradient is NaN/inf on any rank: ``raise`` a FloatingPointError on every rank,
``skip`` the optimizer step (gradients are dropped) on every rank, ``stop`` training after this step without
taking it, or ``ignore`` (no check, no cost)."""

NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip", "stop", "ignore")


class NonFiniteStepError(FloatingPointError):
    """Raised on every rank when a step's loss or gradients are not finite and the policy is ``raise``."""


def _local_nonfinite(loss: Any, parameters: Iterable[torch.nn.Parameter], device: torch.device) -> Tensor:
    """1.0 if the loss or any gradient holds a NaN/inf, else 0.0, computed on ``device`` without a host sync: one
    max-abs per gradient (``torch._foreach_norm`` with ord=inf: exact, it cannot overflow, and NaN propagates)."""
    if isinstance(loss, dict):
        loss = loss.get("loss")
    checks = []
    if isinstance(loss, Tensor):
        checks.append(loss.detach().float().reshape(-1).to(device))
    # The local shard of a DTensor gradient (tensor parallel, FSDP2): every rank checks its own (FSDP2 leaves some
    # shards of small tensors empty), the ranks then agree.
    grads = [g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in parameters) if g is not None]
    grads = [g for g in grads if g.numel()]
    if grads:
        checks += [n.float().reshape(1).to(device) for n in torch._foreach_norm(grads, float("inf"))]
    if not checks:
        return torch.zeros((), device=device)
    return (~torch.isfinite(torch.cat(checks))).any().float()


def any_rank_nonfinite(loss: Any, parameters: Iterable[torch.nn.Parameter], device: torch.device) -> bool:
    """True on every rank if the loss or a gradient is not finite on any rank: one all-reduce of one number and
    one host sync per step (the flag is computed on the device)."""
    flag = _local_nonfinite(loss, parameters, device).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def nonfinite_step_guard(
    closure: Callable[[], Any],
    *,
    policy: NonFinitePolicy,
    parameters: Callable[[], Iterable[torch.nn.Parameter]],
    device: torch.device,
    step: int,
    request_stop: Callable[[], None],
    zero_grad: Callable[[], None],
) -> Callable[[], Any]:
    """Wrap a Lightning optimizer closure so that all ranks act alike on a non-finite loss or gradient.

    Returning ``None`` from the closure makes Lightning skip ``optimizer.step`` (automatic optimization).
    """
    if policy == "ignore":
        return closure

    def guarded() -> Any:
        result = closure()
        if result is None or not any_rank_nonfinite(result, parameters(), device):
            return result
        message = f"non-finite loss or gradient at global step {step} on at least one rank"
        if policy == "raise":
            raise NonFiniteStepError(
                f"{message}. Lower the learning rate, enable gradient clipping, check the data for NaNs, or set"
                " SeqParStrategy(on_nonfinite='skip') to skip such steps on every rank."
            )
        zero_grad()
        if policy == "stop":
            log.warning("%s: stopping training on every rank without taking the step.", message)
            request_stop()
        else:
            log.warning("%s: skipping the optimizer step on every rank.", message)
        return None

    return guarded


# --- the same data on the ranks that share a sample ---------------------------------------------------------


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
                f"the ranks of one {name} group received different batches from the {what} (checksums: {differing})."
                " They share every sample, so their loaders must yield the same batches: key samplers to the"
                " data-parallel rank (trainer.strategy.distributed_sampler_kwargs), not the global rank, and seed any"
                " randomness in the dataset identically on these ranks."
            )
