"""What `seqpar` checks and derives before it starts any process: the data, the model's field options, the strategy
name, the sequence-parallel size against the attention heads, and which checkpoint ``--ckpt_path last`` means.

Every error is a :class:`ConfigError` whose message starts with the command-line option to change, so a
mistake costs one process and one line, not N processes and a thousand lines of tracebacks.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ConfigError", "check_data", "check_model", "check_strategy", "derive_data_options", "resolve_checkpoint"]


class ConfigError(ValueError):
    """A configuration problem found before launching; the message names the option to set."""


def _plain(value: Any) -> Any:
    """jsonargparse Namespaces -> dicts, recursively."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def _first_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return str(text).strip()


# --- data -------------------------------------------------------------------------------------------------

def derive_data_options(data: dict[str, Any]) -> dict[str, Any]:
    """Fills what a recipe leaves to the store: split years written ``last`` become the store's last year.

    ``train_years: null`` already means "every year not held out", and ``lead_time_hours: null`` one time step
    of the store (both understood by :class:`ERA5DataModule`). Returns the changed options (for the log).

    Raises:
        ConfigError: when the store cannot be opened or has no year to hold out, naming ``--data.path``.
    """
    wanted = [
        k
        for k in ("train_years", "val_years", "test_years")
        if isinstance(data.get(k), str) and data[k].strip() == "last"
    ]
    if not wanted:
        return {}
    store = _open_store(data)
    years = sorted({int(y) for y in np.unique(store.years)})
    if len(years) < 2:
        raise ConfigError(
            f"--data.{wanted[0]}: the recipe holds out the last year of the store, but {data['path']!r} has only "
            f"{years}; "
            "set --data.train_years, --data.val_years and --data.test_years to split it yourself"
        )
    derived = {k: [years[-1]] for k in wanted}
    data.update(derived)
    return derived


def _open_store(data: dict[str, Any]):
    from lightning_seqpar.weather.data.store import ERA5Store

    try:
        return ERA5Store(str(data["path"]), data.get("select_index"), data.get("duplicate_times", "error"))
    except FileNotFoundError as err:
        raise ConfigError(f"--data.path: {_first_line(err)}") from None
    except ValueError as err:
        text = _first_line(err)
        if "duplicate_times" in text:
            raise ConfigError(
                f"--data.duplicate_times: {text} (on the command line: --data.duplicate_times keep_first)"
            ) from None
        raise ConfigError(f"--data.path: {text}") from None
    except OSError as err:
        raise ConfigError(f"--data.path: {_first_line(err)}") from None


def check_data(data: dict[str, Any]) -> ERA5DataModule:  # noqa: F821 - imported inside, the data stack is heavy
    """Opens the store and checks the fields, split years and lead times the run will ask of it.

    Returns:
        The ``ERA5DataModule`` built from ``data`` (nothing read but coordinates).

    Raises:
        ConfigError: naming ``--data.path``, ``--data.variables``, ``--data.out_variables``,
            ``--data.<split>_years``, ``--data.lead_time_hours`` or ``--data.duplicate_times``.
    """
    from lightning_seqpar.weather.data.era5 import ERA5DataModule

    store = _open_store(data)
    for option in ("variables", "out_variables"):
        for field in data.get(option) or []:
            try:
                store.resolve(field)
            except (KeyError, ValueError) as err:
                hint = (
                    " (null, the default, means the same fields as --data.variables)"
                    if option == "out_variables"
                    else ""
                )
                raise ConfigError(f"--data.{option}: {_first_line(err)}{hint}") from None
    try:
        dm = ERA5DataModule(**data)
    except ValueError as err:
        raise ConfigError(f"--data: {_first_line(err)}") from None
    dm._store = store
    for split in ("train", "val", "test"):
        if split == "train" or dm.split_years[split] is not None:
            try:
                dm.split_indices(split)
            except ValueError as err:
                raise ConfigError(f"--data.{split}_years: {_first_line(err)}") from None
    for hours in dm.lead_times_hours:
        ratio = hours / store.step_hours
        if abs(ratio - round(ratio)) > 1e-9:
            raise ConfigError(
                f"--data.lead_time_hours: {hours} h is not a multiple of the {store.step_hours:g} h time step "
                f"of {data['path']!r}; use e.g. {int(store.step_hours)} (or null: one time step)"
            )
    return dm


