"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over the data x sequence parallel ranks, meta-device initialisation,
and checkpoints in ``torch.distributed.checkpoint`` (DCP) format that load at any layout.

The ranks of one sequence-parallel group hold the same parameters and each computes part of their gradient, so
parameters are sharded, and gradients reduce-scattered (averaged), over the flattened ``dp_sp`` mesh dimension:
one optimizer step then equals single-device training on the global batch, as DDP over the same ranks does
(PyTorch FSDP2, Zhao et al. arXiv 2304.11277 for the design it follows; torchtitan ``apply_fsdp``). With tensor
parallelism the parameters are already DTensors on the ``tp`` mesh and FSDP2 shards their local pieces over
``dp_sp`` (2-D, FSDP2 x TP), as Lightning's ``ModelParallelStrategy`` does.

Order: :func:`~lightning_seqpar.tensor_parallel.apply_tensor_parallel`, then
:func:`~lightning_seqpar.parallelize.apply_sequence_parallel`, then :func:`apply_fsdp`, then the optimizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.overrides import TorchFunctionMode

from lightning_seqpar.plan import find_block_stacks
from lightning_seqpar.tensor_parallel.styles import ROW_LAYOUT_ATTRIBUTE, reorder_rows


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    blocks: list[nn.Module] | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 over ``mesh``: each transformer block its own unit (its parameters gathered just
    before it runs, freed after), then the root (everything else: embeddings, norms, head).

    Args:
        model: The model, after tensor and sequence parallelism were applied; changed in place (its class and those
            of the blocks become ``FSDP...`` subclasses; parameters become DTensors sharded along dim 0).
        mesh: The ranks to shard over: the one-dimensional ``dp_sp`` mesh (``device_mesh["dp_sp"]``), or a 2-D
            ``(replicate, shard)`` mesh for HSDP.
        param_dtype: Dtype of the gathered parameters in forward and backward (e.g. ``torch.bfloat16``); None keeps
            the stored dtype. The sharded parameters and the optimizer stay in their own dtype (fp32).
        reduce_dtype: Dtype of the gradient reduce-scatter (e.g. ``torch.float32`` with bf16 compute); None uses
            ``param_dtype``.
        reshard_after_forward: Free each block's gathered parameters after its forward (ZeRO-3-like, one more
            all-gather in backward); False keeps them until backward (ZeRO-2-like).
        blocks: The units to shard separately; default: the children of the largest stack of repeated blocks
            (:func:`lightning_seqpar.plan.find_block_stacks`).

    Returns:
        ``model`` (now an ``FSDPModule``).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if blocks is None:
        stacks = find_block_stacks(model)
        blocks = list(stacks[0][1]) if stacks else []
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are used last in backward: keeping them gathered saves one all-gather.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def materialize_meta_model(
    model: nn.Module, device: torch.device | str, init_fn: Callable[[nn.Module], Any] | None = None
) -> nn.Module:
    """Allocate a model built on the meta device (after it was split and sharded) and initialise it in place.

    Build the model under ``torch.device("meta")`` (or with ``device="meta"``), apply tensor parallelism and
    :func:`apply_fsdp`, then call this: each rank allocates only its shards (``to_empty``) and runs the model's own
    initialisation on them: ``init_fn(model)`` if given, else ``model.init_weights()`` if it has one, else every
    module's ``reset_parameters()``. Plain tensors the initialisation copies into sharded parameters (e.g. a sin-cos
    table) are treated as replicated (``implicit_replication``), so each rank keeps its slice.

    Args:
        model: The sharded meta model.
        device: Where to allocate (``"cpu"``, ``"cuda"``, or ``torch.device("cuda", local_rank)``).
        init_fn: The initialisation to run instead of the model's own.

    Returns:
        ``model``. Buffers are allocated but hold garbage unless the initialisation fills them.

    Raises:
        ValueError: No initialisation was given or found.
    """
    model.to_empty(device=device)
    if init_fn is None and callable(getattr(model, "init_weights", None)):
        init_fn = lambda m: m.init_weights()
    if init_fn is None:
        resettable = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
        if not resettable:
            raise ValueError(
                f"{type(model).__name__} has no init_weights() and no module with reset_parameters(): pass"
                " init_fn=... to materialize_meta_model to initialise it."
            )
        init_fn = lambda m: [r.reset_parameters() for r in resettable]
    with torch.no_grad(), implicit_replication(), _CopyIntoShards():
        init_fn(model)
    return model


