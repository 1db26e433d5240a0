"""DeepSpeed ZeRO on the sequence-parallel groups: the engine config from Lightning's settings, the engine, full weights
and checkpoints.

The engine sees the :class:`~lightning_seqpar.topology.DeepSpeedMPU` ("flat" mpu): DeepSpeed's data
parallelism is our sequence-data group of ``dp * sp`` ranks, so ZeRO partitions parameters, gradients and
optimizer state over every rank of a pipeline stage, and the gradient all-reduce divides by ``dp * sp``,
exactly as the DDP path does. Consequence: DeepSpeed counts SP ranks as replicas in its ``train_batch_size``,
so that key is never set (only the micro-batch size and the accumulation steps are).

Checkpoints are DeepSpeed directories (each rank writes its shard); :func:`consolidate_checkpoint` turns one
into a single fp32 state dict (``python -m lightning_seqpar.consolidate DIR OUT``).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

ZeroStage = Literal[0, 1, 2, 3]
CHECKPOINT_TAG = "checkpoint"
LAYOUT_FILE = "seqpar_layout.json"
_PRECISION_KEYS = {
    "bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16",
    "16-mixed": "fp16", "16-true": "fp16", "16": "fp16",
    "32-true": None, "32": None, "64-true": None,
}


class DeepSpeedConfigError(ValueError):
    """Raised when the DeepSpeed settings cannot work on the sequence-parallel groups."""


def load_user_config(config: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """A DeepSpeed config given as a dict or a JSON file path (a deep copy; empty when None)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = Path(config)
    if not path.is_file():
        raise DeepSpeedConfigError(f"deepspeed_config={str(config)!r} is neither a dict nor an existing JSON file.")
    return json.loads(path.read_text())


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, nested dicts key by key (the explicit config wins)."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, Mapping) and isinstance(merged.get(key), dict) else value
        )
    return merged


