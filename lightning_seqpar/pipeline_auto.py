"""Pipeline stages from the LightningModule's own steps: each stage runs the step with the blocks it does not own skipped.

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
stage). Before the first optimizer step every stage checks that no parameter it does not own received a gradient
(a tensor computed before the stack and used after it, e.g. a skip connection around the blocks), and stops with
an error that names them. Evaluation and prediction run forward only through :func:`evaluate` (micro-batched,
point-to-point), the same for modules with or without the explicit contract of :mod:`lightning_seqpar.pipeline`.

What the last stage logs (``self.log``), its torchmetrics states and the step outputs are broadcast to the other
stages of its pipeline, so Lightning sees the same values on every rank and each sample is counted once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_seqpar.pipeline import PipelineError
from lightning_seqpar.plan import find_block_stacks


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
    """``(path, blocks)`` of the largest block stack; raises :class:`PipelineError` if there is none or too few blocks."""
    stacks = find_block_stacks(module)
    if not stacks:
        raise PipelineError(
            f"SeqParStrategy(pipeline_stages={stages}) found no stack of repeated blocks (an nn.ModuleList or"
            f" nn.Sequential of one block class) in {type(module).__name__} to cut into stages. Write"
            " pipeline_layers() and pipeline_loss() (docs/sharding.md, 'Pipeline stages')."
        )
    path, stack = stacks[0]
    blocks = list(stack)
    if len(blocks) < stages:
        raise PipelineError(f"pipeline_stages={stages} but '{path}' has only {len(blocks)} blocks: every stage needs one.")
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

    def __init__(self, module: nn.Module, path: str, blocks: Sequence[nn.Module], bounds: Sequence[int], stage: int, on_region_end: Callable[[], None]) -> None:
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
                self._undo.append(_wrap_forward(block, self._skip_forward(i)))
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
                self.calls.append(index)
                x, _ = _first_tensor(args, kwargs)
                if x is None:
                    raise PipelineError(f"{self.path}.{index} was called without a tensor argument; pipeline stages pass the first tensor argument of each block on.")
                return x  # a block of another stage: its input passes through

            return forward

        return make

    def _enter_hook(self, index: int) -> Callable:
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not self.active:
                return None
            self.calls.append(index)
            if index != self.start or self.stage == 0:
                return None
            local, rebuild = _first_tensor(args, kwargs)
            received = self.received
            assert received is not None, "a later stage runs a step without the previous stage's activation"
            if local is None or local.shape != received.shape:
                raise PipelineError(
                    f"stage {self.stage} received an activation of shape {tuple(received.shape)} for {self.path}.{index},"
                    f" but {self.module_name}'s own forward gives that block an input of shape"
                    f" {None if local is None else tuple(local.shape)}. {self._chain_help()}"
                )
            return rebuild(received.to(local.dtype))

        return hook

    def _leave(self, block: nn.Module, args: tuple, output: Any) -> None:
        if not self.active:
            return
        tensor = output if isinstance(output, Tensor) else (output[0] if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) else None)
        if tensor is None:
            raise PipelineError(f"{self.path}.{self.stop - 1} returned {type(output).__name__}; pipeline stages need blocks that return a tensor (or a tuple starting with one).")
        raise _StageDone(tensor)

    def _chain_help(self) -> str:
        return (
            f"Automatic pipeline stages need a forward that calls the blocks of '{self.path}' once each, in order,"
            " each on the previous block's output, with nothing computed before the stack used after it. Otherwise"
            f" write {self.module_name}.pipeline_layers() and pipeline_loss() (docs/sharding.md, 'Pipeline stages')."
        )

    def run(self, step: Callable[[], Any], received: Tensor | None) -> tuple[bool, Any]:
        """Call ``step()`` as this stage: ``(False, activation to send)`` on a non-last stage, ``(True, step output)`` on the last."""
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
            raise PipelineError(f"{self.module_name}'s step returned before calling {self.path}.{self.stop - 1}, the last block of stage {self.stage}. {self._chain_help()}")
        self._check_calls(len(self.blocks))
        return True, output

    def _check_calls(self, upto: int) -> None:
        if self.calls != list(range(upto)):
            raise PipelineError(
                f"{self.module_name}'s forward called the blocks of '{self.path}' in the order {self.calls}; expected"
                f" {list(range(upto))} on stage {self.stage}. {self._chain_help()}"
            )


def _wrap_forward(module: nn.Module, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    from lightning_seqpar.memory import wrap_forward

    return wrap_forward(module, make)


# --- ownership of the parameters ------------------------------------------------------------------------


def stage_parameters(module: nn.Module, blocks: Sequence[nn.Module], bounds: Sequence[int]) -> list[list[tuple[str, nn.Parameter]]]:
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
        raise PipelineError(f"pipeline stages cut batches along dim 0, but this batch ({type(batch).__name__}) holds no tensor.")
    size = sizes[0]
    if micro_batches == 1:
        return [batch]
    if equal and size % micro_batches:
        raise PipelineError(
            f"a batch of {size} samples does not split into micro_batches={micro_batches} equal micro-batches; choose a"
            " batch size divisible by micro_batches (DeepSpeed's pipeline averages equal micro-batches)."
        )
    parts = min(micro_batches, size)
    split = [list(leaf.tensor_split(parts, dim=0)) if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == size else None for leaf in leaves]
    return [tree_unflatten([s[i] if s is not None else leaf for s, leaf in zip(split, leaves)], spec) for i in range(parts)]


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


# --- what the last stage logs, its metric states and outputs ---------------------------------------------


class LastStageMirror:
    """Records ``self.log`` calls of the last stage and replays them on the others; copies torchmetrics states.

    On a non-last stage the step stops early, so whatever it would log after its blocks never runs there; logging
    it before would count twice. So non-last stages log only the replayed calls, with the last stage's values.
    """

    def __init__(self, module: nn.Module, src: int, group: Any, is_last: bool) -> None:
        from torchmetrics import Metric

        self.module, self.src, self.group, self.is_last = module, src, group, is_last
        self.metric_paths = {id(m): path for path, m in module.named_modules() if isinstance(m, Metric)}
        self.records: list[tuple[int, str, Any, tuple, dict]] = []
        self.micro_index = 0

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """While active, ``module.log`` records (last stage) or is muted (other stages)."""
        original = self.module.log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if not self.is_last:
                return None
            path = self.metric_paths.get(id(value))
            stored = ("metric", path) if path is not None else (tree_map(lambda t: t.detach().cpu() if isinstance(t, Tensor) else t, value))
            self.records.append((self.micro_index, name, stored, args, kwargs))
            return original(name, value, *args, **kwargs)

        self.records = []
        self.module.log = log  # the instance attribute shadows LightningModule.log (log_dict calls self.log too)
        try:
            yield
        finally:
            del self.module.log

    def share(self, outputs: Any = None) -> tuple[list, Any]:
        """Broadcast the records, metric states and ``outputs`` from the last stage; returns ``(records, outputs)``."""
        payload: list[Any] = [None]
        if self.is_last:
            payload[0] = {"records": self.records, "metrics": self._metric_states(), "outputs": _to_cpu(outputs)}
        dist.broadcast_object_list(payload, src=self.src, group=self.group)
        received = payload[0]
        if not self.is_last:
            self._load_metric_states(received["metrics"])
        return received["records"], received["outputs"]

    def replay(self, records: list, micro_batches: Sequence[Any], set_batch: Callable[[Any], None], device: torch.device) -> None:
        """Non-last stages: call ``module.log`` as the last stage did, micro-batch by micro-batch."""
        if self.is_last:
            return
        for index, name, stored, args, kwargs in records:
            set_batch(micro_batches[index])
            if isinstance(stored, tuple) and len(stored) == 2 and stored[0] == "metric":
                value = self.module.get_submodule(stored[1])
            else:
                value = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, stored)
            self.module.log(name, value, *args, **kwargs)

    def _metric_states(self) -> dict[str, Any]:
        states = {}
        for path in self.metric_paths.values():
            metric = self.module.get_submodule(path)
            states[path] = ({name: _to_cpu(getattr(metric, name)) for name in metric._defaults}, metric._update_count)
        return states

    def _load_metric_states(self, states: dict[str, Any]) -> None:
        for path, (values, count) in states.items():
            metric = self.module.get_submodule(path)
            device = metric.device
            for name, value in values.items():
                setattr(metric, name, tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, value))
            metric._update_count = count
            metric._computed = None


def _to_cpu(value: Any) -> Any:
    return tree_map(lambda t: t.detach().cpu() if isinstance(t, Tensor) else t, value)


# --- forward-only schedule --------------------------------------------------------------------------------

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8, torch.int16]
_HEADER = 10  # dtype, ndim, up to 8 dims


def send_activation(tensor: Tensor, dst: int) -> None:
    """Send ``tensor`` (any shape and dtype) to global rank ``dst``: a small header with its shape, then the data."""
    if tensor.dim() > _HEADER - 2:
        raise PipelineError(f"pipeline stages pass activations of at most {_HEADER - 2} dimensions, got {tensor.dim()}.")
    header = torch.zeros(_HEADER, dtype=torch.int64, device=tensor.device)
    header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
    header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    dist.send(header, dst)
    dist.send(tensor.detach().contiguous(), dst)


def recv_activation(src: int, device: torch.device) -> Tensor:
    """Receive what :func:`send_activation` sent from global rank ``src``."""
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    tensor = torch.empty([int(n) for n in header[2 : 2 + ndim]], dtype=dtype, device=device)
    dist.recv(tensor, src)
    return tensor


# --- this rank's stage: training through DeepSpeed, evaluation forward only ------------------------------


class PipelineStages:
    """This rank's pipeline stage of a LightningModule: its blocks, its parameters, its neighbours.

    Args:
        module: The LightningModule (sequence-parallel plan already applied).
        topology: The process groups; ``topology.pp_rank`` is this rank's stage.
        runtime_end: Ends the sequence-parallel region (a non-last stage leaves it without the gather).
        path, blocks: The block stack.
        bounds: Block boundaries of the stages, ``bounds[s]:bounds[s+1]`` on stage ``s``.
        explicit: True when the module trains through its own ``pipeline_layers()`` chain.
    """

    def __init__(self, module: nn.Module, topology: Any, runtime_end: Callable[[], None], path: str, blocks: Sequence[nn.Module], bounds: Sequence[int], explicit: bool = False) -> None:
        self.module, self.topology, self.explicit = module, topology, explicit
        self.path, self.blocks, self.bounds = path, list(blocks), list(bounds)
        self.stage, self.stages = topology.pp_rank, topology.pp
        group = topology.pipeline_group
        self.prev = dist.get_global_rank(group, self.stage - 1) if self.stage > 0 else None
        self.next = dist.get_global_rank(group, self.stage + 1) if self.stage < self.stages - 1 else None
        self.is_last = self.next is None
        self.runner = StageRunner(module, path, blocks, bounds, self.stage, runtime_end)
        self.mirror = LastStageMirror(module, dist.get_global_rank(group, self.stages - 1), group, self.is_last)
        self.owned: list[tuple[str, nn.Parameter]] = stage_parameters(module, blocks, bounds)[self.stage]
        self._queue: Iterator[tuple[int, Any]] = iter(())
        self._step: Callable[[Any], Any] = lambda micro: None
        self._context: Callable[[], Any] = contextlib.nullcontext

    @classmethod
    def automatic(cls, module: nn.Module, topology: Any, runtime_end: Callable[[], None], bounds: Sequence[int] | None = None) -> PipelineStages:
        """Stages over the largest block stack, split evenly (or at ``bounds``)."""
        path, blocks = block_stack(module, topology.pp)
        return cls(module, topology, runtime_end, path, blocks, bounds or even_split(len(blocks), topology.pp))

    def remove(self) -> None:
        self.runner.remove()

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # --- training ---

    def build_pipeline_module(self, grid: Any) -> nn.Module:
        """DeepSpeed's ``PipelineModule`` with one :class:`StageLayer` per stage (this rank builds only its own)."""
        from deepspeed.pipe import PipelineModule

        layers = [StageLayer([p for _, p in self.owned], self._train_micro_batch) if s == self.stage else nn.Identity() for s in range(self.stages)]
        # uniform: one layer per stage; dynamic_shape: a smaller last batch sends its shapes again.
        return PipelineModule(layers=layers, num_stages=self.stages, topology=grid, loss_fn=None, partition_method="uniform", dynamic_shape=True)

    def guard_first_step(self, engine: Any) -> None:
        """Before the engine's first optimizer step, check that no stage computed gradients for parameters it does
        not own (they would never be updated); stop on every rank with their names if one did."""
        from deepspeed.runtime.pipe import schedule

        instructions = type(engine)._INSTRUCTION_MAP
        step = instructions[schedule.OptimizerStep]

        def checked_step(engine_self: Any, **kwargs: Any) -> Any:
            del engine._INSTRUCTION_MAP  # once
            self.check_gradients()
            return step(engine_self, **kwargs)

        engine._INSTRUCTION_MAP = {**instructions, schedule.OptimizerStep: checked_step}

    def check_gradients(self) -> None:
        mine = {id(p) for _, p in self.owned}
        stray = [name for name, p in self.module.named_parameters() if p.grad is not None and id(p) not in mine]
        count = torch.tensor([len(stray)], device=self.device)
        dist.all_reduce(count)
        if not int(count.item()):
            return
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (self.stage, stray))
        found = {stage: names for stage, names in everyone if names}
        where = "; ".join(f"stage {s}: {', '.join(names)}" for s, names in sorted(found.items()))
        first, last = self.bounds[1], self.bounds[-2]
        raise PipelineError(
            f"pipeline stages: these parameters of {type(self.module).__name__} received gradients on a stage that does"
            f" not train them, so they would never be updated ({where}). Parameters registered before"
            f" '{self.path}' train on the first stage (with blocks 0-{first - 1}), those after it on the last (blocks"
            f" {last}-{len(self.blocks) - 1}); a tensor computed before the stack and used after it (a skip connection"
            f" around the blocks) cannot cross the stages. {self.runner._chain_help()}"
        )

    def train(self, engine: Any, batch: Any, batch_idx: int, micro_batches: int, context: Callable[[], Any]) -> Tensor:
        """One optimizer step on one DataLoader batch, cut into ``micro_batches``; returns the mean loss (every rank)."""
        micro = split_micro_batches(batch, micro_batches, equal=True)
        self._queue, self._context = iter(enumerate(micro)), context
        self._step = lambda m: self.module.training_step(m, batch_idx)
        placeholders = [(torch.zeros(1), torch.zeros(1))] * len(micro)  # the stages read the micro-batches themselves
        try:
            with self.mirror.capture():
                loss = engine.train_batch(data_iter=iter(placeholders))
            records, _ = self.mirror.share()
            self.mirror.replay(records, micro, self._set_batch, self.device)
        finally:
            self._set_batch(batch)
        return loss.detach().float() if isinstance(loss, Tensor) else torch.tensor(float(loss))

    def _train_micro_batch(self, inputs: Any) -> Tensor:
        """Called by DeepSpeed's schedule, in micro-batch order, on every stage."""
        index, micro = next(self._queue)
        self._set_batch(micro)
        self.mirror.micro_index = index
        with self._context():
            finished, output = self.runner.run(lambda: self._step(micro), inputs if self.stage > 0 else None)
        if not finished:
            return output
        loss = output.get("loss") if isinstance(output, dict) else output
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise PipelineError(f"with pipeline stages {type(self.module).__name__}.training_step must return the loss (a scalar tensor or a dict with 'loss'), got {type(output).__name__}.")
        return loss.reshape(())

    # --- evaluation ---

    def evaluate(self, hook: str, batch: Any, args: tuple, kwargs: dict, micro_batches: int, context: Callable[[], Any]) -> Any:
        """``module.<hook>(batch, *args, **kwargs)`` through the stages, forward only; the output (same on every rank)."""
        micro = split_micro_batches(batch, micro_batches, equal=False)
        step = getattr(self.module, hook)
        outputs, sizes = [], []
        try:
            with self.mirror.capture():
                for index, part in enumerate(micro):
                    received = recv_activation(self.prev, self.device) if self.prev is not None else None
                    self._set_batch(part)
                    self.mirror.micro_index = index
                    with context():
                        finished, output = self.runner.run(lambda part=part: step(part, *args, **kwargs), received)
                    if finished:
                        outputs.append(output)
                        sizes.append(_batch_size(part))
                    else:
                        send_activation(output, self.next)
            combined = combine_outputs(outputs, sizes) if self.is_last else None
            records, shared = self.mirror.share(combined)
            self.mirror.replay(records, micro, self._set_batch, self.device)
        finally:
            self._set_batch(batch)
        if self.is_last:
            return combined
        device = self.device
        return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, shared)

    def _set_batch(self, batch: Any) -> None:
        """Lightning weighs logged means by the size of ``trainer._results.batch``: make it the micro-batch."""
        trainer = getattr(self.module, "_trainer", None)
        results = getattr(trainer, "_results", None) if trainer is not None else None
        if results is not None:
            results.batch, results.batch_size = batch, None