def has_meta_tensors(module: nn.Module) -> bool:
    """True when a parameter or buffer of ``module`` is on the meta device (built under ``torch.device("meta")``)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def materialize_meta_module(module: nn.Module, device: torch.device | str) -> None:
    """Allocate and initialise a (split, sharded) LightningModule built on the meta device, as the strategies do
    for a model created in ``configure_model`` under ``torch.device("meta")``.

    The module's own ``init_weights()`` initialises it if it has one; otherwise each child that holds parameters is
    initialised by its ``init_weights()`` (timm's ``VisionTransformer``, the bundled ClimaX) or else by every
    ``reset_parameters()`` inside it (:func:`materialize_meta_model`).

    Args:
        module: The LightningModule (or any module) after tensor parallelism and FSDP2 were applied.
        device: Where to allocate each rank's shards.

    Raises:
        ValueError: A parameter would be left uninitialised (after ``to_empty`` it holds whatever the memory held):
            it sits in a module without ``reset_parameters()`` and no ``init_weights()`` above it covers it. The
            message names the parameters and asks for an ``init_weights()``.
    """
    if callable(getattr(module, "init_weights", None)):
        materialize_meta_model(module, device)
        return
    orphans = [name for name, _ in module.named_parameters(recurse=False)]
    for child_name, child in module.named_children():
        if callable(getattr(child, "init_weights", None)):
            continue
        orphans += [f"{child_name}.{path}.{name}" if path else f"{child_name}.{name}"
                    for path, sub in child.named_modules() if not callable(getattr(sub, "reset_parameters", None))
                    for name, _ in sub.named_parameters(recurse=False)]
    if orphans:
        raise ValueError(
            f"{type(module).__name__} was built on the meta device, and the parameters {orphans} belong to modules"
            " without reset_parameters(), so nothing would initialise them (they would hold uninitialised memory)."
            " Give the model that holds them an init_weights() method that sets every parameter (it runs on each"
            " rank's shards after sharding), or build the model on a real device."
        )

    def initialise(root: nn.Module) -> None:
        for child in root.children():
            if callable(getattr(child, "init_weights", None)):
                child.init_weights()
            else:
                for sub in child.modules():
                    if callable(getattr(sub, "reset_parameters", None)):
                        sub.reset_parameters()

    materialize_meta_model(module, device, init_fn=initialise)


class _CopyIntoShards(TorchFunctionMode):
    """``sharded.copy_(whole)`` (a DTensor parameter from a plain tensor, e.g. a sin-cos table) copies this rank's
    piece of ``whole`` into its shard: what the copy means on one device, for any placement (DTensor's own copy_
    refuses shards it cannot propagate, such as a dimension of size 1 over 2 ranks)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func is Tensor.copy_
            and isinstance(args[0], DTensor)
            and isinstance(args[1], Tensor)
            and not isinstance(args[1], DTensor)
        ):
            dest, src = args[0], args[1]
            whole = src.to(device=dest.device, dtype=dest.dtype).expand(dest.shape).contiguous()
            piece = distribute_tensor(whole, dest.device_mesh, dest.placements, src_data_rank=None).to_local()
            dest.to_local().copy_(piece)
            return dest
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints (DCP): each rank writes its shards; a load at another layout reads the pieces it needs.
# ---------------------------------------------------------------------------------------------------------


def _row_layouts(model: nn.Module) -> dict[str, Tensor]:
    """``{parameter FQN: permutation}`` of parameters stored with reordered rows (fused qkv split by head)."""
    out = {}
    for path, module in model.named_modules():
        for name, permutation in getattr(module, ROW_LAYOUT_ATTRIBUTE, {}).items():
            out[f"{path}.{name}" if path else name] = permutation
    return out


