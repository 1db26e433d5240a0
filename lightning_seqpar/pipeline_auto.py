"""Pipeline stages from the LightningModule's own steps: each stage runs the step with the blocks it does not own
skipped.

No ``pipeline_layers()`` needed. The block stack the sequence-parallel plan already found is split evenly over the
stages; every stage calls the module's own ``training_step`` / ``validation_step`` / ``test_step`` /
``predict_step`` on each micro-batch, with hooks on the blocks (B batch, L_r this rank's tokens, D width):

- a block this stage does not own returns its input unchanged (the layers *before* the stack, e.g. the patch
  embedding, run on every stage: they are cheap next to the blocks, and they build the side inputs, token
  shards and sequence-parallel state every stage needs);
- the first block a later stage owns takes the activation ``[B, L_r, D]`` received from the previous stage in
  place of its locally computed input (same shape: the embedding shards the tokens the same way on every stage);
- after the last block a stage owns, a non-last stage stops the step and sends that block's output on; the last
  stage runs the rest of the step: the layers after the stack, the loss, metrics, ``self.log``.

Training goes through DeepSpeed's ``PipelineEngine`` (1F1B schedule, ZeRO-1, clipping, checkpoints) with one
:class:`StageLayer` per stage, which holds exactly the parameters the stage trains: blocks by the split, the
LightningModule's other parameters by where they are registered (before the stack: first stage, after it: last
stage; a module's own parameters come before its submodules'). :mod:`lightning_seqpar.pipeline_stages` runs the
schedules. Before the first optimizer step every stage checks
that no parameter it does not own received a gradient (a tensor computed before the stack and used after it, e.g.
a skip connection around the blocks), and stops with an error that names them. Evaluation and prediction run
forward only (micro-batched, point-to-point), the same for modules with or without the explicit contract of
:mod:`lightning_seqpar.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_seqpar.pipeline import PipelineError
from lightning_seqpar.plan import find_block_stacks
from lightning_seqpar.wrapping import wrap_forward


class _StageDone(Exception):
    """Raised by the last block a non-last stage owns: carries that block's output out of the user's step."""

    def __init__(self, output: Tensor) -> None:
        super().__init__("pipeline stage finished")
        self.output = output


def _first_tensor(args: tuple, kwargs: dict) -> tuple[Tensor | None, Callable[[Tensor], tuple[tuple, dict]]]:
    """The first tensor argument of a call, and how to rebuild the call with another tensor in its place."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    for name, value in kwargs.items():
        if isinstance(value, Tensor):
            return value, lambda t, name=name: (args, {**kwargs, name: t})
    return None, lambda t: (args, kwargs)


def block_stack(module: nn.Module, stages: int) -> tuple[str, list[nn.Module]]:
    """``(path, blocks)`` of the largest block stack; raises :class:`PipelineError` if there is none or too few
    blocks."""
    stacks = find_block_stacks(module)
    if not stacks:
        raise PipelineError(
            f"SeqParStrategy(pipeline_stages={stages}) found no stack of repeated blocks (an nn.ModuleList or"
            f" nn.Sequential of one block class) in {type(module).__name__} to cut into stages. Write"
            " pipeline_layers() and pipeline_loss() (docs/sharding.md, 'Pipeline stages')."
        )
    path, stack = stacks[0]
    blocks = list(stack)
    if isinstance(blocks[0], (nn.ModuleList, nn.ModuleDict)):
        raise PipelineError(
            f"the blocks of '{path}' in {type(module).__name__} are {type(blocks[0]).__name__} containers that their"
            " owner loops over (with the residual additions in the owner's forward), so a stage cannot skip a block"
            " by passing its input on. Write pipeline_layers() and pipeline_loss() (docs/sharding.md, 'Pipeline"
            " stages')."
        )
    if len(blocks) < stages:
        raise PipelineError(
            f"pipeline_stages={stages} but '{path}' has only {len(blocks)} blocks: every stage needs one."
        )
    return path, blocks


