"""Multi-GPU scaling of SeqParStrategy: weak and strong scaling of Ulysses, LSS, ring and hybrid, the longest sequence, and communication time.

Run one process per GPU (``benchmarks/run_multi_gpu.sh N`` does this for 1 and N GPUs and merges the results)::

    torchrun --nproc_per_node 8 benchmarks/bench_multi_gpu.py --out benchmarks/results --tag n8

Each configuration trains the generic ViT (8 pre-norm blocks, width 1024, 16 heads, bf16-mixed, AdamW) for a few
steps through Lightning's Trainer and the strategy, timed with CUDA events around each training step; the median
step is reported. Tokens per step = L x dp (one sample of L tokens per SP group). Communication is measured with
torch.profiler over one step: time in NCCL kernels against time in attention kernels.

``--smoke`` runs tiny sizes on the CPU over gloo (``torchrun --nproc_per_node 2 ... --smoke``), which the test
suite does to keep this script working.
"""

from __future__ import annotations

import argparse
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
from bench_single_gpu import OUT_DIM, GenericViT, StepClock, device_info, vit_flops  # noqa: E402

K = 1024


@dataclass
class Result:
    """One measured configuration on this world size."""

    section: str  # weak | strong | longest | profile
    attention: str
    world: int
    sp: int
    dp: int
    length: int  # tokens per sample (per SP group)
    status: str = "ok"  # ok | oom | error
    step_ms: float | None = None
    tokens_per_s: float | None = None
    tflops_per_gpu: float | None = None
    peak_gib: float | None = None
    comm_ms: float | None = None
    attention_ms: float | None = None
    note: str = ""
    step_ms_all: list[float] = field(default_factory=list)


@dataclass
class Sizes:
    width: int = 1024
    depth: int = 8
    heads: int = 16
    tokens_per_gpu: int = 64 * K
    strong_length: int = 256 * K
    longest: tuple[int, ...] = (256 * K, 512 * K, 1024 * K, 2048 * K)
    warmup: int = 2
    timed: int = 5

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(width=32, depth=2, heads=4, tokens_per_gpu=16, strong_length=24, longest=(32, 64), warmup=1, timed=2)