def _optimizer_rows(model: nn.Module, optim_state: dict, to_original: bool, like: dict | None = None) -> dict:
    """Optimizer state tensors of reordered parameters (``exp_avg``, momentum; same shape as the parameter) moved to
    (``to_original``) or from the single-device row order, laid out like ``like``'s tensors (whole tensors without
    it); the model's state dict does this in its own hooks."""
    layouts = _row_layouts(model)
    state = optim_state.get("state", {})
    for fqn, permutation in layouts.items():
        if fqn not in state:
            continue
        state[fqn] = dict(state[fqn])  # get_state_dict hands out the optimizer's own per-parameter dicts
        for key, value in list(state[fqn].items()):
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == permutation.numel():
                if to_original:
                    state[fqn][key] = reorder_rows(value, torch.argsort(permutation))
                else:
                    state[fqn][key] = reorder_rows(value, permutation, like=like[fqn][key] if like else None)
    return optim_state


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state in the single-device layout, on rank 0's CPU; a collective (every rank calls).

    Tensor-parallel (and FSDP2) state tensors are gathered into whole tensors, fused projections' rows put back in
    their original order, and the state keyed by parameter name (``get_optimizer_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``): a ``torch.save`` checkpoint that :func:`load_full_optimizer_state`
    restores at any tensor-parallel size, 1 included. Ranks other than 0 get an empty state (they do not write).
    """
    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _optimizer_rows(model, state, to_original=True)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a :func:`full_optimizer_state` (whole tensors keyed by parameter name, or ``optimizer.state_dict()``'s
    own numbering from a run without tensor parallelism) into ``optimizer`` at this run's layout; every rank passes
    the same ``state``.

    Parameters without saved state (no gradient before the checkpoint was written) start with fresh state.

    Raises:
        ValueError: ``state`` numbers more parameters than the optimizer holds, or names parameters the model does
            not have.
    """
    state = {"state": dict(state.get("state", {})), "param_groups": [dict(g) for g in state.get("param_groups", [])]}
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if any(isinstance(key, int) for key in state["state"]) or any(
        isinstance(i, int) for g in state["param_groups"] for i in g.get("params", [])
    ):  # optimizer.state_dict() numbering: parameter i of the groups in order
        if len(ordered) < max([*state["state"], -1]) + 1:
            raise ValueError(
                f"the saved optimizer state numbers {max(state['state']) + 1} parameters, this optimizer holds"
                f" {len(ordered)}: it was saved for another model."
            )
        state["state"] = {ordered[i]: v for i, v in state["state"].items()}
        for group in state["param_groups"]:
            group["params"] = [ordered[i] for i in group["params"]]
    unknown = sorted(set(state["state"]) - set(ordered))
    if unknown:
        raise ValueError(
            f"the saved optimizer state holds parameters this model does not have ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}): it was saved for another model."
        )
    if not any(isinstance(v, Tensor) and v.dim() > 0 for entry in state["state"].values() for v in entry.values()):
        # No per-parameter tensors (SGD without momentum): nothing to lay out, and torch's full-state loader cannot
        # tell the device then ("Expected device to be set"); the optimizer's own loader takes it by index.
        index = {name: i for i, name in enumerate(ordered)}
        optimizer.load_state_dict({
            "state": {index[name]: entry for name, entry in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]],
        })
        return
    state = _optimizer_rows(model, state, to_original=False)  # whole tensors, this run's rows
    # Parameters that had no gradient before the checkpoint (an unused mask token) have no saved state and keep
    # the fresh state torch gives them; a name the model lacks was refused above.
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Save ``model`` (and ``optimizer``) in DCP format under the directory ``path``; a collective (every rank).

    The state is sharded as it lives (FSDP2 / tensor-parallel DTensors); each rank writes its own pieces. Keys and
    layouts are those of the single-device model (fused projections in their original row order), so
    :func:`load_checkpoint` restores it at any (dp, sp, tp) layout and :func:`consolidate_checkpoint` turns it into
    one ``torch.save`` file.

    Args:
        path: Checkpoint directory (created).
        model: The model (plain, tensor-parallel, FSDP2 or both).
        optimizer: Its optimizer, saved under ``"optimizer"`` with parameter FQNs as keys.
        extra: More entries (tensors, numbers) saved alongside, e.g. ``{"step": torch.tensor(10)}``.
    """
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model), **(extra or {})}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {
            "model": model_state,
            "optimizer": _optimizer_rows(model, optim_state, to_original=True),
            **(extra or {}),
        }
    dcp.save(state, checkpoint_id=os.fspath(path))


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``) at this run's layout, which may
    differ from the saving run's (4 ranks saved, 2 or 1 load); a collective.

    Args:
        path: Checkpoint directory.
        model: The model, split and sharded as it will train.
        optimizer: Its optimizer (state is created if it has none yet).
        extra: Templates of the extra entries to read (loaded in place and returned).

    Returns:
        ``extra``, filled.
    """
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model), **(extra or {})}
        dcp.load(state, checkpoint_id=os.fspath(path))
        set_model_state_dict(model, state["model"])
        return extra or {}
    model_state, optim_state = get_state_dict(model, optimizer)
    live = {fqn: dict(v) for fqn, v in optim_state.get("state", {}).items()}  # the tensors in this run's row order
    state = {"model": model_state, "optimizer": _optimizer_rows(model, optim_state, to_original=True), **(extra or {})}
    # A parameter that had no gradient before the checkpoint (an unused mask token) has no optimizer state in it:
    # it keeps the fresh state it has here instead of failing the load ("Missing key in checkpoint state_dict").
    saved = set(dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata)
    fresh = {}
    for fqn, entry in state["optimizer"].get("state", {}).items():
        for key in [k for k in entry if f"optimizer.state.{fqn}.{k}" not in saved]:
            fresh[(fqn, key)] = entry.pop(key)
    dcp.load(state, checkpoint_id=os.fspath(path))
    for (fqn, key), value in fresh.items():
        state["optimizer"]["state"][fqn][key] = value
    optim_state = _optimizer_rows(model, state["optimizer"], to_original=False, like=live)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state)
    return extra or {}


def consolidate_checkpoint(path: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Turn a DCP checkpoint directory into one ``torch.save`` file (``{"model": {...}, "optimizer": {...}}``, whole
    tensors in the single-device layout) in one process, without a process group
    (``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``). Returns ``output``."""
    dcp_to_torch_save(os.fspath(path), os.fspath(output))
    return Path(output)