# --- model ------------------------------------------------------------------------------------------------

def check_model(model: dict[str, Any], dm) -> None:
    """``loss_weights`` must name output fields and ``residual`` needs every output among the inputs.

    Raises:
        ConfigError: naming ``--model.loss_weights`` or ``--model.residual`` and what to change.
    """
    variables, out_variables = dm.variables, dm.out_variables
    canonical = {}
    for name in (model.get("loss_weights") or {}):
        try:
            canonical[name] = dm.store.canonical(name)
        except (KeyError, ValueError):
            canonical[name] = name
    unknown = sorted(n for n, c in canonical.items() if c not in out_variables)
    if unknown:
        raise ConfigError(f"--model.loss_weights names {unknown}, which are not output fields {out_variables}; "
                          "weigh output fields, or --model.loss_weights null for equal weights")
    absent = [f for f in out_variables if f not in variables]
    if model.get("residual") and absent:
        raise ConfigError(f"--model.residual true forecasts input + change, but output fields {absent} are not inputs; "
                          "add them to --data.variables or pass --model.residual false")


# --- strategy and devices ---------------------------------------------------------------------------------

def _strategy_settings(strategy: Any) -> tuple[str | None, dict[str, Any]]:
    """``(name or class path, its init arguments)`` for a strategy given as a registered name or a class_path."""
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = _plain(strategy)
    if isinstance(strategy, str):
        name = strategy.lower()
        if name in StrategyRegistry:
            entry = StrategyRegistry[name]
            return f"{entry['strategy'].__module__}.{entry['strategy'].__name__}", dict(entry["init_params"])
        return name, {}
    if isinstance(strategy, dict):
        return strategy.get("class_path"), dict(strategy.get("init_args") or {})
    return type(strategy).__module__ + "." + type(strategy).__name__, {}


