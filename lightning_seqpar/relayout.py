"""Resume a ZeRO checkpoint on another layout: merge the shards of any data x sequence size, re-shard for this run.

DeepSpeed's own route (``ds_to_universal`` + ``load_universal``) knows Adam's ``exp_avg``/``exp_avg_sq`` only and
fails with ``KeyError: 'exp_avg'`` on SGD's ``momentum_buffer``. Here every optimizer state that is partitioned
like the fp32 master weights (whatever its name) is merged with the same reconstruction DeepSpeed's
``zero_to_fp32`` applies to the weights (:func:`read_full_state`), and handed to the new engine per parameter
through DeepSpeed's public ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``, which partition it
for the new ranks and ZeRO stage (:func:`load_full_state`). Scalar states (Adam's ``step``) and the optimizer's
hyperparameters are copied. Every rank reads the shards (from a shared file system) and keeps one full fp32 copy
of weights and state in host memory while loading.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class FullState:
    """A ZeRO checkpoint's state with the partitions merged: ``{name: tensor}`` per state, as in the module."""

    weights: dict[str, Tensor]
    optimizer: dict[str, dict[str, Tensor]]  # {state key, e.g. "momentum_buffer": {parameter name: tensor}}
    scalars: dict[str, Any] = field(default_factory=dict)  # per-partition scalars, e.g. Adam's "step"
    param_groups: list[dict[str, Any]] = field(default_factory=list)  # hyperparameters (lr, momentum, betas, ...)
    engine_counters: dict[str, int] = field(default_factory=dict)  # global_steps, global_samples, skipped_steps


def _partition_states(shard: dict[str, Any], stage: int) -> tuple[list[Tensor], dict[int, dict[str, Any]], list[dict]]:
    """(fp32 partitions per group, base optimizer state per group, param groups) of one rank's optimizer file."""
    if stage <= 2:
        return (
            shard["single_partition_of_fp32_groups"],
            shard["base_optimizer_state"]["state"],
            shard["base_optimizer_state"]["param_groups"],
        )
    return (
        shard["fp32_flat_groups"],
        shard["optimizer_state_dict"]["state"],
        shard["optimizer_state_dict"]["param_groups"],
    )


def read_full_state(ds_dir: str | os.PathLike) -> FullState:
    """Merge the ZeRO-1/2/3 shards under ``ds_dir`` (``<checkpoint>/checkpoint``) into full per-parameter tensors.

    Raises:
        ValueError: when ``ds_dir`` holds no ZeRO optimizer shards.
    """
    from deepspeed.utils import zero_to_fp32 as z

    model_files = z.get_model_state_files(str(ds_dir))
    zero_model_states = z.parse_model_states(model_files)
    shards = [
        torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for f in z.get_optim_files(str(ds_dir))
    ]
    if not shards or "zero_stage" not in shards[0]:
        raise ValueError(f"{ds_dir} holds no ZeRO optimizer shards (*_optim_states.pt).")
    stage = int(shards[0]["zero_stage"])
    world = shards[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    per_rank = [_partition_states(s, stage) for s in shards]
    flat_groups = {"fp32": [fp32 for fp32, _, _ in per_rank]}
    scalars: dict[str, Any] = {}
    first_state = per_rank[0][1]
    for key, value in (first_state.get(0) or {}).items():
        if isinstance(value, Tensor) and value.numel() == per_rank[0][0][0].numel():
            flat_groups[key] = [[state[g][key] for g in range(len(fp32))] for fp32, state, _ in per_rank]
        else:
            scalars[key] = value
    merged: dict[str, dict[str, Tensor]] = {}
    for key, groups in flat_groups.items():
        state: dict[str, Any] = OrderedDict()
        if stage <= 2:
            z._zero2_merge_trainable_params(
                state, world, groups, zero_model_states, shards[0].get("param_alignment_paddings")
            )
        else:
            z._zero3_merge_trainable_params(state, world, groups, zero_model_states)
            state = z.to_torch_tensor(state)
        merged[key] = {name: t.detach().clone() for name, t in state.items()}
    model_state = torch.load(model_files[0], map_location="cpu", weights_only=False)
    weights = {**zero_model_states[0].buffers, **merged.pop("fp32")}
    counters = {k: int(model_state.get(k, 0) or 0) for k in ("global_steps", "global_samples", "skipped_steps")}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in per_rank[0][2]]
    return FullState(weights=weights, optimizer=merged, scalars=scalars, param_groups=groups, engine_counters=counters)