def build_config(
    *,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    precision: str = "32-true",
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str | None = None,
    gradient_accumulation_steps: int = 1,
    micro_batch_size: int = 1,
    user_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for Lightning's settings; keys of ``user_config`` override the derived ones.

    Args:
        zero_stage: ZeRO stage 0-3 (0: plain data parallelism over the sequence-data group).
        offload_optimizer: Optimizer state (and the fp32 master weights) in host memory (ZeRO 1-3).
        offload_parameters: Parameters in host memory between uses (ZeRO-3 only).
        precision: Lightning's precision string: ``bf16-*`` enables ``bf16``, ``16-*`` enables ``fp16``.
        gradient_clip_val: ``Trainer(gradient_clip_val=...)``; None or 0 turns clipping off. Always written,
            because DeepSpeed 0.19.8 clips at 1.0 when the key is absent.
        gradient_clip_algorithm: Only ``"norm"`` (DeepSpeed has no clipping by value).
        gradient_accumulation_steps: ``Trainer(accumulate_grad_batches=...)`` (pipelines: micro-batches per step).
        micro_batch_size: Samples per rank per micro-batch (DeepSpeed uses it for its throughput log only).
        user_config: An explicit DeepSpeed config; may not set ``train_batch_size`` (see the module docstring).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}.")
    if offload_optimizer and zero_stage == 0:
        raise DeepSpeedConfigError("offload_optimizer=True needs zero_stage >= 1 (DeepSpeed offloads ZeRO partitions).")
    if offload_parameters and zero_stage != 3:
        raise DeepSpeedConfigError(
            "offload_parameters=True needs zero_stage=3 (parameters are only partitioned by ZeRO-3), got"
            f" zero_stage={zero_stage}."
        )
    if gradient_clip_val and gradient_clip_algorithm not in (None, "norm"):
        raise DeepSpeedConfigError(
            f"DeepSpeed clips gradients by norm only; got gradient_clip_algorithm={gradient_clip_algorithm!r}."
            " Use Trainer(gradient_clip_algorithm='norm')."
        )
    if precision not in _PRECISION_KEYS:
        raise DeepSpeedConfigError(
            f"precision {precision!r} is not supported with DeepSpeed; use 32-true, bf16-mixed, bf16-true or 16-mixed."
        )
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "gradient_clipping": float(gradient_clip_val or 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the optimizer comes from configure_optimizers
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    half = _PRECISION_KEYS[precision]
    if half is not None:
        config[half] = {"enabled": True}
    config = _merge(config, user_config or {})
    if "train_batch_size" in config:
        raise DeepSpeedConfigError(
            "do not set train_batch_size in deepspeed_config: DeepSpeed counts the sequence-parallel ranks as data"
            " replicas, so its batch arithmetic would be off by sequence_parallel_size. Set"
            " train_micro_batch_size_per_gpu and gradient_accumulation_steps (or Trainer(accumulate_grad_batches=...))."
        )
    return config


def attach_to_process_group() -> None:
    """Make DeepSpeed's communication layer wrap the process group Lightning created (it creates none itself)."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


def initialize_engine(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, config: dict[str, Any], mpu: Any
) -> tuple[Any, Any]:
    """``deepspeed.initialize`` on the existing process groups; returns ``(engine, engine optimizer)``.

    ``optimizer`` is the client optimizer from ``configure_optimizers`` (None when ``config`` has an
    ``"optimizer"`` section). ``mpu`` is the flat :class:`~lightning_seqpar.topology.DeepSpeedMPU`, or None for a
    ``PipelineModule``, which brings its own grid.
    """
    import deepspeed

    attach_to_process_group()
    parameters = None if optimizer is not None else [p for p in model.parameters() if p.requires_grad]
    engine, engine_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=parameters, config=config, mpu=mpu, dist_init_required=False
    )
    return engine, engine_optimizer


def restrict_optimizer(optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter]) -> None:
    """Keep only ``parameters`` in ``optimizer``'s groups (a pipeline stage optimizes its own layers only)."""
    keep = {id(p) for p in parameters}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in keep]
    if any(not group["params"] for group in optimizer.param_groups):
        raise DeepSpeedConfigError(
            "a parameter group of the optimizer has no parameter on this pipeline stage; with pipeline_stages > 1,"
            " put all parameters in one group (or groups that every stage has)."
        )


def is_zero3_partitioned(module: nn.Module) -> bool:
    """True when ZeRO-3 holds ``module``'s parameters as partitions (each rank keeps only its slice)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unpartitioned) state dict of ``module``, on CPU; collective under ZeRO-3 (call on every rank)."""
    if not is_zero3_partitioned(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# --- checkpoints ------------------------------------------------------------------------------------------


def write_layout(directory: str | os.PathLike, layout: Mapping[str, Any]) -> None:
    """Record the parallel layout next to the shards (rank 0), so a resume can check it before loading."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / LAYOUT_FILE).write_text(json.dumps(dict(layout), indent=1, sort_keys=True))


def read_layout(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The layout :func:`write_layout` recorded in ``directory`` (None for a file, or a directory without one)."""
    path = Path(directory) / LAYOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def layout_differences(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any], keys: Iterable[str] | None = None
) -> list[str]:
    """The settings in which a checkpoint's recorded layout (``checkpoint["seqpar"]`` or :func:`read_layout`) differs
    from this run's, one ``"key: checkpoint X, now Y"`` line each, over ``keys`` (default: every key of ``current``).
    Empty when nothing differs or nothing was recorded. ``attention="auto"`` on either side matches any kind (it is
    resolved only once the model is known, after a checkpoint may have been read)."""
    if not saved:
        return []
    return [
        f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
        for key in (keys or current)
        if saved.get(key) != current.get(key)
        and not (key == "attention" and "auto" in (saved.get(key), current.get(key)))
    ]


