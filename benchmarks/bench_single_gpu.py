"""Single-GPU benchmark: step time, tokens/s, model TFLOP/s and peak memory of a generic ViT and of ClimaX, plain
PyTorch against the same model under SeqParStrategy(sequence_parallel_size=1), per attention backend, and the
longest sequence that trains with and without activation checkpointing and the memory savers.

One command (on a CUDA machine; ``--smoke`` runs tiny sizes anywhere, CPU included)::

    PYTHONPATH=. python benchmarks/bench_single_gpu.py --out benchmarks/results

writes ``single_gpu.json``, ``single_gpu.md`` and ``single_gpu.png`` into ``--out``. Method: random data (never
zeros), warm-up steps first, CUDA events around every step, median over the timed steps; peak memory is
``torch.cuda.max_memory_allocated`` over the whole run (weights, gradients and optimizer state included).

Model FLOPs per training step (recomputation not counted): 3 x forward, forward per block =
24 L D^2 (qkv 6 L D^2, proj 2 L D^2, MLP 16 L D^2) + 4 L^2 D (Q K^T and P V). ClimaX adds its embedding and
head (see :func:`climax_flops`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
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

from _common import BenchModule, StepClock, StepTimer, bench_trainer, call_times, device_info, fmt  # noqa: E402

from lightning_seqpar.memory import MasterWeightAdamW  # noqa: E402
from lightning_seqpar.weather.models.layers import Block  # noqa: E402
from lightning_seqpar.wrapping import checkpoint_module, chunk_module  # noqa: E402

K = 1024
OUT_DIM = 16  # regression target per token (a 4 x 4 patch), so input and target stay small next to [L, D]


# ---------------------------------------------------------------------------------------------------------
# Sizes and FLOPs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    width: int = 1024
    depth: int = 8
    heads: int = 16
    variables: int = 48
    speed_lengths: tuple[int, ...] = (16 * K, 64 * K)
    math_length: int = 4 * K
    ladder_lengths: tuple[int, ...] = (32 * K, 64 * K)
    largest_lengths: tuple[int, ...] = (128 * K, 256 * K, 512 * K, 1024 * K)
    climax_largest: tuple[int, ...] = (16 * K, 32 * K, 64 * K, 128 * K, 256 * K)
    warmup: int = 2
    timed: int = 10
    mlp_chunks: int = 16

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            width=64,
            depth=2,
            heads=4,
            variables=3,
            speed_lengths=(256, 512),
            math_length=128,
            ladder_lengths=(256, 512),
            largest_lengths=(256, 512, 1024, 2048),
            climax_largest=(256, 512),
            warmup=1,
            timed=2,
            mlp_chunks=4,
        )


def vit_flops(length: int, width: int, depth: int) -> float:
    """Model FLOPs of one training step of the block stack: 3 x depth x (24 L D^2 + 4 L^2 D)."""
    return 3.0 * depth * (24.0 * length * width**2 + 4.0 * length**2 * width)


def climax_flops(length: int, width: int, depth: int, variables: int, patch: int = 2, decoder_depth: int = 2) -> float:
    """Blocks as :func:`vit_flops`, plus per-variable patch embedding (2 V L p^2 D), variable aggregation
    (key/value projection 4 V L D^2, output projection 2 L D^2, attention over variables 4 V L D) and the head
    (decoder_depth x 2 L D^2 + 2 L D V p^2); training = 3 x forward."""
    L, D, V, p2 = length, width, variables, patch * patch
    extra = (
        2 * V * L * p2 * D
        + 4 * V * L * D**2
        + 2 * L * D**2
        + 4 * V * L * D
        + decoder_depth * 2 * L * D**2
        + 2 * L * D * V * p2
    )
    return vit_flops(length, width, depth) + 3.0 * extra


# ---------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------


class GenericViT(nn.Module):
    """``depth`` pre-norm blocks (LayerNorm, fused qkv / proj, 4x GELU MLP) on token embeddings [B, L, D], then a
    LayerNorm and a linear head to ``OUT_DIM`` values per token."""

    def __init__(self, width: int, depth: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.blocks = nn.ModuleList(Block(width, heads, 4.0, **factory) for _ in range(depth))
        self.norm = nn.LayerNorm(width, **factory)
        self.head = nn.Linear(width, OUT_DIM, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, OUT_DIM]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def climax_grid(length: int) -> tuple[int, int]:
    """A patch grid h x w = length with h <= w, both powers of two when length is."""
    h = 2 ** (int(math.log2(length)) // 2)
    while length % h:
        h //= 2
    return h, length // h


def build(kind: str, sizes: Sizes, length: int, device: torch.device, dtype=None):
    """(model, inputs tuple, target) with random data; the seed fixes the weights."""
    torch.manual_seed(0)
    if kind == "vit":
        model = GenericViT(sizes.width, sizes.depth, sizes.heads, device=device, dtype=dtype)
        x = torch.randn(1, length, sizes.width, device=device, dtype=dtype or torch.float32)  # [B, L, D]
        y = torch.randn(1, length, OUT_DIM, device=device)
        return model, (x,), y
    from lightning_seqpar.weather.models.climax import ClimaX

    names = [f"var{i}" for i in range(sizes.variables)]
    h, w = climax_grid(length)
    model = ClimaX(names, (2 * h, 2 * w), patch_size=2, embed_dim=sizes.width, depth=sizes.depth,
                   num_heads=sizes.heads, drop_path=0.0, device=device, dtype=dtype)
    x = torch.randn(1, len(names), 2 * h, 2 * w, device=device)  # [B, V, Hg, Wg]
    lead = torch.full((1,), 72.0, device=device)
    y = torch.randn(1, len(names), 2 * h, 2 * w, device=device)
    return model, (x, lead, names, names), y


def sdpa_context(backend: str):
    """The SDPA kernel choice of the plain model, matching local_attention's backends."""
    names = {
        "sdpa_cudnn": "CUDNN_ATTENTION",
        "sdpa_flash": "FLASH_ATTENTION",
        "sdpa_efficient": "EFFICIENT_ATTENTION",
        "math": "MATH",
    }
    if backend not in names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, names[backend])])


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


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, sizes: Sizes, device: torch.device, budget_s: float, results: dict, out: Path) -> None:
        self.sizes, self.device, self.budget_s, self.results, self.out = sizes, device, budget_s, results, out
        self.t0 = time.monotonic()
        gc.collect()
        gc.freeze()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def add(self, fn, kind, length, backend, memory, steps, section) -> Trial:
        if self.left() <= 0:
            trial = Trial(kind, _mode_of(fn), backend, length, memory, section, status="skipped",
                          note="time budget spent")
        else:
            trial = measure(fn, kind, self.sizes, length, backend, memory, self.device, steps=steps, section=section)
        self.results["trials"] = [t for t in self.results["trials"] if not _same(t, trial)] + [trial.__dict__]
        print(_row(trial), flush=True)
        write_outputs(self.results, self.out)
        return trial