def load_full_state(engine: Any, state: FullState) -> None:
    """Load ``state`` into a DeepSpeed ``engine`` of any ZeRO stage and size (every rank; collective under ZeRO-3).

    Raises:
        ValueError: when the parameter names or optimizer states do not match this engine's.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    module: nn.Module = engine.module
    parameters = dict(module.named_parameters())
    missing = sorted(set(parameters) - set(state.weights))
    if missing:
        raise ValueError(f"the checkpoint has no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    _create_optimizer_state(engine, base, state)
    with deepspeed.zero.GatheredParameters(list(parameters.values()), modifier_rank=0, enabled=_zero3(module)):
        with torch.no_grad():
            for name, p in parameters.items():
                p.data.copy_(state.weights[name].to(p.dtype).view_as(p.data))
    for name, p in parameters.items():
        if hasattr(p, "ds_id"):
            _set_zero3_partition(p, state.weights[name], None)
            for key, values in state.optimizer.items():
                _set_zero3_partition(p, values[name], key)
            continue
        safe_set_full_fp32_param(p, state.weights[name].to(p.device))
        for key, values in state.optimizer.items():
            safe_set_full_optimizer_state(p, values[name].to(p.device), key)
    buffers = {name: t for name, t in state.weights.items() if name not in parameters}
    module.load_state_dict(buffers, strict=False)
    for group, saved in zip(base.param_groups, state.param_groups):
        group.update({k: v for k, v in saved.items() if k in group})
    for key, value in state.engine_counters.items():
        setattr(engine, key, value)


def _set_zero3_partition(param: Tensor, value: Tensor, key: str | None) -> None:
    """This rank's slice of ``value`` into ZeRO-3's fp32 partition (``key=None``) or optimizer state of ``param``.

    DeepSpeed 0.19.8's ``set_full_hp_param`` reads past the end of ``value`` on the ranks whose partition is
    padding (a parameter with fewer elements than ranks); the slice is cut here, the padding left at zero.
    """
    optimizer = param._z3_optimizer  # type: ignore[attr-defined]
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = partition.numel() * optimizer._get_param_partition_rank(param)
    piece = value.detach().flatten()[start:start + partition.numel()].to(partition)
    partition.data.zero_()
    partition.data[: piece.numel()].copy_(piece)


def _zero3(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _create_optimizer_state(engine: Any, base: torch.optim.Optimizer, state: FullState) -> None:
    """Give every flat fp32 partition of the new engine the checkpoint's optimizer states (zeros, filled per
    parameter afterwards) and scalars: torch optimizers create their state at the first step, DeepSpeed links
    its per-parameter views of it after that step, so neither exists yet on a fresh engine."""
    # ZeRO-3 keeps its flat partitions out of the optimizer's groups between steps.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        p for g in base.param_groups for p in g["params"]
    ]
    for flat in flats:
        partition_state = base.state[flat]
        for key in state.optimizer:
            if key not in partition_state:
                partition_state[key] = torch.zeros_like(flat)
        for key, value in state.scalars.items():
            partition_state[key] = value.clone() if isinstance(value, Tensor) else value
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the views now
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def checkpoint_client_state(ds_dir: str | os.PathLike, keys: list[str]) -> dict[str, Any]:
    """The Lightning state (loops, epoch, callbacks, schedulers, ...) saved with the shards under ``keys``."""
    from deepspeed.utils import zero_to_fp32 as z

    saved = torch.load(z.get_model_state_files(str(ds_dir))[0], map_location="cpu", weights_only=False)
    return {k: saved[k] for k in keys if k in saved}


def shard_directory(checkpoint_dir: str | os.PathLike, tag: str) -> Path:
    """The directory DeepSpeed writes the shards of checkpoint ``tag`` to: ``checkpoint_dir / tag``."""
    return Path(checkpoint_dir) / tag
