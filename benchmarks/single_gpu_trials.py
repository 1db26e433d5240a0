"""One measured configuration of the single-GPU benchmark: the memory configurations, the plain PyTorch loop and
the same model under SeqParStrategy(sequence_parallel_size=1), each timed per step (``_common.StepClock``) into a
:class:`Trial`; :func:`measure` turns an out-of-memory or a failure into a recorded trial.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import BenchModule, StepClock, StepTimer, bench_trainer  # noqa: E402
from workloads import K, Sizes, build, climax_flops, sdpa_context, vit_flops  # noqa: E402

from lightning_seqpar.memory import MasterWeightAdamW  # noqa: E402
from lightning_seqpar.wrapping import checkpoint_module, chunk_module  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One measured configuration."""

    model: str
    mode: str  # plain | strategy
    backend: str
    length: int
    memory: str  # memory configuration, see MEMORY_CONFIGS
    section: str
    status: str = "ok"  # ok | oom | error | skipped
    step_ms: float | None = None
    step_ms_all: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    tflops: float | None = None
    flops_per_step: float | None = None
    peak_gib: float | None = None
    note: str = ""
    measured_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


MEMORY_CONFIGS = {
    "amp": "autocast bf16, fp32 weights and residual stream, no recomputation",
    "amp+ckpt": "autocast bf16, fp32 weights and residual stream, per-block activation checkpointing",
    "bf16+ckpt": "bf16 weights and residual stream, fp32 master weights in AdamW, per-block checkpointing",
    "bf16+ckpt+chunk": "bf16+ckpt, MLP recomputed in token chunks",
    "bf16+sac+chunk": "bf16, per-block checkpointing that keeps the attention output (no attention recompute), chunked "
    "MLP",
    "bf16+offload+chunk": "bf16, per-block checkpointing with block inputs in pinned host memory, chunked MLP",
}
CLIMAX_MEMORY = {
    "amp+ckpt+agg16k": "ClimaX only: amp+ckpt, variable aggregation run on 16K-token slices and recomputed"
}


def _memory_setup(model: nn.Module, memory: str, sizes: Sizes):
    """Apply a memory configuration to the model's blocks; returns (autocast?, optimizer)."""
    blocks = model.blocks
    if "chunk" in memory:
        for block in blocks:
            chunk_module(block.mlp, sizes.mlp_chunks)
    if "ckpt" in memory or "sac" in memory or "offload" in memory:
        for block in blocks:
            checkpoint_module(block, offload="offload" in memory, save_attention="sac" in memory)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if memory.startswith("bf16"):
        return False, MasterWeightAdamW(model.parameters(), lr=1e-4, **fused)
    return True, torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)