def _same(a: dict, b: Trial) -> bool:
    return all(a[k] == getattr(b, k) for k in ("model", "mode", "backend", "length", "memory", "section"))


def section_speed(r: Runner, backends: list[str]) -> None:
    s = r.sizes
    steps_for = lambda L: (s.warmup, s.timed if L > 16 * K or s.width < 1024 else 2 * s.timed)  # noqa: E731
    for L in s.speed_lengths:
        # efficient attention is far behind at 64K (and costs a minute of device time): 16K only
        for backend in [b for b in backends if b != "sdpa_efficient" or L <= 16 * K or s.width < 1024]:
            r.add(run_plain, "vit", L, backend, "amp", steps_for(L), "speed")
        r.add(run_strategy, "vit", L, backends[0], "amp", steps_for(L), "speed")
        r.add(run_plain, "vit", L, backends[0], "amp", steps_for(L), "speed-repeat")  # the spread of one config
        # Blocks through torch.compile: plain (nn.Module.compile) and the strategy's compile_blocks option.
        r.add(functools.partial(run_plain, compile_blocks=True), "vit", L, backends[0], "amp", steps_for(L), "speed")
        r.add(functools.partial(run_strategy, compile_blocks=True), "vit", L, backends[0], "amp", steps_for(L), "speed")
    r.add(run_plain, "vit", s.math_length, "math", "amp", (s.warmup, s.timed), "speed")
    r.add(run_strategy, "vit", s.math_length, "math", "amp", (s.warmup, s.timed), "speed")