def _layouts(world: int, attention: str) -> list[tuple[int, int]]:
    """(sp, dp) pairs to run: sp = world, and for world >= 4 the sp x dp mixes."""
    pairs = [(world, 1)]
    if world >= 4:
        pairs += [(world // 2, 2)]
    return [(sp, dp) for sp, dp in pairs if attention != "hybrid" or sp >= 4]


def run_one(section: str, attention: str, sp: int, length: int, sizes: Sizes, device: torch.device, profile: bool = False) -> Result:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    world = int(os.environ["WORLD_SIZE"])
    result = Result(section, attention, world, sp, world // sp, length)
    torch.manual_seed(0)
    model = GenericViT(sizes.width, sizes.depth, sizes.heads)
    x = torch.randn(1, length, sizes.width)  # [B, L, D], the same on every rank of a group (same seed)
    y = torch.randn(1, length, OUT_DIM)
    clock = StepClock(device)
    steps = sizes.warmup + sizes.timed
    profile_times: dict[str, float] = {}

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.model(x.to(self.device)), y.to(self.device))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= sizes.warmup:
                clock.start()
            if profile and batch_idx == steps - 1:
                self.profiler = torch.profiler.profile(activities=_activities(device))
                self.profiler.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx >= sizes.warmup:
                clock.stop()
            if profile and batch_idx == steps - 1:
                self.profiler.__exit__(None, None, None)
                profile_times.update(_split_profile(self.profiler, device))

    strategy = SeqParStrategy(
        sequence_parallel_size=sp, attention=attention, activation_checkpointing=True,
        ulysses_degree=min(sp, 4) if attention == "hybrid" else None,
        process_group_backend="nccl" if device.type == "cuda" else "gloo", timeout=600,
    )
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=world, strategy=strategy,
        precision="bf16-mixed" if device.type == "cuda" else "32-true", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(Module(), DataLoader(list(range(steps * result.dp)), batch_size=1))
    times = clock.times_ms()
    result.step_ms_all = [round(t, 3) for t in times]
    result.step_ms = statistics.median(times)
    result.tokens_per_s = length * result.dp / (result.step_ms / 1e3)
    result.tflops_per_gpu = vit_flops(length, sizes.width, sizes.depth) * result.dp / world / (result.step_ms / 1e3) / 1e12
    if device.type == "cuda":
        result.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    result.comm_ms = profile_times.get("comm_ms")
    result.attention_ms = profile_times.get("attention_ms")
    return result


def _activities(device: torch.device):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def _split_profile(profiler, device: torch.device) -> dict[str, float]:
    """Milliseconds in communication kernels (NCCL / gloo) and in attention kernels during the profiled step."""
    comm = attention = 0.0
    for event in profiler.key_averages():
        name = event.key.lower()
        us = event.device_time_total if device.type == "cuda" else event.cpu_time_total
        if "nccl" in name or (device.type != "cuda" and "gloo" in name):
            comm += us
        elif any(k in name for k in ("flash", "cudnn", "fmha", "attention", "sdpa")):
            attention += us
    return {"comm_ms": comm / 1e3, "attention_ms": attention / 1e3}


def measure(*args, **kwargs) -> Result:
    try:
        return run_one(*args, **kwargs)
    except torch.OutOfMemoryError:
        section, attention, sp, length = args[:4]
        world = int(os.environ["WORLD_SIZE"])
        return Result(section, attention, world, sp, world // sp, length, status="oom")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default=None, help="file name suffix; default n<world>")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (gloo)")
    parser.add_argument("--attention", nargs="+", default=["ulysses", "lss", "ring", "hybrid"])
    parser.add_argument("--sections", default="weak,strong,longest,profile")
    args = parser.parse_args(argv)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    sizes = Sizes.smoke() if args.smoke else Sizes()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sections = args.sections.split(",")
    results: list[Result] = []
    t0 = time.monotonic()
    for attention in args.attention:
        for sp, dp in _layouts(world, attention):
            if "weak" in sections:
                results.append(measure("weak", attention, sp, sizes.tokens_per_gpu * sp, sizes, device))
            if "strong" in sections:
                results.append(measure("strong", attention, sp, sizes.strong_length, sizes, device))
        if "profile" in sections:
            results.append(measure("profile", attention, world, sizes.tokens_per_gpu * world, sizes, device, profile=True))
        if "longest" in sections:
            for length in sizes.longest:
                res = measure("longest", attention, world, length, sizes, device)
                results.append(res)
                if res.status != "ok":
                    break
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = args.tag or f"n{world}"
        info = device_info(device) if device.type == "cuda" else {"device": "cpu", "torch": torch.__version__}
        payload = {"world": world, "smoke": args.smoke, "sizes": asdict(sizes), "device": info,
                   "seconds": round(time.monotonic() - t0, 1), "results": [asdict(r) for r in results]}
        (args.out / f"multi_gpu_{tag}.json").write_text(json.dumps(payload, indent=1))
        print(markdown(payload))


def markdown(payload: dict) -> str:
    rows = ["| section | attention | world | sp x dp | L | step ms | tokens/s | TFLOP/s per GPU | peak GiB | comm ms | attn ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in payload["results"]:
        rows.append(
            f"| {r['section']} | {r['attention']} | {r['world']} | {r['sp']} x {r['dp']} | {r['length']} | "
            f"{fmt(r['step_ms'], '.1f') if r['status'] == 'ok' else r['status']} | {fmt(r['tokens_per_s'], ',.0f')} | "
            f"{fmt(r['tflops_per_gpu'], '.1f')} | {fmt(r['peak_gib'], '.1f')} | {fmt(r['comm_ms'], '.1f')} | {fmt(r['attention_ms'], '.1f')} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
