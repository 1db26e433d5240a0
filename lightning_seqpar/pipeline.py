"""DeepSpeed pipeline stages over the block stack, with sequence parallelism inside every stage.

What the LightningModule writes (the pipeline contract; ``training_step`` is not called, because no single
rank holds the whole model)::

    def pipeline_layers(self) -> list[nn.Module]:
        # the forward as a chain: inputs -> layers[0] -> ... -> layers[-1] -> outputs
        return [Embed(self.model), *self.model.blocks, Head(self.model)]

    def pipeline_loss(self, outputs, targets) -> Tensor:        # runs on the last stage, per micro-batch
        return F.mse_loss(outputs, targets)

    def pipeline_batch(self, batch) -> tuple[inputs, targets]:  # optional; default: batch[0], batch[1]
        return batch["x"], batch["y"]

Every trainable parameter of the LightningModule must belong to exactly one of these layers (registered in it
as a submodule or parameter): :func:`check_ownership` stops before the first step with the names of those left out
or claimed twice, which a layer that computes from modules it does not register would otherwise leave untrained.
Without ``pipeline_layers()`` the stages are built from the module's own steps (:mod:`lightning_seqpar.pipeline_auto`),
which is also how every module is evaluated with pipeline stages.

What the strategy does with it: the largest block stack (:func:`~lightning_seqpar.plan.find_block_stacks`) must
appear in ``pipeline_layers()`` as one contiguous run; its blocks are split evenly over the stages, the layers
before it go to the first stage and the layers after it to the last. Each DataLoader batch is one optimizer
step: it is cut into ``micro_batches`` equal micro-batches along dim 0 and handed to
``PipelineEngine.train_batch``, which runs forward, backward and the step, and returns the mean loss.

Inside a stage the sequence-parallel plan works as without pipelines: the first block shards the tokens on
stage 0, each SP rank sends its shard ``[B, L_r, D]`` to the same SP rank of the next stage, and a later stage
re-enters the region from the shard it receives (one all-gather of the ``P`` shard lengths). Rank layout:
DeepSpeed's ``PipeDataParallelTopology(num_pp=pp, num_dp=dp*sp)`` numbers ranks exactly as
:class:`~lightning_seqpar.topology.Topology` does, so its data-parallel groups are our sequence-data groups.

Checkpoints of pipeline stages hold one file per layer; :func:`load_pipeline_checkpoint` loads them into the
module by name for evaluation (``trainer.validate(module, ckpt_path=...)`` with ``pipeline_stages > 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_seqpar.comm import resolve_layout
from lightning_seqpar.deepspeed_engine import attach_to_process_group
from lightning_seqpar.parallelize import AppliedPlan
from lightning_seqpar.plan import find_block_stacks
from lightning_seqpar.topology import Topology


class PipelineError(ValueError):
    """Raised when a model cannot be cut into pipeline stages as the pipeline contract describes."""


def has_contract(module: nn.Module) -> bool:
    """True when ``module`` describes its forward as a chain itself (``pipeline_layers()``)."""
    return callable(getattr(module, "pipeline_layers", None))


def check_ownership(module: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Raise :class:`PipelineError` unless every trainable parameter of ``module`` belongs to exactly one of ``layers``.

    A parameter a layer uses but does not register (e.g. the layer keeps the model in a plain attribute) is in no
    stage's optimizer and would silently never be updated; one registered by two layers would be trained twice.
    """
    claims: dict[int, list[int]] = {}
    for index, layer in enumerate(layers):
        for parameter in layer.parameters():
            claims.setdefault(id(parameter), []).append(index)
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    left_out = [name for name, p in trainable if id(p) not in claims]
    twice = [f"{name} (layers {claims[id(p)]})" for name, p in trainable if len(claims.get(id(p), ())) > 1]
    known = {id(p) for p in module.parameters()}
    foreign = [index for index, layer in enumerate(layers) if any(id(p) not in known for p in layer.parameters())]
    if not (left_out or twice or foreign):
        return
    problems = []
    if left_out:
        problems.append(f"in no layer (they would never be trained): {', '.join(left_out)}")
    if twice:
        problems.append(f"in more than one layer: {', '.join(twice)}")
    if foreign:
        problems.append(
            f"layers {foreign} hold parameters that are not {type(module).__name__}'s (they would not be saved)"
        )
    raise PipelineError(
        f"{type(module).__name__}.pipeline_layers() must hold every trainable parameter of the module exactly once;"
        f" parameters {'; '.join(problems)}. Register what a layer computes with as its submodules or parameters"
        " (self.embed = model.patch_embed, not a reference kept in a plain attribute or a closure), or leave"
        " pipeline_layers() out and let the strategy build the stages from the module's own steps."
    )


