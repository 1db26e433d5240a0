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
head (see ``workloads.climax_flops``). The pieces: ``workloads.py`` (sizes, FLOPs, models),
``single_gpu_trials.py`` (one measured configuration), ``single_gpu_report.py`` (JSON, markdown, plot).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import call_times, device_info  # noqa: E402
from single_gpu_report import _row, markdown, memory_model, plot, write_outputs  # noqa: E402
from single_gpu_trials import (  # noqa: E402
    MEMORY_CONFIGS,
    Trial,
    _mode_of,
    measure,
    run_plain,
    run_strategy,
)
from workloads import K, Sizes  # noqa: E402

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


def matmul_ceiling(device: torch.device) -> float | None:
    """bf16 8192^3 matrix product rate on random data (median of 20 after 5 warm-ups): the practical ceiling."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / (statistics.median(call_times(lambda: a @ b, (5, 20), device)) / 1e3) / 1e12


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