def _world_size(trainer: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(processes on this node, processes in all)`` the trainer options ask for; ``None`` where unknown."""
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes") or 1)
    accelerator = str(trainer.get("accelerator") or "auto")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    elif accelerator == "cpu":
        per_node = 1  # Lightning runs one CPU process for "auto" / -1
    else:
        return None, None
    return per_node, per_node * nodes


def check_strategy(trainer: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """Checks the strategy name and, for Ulysses attention, heads against the sequence-parallel size.

    Returns:
        warnings to print (more CPU processes than cores).

    Raises:
        ConfigError: an unknown strategy name (with the nearest registered names), or fewer attention heads
            than sequence-parallel ranks under Ulysses.
    """
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = _plain(trainer.get("strategy", "auto"))
    if isinstance(strategy, str) and strategy.lower() != "auto" and strategy.lower() not in StrategyRegistry:
        names = StrategyRegistry.available_strategies()
        close = difflib.get_close_matches(strategy.lower(), names, n=3, cutoff=0.6)
        seqpar = ", ".join(n for n in names if n.startswith("seqpar"))
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(f"--trainer.strategy: {strategy!r} is not a registered strategy; {hint}"
                          f"lightning-seqpar registers {seqpar} (and Lightning: auto, ddp, fsdp, deepspeed, ...)")
    notes = []
    per_node, world = _world_size(trainer)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if str(trainer.get("accelerator")) == "cpu" and per_node and per_node > cores:
        notes.append(f"--trainer.devices {per_node} starts {per_node} processes on {cores} CPU cores: they will share "
                     f"the cores and run slowly; --trainer.devices {cores} or fewer runs faster")
    path, init = _strategy_settings(strategy)
    if not path or not path.endswith("SeqParStrategy") or world is None:
        return notes
    attention = init.get("attention", "ulysses")
    stages = int(init.get("pipeline_stages", 1) or 1)
    sp = init.get("sequence_parallel_size") or (per_node // stages if per_node % stages == 0 else per_node)
    heads = _model_heads(model)
    if attention == "ulysses" and heads is not None and heads < sp:
        raise ConfigError(
            f"--trainer.devices: Ulysses attention splits the model's {heads} heads over the {sp} ranks of the "
            f"sequence-parallel group, and each rank needs at least one; use --trainer.devices {heads} or fewer, "
            f"--trainer.strategy seqpar_lss (no limit on ranks), or --model.model.init_args.num_heads {sp} or more")
    return notes


def _model_heads(model: dict[str, Any]) -> int | None:
    """``num_heads`` of the configured network (its init_args, else its class's default), or ``None``."""
    network = _plain(model.get("model"))
    if not isinstance(network, dict):
        return None
    heads = (network.get("init_args") or {}).get("num_heads")
    if heads is None and network.get("class_path"):
        try:
            module, _, name = network["class_path"].rpartition(".")
            cls = getattr(__import__(module, fromlist=[name]), name)
            default = inspect.signature(cls).parameters.get("num_heads")
            heads = None if default is None or default.default is inspect.Parameter.empty else default.default
        except (ImportError, AttributeError, ValueError):
            return None
    return int(heads) if isinstance(heads, int) else None


# --- checkpoints ------------------------------------------------------------------------------------------

def _run_dirs(root: Path) -> list[Path]:
    """Checkpoint directories of the runs under ``root``, oldest first: ``*/version_N/checkpoints`` by N, then
    ``root/checkpoints`` (a run without a logger)."""
    found = []
    for path in list(root.glob("*/version_*/checkpoints")) + list(root.glob("version_*/checkpoints")):
        match = re.fullmatch(r"version_(\d+)", path.parent.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path.stat().st_mtime, path))
    if (root / "checkpoints").is_dir():
        found.append((-1, (root / "checkpoints").stat().st_mtime, root / "checkpoints"))
    return [p for *_, p in sorted(found, key=lambda t: (t[0], t[1]))]


def _last_in(directory: Path) -> Path | None:
    """The run's ``last.ckpt`` (``save_last``), else its newest checkpoint, else ``None``."""
    for pattern in ("last*.ckpt", "*.ckpt"):
        candidates = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return None


def resolve_checkpoint(which: str, root: str | Path) -> Path:
    """The file that ``--ckpt_path last`` or ``best`` means: of the latest run under ``root`` that saved one.

    ``last`` is that run's ``last.ckpt`` (its newest checkpoint without ``save_last``); ``best`` is the best model
    path its ModelCheckpoint recorded in
    ``last.ckpt``. Runs are Lightning's versions, ``<root>/<logger name>/version_N/checkpoints``, latest = largest N.

    Raises:
        ConfigError: no run under ``root`` saved a checkpoint, or its ``last.ckpt`` records no best model.
    """
    root = Path(root)
    runs = [d for d in _run_dirs(root) if _last_in(d) is not None]
    if not runs:
        raise ConfigError(
            f"--ckpt_path {which}: no run under {str(root)!r} (trainer.default_root_dir) saved a checkpoint "
            f"(looked in {root}/*/version_N/checkpoints); train first with `seqpar fit`, or pass the "
            "checkpoint file itself: --ckpt_path PATH"
        )
    last = _last_in(runs[-1])
    if which == "last":
        return last
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    best = [s.get("best_model_path") for k, s in (state.get("callbacks") or {}).items() if "ModelCheckpoint" in str(k)]
    best = [b for b in best if b]
    if not best or not Path(best[0]).exists():
        raise ConfigError(f"--ckpt_path best: {last} records no best checkpoint that still exists (ModelCheckpoint "
                          "needs a monitor); use --ckpt_path last or a file")
    return Path(best[0])