def section_climax(r: Runner, backend: str) -> None:
    s = r.sizes
    for L in s.speed_lengths:
        r.add(run_plain, "climax", L, backend, "amp", (s.warmup, s.timed), "speed")
        r.add(run_strategy, "climax", L, backend, "amp", (s.warmup, s.timed), "speed")
    for memory in ("amp", "amp+ckpt"):
        for L in s.climax_largest:
            if r.add(run_plain, "climax", L, backend, memory, (0, 1), "largest").status != "ok":
                break


def section_ladder(r: Runner, backend: str) -> None:
    s = r.sizes
    for memory in MEMORY_CONFIGS:
        for L in s.ladder_lengths:
            # five timed steps at every length: a median of two let one slow step (host or allocator) set a row
            steps = (2, 5)
            r.add(run_plain, "vit", L, backend, memory, steps, "ladder")


def memory_model(results: dict) -> dict:
    """Bytes per token and intercept of each memory configuration from the two ladder lengths."""
    model = {}
    for memory in MEMORY_CONFIGS:
        points = sorted((t["length"], t["peak_gib"]) for t in results["trials"]
                        if t["section"] == "ladder" and t["memory"] == memory and t["status"] == "ok" and t["peak_gib"])
        if len(points) >= 2:
            (l0, p0), (l1, p1) = points[0], points[-1]
            slope = (p1 - p0) * 2**30 / (l1 - l0)
            intercept = p0 * 2**30 - slope * l0
            model[memory] = {"bytes_per_token": slope, "intercept_gib": intercept / 2**30,
                             "predicted_1m_gib": (intercept + slope * 2**20) / 2**30}
    return model


def section_largest(r: Runner, backend: str, memories: list[str], lengths: list[int]) -> None:
    for memory in memories:
        for L in lengths:
            if r.add(run_plain, "vit", L, backend, memory, (0, 1), "largest").status != "ok":
                break


def pick_memory_for(results: dict, length: int, capacity_gib: float) -> str:
    """The fastest memory configuration predicted to fit ``length`` tokens with 8% headroom."""
    model = memory_model(results)
    for memory in ("bf16+sac+chunk", "bf16+ckpt+chunk", "bf16+offload+chunk"):
        if memory in model:
            predicted = (model[memory]["intercept_gib"] * 2**30 + model[memory]["bytes_per_token"] * length) / 2**30
            if predicted < 0.92 * capacity_gib:
                return memory
    return "bf16+offload+chunk"


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


def _tokens(length: int) -> str:
    return f"{length // K}K" if length >= K else str(length)


def _row(t: Trial | dict) -> str:
    t = t if isinstance(t, dict) else t.__dict__
    return (f"{t['section']:<12} {t['model']:<6} {t['mode']:<8} {t['backend']:<11} L={t['length']:>8} {t['memory']:<19}"
            f" {t['status']:<7} step {fmt(t['step_ms'], '10.1f')} ms  {fmt(t['tokens_per_s'], '10.0f')} tok/s"
            f"  {fmt(t['tflops'], '6.1f')} TFLOP/s  peak {fmt(t['peak_gib'], '6.2f')} GiB {t['note']}")


