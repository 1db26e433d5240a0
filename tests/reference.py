"""The single-process reference that distributed training tests compare against: one model, the global batches.

Every multi-process training test records which samples each optimizer step saw (its *global batches*), then
trains one model in one process on exactly those samples with the module's own optimizer and MSE loss, and
compares losses and weights. This file is that loop, written once; the variants the tests need (how the module
is built and seeded, a saved state to start from) are parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule


@dataclass
class Reference:
    """What the single process did.

    Attributes:
        losses: the loss of each optimizer step, before the step (one float per global batch).
        state: ``module.state_dict()`` after the last step (the module's own tensors, not copies).
        module: the trained LightningModule; ``module.model`` is the network.
    """

    losses: list[float]
    state: dict[str, torch.Tensor]
    module: LightningModule


def train_single_process(make_module: Callable[[], LightningModule], global_batches: Sequence[Sequence[int]],
                         dataset, seed: int | None, initial_state: dict[str, torch.Tensor] | None = None) -> Reference:
    """Trains ``make_module()`` in this process: one optimizer step per global batch, ``mse_loss(model(x), y)``.

    Args:
        make_module: builds the module (its ``model`` is the network, ``configure_optimizers()`` returns one
            optimizer: SGD, SGD with momentum or AdamW, as in the distributed run).
        global_batches: sample indices of each optimizer step, e.g. every rank's ``seen`` of one step joined.
        dataset: gives ``x`` ``[N, L, D]`` inputs and ``y`` targets indexed by those indices (``RandomTokens``).
        seed: passed to ``seed_everything`` before ``make_module()``, as the distributed run seeded before building
            its module, so that both start from the same weights; ``None`` leaves the random state alone (give
            ``initial_state`` then).
        initial_state: a state dict loaded into the module before training (the weights a distributed run saved).

    Returns:
        a :class:`Reference`; with no global batches, the untrained module.
    """
    if seed is not None:
        from lightning.pytorch import seed_everything

        seed_everything(seed)
    module = make_module()
    if initial_state is not None:
        module.load_state_dict(initial_state)
    optimizer = module.configure_optimizers()
    losses = []
    for indices in global_batches:
        optimizer.zero_grad()
        loss = F.mse_loss(module.model(dataset.x[indices]), dataset.y[indices])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return Reference(losses, module.state_dict(), module)