def _batch_size(batch: Any) -> int:
    leaves, _ = tree_flatten(batch)
    return next(leaf.shape[0] for leaf in leaves if isinstance(leaf, Tensor) and leaf.dim() > 0)


def build_training_stages(module: nn.Module, topology: Any, applied: Any) -> tuple[nn.Module, PipelineStages]:
    """The DeepSpeed ``PipelineModule`` to train and this rank's :class:`PipelineStages`: from the module's
    ``pipeline_layers()`` when it has them (:mod:`lightning_seqpar.pipeline`), else automatic."""
    from lightning_seqpar import pipeline

    if pipeline.has_contract(module):
        net, blocks = pipeline.build_pipeline_module(module, topology)
        pipeline.enter_stage_regions(applied, net, blocks)
        path, _ = find_block_stacks(module)[0]
        first = next(i for i, layer in enumerate(net._layer_specs) if layer is blocks[0])
        inner = [min(max(int(p) - first, 0), len(blocks)) for p in net.parts[1:-1]]
        stages = PipelineStages(module, topology, applied.runtime.end_region, path, blocks, [0, *inner, len(blocks)], explicit=True)
    else:
        stages = PipelineStages.automatic(module, topology, applied.runtime.end_region)
        net = stages.build_pipeline_module(pipeline.pipeline_grid(topology))
    applied._undo.append(stages.remove)
    return net, stages
