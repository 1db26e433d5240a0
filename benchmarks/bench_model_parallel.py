"""Tensor parallelism against ZeRO-3 and FSDP2 for a ~10B-parameter ViT: step time, model TFLOP/s and peak memory
per GPU over a ladder of sequence lengths, and a memory model fitted to them that predicts 4 and 8 GPUs.

Run one configuration per launch (a configuration that runs out of memory cannot take the others with it); each
launch merges its rows into ``model_parallel_<tag>.json`` and rewrites the ``.md`` and ``.png``::

    for c in tp tp_replicated fsdp zero3; do
      torchrun --nproc_per_node 2 benchmarks/bench_model_parallel.py --config $c --out benchmarks/results
    done

Configurations on ``W`` processes (the same global work: one sample of ``L`` tokens per step, bf16-mixed, AdamW,
activation checkpointing of every block, through Lightning's Trainer and ``SeqParStrategy``):

- ``tp``: ``SeqParStrategy(tensor_parallel_size=W)`` (Megatron-style with its sequence parallelism: activations
  between the projections sharded over the tp ranks; DDP engine, dp = sp = 1);
- ``tp_replicated``: the same with ``tp_sequence_parallel=False`` (activations replicated over the tp ranks);
- ``fsdp``: ``SeqParStrategy(fsdp=True, sequence_parallel_size=W)`` (FSDP2 over the sp ranks, Ulysses attention);
- ``zero3``: ``SeqParStrategy(zero_stage=3, sequence_parallel_size=W)`` (DeepSpeed ZeRO-3, Ulysses attention).

The model is ``workloads.GenericViT`` (default width 8192, depth 11, 32 heads: 8.9e9 parameters, the largest of
arXiv 2405.15780's ViTs); each length runs ``--warmup`` steps, then ``--steps`` timed ones (CUDA events, median).
Peak memory is the largest ``torch.cuda.max_memory_allocated`` over the ranks during that length's steps;
"state" is what stays allocated between steps (weights, gradients, optimizer state). Before each length the
script predicts its peak from the two previous lengths (linear in L, as activations are with fused attention) and
stops the ladder when the prediction passes the GPU's capacity, so an out-of-memory error does not leave one rank
waiting in a collective. Model FLOPs per step: :func:`workloads.vit_flops` (recomputation not counted).

``--smoke`` runs tiny sizes on the CPU over gloo (fp32), which the test suite does to keep this script working.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchModule, bench_device, bench_trainer, device_info  # noqa: E402
from model_parallel_report import write_report  # noqa: E402
from workloads import OUT_DIM, GenericViT, vit_flops  # noqa: E402

K = 1024
GIB = 2**30
CONFIGS = ("tp", "tp_replicated", "fsdp", "zero3")


def strategy_for(config: str, world: int, backend: str, timeout: int):
    """The strategy line of ``config`` on ``world`` processes."""
    from lightning_seqpar import SeqParStrategy

    common = {"activation_checkpointing": True, "process_group_backend": backend, "timeout": timeout}
    if config == "tp":
        return SeqParStrategy(tensor_parallel_size=world, **common)
    if config == "tp_replicated":
        return SeqParStrategy(tensor_parallel_size=world, tp_sequence_parallel=False, **common)
    if config == "fsdp":
        return SeqParStrategy(fsdp=True, sequence_parallel_size=world, **common)
    if config == "zero3":
        return SeqParStrategy(zero_stage=3, sequence_parallel_size=world, **common)
    raise SystemExit(f"unknown --config {config!r}; choose from {', '.join(CONFIGS)}")


class Ladder(Callback):
    """Runs the lengths in order, ``warmup + steps`` training steps each: times the timed steps, records each length's
    peak memory and the state between steps, and ends the fit early when the next length is predicted not to fit.

    A length of ``None`` (``auto`` on the command line, last) becomes the longest multiple of ``AUTO_MULTIPLE``
    tokens whose predicted peak stays within ``AUTO_HEADROOM`` of the GPU, and runs one step (the optimizer state
    exists already, so that step is a steady-state step at a new shape)."""

    def __init__(self, lengths: list[int | None], warmup: int, steps: int, device: torch.device,
                 capacity_gib: float | None, on_row, dims: tuple[int, int], max_step_s: float = float("inf")) -> None:
        if warmup + steps < 2:
            raise ValueError("the ladder needs 2 or more steps per length (the first creates the optimizer state)")
        self.lengths, self.device, self.capacity_gib, self.on_row = list(lengths), device, capacity_gib, on_row
        self.dims, self.max_step_s = dims, max_step_s  # (width, depth) for the model FLOPs
        # One entry per training step: (index into lengths, timed?, last step of that length?)
        self.plan: list[tuple[int, bool, bool]] = []
        for i, length in enumerate(lengths):
            flags = [True] if length is None else [False] * warmup + [True] * steps
            self.plan += [(i, timed, j == len(flags) - 1) for j, timed in enumerate(flags)]
        self.rows: list[dict] = []
        self._times: list[float] = []
        self._t0 = time.perf_counter()

    def length_at(self, step: int) -> int:
        return self.lengths[self.plan[min(step, len(self.plan) - 1)][0]]

    def _max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        cuda = self.device.type == "cuda"
        self.step = batch_idx  # the training step the loss is computed for
        index, timed, _ = self.plan[batch_idx]
        # Memory is measured from the start of each length, except that the run's first step (which creates the
        # gradients and the optimizer state) is left out of the first length's: "state" then always holds weights,
        # gradients and optimizer state, and every peak is a steady-state step's.
        if batch_idx == 1 or (batch_idx > 1 and self.plan[batch_idx - 1][0] != index):
            if cuda:
                torch.cuda.synchronize()
                self._state_gib = torch.cuda.memory_allocated() / GIB
                torch.cuda.reset_peak_memory_stats()
        if batch_idx == 0 or self.plan[batch_idx - 1][0] != index:
            self._times, self._t0 = [], time.perf_counter()
        if timed:
            if cuda:
                self._start = torch.cuda.Event(enable_timing=True)
                self._start.record()
            else:
                self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cuda = self.device.type == "cuda"
        index, timed, last = self.plan[batch_idx]
        if timed:
            if cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                end.synchronize()
                self._times.append(self._start.elapsed_time(end))
            else:
                self._times.append((time.perf_counter() - self._start) * 1e3)
        if not last:
            return
        length, world = self.lengths[index], trainer.world_size
        step_ms = statistics.median(self._times)
        row = {"length": length, "status": "ok", "step_ms": step_ms, "step_ms_all": [round(t, 2) for t in self._times],
               "tflops_per_gpu": vit_flops(length, *self.dims) / world / (step_ms / 1e3) / 1e12,
               "tokens_per_s": length / (step_ms / 1e3), "loss": float(outputs["loss"]),
               "seconds": round(time.perf_counter() - self._t0, 1), "timed_steps": len(self._times)}
        if cuda:
            row["peak_gib"] = self._max_over_ranks(torch.cuda.max_memory_allocated() / GIB)
            row["state_gib"] = self._max_over_ranks(self._state_gib)
        if self.lengths and index == len(self.lengths) - 1 and getattr(self, "auto_note", None):
            row["note"] = self.auto_note
        self.rows.append(row)
        self.on_row(row)
        if index + 1 >= len(self.lengths) or not (cuda and self.capacity_gib):
            if index + 1 < len(self.lengths) and self.lengths[index + 1] is None:  # the CPU: twice the last length
                self.lengths[index + 1] = 2 * length
            return
        nxt = index + 1
        if self.lengths[nxt] is None:
            self.lengths[nxt], self.auto_note = auto_length(self.rows, self.capacity_gib, self.dims, self.max_step_s)
            if self.lengths[nxt] <= length:
                self.on_row({"length": self.lengths[nxt], "status": "skipped",
                             "note": "the longest predicted to fit is not longer than the last measured"})
                trainer.should_stop = True
            return
        predicted = predict_peak(self.rows, self.lengths[nxt])
        if predicted is not None and predicted > 0.97 * self.capacity_gib:
            for later in self.lengths[nxt:]:
                if later is None:
                    continue
                self.on_row({"length": later, "status": "skipped",
                             "note": f"predicted peak {predict_peak(self.rows, later):.0f} GiB > "
                                     f"{0.97 * self.capacity_gib:.0f} GiB (97% of the GPU)"})
            trainer.should_stop = True


AUTO_MULTIPLE = 8192
AUTO_HEADROOM = 0.92


def auto_length(rows: list[dict], capacity_gib: float, dims: tuple[int, int] | None = None,
                max_step_s: float = float("inf")) -> tuple[int, str]:
    """``(L, why)``: the longest multiple of ``AUTO_MULTIPLE`` tokens whose peak, extrapolated from the last two
    measured lengths, stays within ``AUTO_HEADROOM`` of ``capacity_gib``, and (with ``dims = (width, depth)``) whose
    step, scaled from the last one by the model FLOPs, stays within ``max_step_s``; ``why`` names which limit
    decided."""
    last = rows[-1]
    length = last["length"]
    memory_bound = True
    while predict_peak(rows, length + AUTO_MULTIPLE) <= AUTO_HEADROOM * capacity_gib:
        if dims is not None:
            scale = vit_flops(length + AUTO_MULTIPLE, *dims) / vit_flops(last["length"], *dims)
            seconds = last["step_ms"] / 1e3 * scale
            if seconds > max_step_s:
                memory_bound = False
                break
        length += AUTO_MULTIPLE
    if memory_bound:
        return length, f"the longest predicted to fit in {AUTO_HEADROOM:.0%} of the GPU"
    return length, f"the longest within the {max_step_s:.0f} s step budget (memory would allow more)"


def predict_peak(rows: list[dict], length: int) -> float | None:
    """Peak GiB at ``length`` from the last two measured lengths (linear in L); one row: proportional above the
    state. None without a measured row."""
    ok = [r for r in rows if r.get("peak_gib") is not None]
    if not ok:
        return None
    if len(ok) == 1:
        r = ok[0]
        return r["state_gib"] + (r["peak_gib"] - r["state_gib"]) * length / r["length"]
    a, b = ok[-2], ok[-1]
    slope = (b["peak_gib"] - a["peak_gib"]) / (b["length"] - a["length"])
    return b["peak_gib"] + slope * (length - b["length"])


def sample(index: int, tokens: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``index`` of ``tokens`` tokens: inputs [1, L, D] and targets [1, L, OUT_DIM], the same on every rank."""
    g = torch.Generator(device=device).manual_seed(int(index))
    return (torch.randn(1, tokens, width, generator=g, device=device),
            torch.randn(1, tokens, OUT_DIM, generator=g, device=device))