def matmul_ceiling(device: torch.device) -> float | None:
    """bf16 8192^3 matrix product rate on random data (median of 20 after 5 warm-ups): the practical ceiling."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / (statistics.median(call_times(lambda: a @ b, (5, 20), device)) / 1e3) / 1e12


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["memory_model"] = memory_model(results)
    (out / "single_gpu.json").write_text(json.dumps(results, indent=1))
    (out / "single_gpu.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    info, trials = results["device"], results["trials"]
    lines = [
        "# Single-GPU benchmark",
        "",
        f"Device: {info.get('name', info['device'])} ({info.get('memory_gib', 0):.1f} GiB), torch {info['torch']},"
        f" CUDA {info['cuda']}, cuDNN {info.get('cudnn')}, Lightning {info['lightning']}."
        f" bf16 matmul ceiling (8192^3, random data): {fmt(results.get('matmul_tflops'), '.0f')} TFLOP/s.",
        "",
        "Model FLOPs per step = 3 x depth x (24 L D^2 + 4 L^2 D) for the ViT (recomputation not counted); ClimaX adds"
        " embedding and head. Step time: median over the timed steps (CUDA events); `largest` rows are one step"
        " after the optimizer state exists. Peak: torch.cuda.max_memory_allocated.",
        "",
        *targets(results),
        "## Speed: plain PyTorch vs SeqParStrategy (sp=1), autocast bf16 both, AdamW (fused) both",
        "",
        "| model | L | path | backend | step ms | tokens/s | TFLOP/s | peak GiB | measured (UTC) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        if t["section"] in ("speed", "speed-repeat"):
            path = t["mode"] + (" (repeat)" if t["section"] == "speed-repeat" else "")
            lines.append(f"| {t['model']} | {t['length']} | {path} | {t['backend']} | {fmt(t['step_ms'], '.1f')} |"
                         f" {fmt(t['tokens_per_s'], '.0f')} | {fmt(t['tflops'], '.1f')} | {fmt(t['peak_gib'], '.2f')} |"
                         f" {t.get('measured_at', '-')} |" + (f" {t['status']}" if t["status"] != "ok" else ""))
    lines += [
        "",
        "## Strategy overhead at sp=1 (strategy step / plain step - 1)",
        "",
        "| model | L | paths | backend | overhead |",
        "|---|---|---|---|---|",
    ]
    for t in trials:
        if t["section"] == "speed" and t["mode"] in ("strategy", "strategy+compile") and t["status"] == "ok":
            plain_mode = t["mode"].replace("strategy", "plain")
            plain = [p for p in trials if p["section"] == "speed" and p["mode"] == plain_mode and p["status"] == "ok"
                     and p["model"] == t["model"] and p["length"] == t["length"] and p["backend"] == t["backend"]]
            if plain:
                lines.append(f"| {t['model']} | {t['length']} | {t['mode']} vs {plain_mode} | {t['backend']} |"
                             f" {100 * (t['step_ms'] / plain[0]['step_ms'] - 1):+.1f}% |")
    kinds = [t for t in trials if t["section"] == "attention-kinds"]
    if kinds:
        lines += ["", "## Distributed attention kinds at sp=1 (strategy path, autocast bf16)", "",
                  "| L | attention | backend | step ms | tokens/s | TFLOP/s | peak GiB | measured (UTC) |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in kinds:
            lines.append(
                f"| {t['length']} | {t['mode'].removeprefix('strategy-')} | {t['backend']} |"
                f" {fmt(t['step_ms'], '.1f')} | {fmt(t['tokens_per_s'], '.0f')} | {fmt(t['tflops'], '.1f')} |"
                f" {fmt(t['peak_gib'], '.2f')} | {t.get('measured_at', '-')} |"
                + (f" {t['status']}" if t["status"] != "ok" else "")
            )
    lines += ["", "## Memory configurations (generic ViT, plain PyTorch)", ""]
    lines += [f"- `{k}`: {v}" for k, v in {**MEMORY_CONFIGS, **CLIMAX_MEMORY}.items()]
    lines += ["", "| memory | L | step ms | TFLOP/s | peak GiB |", "|---|---|---|---|---|"]
    for t in trials:
        if t["section"] == "ladder":
            lines.append(
                f"| {t['memory']} | {t['length']} | {fmt(t['step_ms'], '.1f')} | {fmt(t['tflops'], '.1f')} | "
                f"{fmt(t['peak_gib'], '.2f')} | {t['status'] if t['status'] != 'ok' else ''}"
            )
    lines += [
        "",
        "| memory | KB per token (slope) | fixed GiB | predicted peak at 1,048,576 tokens GiB |",
        "|---|---|---|---|",
    ]
    for k, m in results.get("memory_model", {}).items():
        lines.append(
            f"| {k} | {m['bytes_per_token'] / 1024:.1f} | {m['intercept_gib']:.2f} | {m['predicted_1m_gib']:.1f} |"
        )
    lines += [
        "",
        "## Longest sequence that trains (one step)",
        "",
        "| model | memory | backend | L | status | step s | TFLOP/s | peak GiB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted(
        (t for t in trials if t["section"] == "largest"),
        key=lambda t: (t["model"], t["memory"], t["backend"], t["length"]),
    ):
        note = t["note"].split(".")[0][:90] if t["status"] == "error" else ""
        lines.append(
            f"| {t['model']} | {t['memory']} | {t['backend']} | {t['length']} | {t['status']} |"
            f" {fmt(t['step_ms'] and t['step_ms'] / 1e3, '.1f')} | {fmt(t['tflops'], '.1f')} | "
            f"{fmt(t['peak_gib'], '.2f')} | {note} |"
        )
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[str]:
    """The issue's targets, read off the trials: strategy overhead at sp = 1, model TFLOP/s of the generic ViT at
    the longest speed length, and the longest sequences that trained."""
    trials = [t for t in results["trials"] if t["status"] == "ok"]
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    speed = [t for t in trials if t["section"] == "speed" and t["model"] == "vit" and t["backend"] == "sdpa"]
    for L in sorted({t["length"] for t in speed if t["length"] >= 16 * K}):
        s = [t for t in speed if t["length"] == L and t["mode"] == "strategy"]
        p = [t for t in speed if t["length"] == L and t["mode"] == "plain"]
        if s and p:
            overhead = 100 * (s[0]["step_ms"] / p[0]["step_ms"] - 1)
            lines.append(
                f"| strategy step (sp = 1) within 3% of plain PyTorch, {_tokens(L)} tokens | {overhead:+.1f}% |"
                f" {'yes' if overhead <= 3 else 'no'} |"
            )
    if speed:
        L = max(t["length"] for t in speed)
        for mode in ("plain", "strategy", "plain+compile", "strategy+compile"):
            best = [t for t in speed if t["length"] == L and t["mode"] == mode]
            if best:
                tf = best[0]["tflops"]
                lines.append(
                    f"| >= 380 model TFLOP/s, generic ViT, {_tokens(L)} tokens, {mode} | {tf:.1f} | "
                    f"{'yes' if tf >= 380 else 'no'} |"
                )
    largest = [t for t in trials if t["section"] == "largest" and t["model"] == "vit"]
    if largest:
        t = max(largest, key=lambda t: t["length"])
        lines.append(f"| generic ViT at 1,048,576 tokens trains on one GPU | {t['length']:,} tokens, {t['memory']},"
                     f" peak {fmt(t['peak_gib'], '.1f')} GiB | {'yes' if t['length'] >= 2**20 else 'no'} |")
    climax = [t for t in trials if t["section"] == "largest" and t["model"] == "climax"]
    if climax:
        t = max(climax, key=lambda t: t["length"])
        lines.append(f"| ClimaX largest trainable, {results['sizes']['variables']} variables | {t['length']:,} tokens,"
                     f" {t['memory']}, peak {fmt(t['peak_gib'], '.1f')} GiB | (reported) |")
    return lines + [""]


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[str, list] = {}
    for t in results["trials"]:
        if t["model"] != "vit" or t["status"] != "ok" or t["section"] == "speed-repeat":
            continue
        label = f"{t['mode']} {t['backend']} {t['memory']}"
        groups.setdefault(label, []).append(t)
    for i, (label, ts) in enumerate(sorted(groups.items())):
        # up to 20 colours, and a marker that changes with them, so that no two series look alike
        style = {"color": plt.cm.tab20.colors[i % 20], "marker": "os^Dv<>p"[i % 8], "label": label}
        ts = sorted(ts, key=lambda t: t["length"])
        xs = [t["length"] for t in ts]
        ax_speed.plot(xs, [t["tokens_per_s"] for t in ts], **style)
        mem = [(t["length"], t["peak_gib"]) for t in ts if t["peak_gib"] is not None]
        if mem:
            ax_mem.plot(*zip(*mem), **style)
    capacity = results["device"].get("memory_gib")
    if capacity:
        ax_mem.axhline(capacity, color="k", linestyle="--", linewidth=1, label="GPU memory")
    for ax, title in ((ax_speed, "tokens/s"), (ax_mem, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(f"generic ViT (8 x 1024): {title}")
        ax.grid(True, alpha=0.3)
    ax_mem.legend(fontsize=6, loc="upper left")
    fig.suptitle(
        f"{results['device'].get('name', results['device']['device'])}, torch {results['device']['torch']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out / "single_gpu.png", dpi=120)


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU too")
    parser.add_argument(
        "--sections",
        default="speed,climax,ladder,largest,climax-agg",
        help="comma list of speed, climax, attention-kinds, ladder, largest, climax-agg, climax-largest,"
        " extreme (the default fits one 10-minute device call; extreme is the 1M-token step, ~5 minutes)",
    )
    parser.add_argument(
        "--render", type=Path, help="only rewrite the markdown and plot of this single_gpu.json into --out"
    )
    parser.add_argument(
        "--merge", type=Path, help="earlier single_gpu.json whose trials are kept (same configs replaced)"
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip remaining trials after this many seconds")
    parser.add_argument(
        "--climax-backend", default="sdpa_flash", help="attention backend of the climax-largest section"
    )
    parser.add_argument(
        "--large-backend", default=None, help="attention backend of the longest runs (default: fastest at 64K)"
    )
    parser.add_argument("--largest-lengths", default=None, help="comma list overriding the largest-section lengths;"
                        " its last entry is the extreme section's target")
    args = parser.parse_args(argv)

    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_seqpar"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.render:
        results = json.loads(args.render.read_text())
        write_outputs(results, args.out)
        plot(results, args.out)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = Sizes.smoke() if args.smoke else Sizes()
    results = {"device": device_info(device), "sizes": sizes.__dict__, "trials": [], "memory_configs": MEMORY_CONFIGS}
    if args.merge and args.merge.exists():
        previous = json.loads(args.merge.read_text())
        results["trials"] = previous.get("trials", [])
        results["matmul_tflops"] = previous.get("matmul_tflops")
    if "matmul_tflops" not in results or results["matmul_tflops"] is None:
        results["matmul_tflops"] = matmul_ceiling(device)
    print(json.dumps(results["device"]), f"matmul {results['matmul_tflops']}", flush=True)
    runner = Runner(sizes, device, args.budget_s, results, args.out)
    sections = args.sections.split(",")
    backends = ["sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient"] if device.type == "cuda" else ["sdpa"]
    if "speed" in sections:
        section_speed(runner, backends)
    best = args.large_backend or fastest_backend(results, sizes) or "sdpa"
    results["large_backend"] = best
    if "climax" in sections:
        section_climax(runner, best)
    if "attention-kinds" in sections:
        # The strategy's path at sp = 1 with each distributed attention: LSS on the fastest SDPA kernel, ring and
        # hybrid on their own block kernels (PyTorch's flash op on CUDA): the single-GPU cost of choosing them.
        for length in sizes.speed_lengths:
            for attention, backend in (("lss", best), ("ring", "auto"), ("hybrid", "auto")):
                runner.add(functools.partial(run_strategy, attention=attention), "vit", length, backend, "amp",
                           (sizes.warmup, sizes.timed), "attention-kinds")
    if "ladder" in sections:
        section_ladder(runner, best)
    lengths = [int(v) for v in args.largest_lengths.split(",")] if args.largest_lengths else None
    if "largest" in sections:
        section_largest(runner, best, ["amp"], lengths or list(sizes.largest_lengths[:2]))
        section_largest(runner, best, ["amp+ckpt"], lengths or list(sizes.largest_lengths[:2]))
    if "climax-agg" in sections:
        for L in [L for L in sizes.climax_largest if L >= sizes.speed_lengths[-1]]:
            if runner.add(run_plain, "climax", L, best, "amp+ckpt+agg16k", (0, 1), "largest").status != "ok":
                break
    if "climax-largest" in sections:
        # cuDNN attention fails on the variable aggregation's B*L-sized batch from 64K tokens: force a kernel
        for memory in ("amp", "amp+ckpt"):
            for L in [L for L in sizes.climax_largest if L >= sizes.speed_lengths[-1]]:
                if runner.add(run_plain, "climax", L, args.climax_backend, memory, (0, 1), "largest").status != "ok":
                    break
    if "extreme" in sections:
        # the longest sequence with the fastest memory savers predicted to fit, then the baseline's next doubling
        capacity = results["device"].get("memory_gib", 0)
        target = (lengths or [sizes.largest_lengths[-1]])[-1]
        memory = pick_memory_for(results, target, capacity) if capacity else "bf16+sac+chunk"
        results["extreme_memory"] = memory
        trial = runner.add(run_plain, "vit", target, best, memory, (0, 1), "largest")
        if trial.status == "error" and best != "sdpa_flash":
            runner.add(run_plain, "vit", target, "sdpa_flash", memory, (0, 1), "largest")
        section_largest(runner, best, ["amp+ckpt"], [sizes.largest_lengths[2]])
    write_outputs(results, args.out)
    plot(results, args.out)
    print(markdown(results), flush=True)


def fastest_backend(results: dict, sizes: Sizes) -> str | None:
    L = sizes.speed_lengths[-1]
    ok = [t for t in results["trials"] if t["section"] == "speed" and t["model"] == "vit" and t["mode"] == "plain"
          and t["length"] == L and t["status"] == "ok" and t["backend"] != "math"]
    return min(ok, key=lambda t: t["step_ms"])["backend"] if ok else None


if __name__ == "__main__":
    main()
