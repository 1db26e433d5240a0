"""This rank's pipeline stage: a LightningModule's steps through DeepSpeed's pipeline engine (training) or forward only
(validation, test, predict), with what the last stage logs, its metric states and outputs shared with the others.

The stage itself (which blocks run, which parameters train) is :mod:`lightning_seqpar.pipeline_auto`. On a non-last
stage a step stops after its blocks, so whatever it would log after them never runs there, and logging what it
logs before them would count twice: non-last stages log only what the last stage logged, replayed with its values,
and take its torchmetrics states after every step. Lightning then sees the same values on every rank, and
``sync_dist`` and torchmetrics reduce over the data-parallel group of each stage, which counts each sample once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from lightning_seqpar.pipeline import PipelineError
from lightning_seqpar.pipeline_auto import (
    StageLayer,
    StageRunner,
    block_stack,
    combine_outputs,
    even_split,
    split_micro_batches,
    stage_parameters,
)
from lightning_seqpar.plan import find_block_stacks


class LastStageMirror:
    """Records ``self.log`` calls of the last stage and replays them on the others; copies torchmetrics states.

    On a non-last stage the step stops early, so whatever it would log after its blocks never runs there; logging
    it before would count twice. So non-last stages log only the replayed calls, with the last stage's values.
    """

    def __init__(self, module: nn.Module, src: int, group: Any, is_last: bool) -> None:
        self.module, self.src, self.group, self.is_last = module, src, group, is_last
        self.metric_paths: dict[int, str] = {}
        self.records: list[tuple[int, str, Any, tuple, dict]] = []
        self.micro_index = 0

    def _find_metrics(self) -> None:
        from torchmetrics import Metric

        self.metric_paths = {id(m): path for path, m in self.module.named_modules() if isinstance(m, Metric)}

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """While active, ``module.log`` records (last stage) or is muted (other stages)."""
        original = self.module.log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if not self.is_last:
                return None
            path = self.metric_paths.get(id(value))
            stored = ("metric", path) if path is not None else _to_cpu(value)
            self.records.append((self.micro_index, name, stored, args, kwargs))
            return original(name, value, *args, **kwargs)

        self.records = []
        self._find_metrics()  # every step: a module may add metrics after setup
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

    def replay(
        self, records: list, micro_batches: Sequence[Any], set_batch: Callable[[Any], None], device: torch.device
    ) -> None:
        """Non-last stages: call ``module.log`` as the last stage did, micro-batch by micro-batch."""
        if self.is_last:
            return
        for index, name, stored, args, kwargs in records:
            set_batch(micro_batches[index])
            if isinstance(stored, tuple) and len(stored) == 2 and stored[0] == "metric":
                value = self.module.get_submodule(stored[1])
            else:
                value = _to_device(stored, device)
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
            for name, value in values.items():
                setattr(metric, name, _to_device(value, metric.device))
            metric._update_count = count
            metric._computed = None


def _to_cpu(value: Any) -> Any:
    return tree_map(lambda t: t.detach().cpu() if isinstance(t, Tensor) else t, value)


def _to_device(value: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, value)


# --- forward-only schedule --------------------------------------------------------------------------------

_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8,
    torch.int8, torch.int16,
]
_HEADER = 10  # dtype, ndim, up to 8 dims


def send_activation(tensor: Tensor, dst: int) -> None:
    """Send ``tensor`` (any shape and dtype) to global rank ``dst``: a small header with its shape, then the data."""
    if tensor.dim() > _HEADER - 2:
        raise PipelineError(
            f"pipeline stages pass activations of at most {_HEADER - 2} dimensions, got {tensor.dim()}."
        )
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
        path: Where the block stack is in ``module``.
        blocks: The blocks of the stack.
        bounds: Block boundaries of the stages, ``bounds[s]:bounds[s+1]`` on stage ``s``.
        explicit: True when the module trains through its own ``pipeline_layers()`` chain.
    """

    def __init__(
        self, module: nn.Module, topology: Any, runtime_end: Callable[[], None], path: str,
        blocks: Sequence[nn.Module], bounds: Sequence[int], explicit: bool = False,
    ) -> None:
        self.module, self.topology, self.explicit = module, topology, explicit
        self.path, self.blocks, self.bounds = path, list(blocks), list(bounds)
        self.stage, self.stages = topology.pp_rank, topology.pp
        group = topology.pipeline_group
        self.prev = dist.get_global_rank(group, self.stage - 1) if self.stage > 0 else None
        self.next = dist.get_global_rank(group, self.stage + 1) if self.stage < self.stages - 1 else None
        self.is_last = self.next is None
        self.runner = StageRunner(module, path, blocks, bounds, self.stage, runtime_end)
        self.mirror = LastStageMirror(module, dist.get_global_rank(group, self.stages - 1), group, self.is_last)
        every_stage = stage_parameters(module, blocks, bounds)
        self.owned: list[tuple[str, nn.Parameter]] = every_stage[self.stage]
        # which stage trains each
        self.owner: dict[int, int] = {id(p): s for s, pairs in enumerate(every_stage) for _, p in pairs}
        self._released: dict[int, torch.Size] = {}
        self._queue: Iterator[tuple[int, Any]] = iter(())
        self._step: Callable[[Any], Any] = lambda micro: None
        self._context: Callable[[], Any] = contextlib.nullcontext

    def release_other_blocks(self) -> None:
        """Free the parameters of the blocks other stages train: this rank never runs them, so a model too large for
        one device fits across the stages. :meth:`restore_full_weights` brings them back at the end of the fit."""
        prefix = f"{self.path}."
        shared = {
            id(p) for name, p in self.module.named_parameters(remove_duplicate=False) if not name.startswith(prefix)
        }
        for i, block in enumerate(self.blocks):
            if not self.runner.start <= i < self.runner.stop:
                for p in block.parameters():
                    if id(p) not in shared:
                        self._released[id(p)] = p.shape
                        p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def restore_full_weights(self) -> None:
        """After a fit: every rank receives the parameters the other stages trained (one broadcast per parameter over
        the pipeline group, in fp32), so the module holds the whole trained model again, as after a fit without
        pipeline stages, and can be evaluated or saved in any configuration."""
        group, device = self.topology.pipeline_group, self.device
        for p in self.module.parameters():
            owner = self.owner.get(id(p))
            if owner is None:  # in no stage's layers (frozen): never changed
                continue
            if owner == self.stage:
                buffer = p.detach().float().contiguous()
            else:
                buffer = torch.empty(self._released.get(id(p), p.shape), dtype=torch.float32, device=device)
            dist.broadcast(buffer, src=dist.get_global_rank(group, owner), group=group)
            if owner != self.stage:
                p.data = buffer.to(p.dtype)
        self._released.clear()

    def match_engine_dtype(self, net: nn.Module) -> None:
        """Give the parameters outside this stage's engine the dtype DeepSpeed gave its own (bf16 / fp16): the layers
        before the stack run on every stage, on the batch Lightning converted to that dtype."""
        engine_dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
        mine = {id(p) for p in net.parameters()}
        for p in self.module.parameters():
            if engine_dtype is not None and id(p) not in mine and p.is_floating_point() and p.dtype != engine_dtype:
                p.data = p.data.to(engine_dtype)

    def check_weights(self) -> None:
        """Raise if a block this stage runs has released parameters (it was trained on another stage)."""
        released = [
            f"{self.path}.{i}"
            for i in range(self.runner.start, self.runner.stop)
            if any(p.numel() == 0 for p in self.blocks[i].parameters())
        ]
        if released:
            raise PipelineError(
                f"stage {self.stage} would run {', '.join(released)}, whose weights live on another stage since a fit"
                " with pipeline stages. Evaluate with the Trainer that fitted (its stages keep their blocks), or load"
                " the full weights first: module.load_state_dict(trainer.strategy.full_state_dict()) right after fit,"
                " or from a checkpoint consolidated with python -m lightning_seqpar.consolidate."
            )

    @classmethod
    def automatic(
        cls, module: nn.Module, topology: Any, runtime_end: Callable[[], None], bounds: Sequence[int] | None = None
    ) -> PipelineStages:
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

        layers = [
            StageLayer([p for _, p in self.owned], self._train_micro_batch) if s == self.stage else nn.Identity()
            for s in range(self.stages)
        ]
        # uniform: one layer per stage; dynamic_shape: a smaller last batch sends its shapes again.
        return PipelineModule(
            layers=layers, num_stages=self.stages, topology=grid, loss_fn=None, partition_method="uniform",
            dynamic_shape=True,
        )

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
        """One optimizer step on one DataLoader batch, cut into ``micro_batches``; returns the mean loss (every
        rank)."""
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
            raise PipelineError(
                f"with pipeline stages {type(self.module).__name__}.training_step must return the loss (a scalar"
                f" tensor or a dict with 'loss'), got {type(output).__name__}."
            )
        return loss.reshape(())

    # --- evaluation ---

    def evaluate(
        self, hook: str, batch: Any, args: tuple, kwargs: dict, micro_batches: int, context: Callable[[], Any]
    ) -> Any:
        """``module.<hook>(batch, *args, **kwargs)`` through the stages, forward only; the output (same on every
        rank)."""
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
        return _to_device(shared, self.device)

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
        stages = PipelineStages(
            module, topology, applied.runtime.exit, path, blocks, [0, *inner, len(blocks)], explicit=True
        )
        parts = [int(p) for p in net.parts]  # layer i trains on the stage s with parts[s] <= i < parts[s + 1]
        stages.owner = {
            id(p): s for s in range(topology.pp) for layer in net._layer_specs[parts[s] : parts[s + 1]]
            for p in layer.parameters()
        }
    else:
        stages = PipelineStages.automatic(module, topology, applied.runtime.exit)
        net = stages.build_pipeline_module(pipeline.pipeline_grid(topology))
    applied.add_undo(stages.remove)
    stages.release_other_blocks()
    return net, stages
