"""Per-sample random draws inside the sequence-parallel region: the same on every rank of the group.

Inside the region each rank holds a slice of every sample's tokens and draws from a random stream of its own
(:meth:`~lightning_seqpar.parallelize.SequenceParallelRuntime.enter`), which is right for token-level dropout.
Stochastic depth (drop path, Huang et al. 2016, arXiv 1603.09382) draws one number per *sample* and drops the whole
residual branch of that sample; with per-rank streams the ranks of a group would drop the branch for some of a
sample's tokens and keep it for the others, a draw no single device can make. While a drop-path module runs in the
region (timm ``DropPath``, Hugging Face ``*DropPath``, torchvision ``StochasticDepth``), every random tensor it
draws is broadcast from the group's first rank, so the group agrees. Activation-checkpoint recomputation replays the
same draws (torch restores each rank's stream, and the broadcast runs again from the same rank).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_seqpar.comm import group_size

_RANDOM = {
    torch.rand, torch.randn, torch.randint, torch.bernoulli, torch.normal, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.multinomial, Tensor.bernoulli_, Tensor.uniform_, Tensor.normal_, Tensor.random_,
    Tensor.exponential_, Tensor.geometric_, Tensor.cauchy_, Tensor.log_normal_, Tensor.bernoulli,
}


def is_drop_path(module: nn.Module) -> bool:
    """Whether ``module`` is a stochastic-depth module (class name ``DropPath`` or ``StochasticDepth``, any prefix)."""
    name = type(module).__name__.lower()
    return name.endswith("droppath") or name.endswith("stochasticdepth")


class SharedDraws(TorchFunctionMode):
    """While active, every random tensor drawn is replaced by the group's first rank's draw (one broadcast each).

    Args:
        group: The sequence-parallel process group.
        active: Whether the draws must be shared now (inside the region, or in a recomputation in backward).
    """

    def __init__(self, group: dist.ProcessGroup, active: Callable[[], bool]) -> None:
        super().__init__()
        self.group, self.active = group, active

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RANDOM and isinstance(out, Tensor) and self.active():
            shared = out.contiguous()
            dist.broadcast(shared, src=dist.get_global_rank(self.group, 0), group=self.group)
            if shared is not out:
                out.copy_(shared)
        return out


def share_drop_path_draws(block: nn.Module, group: dist.ProcessGroup, active: Callable[[], bool],
                          wrap_forward: Callable[[nn.Module, Callable[[Callable], Callable]], None]) -> int:
    """Make every drop-path module inside ``block`` draw the same per-sample numbers on all ranks of ``group``
    (:class:`SharedDraws` around its forward, run eagerly under ``torch.compile``); returns how many were wrapped."""
    if group_size(group) == 1:
        return 0
    wrapped = 0
    for module in block.modules():
        if not is_drop_path(module):
            continue

        def make(inner: Callable) -> Callable:
            @torch.compiler.disable
            def forward(*args: Any, **kwargs: Any) -> Any:
                with SharedDraws(group, active):
                    return inner(*args, **kwargs)

            return forward

        wrap_forward(module, make)
        wrapped += 1
    return wrapped