def even_split(num_blocks: int, stages: int) -> list[int]:
    """Block boundaries ``[0, b_1, ..., num_blocks]`` of ``stages`` near-equal runs (the first stages get the extra)."""
    base, extra = divmod(num_blocks, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return bounds


class StageRunner:
    """Hooks on the blocks that make one call of a LightningModule step run only this stage's part of it.

    The hooks act only inside :meth:`run`; outside it (e.g. a forward made by a callback) the model is unchanged.
    ``bounds[s]:bounds[s+1]`` are the blocks of stage ``s``.
    """

    def __init__(
        self, module: nn.Module, path: str, blocks: Sequence[nn.Module], bounds: Sequence[int], stage: int,
        on_region_end: Callable[[], None],
    ) -> None:
        self.module_name, self.path, self.blocks = type(module).__name__, path, list(blocks)
        self.bounds, self.stage = list(bounds), stage
        self.stages = len(bounds) - 1
        self.start, self.stop = self.bounds[stage], self.bounds[stage + 1]
        self.is_last = stage == self.stages - 1
        self._on_region_end = on_region_end
        self.active = False
        self.received: Tensor | None = None
        self.calls: list[int] = []
        self._undo: list[Callable[[], None]] = []
        for i, block in enumerate(self.blocks):
            if self.start <= i < self.stop:
                self._undo.append(block.register_forward_pre_hook(self._enter_hook(i), with_kwargs=True).remove)
            else:
                self._undo.append(wrap_forward(block, self._skip_forward(i)))
        if not self.is_last:
            self._undo.append(self.blocks[self.stop - 1].register_forward_hook(self._leave).remove)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _skip_forward(self, index: int) -> Callable[[Callable], Callable]:
        def make(inner: Callable) -> Callable:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if not self.active:
                    return inner(*args, **kwargs)
                self._called(index)
                x, _ = _first_tensor(args, kwargs)
                if x is None:
                    raise PipelineError(
                        f"{self.path}.{index} was called without a tensor argument; pipeline stages pass the first"
                        " tensor argument of each block on."
                    )
                return x  # a block of another stage: its input passes through

            return forward

        return make

    def _enter_hook(self, index: int) -> Callable:
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not self.active:
                return None
            self._called(index)
            if index != self.start or self.stage == 0:
                return None
            local, rebuild = _first_tensor(args, kwargs)
            received = self.received
            assert received is not None, "a later stage runs a step without the previous stage's activation"
            if local is None or local.shape != received.shape:
                raise PipelineError(
                    f"stage {self.stage} received an activation of shape {tuple(received.shape)} for"
                    f" {self.path}.{index},"
                    f" but {self.module_name}'s own forward gives that block an input of shape"
                    f" {None if local is None else tuple(local.shape)}. {self._chain_help()}"
                )
            return rebuild(received.to(local.dtype))

        return hook

    def _called(self, index: int) -> None:
        """Record a block call; a second call in one step (the model run twice) cannot be split into stages."""
        if index in self.calls:
            raise PipelineError(
                f"{self.module_name}'s step called {self.path}.{index} twice (blocks so far: {self.calls})."
                f" {self._chain_help()}"
            )
        self.calls.append(index)

    def _leave(self, block: nn.Module, args: tuple, output: Any) -> None:
        if not self.active:
            return
        tensor = (
            output
            if isinstance(output, Tensor)
            else (output[0] if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) else None)
        )
        if tensor is None:
            raise PipelineError(
                f"{self.path}.{self.stop - 1} returned {type(output).__name__}; pipeline stages need blocks that"
                " return a tensor (or a tuple starting with one)."
            )
        # Sent to the next stage by a point-to-point collective, which needs one contiguous buffer: gloo refuses a
        # strided view and NCCL sends its storage as if it were contiguous (wrong values, no error). timm's
        # VisionTransformer hands its blocks such views.
        raise _StageDone(tensor.contiguous())

    def _chain_help(self) -> str:
        return (
            f"Automatic pipeline stages need a forward that calls the blocks of '{self.path}' once each, in order,"
            " each on the previous block's output, with nothing computed before the stack used after it. Otherwise"
            f" write {self.module_name}.pipeline_layers() and pipeline_loss() (docs/sharding.md, 'Pipeline stages')."
        )

    def run(self, step: Callable[[], Any], received: Tensor | None) -> tuple[bool, Any]:
        """Call ``step()`` as this stage: ``(False, activation to send)`` on a non-last stage, ``(True, step output)``
        on the last."""
        self.active, self.received, self.calls = True, received, []
        try:
            output = step()
        except _StageDone as done:
            self._check_calls(self.stop)
            return False, done.output
        finally:
            self.active, self.received = False, None
            self._on_region_end()
        if not self.is_last:
            raise PipelineError(
                f"{self.module_name}'s step returned before calling {self.path}.{self.stop - 1}, the last block of"
                f" stage {self.stage}. {self._chain_help()}"
            )
        self._check_calls(len(self.blocks))
        return True, output

    def _check_calls(self, upto: int) -> None:
        if self.calls != list(range(upto)):
            raise PipelineError(
                f"{self.module_name}'s forward called the blocks of '{self.path}' in the order {self.calls}; expected"
                f" {list(range(upto))} on stage {self.stage}. {self._chain_help()}"
            )