def merge(path: Path, payload: dict) -> dict:
    """``payload``'s rows merged into the JSON at ``path``: rows of the same (config, length) are replaced."""
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("model") == payload["model"] and old.get("world") == payload["world"]:
            keep = {(r["config"], r["length"]) for r in payload["rows"]}
            payload["rows"] = [r for r in old["rows"] if (r["config"], r["length"]) not in keep] + payload["rows"]
            payload["devices"] = old.get("devices", {}) | payload["devices"]
    payload["rows"].sort(key=lambda r: (CONFIGS.index(r["config"]) if r["config"] in CONFIGS else 9, r["length"]))
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, choices=CONFIGS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default=None, help="file name suffix; default n<world>")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--depth", type=int, default=11)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--lengths", default="8192,32768,65536,auto",
                        help="comma-separated tokens per sample, ascending; a last 'auto' adds the longest predicted"
                             " to fit (one step)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=300, help="process-group timeout, seconds")
    parser.add_argument("--max-step-s", type=float, default=90.0,
                        help="the 'auto' length is also capped so that its one step is predicted within this time")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (gloo, fp32)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.depth, args.heads, args.lengths = 32, 2, 4, "12,24,auto"
    lengths: list[int | None] = [None if x == "auto" else int(x) for x in args.lengths.split(",")]
    fixed = [x for x in lengths if x is not None]
    if fixed != sorted(fixed) or None in lengths[:-1] or (lengths[-1] is None and len(fixed) < 2):
        parser.error(f"--lengths must be ascending, with 'auto' only last and after two lengths; got {args.lengths}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = bench_device(args.smoke)
    cuda = device.type == "cuda"
    tag = args.tag or f"n{world}"
    path = args.out / f"model_parallel_{tag}.json"

    def on_row(row: dict, any_rank: bool = False) -> None:
        """Rank 0 (or, for a failure, the rank that failed) writes after every length: a run cut short keeps what
        it measured."""
        if rank != 0 and not any_rank:
            return
        payload = merge(path, {"model": model_info, "world": world, "devices": {args.config: device_info(device)},
                               "rows": [{"config": args.config} | row]})
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1))
        write_report(payload, args.out / f"model_parallel_{tag}", with_plot=cuda)
        print(f"[{args.config}] {row}", flush=True)

    torch.manual_seed(0)  # the same weights on every rank; built on the GPU (initialising 1e10 parameters on the
    # CPU takes minutes), where the whole model fits once (36 GB at 8.9e9 in fp32) before the strategy splits it
    model = GenericViT(args.width, args.depth, args.heads, device=device)
    model_info = {"width": args.width, "depth": args.depth, "heads": args.heads,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "block_parameters": sum(p.numel() for p in model.blocks.parameters()),
                  "capacity_gib": torch.cuda.get_device_properties(device).total_memory / GIB if cuda else None,
                  "precision": "bf16-mixed" if cuda else "32-true"}
    ladder = Ladder(lengths, args.warmup, args.steps, device, model_info["capacity_gib"], on_row,
                    (args.width, args.depth), args.max_step_s)

    def loss(module, batch):  # batch: [1] sample index (the seed of its data); the step's length from the ladder
        x, y = sample(int(batch[0]), ladder.length_at(ladder.step), args.width, module.device)
        if args.config == "zero3" and cuda:  # DeepSpeed holds bf16 weights; Lightning converts batches, not these
            x = x.to(torch.bfloat16)
        return F.mse_loss(module.model(x).float(), y)

    strategy = strategy_for(args.config, world, "nccl" if cuda else "gloo", args.timeout)
    total = len(ladder.plan)
    trainer = bench_trainer(strategy, device, world, total, [ladder])
    from torch.utils.data import DataLoader

    try:
        trainer.fit(BenchModule(model, loss, fused=False), DataLoader(list(range(total)), batch_size=1))
    except torch.OutOfMemoryError as error:  # this rank's record of it; torchrun then stops the others
        done = {r["length"] for r in ladder.rows}
        failed = next((x for x in ladder.lengths if x not in done and x is not None), None)
        note = (f"rank {rank} out of memory: {torch.cuda.memory_allocated(device) / GIB:.1f} GiB allocated of"
                f" {model_info['capacity_gib']:.1f}; {str(error).splitlines()[0][:160]}")
        print(note, flush=True)
        on_row({"length": failed, "status": "oom", "note": note}, any_rank=True)
        raise


if __name__ == "__main__":
    main()
