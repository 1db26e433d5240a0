"""Peers side by side: the same sequence-parallel work through this project's attentions and through the peer libraries
that install here, on N GPUs of one host, each checked against one-GPU SDPA on the same data.

One process per GPU (``benchmarks/run_multi_gpu.sh`` runs it after the scaling benchmark)::

    torchrun --nproc_per_node 2 benchmarks/bench_peers.py --out benchmarks/results

writes ``peers_n<N>.json``, ``peers_n<N>.md`` and ``peers_n<N>.png``. Sections:

- ``check``: every method's output and q/k/v gradients (bf16, tokens sharded over the N ranks) against one-GPU
  SDPA in float32 on the same bf16 inputs (TF32 off); relative error ``||x - ref|| / ||ref||``, < 2e-2 passes.
- ``attention``: exact non-causal attention, forward + backward, one sequence of L tokens sharded over the N
  ranks, bf16, at each (heads x head dim). TFLOP/s per GPU counts forward = 4 L^2 H d and forward + backward =
  3.5 x forward (FlashAttention-2's accounting, arXiv 2307.08691), divided by N. The one-GPU cuDNN row runs the
  whole sequence on rank 0's GPU alone (same accounting, N = 1).
- ``causal``: the same with causal masking, counting half the FLOPs; this project's ring in its balanced zigzag
  order and in rank order (``ring_rank_order``), PyTorch's ring with its head-tail load balancing (cuDNN).
- ``vit``: a whole training step of the generic ViT (width 1024, depth 8, fused qkv, bf16 autocast, fused AdamW),
  tokens sharded over the N ranks, only the attention call swapped between rows; the parameter gradients are
  all-reduced over the group (one flat all-reduce, the same for every row). Model TFLOP/s per GPU as in
  ``workloads.vit_flops`` / N. Blocks are recomputed in backward (activation checkpointing) when a GPU
  holds more than ``--checkpoint-above`` tokens.

Methods: this project's ``ulysses``, ``lss``, ``ring`` and ``hybrid`` (Ulysses degree u x ring degree r); peers:
DeepSpeed's ``DistributedAttention`` (Ulysses, arXiv 2309.14509) with SDPA inside, PyTorch's
``context_parallel`` ring with the cuDNN or flash SDPA kernel and each rotate method (all-gather, all-to-all),
and yunchang / ring-flash-attn where they import (both need flash-attn; rows say why when they cannot run).
Timing: CUDA events around each iteration after warm-up, the median over the timed ones, the slowest rank's
median. Each row's ``vs_best_peer`` is its TFLOP/s over the best peer's at the same shape.

``--smoke`` runs tiny sizes on the CPU over gloo (``torchrun --nproc_per_node 2 ... --smoke``); the peers whose
kernels are CUDA-only are recorded as errors there.

The pieces: ``peer_methods.py`` (the methods), ``peer_measure.py`` (checks and timings), ``peers_report.py``
(JSON, markdown, plot); the ViT and its FLOPs come from ``workloads.py``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_device, device_info, fmt  # noqa: E402
from peer_measure import (  # noqa: E402
    TOLERANCE,
    _slowest,
    attention_flops,
    check_method,
    time_attention,
    time_one_gpu,
    time_vit,
)
from peer_methods import Methods, Unavailable, hybrid_degrees  # noqa: E402, F401 - hybrid_degrees: tests import it here
from peers_report import markdown, write_outputs  # noqa: E402
from workloads import K, vit_flops  # noqa: E402


@dataclass
class Sizes:
    attention: tuple[tuple[int, int, int], ...] = ((64 * K, 16, 64), (256 * K, 16, 64), (256 * K, 8, 128))  # (L, H, d)
    vit_lengths: tuple[int, ...] = (64 * K, 128 * K)
    width: int = 1024
    depth: int = 8
    heads: int = 16
    check_length: int = 4 * K
    causal: tuple[tuple[int, int, int], ...] = ((256 * K, 16, 64),)
    attention_steps: tuple[int, int] = (1, 3)  # (warm-up, timed) above 128K tokens; (2, 10) up to it
    vit_steps: tuple[int, int] = (1, 2)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            attention=((64, 4, 16), (96, 2, 32)),
            causal=((64, 4, 16),),
            vit_lengths=(64,),
            width=32,
            depth=2,
            heads=4,
            check_length=48,
            attention_steps=(1, 1),
            vit_steps=(1, 1),
        )


@dataclass
class Row:
    section: str  # check | attention | causal | vit
    method: str
    family: str  # ours | peer | one-gpu
    world: int
    length: int
    heads: int
    head_dim: int
    status: str = "ok"  # ok | wrong | error | unavailable | oom
    ms: float | None = None
    tflops_per_gpu: float | None = None
    vs_best_peer: float | None = None
    errors: dict = field(default_factory=dict)
    note: str = ""
    ms_all: list[float] = field(default_factory=list)
    measured_at: str = ""


# ---------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------


def run_row(row: Row, fn, flops: float | None, device) -> Row:
    row.measured_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        result = fn()
        if row.section == "check":
            row.errors = {n: float(f"{e:.3e}") for n, e in result.items()}
            row.status = "ok" if max(result.values()) < TOLERANCE else "wrong"
        else:
            row.ms_all = [round(t, 3) for t in result]
            row.ms = _slowest(statistics.median(result), device)
            row.tflops_per_gpu = flops / (row.ms / 1e3) / 1e12 if flops else None
    except Unavailable as err:
        row.status, row.note = "unavailable", str(err)
    except torch.OutOfMemoryError:
        row.status, row.note = "oom", "out of GPU memory"
    except Exception as err:  # noqa: BLE001 - a peer that breaks must not end the comparison; the row says how
        row.status, row.note = "error", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        if os.environ.get("SEQPAR_BENCH_TRACEBACK"):
            traceback.print_exc()
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    # Ranks must agree on the status (a rank that failed alone would leave the others waiting in the next row).
    failed = torch.tensor(
        [0 if row.status == "ok" or row.status == "wrong" else 1], device=device if device.type == "cuda" else "cpu"
    )
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() and row.status in ("ok", "wrong"):
        row.status, row.note = "error", "failed on another rank"
    if dist.get_rank() == 0:
        detail = (
            row.errors
            if row.section == "check"
            else f"{fmt(row.ms, '.1f')} ms, {fmt(row.tflops_per_gpu, '.1f')} TFLOP/s/GPU"
        )
        print(
            f"[bench_peers] {row.section} {row.method} L {row.length} {row.heads}x{row.head_dim}: {row.status} "
            f"{detail} {row.note}",
            flush=True,
        )
    return row


def add_ratios(rows: list[dict]) -> None:
    """``vs_best_peer`` of every timed row: its TFLOP/s over the best peer's at the same section and shape."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["family"] == "peer" and r["status"] == "ok" and r["tflops_per_gpu"]:
            key = (r["section"], r["length"], r["heads"], r["head_dim"])
            best[key] = max(best.get(key, 0.0), r["tflops_per_gpu"])
    for r in rows:
        key = (r["section"], r["length"], r["heads"], r["head_dim"])
        if r["status"] == "ok" and r["tflops_per_gpu"] and key in best:
            r["vs_best_peer"] = round(r["tflops_per_gpu"] / best[key], 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default=None, help="file name suffix; default n<world>")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (gloo)")
    parser.add_argument("--sections", default="check,attention,causal,vit")
    parser.add_argument("--methods", default=None, help="comma list of method names to run (default: all)")
    parser.add_argument("--attention", default=None, help="comma list of L:H:d shapes, e.g. 65536:16:64,262144:8:128")
    parser.add_argument("--causal", default=None, help="comma list of L:H:d shapes of the causal section")
    parser.add_argument("--vit-lengths", default=None, help="comma list of ViT sequence lengths")
    parser.add_argument(
        "--attention-steps",
        default=None,
        help="warm-up,timed iterations of attention rows (default 1,3 above 128K tokens, 2,10 up to it)",
    )
    parser.add_argument("--vit-steps", default=None,
                        help="warm-up,timed steps of the ViT rows (default 1,2); with 0 warm-up steps one untimed step"
                             " of a one-block model of the first method runs first at each length")
    parser.add_argument(
        "--checkpoint-above", type=int, default=256 * K, help="recompute ViT blocks above this many tokens per GPU"
    )
    args = parser.parse_args(argv)
    sizes = Sizes.smoke() if args.smoke else Sizes()
    if args.attention:
        sizes.attention = tuple(tuple(int(x) for x in s.split(":")) for s in args.attention.split(","))
    forced_steps = tuple(int(x) for x in args.attention_steps.split(",")) if args.attention_steps else None
    if args.vit_steps:
        sizes.vit_steps = tuple(int(x) for x in args.vit_steps.split(","))
    if args.causal:
        sizes.causal = tuple(tuple(int(x) for x in s.split(":")) for s in args.causal.split(","))
    if args.vit_lengths:
        sizes.vit_lengths = tuple(int(x) for x in args.vit_lengths.split(","))
    sections = args.sections.split(",")
    unknown = set(sections) - {"check", "attention", "causal", "vit"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from check, attention, causal, vit")
    device = bench_device(args.smoke)
    use_cuda = device.type == "cuda"
    if use_cuda:
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=900), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if use_cuda else torch.float32
    methods = Methods(world, device)
    chosen = set(args.methods.split(",")) if args.methods else None
    info = device_info(device) if use_cuda else {"device": "cpu", "torch": torch.__version__}
    info["gpus"] = torch.cuda.device_count() if use_cuda else 0
    info["peers"] = {name: _version(name) for name in ("deepspeed", "flash_attn", "yunchang", "ring_flash_attn")}
    payload = {"world": world, "smoke": args.smoke, "sizes": asdict(sizes), "device": info, "rows": []}
    tag = args.tag or f"n{world}"

    def record(row: Row) -> None:
        payload["rows"].append(asdict(row))
        if rank == 0:
            add_ratios(payload["rows"])
            write_outputs(payload, args.out, tag)

    def wanted(name: str) -> bool:
        return chosen is None or name in chosen

    if "check" in sections:
        L, H, d = sizes.check_length, sizes.heads, sizes.width // sizes.heads
        for name, family in methods.names(H):
            if wanted(name):
                record(run_row(Row("check", name, family, world, L, H, d),
                               functools.partial(check_method, methods, name, L, H, d, device, dtype), None, device))
    for section, causal in (("attention", False), ("causal", True)):
        if section not in sections:
            continue
        for L, H, d in sizes.causal if causal else sizes.attention:
            flops = attention_flops(L, H, d) / (2 if causal else 1)  # causal: half the score matrix
            steps = forced_steps or (sizes.attention_steps if L > 128 * K else (2, 10))
            row = Row(section, "one_gpu_cudnn", "one-gpu", 1, L, H, d)
            if wanted(row.method):
                # Rank 0 alone; the others wait at the row's closing all-reduce.
                fn = (
                    functools.partial(time_one_gpu, L, H, d, steps, device, dtype, causal)
                    if rank == 0
                    else (lambda: [0.0])
                )
                record(run_row(row, fn, flops, device))
            for name, family in methods.names(H, causal):
                if wanted(name) and not (causal and name.startswith("torch_cp_flash")):
                    record(
                        run_row(
                            Row(section, name, family, world, L, H, d),
                            functools.partial(time_attention, methods, name, L, H, d, steps, device, dtype, causal),
                            flops / world,
                            device,
                        )
                    )
    if "vit" in sections:
        for L in sizes.vit_lengths:
            flops = vit_flops(L, sizes.width, sizes.depth) / world
            checkpoint = L // world > args.checkpoint_above
            wanted_names = [name for name, _ in methods.names(sizes.heads) if wanted(name)]
            if sizes.vit_steps[0] == 0 and wanted_names:
                # No warm-up steps: one untimed step of a one-block model first, so that the first method timed
                # does not alone pay the process's first-step costs at this length (memory growth, kernel plans,
                # communicators) -- at an eighth of a whole step's cost (one block holds a step's peak under
                # recomputation, and runs the same kernels and collectives at the same shapes).
                time_vit(methods, wanted_names[0], L, replace(sizes, depth=1), (1, 0), device, checkpoint)
            for name, family in methods.names(sizes.heads):
                if wanted(name):
                    row = Row("vit", name, family, world, L, sizes.heads, sizes.width // sizes.heads,
                              note="blocks recomputed" if checkpoint else "")
                    fn = functools.partial(time_vit, methods, name, L, sizes, sizes.vit_steps, device, checkpoint)
                    record(run_row(row, fn, flops, device))
    if rank == 0:
        write_outputs(
            payload, args.out, tag, with_plot=not args.smoke or importlib.util.find_spec("matplotlib") is not None
        )
        print(markdown(payload))
    dist.barrier()
    dist.destroy_process_group()


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception as err:  # noqa: BLE001 - a package that fails to import is reported, not fatal
        return f"fails to import: {type(err).__name__}"




if __name__ == "__main__":
    main()