def pipeline_grid(topology: Topology) -> Any:
    """DeepSpeed's ``PipeDataParallelTopology(num_pp=pp, num_dp=dp*sp)``, checked to number ranks as ``topology``
    does."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    attach_to_process_group()
    grid = PipeDataParallelTopology(num_pp=topology.pp, num_dp=topology.dp * topology.sp)
    coordinate = grid.get_coord(topology.rank)
    assert (coordinate.pipe, coordinate.data) == (
        topology.pp_rank,
        topology.dp_rank * topology.sp + topology.sp_rank,
    ), f"DeepSpeed's pipeline grid places rank {topology.rank} at {coordinate}, not at {topology.describe()}"
    return grid


def declared_layers(module: nn.Module) -> list[nn.Module]:
    """The chain of layers ``module.pipeline_layers()`` returns, checked."""
    declare = getattr(module, "pipeline_layers", None)
    if not callable(declare):
        raise PipelineError(
            f"SeqParStrategy(pipeline_stages>1) needs {type(module).__name__}.pipeline_layers(): the forward as a list"
            " of modules applied one after the other (layers before the block stack, the blocks, layers after it),"
            " and pipeline_loss(outputs, targets). See docs/sharding.md, 'Pipeline stages'."
        )
    if not callable(getattr(module, "pipeline_loss", None)):
        raise PipelineError(
            f"SeqParStrategy(pipeline_stages>1) needs {type(module).__name__}.pipeline_loss(outputs, targets)."
        )
    layers = list(declare())
    if not all(isinstance(layer, nn.Module) for layer in layers):
        raise PipelineError("pipeline_layers() must return nn.Module instances (wrap functions in a small module).")
    return layers


def block_run(module: nn.Module, layers: Sequence[nn.Module], stages: int) -> tuple[int, int, list[nn.Module]]:
    """``(first, stop, blocks)``: where the largest block stack sits in ``layers``; raises if it is not one run."""
    stacks = find_block_stacks(module)
    if not stacks:
        raise PipelineError(
            f"found no stack of repeated blocks in {type(module).__name__} to cut into pipeline stages."
        )
    path, stack = stacks[0]
    blocks = list(stack)
    positions = [next((i for i, layer in enumerate(layers) if layer is block), None) for block in blocks]
    first = positions[0]
    if None in positions or positions != list(range(first, first + len(blocks))):
        raise PipelineError(
            f"pipeline_layers() must contain the blocks of '{path}' ({len(blocks)} x {type(blocks[0]).__name__}) once"
            " each, in order and next to each other."
        )
    if len(blocks) < stages:
        raise PipelineError(
            f"pipeline_stages={stages} but '{path}' has only {len(blocks)} blocks: every stage needs one."
        )
    others = [layer for layer in layers if not any(layer is b for b in blocks)]
    if any(type(layer) is type(blocks[0]) for layer in others):
        raise PipelineError(
            f"a layer outside the block stack has the block class {type(blocks[0]).__name__}; wrap it in another"
            " module."
        )
    return first, first + len(blocks), blocks


def build_pipeline_module(module: nn.Module, topology: Topology) -> tuple[Any, list[nn.Module]]:
    """A ``deepspeed.pipe.PipelineModule`` of ``module``'s declared layers and loss, split over ``topology.pp`` stages.

    Returns the pipeline module (holding this rank's stage) and the blocks of the stack.
    """
    from deepspeed.pipe import PipelineModule

    layers = declared_layers(module)
    check_ownership(module, layers)
    first, stop, blocks = block_run(module, layers, topology.pp)
    grid = pipeline_grid(topology)
    # Blocks weigh 1, everything else 0: blocks spread evenly, the rest stays with its neighbouring blocks.
    name = type(blocks[0]).__name__
    net = PipelineModule(
        layers=layers,
        num_stages=topology.pp,
        topology=grid,
        loss_fn=module.pipeline_loss,
        partition_method=f"type:^{name}$",
    )
    parts = [int(p) for p in net.parts]
    if parts[1] <= first or parts[-2] >= stop:
        raise PipelineError(
            f"the stages {parts} put no block on the first or the last stage; layers: {len(layers)}, blocks at"
            f" [{first}, {stop})."
        )
    return net, blocks


def enter_stage_regions(applied: AppliedPlan, net: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Let this stage's blocks run sequence-parallel on the token shards they receive from the previous stage.

    The plan shards at the first block and gathers after the last; a stage in between starts its region at its
    first local block (lengths of all shards: one all-gather) and ends it, without a gather, after its last.
    """
    local = [b for b in blocks if any(b is layer for layer in net.forward_funcs)]
    runtime = applied.runtime
    if local and local[0] is not blocks[0]:

        def enter(module: nn.Module, args: tuple) -> None:
            if runtime.active or not args or not isinstance(args[0], Tensor):
                return
            runtime.enter(resolve_layout(args[0].shape[1], runtime.group), args[0].device)  # [B, L_r, D]: all the L_r

        applied.add_undo(local[0].register_forward_pre_hook(enter).remove)
    if local and local[-1] is not blocks[-1]:
        applied.add_undo(local[-1].register_forward_hook(lambda module, args, output: runtime.exit()).remove)


def split_batch(batch: Any, micro_batches: int) -> list[Any]:
    """Cut every tensor of ``batch`` (a tensor or a tuple/list of them) into ``micro_batches`` equal parts along dim
    0."""
    tensors = [batch] if isinstance(batch, Tensor) else list(batch)
    size = tensors[0].shape[0]
    if size % micro_batches:
        raise PipelineError(
            f"a batch of {size} samples does not split into micro_batches={micro_batches} equal micro-batches; choose a"
            " batch size divisible by micro_batches (DeepSpeed's pipeline needs equal shapes)."
        )
    chunks = [t.chunk(micro_batches, dim=0) for t in tensors]
    if isinstance(batch, Tensor):
        return [c.contiguous() for c in chunks[0]]
    return [type(batch)(c[i].contiguous() for c in chunks) for i in range(micro_batches)]


def pipeline_inputs(module: nn.Module, batch: Any) -> tuple[Any, Any]:
    """``module.pipeline_batch(batch)`` if defined, else ``(batch[0], batch[1])``."""
    if callable(getattr(module, "pipeline_batch", None)):
        return module.pipeline_batch(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise PipelineError(
        f"cannot tell inputs from targets in a batch of type {type(batch).__name__}: define"
        f" {type(module).__name__}.pipeline_batch(batch) -> (inputs, targets)."
    )


def train_batch(engine: Any, module: nn.Module, batch: Any, micro_batches: int) -> Tensor:
    """One optimizer step of the pipeline on one DataLoader batch; returns the mean loss (same on every rank)."""
    inputs, targets = pipeline_inputs(module, batch)
    micro_inputs = split_batch(inputs, micro_batches)
    micro_targets = split_batch(targets, micro_batches)
    loss = engine.train_batch(data_iter=iter(list(zip(micro_inputs, micro_targets))))
    return loss.detach().float() if isinstance(loss, Tensor) else torch.tensor(float(loss))


def load_pipeline_checkpoint(module: nn.Module, directory: Any, tag: str) -> dict[str, Any]:
    """Load the weights of a DeepSpeed pipeline checkpoint (the layer files of every stage) into ``module`` and return
    the checkpoint's client state (loops, callbacks, hyperparameters), for evaluating without the training engine.

    Layer ``i`` is the module's ``pipeline_layers()[i]``, or, for stages built from the module's own steps, the
    parameters of stage ``i`` in the order :func:`~lightning_seqpar.pipeline_auto.stage_parameters` gives them.
    """
    from lightning_seqpar.pipeline_auto import block_stack, even_split, stage_parameters

    folder = Path(directory) / tag
    files = sorted(folder.glob("layer_*-model_states.pt"))
    if not files:
        raise PipelineError(
            f"{folder} holds no pipeline layer files (layer_XX-model_states.pt): not a checkpoint of pipeline stages."
        )
    name_of = {id(t): name for name, t in [*module.named_parameters(), *module.named_buffers()]}
    if has_contract(module):
        layers = declared_layers(module)
        keys = [{key: name_of.get(id(t)) for key, t in layer.state_dict(keep_vars=True).items()} for layer in layers]
    else:
        _, blocks = block_stack(module, len(files))
        owned = stage_parameters(module, blocks, even_split(len(blocks), len(files)))
        keys = [{f"stage_parameters.{j}": name for j, (name, _) in enumerate(stage)} for stage in owned]
    targets = dict([*module.named_parameters(), *module.named_buffers()])
    loaded = set()
    for file in files:
        index = int(file.name.split("-")[0].removeprefix("layer_"))
        for key, value in torch.load(file, map_location="cpu", weights_only=True).items():
            name = keys[index].get(key) if index < len(keys) else None
            if name is None:
                raise PipelineError(
                    f"{file.name} holds {key!r}, which matches no parameter of {type(module).__name__}: the checkpoint"
                    " was written by another model or stage layout."
                )
            target = targets[name]
            target.data = value.to(device=target.device, dtype=target.dtype)
            loaded.add(name)
    missing = [name for name, p in module.named_parameters() if name not in loaded]
    if missing:
        raise PipelineError(f"the pipeline checkpoint {folder} lacks {', '.join(missing)}.")
    client = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {
        k: v
        for k, v in client.items()
        if k not in ("module", "optimizer", "lr_scheduler", "buffer_names", "param_shapes")
    }
