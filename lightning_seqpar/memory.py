"""Memory savers for very long sequences on one device: fp32 master weights for a bf16 model.

:class:`MasterWeightAdamW` lets the model hold bf16 parameters (so the residual stream, the checkpointed block
inputs and LayerNorm's saved inputs are bf16, and no fp32 copy is made under autocast) while the update is computed
on fp32 master weights, as mixed-precision training does. Recomputation (activation checkpointing, token-chunked
modules, host-offloaded block inputs) is in :mod:`lightning_seqpar.wrapping`. Measured effects are in
benchmarks/NOTES.md; the memory model (bytes per token per block) is in docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["MasterWeightAdamW"]


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on fp32 copies of (bf16) model parameters; the model's parameters are overwritten after each step.

    Args:
        params: The model's parameters (an iterable of tensors or of param-group dicts), any dtype.
        **kwargs: AdamW options (``lr``, ``betas``, ``weight_decay``, ``fused``, ...).

    Memory per parameter: model copy (2 bytes in bf16) + master (4) + two moments (8) + transient fp32 grad (4).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], **kwargs: Any) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._model_params: list[Tensor] = []
        master_groups = []
        for group in groups:
            model_params = [p for p in group["params"] if p.requires_grad]
            self._model_params += model_params
            masters = [p.detach().to(torch.float32, copy=True).requires_grad_(True) for p in model_params]
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)

    def _masters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masters = self._masters()
        for p, master in zip(self._model_params, masters, strict=True):
            master.grad = None if p.grad is None else p.grad.to(torch.float32)
        super().step()
        for p, master in zip(self._model_params, masters, strict=True):
            p.copy_(master)
            master.grad = None
        return loss
