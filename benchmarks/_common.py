"""What the benchmark scripts share: the device, timing (per-call and per-training-step), and one Lightning setup.

``bench_single_gpu.py``, ``bench_multi_gpu.py``, ``bench_pipeline.py``, ``bench_peers.py``, ``profile_step.py`` and
their pieces (``single_gpu_trials.py``, ``peer_measure.py``, ...) import it from this folder (they put it on
``sys.path``). Times are milliseconds: CUDA events on a GPU, ``time.perf_counter`` on the CPU (``--smoke`` runs).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def bench_device(smoke: bool) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` (made current) when a GPU is there and ``smoke`` is off, else the
    CPU."""
    if torch.cuda.is_available() and not smoke:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def device_info(device: torch.device) -> dict:
    """Versions (torch, CUDA, Lightning, Python) and, on a GPU, its name, capability, memory (GiB), SMs and cuDNN."""
    import lightning

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "lightning": lightning.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                    alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    return info


def fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or ``"-"`` for a value not measured."""
    return "-" if value is None else format(value, spec)


def call_times(fn: Callable[[], Any], steps: tuple[int, int], device: torch.device,
               before: Callable[[], Any] | None = None) -> list[float]:
    """Milliseconds of each timed call of ``fn`` after the warm-up calls; ``steps`` is ``(warm-up, timed)``.

    ``before`` runs ahead of every timed call, outside the measured time (e.g. ``dist.barrier`` so that all ranks
    start together). CUDA events around the call on a GPU; ``perf_counter`` on the CPU.
    """
    warmup, count = steps
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(count):
        if before is not None:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


class StepClock:
    """Per-step times between :meth:`start` and :meth:`stop` calls: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple] = []

    def start(self) -> None:
        """Marks the start of a step (records an event on the current stream on a GPU)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open = event
        else:
            self._open = time.perf_counter()

    def stop(self) -> None:
        """Marks the end of the step started last."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((self._open, event))
        else:
            self.marks.append((self._open, time.perf_counter()))

    def times_ms(self) -> list[float]:
        """Milliseconds of every step marked (synchronises the GPU first)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.marks]
        return [(b - a) * 1e3 for a, b in self.marks]


class BenchModule(LightningModule):
    """The benchmarks' LightningModule: ``model``, a training step given as ``loss(module, batch)``, and AdamW
    (lr 1e-4; its fused kernel when ``fused``)."""

    def __init__(
        self, model: torch.nn.Module, loss: Callable[[LightningModule, Any], torch.Tensor], fused: bool
    ) -> None:
        super().__init__()
        self.model, self.loss_fn, self.fused = model, loss, fused

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_fn(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4, **({"fused": True} if self.fused else {}))


class StepTimer(Callback):
    """Times training steps ``warmup`` to ``warmup + timed - 1`` with a :class:`StepClock` (from
    ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward and optimizer step), and keeps every
    step's loss (``timed=None``: every step from ``warmup`` on)."""

    def __init__(self, clock: StepClock, warmup: int, timed: int | None = None) -> None:
        self.clock, self.warmup, self.timed = clock, warmup, timed
        self._losses: list[torch.Tensor] = []

    def timing(self, batch_idx: int) -> bool:
        """Whether step ``batch_idx`` is timed."""
        return batch_idx >= self.warmup and (self.timed is None or batch_idx < self.warmup + self.timed)

    @property
    def losses(self) -> list[float]:
        """The loss of every step so far (read at the end: no synchronisation during the steps)."""
        return [float(loss) for loss in self._losses]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.timing(batch_idx):
            self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.timing(batch_idx):
            self.clock.stop()
        loss = outputs["loss"]
        self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)


def bench_trainer(strategy: Any, device: torch.device, devices: int, max_steps: int, callbacks: list[Callback],
                  precision: str | None = None) -> Trainer:
    """A Trainer that only trains, ``max_steps`` steps: no logger, checkpoints, progress bar, summary or validation.
    ``precision`` defaults to ``"bf16-mixed"`` on a GPU and ``"32-true"`` on the CPU."""
    return Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=devices,
        strategy=strategy,
        precision=precision or ("bf16-mixed" if device.type == "cuda" else "32-true"),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
