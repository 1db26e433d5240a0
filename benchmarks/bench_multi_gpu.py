"""Multi-GPU scaling of SeqParStrategy: weak and strong scaling of Ulysses, LSS, ring and hybrid, communication
against attention time, and the longest sequence of the generic ViT and of ClimaX that trains across the GPUs.

Run one process per GPU (``benchmarks/run_multi_gpu.sh N`` does this for 1 and N GPUs and writes the report)::

    torchrun --nproc_per_node 8 benchmarks/bench_multi_gpu.py --out benchmarks/results --tag n8

Sections (``--sections``, comma list):

- ``weak``: ``tokens_per_gpu x sp`` tokens per sample, so every GPU holds the same number of tokens; efficiency
  = (tokens/s on N) / (N x tokens/s on 1), by ``scaling_report.py``. One extra step after the timed ones runs
  under ``torch.profiler``: the time in NCCL kernels against the time in attention kernels.
- ``strong``: one fixed sequence (``strong_length``) on every world size; speed-up = step(1) / step(N).
- ``longest``: one training step (the optimizer state already created) at growing lengths, with per-block
  activation checkpointing, for the generic ViT (every ``--attention``) and for ClimaX (``--climax-attention``),
  until one does not fit. A length is skipped, and says why, when the previous row predicts it would exceed the
  GPU's memory or the time left (``--budget-s``); a skipped row is a prediction, never a measurement.

Every configuration trains through Lightning's Trainer and the strategy (bf16-mixed, fused AdamW), timed with CUDA
events around each training step; the median step is reported. Tokens per step = L x dp (one sample of L tokens
per SP group). Results are written after every configuration, so a run cut short keeps what it measured.
``resident_gib`` is the memory still allocated when a configuration starts (the NCCL process group keeps DDP's
gradient buckets of earlier configurations alive; ``peak_gib`` includes it).

``--smoke`` runs tiny sizes on the CPU over gloo (``torchrun --nproc_per_node 2 ... --smoke``), which the test
suite does to keep this script working.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchModule, StepClock, StepTimer, bench_device, bench_trainer, device_info, fmt  # noqa: E402
from single_gpu_trials import _init_optimizer_state  # noqa: E402
from workloads import build, climax_flops, vit_flops  # noqa: E402

K = 1024
GIB = 2**30


@dataclass
class Result:
    """One measured (or skipped) configuration on this world size."""

    section: str  # weak | strong | longest
    model: str  # vit | climax
    attention: str
    world: int
    sp: int
    dp: int
    length: int  # tokens per sample (per SP group)
    aggregation: str = ""  # ClimaX's variable aggregation (flat | hierarchical); "" for the generic ViT
    status: str = "ok"  # ok | oom | error | skipped
    checkpointing: bool = False
    step_ms: float | None = None
    tokens_per_s: float | None = None
    tflops_per_gpu: float | None = None
    peak_gib: float | None = None
    resident_gib: float | None = None
    comm_ms: float | None = None
    attention_ms: float | None = None
    kernel_ms: float | None = None
    top_kernels: list = field(default_factory=list)  # [[kernel name, ms], ...] of the profiled step
    seconds: float | None = None  # wall time of the whole configuration, start-up included
    note: str = ""
    measured_at: str = ""
    step_ms_all: list[float] = field(default_factory=list)


@dataclass
class Sizes:
    width: int = 1024
    depth: int = 8
    heads: int = 16
    variables: int = 48  # ClimaX
    tokens_per_gpu: int = 64 * K
    strong_length: int = 256 * K
    longest: tuple[int, ...] = (512 * K, 1024 * K, 2048 * K)
    climax_longest: tuple[int, ...] = (256 * K, 512 * K, 1024 * K)
    climax_aggregation: str = "flat"  # ClimaX's variable aggregation: flat | hierarchical (D-CHAG)
    aggregation_group_size: int = 8  # variables per group of the hierarchical aggregation
    weak_steps: tuple[int, int] = (2, 4)  # (warm-up, timed); one more step is profiled
    strong_steps: tuple[int, int] = (1, 2)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(width=32, depth=2, heads=4, variables=3, tokens_per_gpu=16, strong_length=24, longest=(32, 64),
                   climax_longest=(16, 32), weak_steps=(1, 2), strong_steps=(1, 2))


def _layouts(world: int, attention: str) -> list[tuple[int, int]]:
    """(sp, dp) pairs to run: sp = world, and for world >= 4 the sp x dp mixes."""
    pairs = [(world, 1)]
    if world >= 4:
        pairs += [(world // 2, 2)]
    return [(sp, dp) for sp, dp in pairs if attention != "hybrid" or sp >= 4]


def run_one(section: str, model_kind: str, attention: str, sp: int, length: int, sizes: Sizes, device: torch.device,
            steps: tuple[int, int], checkpointing: bool, profile: bool = False) -> Result:
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    world = int(os.environ["WORLD_SIZE"])
    result = Result(section, model_kind, attention, world, sp, world // sp, length, checkpointing=checkpointing,
                    aggregation=sizes.climax_aggregation if model_kind == "climax" else "")
    if device.type == "cuda":
        torch.cuda.synchronize()
        result.resident_gib = torch.cuda.memory_allocated() / GIB
    model, inputs, y = build(model_kind, sizes, length, device)  # the same seed, so the same sample on every rank
    clock = StepClock(device)
    warmup, timed = steps
    total = warmup + timed + int(profile)
    profile_times: dict = {}

    class Timer(StepTimer):
        def on_train_start(self, trainer, pl_module):
            if warmup == 0:  # a single measured step: create the optimizer state first, as a long run would have it
                _init_optimizer_state(pl_module, trainer.optimizers[0])
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            if profile and batch_idx == total - 1:
                self.profiler = torch.profiler.profile(activities=_activities(device))
                self.profiler.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if profile and batch_idx == total - 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.profiler.__exit__(None, None, None)
                profile_times.update(_split_profile(self.profiler, device))

    strategy = SeqParStrategy(
        sequence_parallel_size=sp, attention=attention, activation_checkpointing=checkpointing,
        ulysses_degree=min(sp, 4) if attention == "hybrid" else None,
        process_group_backend="nccl" if device.type == "cuda" else "gloo", timeout=600,
    )
    timer = Timer(clock, warmup, timed)
    trainer = bench_trainer(strategy, device, world, total, [timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    module = BenchModule(model, lambda m, batch: F.mse_loss(m.model(*inputs), y), fused=device.type == "cuda")
    trainer.fit(module, DataLoader(list(range(total * result.dp)), batch_size=1))
    if timed:
        result.note = f"loss {timer.losses[warmup + timed - 1]:.4f}"
    times = clock.times_ms()
    result.step_ms_all = [round(t, 3) for t in times]
    result.step_ms = statistics.median(times)
    result.tokens_per_s = length * result.dp / (result.step_ms / 1e3)
    if model_kind == "vit" or result.aggregation == "hierarchical":  # hierarchical: the block stack's FLOPs only
        flops = vit_flops(length, sizes.width, sizes.depth)
    else:
        flops = climax_flops(length, sizes.width, sizes.depth, sizes.variables)
    result.tflops_per_gpu = flops * result.dp / world / (result.step_ms / 1e3) / 1e12
    if device.type == "cuda":
        result.peak_gib = torch.cuda.max_memory_allocated() / GIB
    result.comm_ms = profile_times.get("comm_ms")
    result.attention_ms = profile_times.get("attention_ms")
    result.kernel_ms = profile_times.get("kernel_ms")
    result.top_kernels = profile_times.get("top_kernels", [])
    return result


def _activities(device: torch.device):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def _split_profile(profiler, device: torch.device) -> dict:
    """Milliseconds in communication kernels (NCCL; gloo ops on the CPU), in attention kernels and in all kernels
    during the profiled step, and the ten kernels that took longest. On a GPU only kernels count: neither the
    operators that launch them nor the ``record_function`` ranges that the profiler also draws on the GPU timeline
    (DDP's forward, the optimizer step, ``nccl:*``), which would count kernels twice. NCCL kernels run on their own
    stream and can overlap compute, so comm + the rest can exceed the step."""
    comm = attention = kernels = 0.0
    per_kernel: dict[str, float] = {}
    if device.type == "cuda":
        items = [(e.name, e.time_range.elapsed_us()) for e in profiler.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    else:
        items = [(e.key, e.cpu_time_total) for e in profiler.key_averages()]
    for key, us in items:
        name = key.lower()
        if device.type == "cuda":
            kernels += us
            per_kernel[key] = per_kernel.get(key, 0.0) + us
        if "nccl" in name or (device.type != "cuda" and "gloo" in name):
            comm += us
        elif any(k in name for k in ("flash", "cudnn", "fmha", "attention", "sdpa")):
            attention += us
    out = {"comm_ms": comm / 1e3, "attention_ms": attention / 1e3}
    if device.type == "cuda":
        out["kernel_ms"] = kernels / 1e3
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:10]
        out["top_kernels"] = [[name[:120], round(us / 1e3, 2)] for name, us in top]
    return out


def measure(section: str, model_kind: str, attention: str, sp: int, length: int, sizes: Sizes, device: torch.device,
            **kwargs) -> Result:
    t0 = time.monotonic()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    world = int(os.environ["WORLD_SIZE"])
    try:
        result = run_one(section, model_kind, attention, sp, length, sizes, device, **kwargs)
    except torch.OutOfMemoryError:
        result = Result(section, model_kind, attention, world, sp, world // sp, length, status="oom",
                        checkpointing=kwargs.get("checkpointing", False))
        if device.type == "cuda":
            result.peak_gib = torch.cuda.max_memory_allocated() / GIB
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result.seconds = round(time.monotonic() - t0, 1)
    result.measured_at = stamp
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            f"[bench_multi_gpu] {section} {model_kind} {attention} sp {sp} x dp {result.dp} L {length}: {result.status}"
            f" step {fmt(result.step_ms, '.1f')} ms, peak {fmt(result.peak_gib, '.1f')} GiB ({result.seconds} s)",
            flush=True,
        )
    return result


def skip_reason(previous: list[Result], length: int, capacity_gib: float | None, seconds_left: float) -> str:
    """Why the next (longer) length of the longest-sequence ladder is not run, from the rows already measured: its
    peak memory extrapolated linearly (through the last two rows; through zero from one) and its step time as the
    last one's times (length ratio)^2 (attention dominates there) plus the last row's start-up."""
    ok = [r for r in previous if r.status == "ok"]
    if not ok:
        return ""
    last = ok[-1]
    ratio = length / last.length
    predicted = None
    if last.peak_gib is not None:
        if len(ok) >= 2 and ok[-2].peak_gib is not None:
            slope = (last.peak_gib - ok[-2].peak_gib) / (last.length - ok[-2].length)
            predicted = last.peak_gib + slope * (length - last.length)
        else:
            predicted = last.peak_gib * ratio
        if capacity_gib is not None and predicted > 0.97 * capacity_gib:
            return f"predicted peak {predicted:.0f} GiB > {capacity_gib:.0f} GiB"
    startup = max(0.0, (last.seconds or 0.0) - (last.step_ms or 0.0) / 1e3)
    predicted_s = (last.step_ms or 0.0) / 1e3 * ratio**2 + startup
    if predicted_s > seconds_left:
        memory = "" if predicted is None else f" (predicted peak {predicted:.0f} GiB)"
        return f"predicted {predicted_s:.0f} s for one step > {seconds_left:.0f} s left{memory}"
    return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default=None, help="file name suffix; default n<world>")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (gloo)")
    parser.add_argument("--attention", nargs="+", default=["ulysses", "lss", "ring", "hybrid"])
    parser.add_argument(
        "--climax-attention", nargs="*", default=["ulysses"], help="attention kinds of ClimaX's longest rows"
    )
    parser.add_argument("--climax-aggregation", choices=("flat", "hierarchical"), default="flat",
                        help="ClimaX's variable aggregation in the longest rows (hierarchical: D-CHAG, groups of 8)")
    parser.add_argument("--climax-lengths", default=None,
                        help="comma-separated lengths of ClimaX's longest ladder (default 256K, 512K, 1M)")
    parser.add_argument("--sections", default="weak,strong,longest")
    parser.add_argument("--longest-models", default="vit,climax", help="models of the longest section, in this order")
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="wall-clock budget; longer rows predicted past it are skipped"
    )
    args = parser.parse_args(argv)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    sizes = Sizes.smoke() if args.smoke else Sizes()
    sizes.climax_aggregation = args.climax_aggregation
    if args.smoke:
        sizes.aggregation_group_size = 2
    if args.climax_lengths:
        sizes.climax_longest = tuple(int(x) for x in args.climax_lengths.split(","))
    device = bench_device(args.smoke)
    use_cuda = device.type == "cuda"
    capacity = torch.cuda.get_device_properties(device).total_memory / GIB if use_cuda else None
    sections = args.sections.split(",")
    unknown = set(sections) - {"weak", "strong", "longest"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from weak, strong, longest")
    t0 = time.monotonic()
    info = device_info(device) if use_cuda else {"device": "cpu", "torch": torch.__version__}
    info["gpus"] = torch.cuda.device_count() if use_cuda else 0
    payload = {"world": world, "smoke": args.smoke, "sizes": asdict(sizes), "device": info, "results": []}
    tag = args.tag or f"n{world}"

    def record(result: Result) -> Result:
        payload["results"].append(asdict(result))
        payload["seconds"] = round(time.monotonic() - t0, 1)
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"multi_gpu_{tag}.json").write_text(json.dumps(payload, indent=1))
        return result

    for attention in args.attention:
        for sp, _dp in _layouts(world, attention):
            if "weak" in sections:
                record(measure("weak", "vit", attention, sp, sizes.tokens_per_gpu * sp, sizes, device,
                               steps=sizes.weak_steps, checkpointing=False, profile=True))
            if "strong" in sections:
                record(measure("strong", "vit", attention, sp, sizes.strong_length, sizes, device,
                               steps=sizes.strong_steps, checkpointing=False))
    if "longest" in sections:
        ladders = []
        for model_kind in args.longest_models.split(","):
            if model_kind == "vit":
                ladders += [("vit", a, sizes.longest) for a in args.attention if a != "hybrid" or world >= 4]
            elif model_kind == "climax":
                ladders += [("climax", a, sizes.climax_longest) for a in args.climax_attention]
            else:
                parser.error(f"unknown model {model_kind!r} in --longest-models; choose from vit, climax")
        for model_kind, attention, lengths in ladders:
            rows: list[Result] = []
            for length in lengths:
                why = skip_reason(rows, length, capacity, args.budget_s - (time.monotonic() - t0))
                if why:
                    record(Result("longest", model_kind, attention, world, world, 1, length, status="skipped",
                                  checkpointing=True, note=why))
                    break
                rows.append(record(measure("longest", model_kind, attention, world, length, sizes, device,
                                           steps=(0, 1), checkpointing=True)))
                if rows[-1].status != "ok":
                    break
    if rank == 0:
        print(markdown(payload))


def markdown(payload: dict) -> str:
    rows = ["| section | model | attention | GPUs | sp x dp | L | step ms | tokens/s | TFLOP/s per GPU | peak GiB | "
            "comm ms | attention ms | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        step = fmt(r["step_ms"], ".1f") if r["status"] == "ok" else r["status"]
        rows.append(
            f"| {r['section']} | {r['model']}{' (' + r['aggregation'] + ')' if r.get('aggregation') else ''} |"
            f" {r['attention']} | {r['world']} | {r['sp']} x {r['dp']} | "
            f"{r['length']:,} | "
            f"{step} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['tflops_per_gpu'], '.1f')} | "
            f"{fmt(r['peak_gib'], '.1f')} | "
            f"{fmt(r['comm_ms'], '.1f')} | {fmt(r['attention_ms'], '.1f')} | "
            f"{r['note'] if r['status'] != 'ok' else ''} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
