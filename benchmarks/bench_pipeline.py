"""Pipeline stages against ZeRO-3 on the same GPUs: step time, peak memory, and the losses of both side by side.

Run one process per GPU (2 GPUs: 2 stages x sp 1 against ZeRO-3 over sp 2)::

    torchrun --nproc_per_node 2 benchmarks/bench_pipeline.py --out benchmarks/results --tag n2

Both configurations train the same generic ViT (``--width``, ``--depth``, ``--heads``; about ``12 x depth x
width^2`` parameters: 4.8e9 by default, 77 GB of model state in DDP at 16 bytes per parameter with AdamW;
``--depth 48`` gives 9.7e9, which fits neither one H200 nor ZeRO-3 over two, and trains through two stages:
benchmarks/results/pipeline_n2_depth48.md) through Lightning's Trainer and the module's own ``training_step`` (no
pipeline methods), on the same global batch of ``--batch`` samples of ``--tokens`` tokens, bf16-mixed, AdamW:

- ``pipeline``: ``SeqParStrategy(pipeline_stages=2, micro_batches=M, zero_stage=1)``, the rest of the world in sp;
- ``zero3``: ``SeqParStrategy(zero_stage=3, sequence_parallel_size=world)``.

Timed with CUDA events around each training step (median of ``--steps`` after ``--warmup``); peak memory is the
largest ``max_memory_allocated`` over the ranks. The loss of every step of both is recorded: same data, same
initial weights, so they agree to bf16 rounding. Writes ``pipeline_<tag>.json`` and ``.md`` under ``--out``.

``--smoke`` runs tiny sizes on the CPU over gloo (``torchrun --nproc_per_node 2 ... --smoke``; fp32), which the
test suite does to keep this script working.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchModule, StepClock, StepTimer, bench_device, bench_trainer  # noqa: E402
from workloads import OUT_DIM, GenericViT  # noqa: E402

GIB = 2**30


def sample(index: int, tokens: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample ``index``: tokens [L, D] and targets [L, OUT_DIM], the same in every configuration."""
    g = torch.Generator(device=device).manual_seed(int(index))
    return torch.randn(tokens, width, generator=g, device=device), torch.randn(
        tokens, OUT_DIM, generator=g, device=device
    )


def run(config: str, args: argparse.Namespace, device: torch.device, world: int) -> dict:
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    torch.manual_seed(0)
    model = GenericViT(args.width, args.depth, args.heads)  # on the CPU: the strategy moves it
    clock = StepClock(device)
    total = args.warmup + args.steps

    def loss(module, batch):  # batch: sample indices [B] (a micro-batch of them with pipelines)
        pairs = [sample(i, args.tokens, args.width, module.device) for i in batch.tolist()]
        x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # [B, L, D], [B, L, OUT]
        if device.type == "cuda":  # DeepSpeed's bf16 weights; Lightning converts DataLoader batches, not these
            x = x.to(torch.bfloat16)
        return F.mse_loss(module.model(x).float(), y)

    timer = StepTimer(clock, args.warmup)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if config == "pipeline":
        strategy = SeqParStrategy(
            sequence_parallel_size=world // 2,
            pipeline_stages=2,
            micro_batches=args.micro_batches,
            zero_stage=1,
            process_group_backend=backend,
            timeout=600,
        )
    else:
        strategy = SeqParStrategy(
            sequence_parallel_size=world, zero_stage=3, process_group_backend=backend, timeout=600
        )
    trainer = bench_trainer(strategy, device, world, total, [timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Lightning's sampler shuffles with the same seed in both runs; batch = args.batch sample indices.
    trainer.fit(
        BenchModule(model, loss, fused=False), DataLoader(list(range(total * args.batch)), batch_size=args.batch)
    )
    losses = timer.losses
    times = clock.times_ms()
    peak = torch.tensor([torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else 0.0], device=device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return {
        "config": config, "step_ms": statistics.median(times), "step_ms_all": [round(t, 3) for t in times],
        "peak_gib": float(peak) if device.type == "cuda" else None, "losses": losses,
        "tokens_per_s": args.batch * args.tokens / (statistics.median(times) / 1e3),
    }


def markdown(payload: dict) -> str:
    rows = {r["config"]: r for r in payload["results"]}
    a = payload["args"]
    lines = [
        f"# Pipeline stages against ZeRO-3 ({payload['world']} x {payload['device']})",
        "",
        f"Generic ViT, width {a['width']}, depth {a['depth']} ({payload['parameters'] / 1e9:.2f}e9 parameters), batch "
        f"{a['batch']}"
        f" x {a['tokens']} tokens, {a['micro_batches']} micro-batches; median of {a['steps']} steps after "
        f"{a['warmup']}.",
        "",
        "| configuration | step (ms) | tokens/s | peak memory (GiB) |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r.get("status") == "oom":
            lines.append(f"| {name} | out of memory | | {r['note']} |")
            continue
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {peak} |")
    if {"pipeline", "zero3"} <= rows.keys() and all(rows[c].get("status") != "oom" for c in ("pipeline", "zero3")):
        p, z = rows["pipeline"]["losses"], rows["zero3"]["losses"]
        diff = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(p, z))
        lines += ["", f"Largest relative difference of the per-step losses, pipeline against ZeRO-3: {diff:.2e}."]
    return "\n".join(lines) + "\n"


def write(payload: dict, out: Path, tag: str) -> None:
    """``pipeline_<tag>.json`` and ``.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pipeline_{tag}.json").write_text(json.dumps(payload, indent=1))
    (out / f"pipeline_{tag}.md").write_text(markdown(payload))


def record_oom(payload: dict, config: str, error: BaseException, rank: int, device: torch.device, out: Path,
               tag: str) -> None:
    """Write ``config``'s out-of-memory row (from the rank that ran out, whichever it is) next to the rows measured
    before it, and print it."""
    allocated = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    capacity = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else 0.0
    note = (f"rank {rank}: {allocated:.1f} GiB allocated of {capacity:.1f}; "
            f"{str(error).splitlines()[0][:160] if str(error) else type(error).__name__}")
    payload["results"].append({"config": config, "status": "oom", "note": note})
    write(payload, out, tag)
    print(f"[bench_pipeline] {config}: out of memory on {note}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="n2")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--configs", default="pipeline,zero3")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (gloo)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.depth, args.heads, args.tokens, args.batch, args.micro_batches, args.warmup, args.steps = (
            32,
            4,
            4,
            13,
            2,
            2,
            1,
            2,
        )
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world % 2:
        raise SystemExit(f"bench_pipeline.py needs an even number of processes (2 stages), got WORLD_SIZE={world}.")
    device = bench_device(args.smoke)
    use_cuda = device.type == "cuda"
    payload = {
        "world": world,
        "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
        "args": vars(args) | {"out": str(args.out)},
        "parameters": sum(
            p.numel() for p in GenericViT(args.width, args.depth, args.heads, device="meta").parameters()
        ),
        "results": [],
    }
    rank = int(os.environ.get("RANK", 0))
    for config in args.configs.split(","):
        try:
            payload["results"].append(run(config, args, device, world))
        except torch.OutOfMemoryError as error:
            record_oom(payload, config, error, rank, device, args.out, args.tag)
            # The other ranks wait in a collective this rank will never join, and a normal exit would tear down the
            # process group and wait with them: leave at once, so that the launcher stops every rank now.
            os._exit(3)
        if rank == 0:  # after every configuration: a run cut short keeps what it measured
            write(payload, args.out, args.tag)
    if int(os.environ.get("RANK", 0)) == 0:
        print(markdown(payload))


if __name__ == "__main__":
    main()
