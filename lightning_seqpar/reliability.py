"""One decision on non-finite steps across all ranks, so that a NaN on one rank cannot make the ranks diverge.

A NaN on one rank must not make that rank skip a step the others take: the ranks of a run would then hold
different weights from that step on, silently. :func:`nonfinite_step_guard` agrees on one flag over the
whole world (one all-reduce of a single number per step) before anyone acts on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

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
    grads = [p.grad for p in parameters if p.grad is not None]
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