# --- ownership of the parameters ------------------------------------------------------------------------


def stage_parameters(
    module: nn.Module, blocks: Sequence[nn.Module], bounds: Sequence[int]
) -> list[list[tuple[str, nn.Parameter]]]:
    """The ``(name, parameter)`` pairs each stage trains: its blocks; before the stack (by registration order) the
    first stage, after it the last. Every parameter of ``module`` appears exactly once."""
    stages = len(bounds) - 1
    block_of = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    stage_of_block = {i: s for s in range(stages) for i in range(bounds[s], bounds[s + 1])}
    owned: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(stages)]
    seen_block = False
    for name, p in module.named_parameters():
        if id(p) in block_of:
            seen_block = True
            owned[stage_of_block[block_of[id(p)]]].append((name, p))
        else:
            owned[-1 if seen_block else 0].append((name, p))
    return owned


class StageLayer(nn.Module):
    """The one 'layer' of a stage in DeepSpeed's ``PipelineModule``: registers the parameters the stage trains (so
    DeepSpeed's optimizer, gradient reduction and checkpoints see exactly them) and runs the stage's part of a step."""

    def __init__(self, parameters: Sequence[nn.Parameter], run: Callable[[Any], Tensor]) -> None:
        super().__init__()
        self.stage_parameters = nn.ParameterList(list(parameters))
        object.__setattr__(self, "_run", run)  # not a submodule: the LightningModule stays out of the stage

    def forward(self, inputs: Any) -> Tensor:
        return self._run(inputs)


# --- micro-batches --------------------------------------------------------------------------------------


def split_micro_batches(batch: Any, micro_batches: int, *, equal: bool) -> list[Any]:
    """Cut every tensor of ``batch`` (any nesting of dicts, lists, tuples) that has the batch size in dim 0 into
    ``micro_batches`` parts along dim 0; other leaves are shared. ``equal``: sizes must divide (training)."""
    leaves, spec = tree_flatten(batch)
    sizes = [leaf.shape[0] for leaf in leaves if isinstance(leaf, Tensor) and leaf.dim() > 0]
    if not sizes:
        raise PipelineError(
            f"pipeline stages cut batches along dim 0, but this batch ({type(batch).__name__}) holds no tensor."
        )
    size = sizes[0]
    if micro_batches == 1:
        return [batch]
    if equal and size % micro_batches:
        raise PipelineError(
            f"a batch of {size} samples does not split into micro_batches={micro_batches} equal micro-batches; choose a"
            " batch size divisible by micro_batches (DeepSpeed's pipeline averages equal micro-batches)."
        )
    parts = min(micro_batches, size)
    split = [
        list(leaf.tensor_split(parts, dim=0))
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == size
        else None
        for leaf in leaves
    ]
    return [
        tree_unflatten([s[i] if s is not None else leaf for s, leaf in zip(split, leaves)], spec) for i in range(parts)
    ]


def combine_outputs(outputs: Sequence[Any], sizes: Sequence[int]) -> Any:
    """One batch's output from its micro-batches' outputs: tensors with a batch dim are concatenated, scalars
    averaged weighted by micro-batch size (a mean loss stays the batch mean), anything else from the last."""
    if len(outputs) == 1:
        return outputs[0]
    flat = [tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        return outputs[-1]
    total = float(sum(sizes))
    combined = []
    for leaves in zip(*(f[0] for f in flat)):
        first = leaves[0]
        if isinstance(first, Tensor) and first.dim() > 0:
            combined.append(torch.cat(leaves, dim=0))
        elif isinstance(first, Tensor) and first.is_floating_point():
            combined.append(sum(t * (n / total) for t, n in zip(leaves, sizes)))
        else:
            combined.append(leaves[-1])
    return tree_unflatten(combined, spec)