def check_resume_layout(
    directory: str | os.PathLike, saved: Mapping[str, Any] | None, current: Mapping[str, Any], *, load_universal: bool
) -> bool:
    """Whether the ZeRO shards under ``directory`` must be re-laid out for this run (:mod:`lightning_seqpar.relayout`).

    Returns False when the shards load as they are (same ``dp * sp`` and ZeRO stage, or ``load_universal``) and
    True when they were written for another ``dp * sp`` or another ZeRO stage >= 1 (merged and re-sharded at load).

    Raises:
        DeepSpeedConfigError: for a layout that cannot be converted (pipeline stages changed or used on either side,
            or ZeRO stage 0 on either side), with the command that turns the checkpoint into fp32 weights to start from.
    """
    keys = ("pipeline_parallel_size", "zero_stage", "sequence_data_parallel_size")
    if load_universal or not layout_differences(saved, current, keys):
        return False
    assert saved is not None
    pipelines = saved.get("pipeline_parallel_size", 1) != 1 or current.get("pipeline_parallel_size", 1) != 1
    if pipelines or not saved.get("zero_stage") or not current.get("zero_stage"):
        written = ", ".join(f"{k}={saved.get(k)}" for k in keys)
        now = ", ".join(f"{k}={current.get(k)}" for k in keys)
        raise DeepSpeedConfigError(
            f"checkpoint {str(directory)!r} was written with {written}; this run has {now}. Optimizer state moves"
            " between ZeRO layouts (any data x sequence size, ZeRO stage 1-3) but not into or out of pipeline stages"
            " or ZeRO-0. Resume with the same settings, or start from its fp32 weights (the optimizer state"
            f" restarts): python -m lightning_seqpar.consolidate {shlex.quote(str(directory))} weights.pt"
            " then module.load_state_dict(torch.load('weights.pt')['state_dict']) and fit without ckpt_path."
        )
    return True


# What DeepSpeed itself writes into a rank's model-states file; everything else there is Lightning's checkpoint
# (hyperparameters, loops, callbacks, the layout, a LightningModule's own keys), passed as client_state.
_DEEPSPEED_STATE_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version",
    "csr_tensor_module_names",
})


def _lightning_state(checkpoint_dir: Path, tag: str | None) -> dict[str, Any]:
    """The Lightning part of rank 0's model-states file (``{}`` if there is none)."""
    if tag is None:
        latest = checkpoint_dir / "latest"
        tag = latest.read_text().strip() if latest.is_file() else CHECKPOINT_TAG
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"):
        path = checkpoint_dir / tag / name
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            return {k: v for k, v in state.items() if k not in _DEEPSPEED_STATE_KEYS}
    return {}


def consolidate_checkpoint(
    checkpoint_dir: str | os.PathLike, output_file: str | os.PathLike | None = None, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """Rebuild the full fp32 ``state_dict`` of the LightningModule from a sharded DeepSpeed checkpoint (one process).

    Args:
        checkpoint_dir: The directory Lightning wrote (``.../epoch=0-step=4.ckpt/``), holding ``checkpoint/``.
        output_file: If given, save one Lightning checkpoint file there: the full ``state_dict`` with the rest of
            what Lightning saved (``hyper_parameters``, epoch and step, callbacks, a module's own keys), so that
            ``LightningModule.load_from_checkpoint(output_file)``, ``load_state_dict`` and
            ``Trainer.test(ckpt_path=...)``
            read it. Optimizer states stay in the shards.
        tag: The tag sub-directory; default: DeepSpeed's ``latest`` file, else ``checkpoint``.

    Returns:
        The consolidated state dict (keys as in ``LightningModule.state_dict()``).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if tag is None and not (checkpoint_dir / "latest").is_file():
        tag = CHECKPOINT_TAG
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    if output_file is not None:
        torch.save({**_lightning_state(checkpoint_dir, tag), "state_dict": state_dict}, output_file)
    return state_dict