def _init_optimizer_state(model: nn.Module, optimizer) -> None:
    """One step on tiny random gradients, so that a single measured step already holds the optimizer state."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-8
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_plain(kind: str, sizes: Sizes, length: int, backend: str, memory: str, device: torch.device,
              steps: tuple[int, int], section: str, compile_blocks: bool = False) -> Trial:
    """Hand-written training loop: zero_grad, forward under autocast (unless bf16 weights), MSE, backward, AdamW.
    ``compile_blocks``: ``torch.compile`` each block (``nn.Module.compile``), attention included."""
    trial = Trial(kind, "plain+compile" if compile_blocks else "plain", backend, length, memory, section)
    dtype = torch.bfloat16 if memory.startswith("bf16") else None
    model, inputs, y = build(kind, sizes, length, device, dtype)
    use_autocast, optimizer = (
        _memory_setup(model, memory, sizes) if kind == "vit" else _memory_setup_climax(model, memory)
    )
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    warmup, timed = steps
    if warmup == 0:
        _init_optimizer_state(model, optimizer)
    _reset_peak(device)
    clock = StepClock(device)
    for step in range(warmup + timed):
        if step >= warmup:
            clock.start()
        optimizer.zero_grad(set_to_none=True)
        # The kernel choice must also hold in backward, where checkpointed blocks recompute their attention.
        with sdpa_context(backend):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                out = model(*inputs)
                loss = F.mse_loss(out.float() if not use_autocast else out, y)
            loss.backward()
        optimizer.step()
        if step >= warmup:
            clock.stop()
    _finish(trial, clock, device, sizes)
    if not torch.isfinite(loss.detach()).item():
        trial.status, trial.note = "error", "non-finite loss"
    return trial


def _memory_setup_climax(model: nn.Module, memory: str):
    if "ckpt" in memory:
        for block in model.blocks:
            checkpoint_module(block)
    if "agg16k" in memory:
        # Variable aggregation on 16K-token slices, recomputed in backward: fused SDPA kernels reject its
        # [B*L, H, 1, d] batch from B*L = 65536 on (a grid-size limit), and its [B*L, V, 2D] keys/values dominate
        # memory.
        chunk_module(model.var_agg, -(-model.num_patches // (16 * K)), dim=2, out_dim=1)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return True, torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)


def run_strategy(
    kind: str,
    sizes: Sizes,
    length: int,
    backend: str,
    memory: str,
    device: torch.device,
    steps: tuple[int, int],
    section: str,
    attention: str = "ulysses",
    compile_blocks: bool = False,
) -> Trial:
    """The same model and loop through Lightning's Trainer and SeqParStrategy(sequence_parallel_size=1), timed by
    CUDA events at on_train_batch_start / on_train_batch_end (training_step, backward and optimizer step).
    ``compile_blocks`` is the strategy's own option (blocks compiled, the distributed attention left eager)."""
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    mode = ("strategy" if attention == "ulysses" else f"strategy-{attention}") + ("+compile" if compile_blocks else "")
    trial = Trial(kind, mode, backend, length, memory, section)
    model, inputs, y = build(kind, sizes, length, device)
    clock = StepClock(device)
    warmup, timed = steps

    module = BenchModule(model, lambda m, batch: F.mse_loss(m.model(*inputs), y), fused=device.type == "cuda")
    timer = StepTimer(clock, warmup)
    strategy = SeqParStrategy(
        sequence_parallel_size=1,
        attention=attention,
        attention_backend=backend,
        activation_checkpointing="ckpt" in memory,
        compile_blocks=compile_blocks,
        process_group_backend="nccl" if device.type == "cuda" else "gloo",
    )
    trainer = bench_trainer(strategy, device, 1, warmup + timed, [timer], precision="bf16-mixed")
    _reset_peak(device)
    fit_and_release(trainer, module, DataLoader(list(range(warmup + timed)), batch_size=1))
    if timed:
        trial.note = f"loss {timer.losses[warmup + timed - 1]:.4f}"
    _finish(trial, clock, device, sizes)
    return trial


def fit_and_release(trainer, module, loader) -> None:
    """``trainer.fit``, then tear the process group down. Lightning leaves it up after fit, and the NCCL group keeps
    DDP's gradient buckets (one fp32 copy of the gradients) alive with it: without this, every later trial in the
    process would carry them in its peak memory. The next fit sets a new group up."""
    excepthook = sys.excepthook  # each init_process_group wraps it with a "[rank0]:" prefix
    try:
        trainer.fit(module, loader)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.excepthook = excepthook


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _finish(trial: Trial, clock: StepClock, device: torch.device, sizes: Sizes) -> None:
    times = clock.times_ms()
    trial.step_ms_all = [round(t, 3) for t in times]
    trial.step_ms = statistics.median(times)
    trial.tokens_per_s = trial.length / (trial.step_ms / 1e3)
    if trial.model == "vit":
        trial.flops_per_step = vit_flops(trial.length, sizes.width, sizes.depth)
    else:
        trial.flops_per_step = climax_flops(trial.length, sizes.width, sizes.depth, sizes.variables)
    trial.tflops = trial.flops_per_step / (trial.step_ms / 1e3) / 1e12
    if device.type == "cuda":
        trial.peak_gib = torch.cuda.max_memory_allocated() / 2**30


def measure(fn, *args, **kwargs) -> Trial:
    """Run one trial, turning an out-of-memory into status 'oom' and freeing everything afterwards."""
    oom, error = False, None
    trial = None
    try:
        trial = fn(*args, **kwargs)
    except torch.OutOfMemoryError:
        oom = True
    except Exception as exc:  # a failed configuration is a result, not the end of the run
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        traceback.print_exc()
    kind, sizes, length, backend, memory, device = args[:6]
    if trial is None:
        trial = Trial(kind, _mode_of(fn), backend, length, memory, kwargs.get("section", ""))
        trial.status = "oom" if oom else "error"
        trial.note = error or ""
        if oom and device.type == "cuda":
            trial.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    gc.collect()
    # What survives (imports, compiled-graph caches) moves out of the collector's view, so that a later trial's
    # full collections do not re-scan it and every trial starts from the same collector state.
    gc.freeze()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return trial


def _mode_of(fn) -> str:
    """The Trial.mode a runner (possibly a functools.partial of one) reports."""
    keywords = getattr(fn, "keywords", {})
    base = "strategy" if getattr(fn, "func", fn) is run_strategy else "plain"
    if base == "strategy" and keywords.get("attention", "ulysses") != "ulysses":
        base += f"-{keywords['attention']}"
    return base + ("+compile" if keywords.get("compile_blocks") else "")
