"""Scaling report from bench_multi_gpu.py results: weak-scaling efficiency, strong-scaling speed-up, communication
against attention time and the longest sequences, as markdown and a plot.

    python benchmarks/scaling_report.py benchmarks/results/multi_gpu_n1.json benchmarks/results/multi_gpu_n8.json [more.json]

The first file is the 1-GPU baseline; the others (e.g. the N-GPU speed sections and a separate longest-sequence run)
are merged. Weak-scaling efficiency = (tokens/s on N) / (N x tokens/s on 1 GPU) against the fastest 1-GPU row (at
sp = 1 Ulysses and LSS both run plain local attention); where the same attention kind has its own 1-GPU row, the
efficiency against it is shown too. Strong scaling: speed-up = step time on 1 GPU / step time on N at the same
sequence, efficiency = speed-up / N. Writes ``<second file's stem>_report.md`` and ``.png`` next to that file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ok(results: list[dict], section: str) -> list[dict]:
    return [r for r in results if r["section"] == section and r["status"] == "ok"]


def efficiency(single: dict, multi: dict) -> list[dict]:
    """One row per weak-scaling result of ``multi``: efficiency against the fastest 1-GPU weak row, and against the
    same attention kind's 1-GPU row where there is one (``efficiency_same``, else None)."""
    base_rows = _ok(single["results"], "weak")
    if not base_rows:
        return []
    best = max(base_rows, key=lambda r: r["tokens_per_s"])
    same = {r["attention"]: r["tokens_per_s"] for r in base_rows}
    rows = []
    for r in _ok(multi["results"], "weak"):
        own = same.get(r["attention"])
        rows.append({"attention": r["attention"], "world": r["world"], "sp": r["sp"], "dp": r["dp"], "length": r["length"],
                     "tokens_per_s": r["tokens_per_s"], "tflops_per_gpu": r["tflops_per_gpu"],
                     "efficiency": r["tokens_per_s"] / (r["world"] * best["tokens_per_s"]),
                     "efficiency_same": None if own is None else r["tokens_per_s"] / (r["world"] * own),
                     "baseline": f"{best['attention']} on 1 GPU"})
    return rows


def strong(single: dict, multi: dict) -> list[dict]:
    """Speed-up of each strong-scaling result of ``multi`` over the fastest 1-GPU row at the same length."""
    rows = []
    for r in _ok(multi["results"], "strong"):
        base = [b for b in _ok(single["results"], "strong") if b["length"] == r["length"]]
        if not base:
            continue
        b = min(base, key=lambda b: b["step_ms"])
        speedup = b["step_ms"] / r["step_ms"]
        rows.append({"attention": r["attention"], "world": r["world"], "sp": r["sp"], "dp": r["dp"], "length": r["length"],
                     "step_ms": r["step_ms"], "base_ms": b["step_ms"], "speedup": speedup, "efficiency": speedup / r["world"]})
    return rows


def report(paths: list[str]) -> tuple[str, dict]:
    single, *others = (json.loads(Path(p).read_text()) for p in paths)
    multi = {"world": max(o["world"] for o in others), "results": [r for o in others for r in o["results"]],
             "sizes": others[0]["sizes"], "device": others[0]["device"]}
    weak_rows, strong_rows = efficiency(single, multi), strong(single, multi)
    dev = multi["device"]
    lines = [f"# Multi-GPU scaling: {multi['world']} x {dev.get('name', dev.get('device'))}", "",
             f"torch {dev.get('torch')}, CUDA {dev.get('cuda')}, lightning {dev.get('lightning')}; bf16-mixed, fused AdamW, "
             f"generic ViT width {multi['sizes']['width']}, depth {multi['sizes']['depth']}, {multi['sizes']['heads']} heads.", ""]
    if weak_rows:
        lines += [f"## Weak scaling ({multi['sizes']['tokens_per_gpu']:,} tokens per GPU, no recomputation)", "",
                  "| attention | GPUs | sp x dp | L | tokens/s | TFLOP/s per GPU | efficiency | vs own 1-GPU row |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['attention']} | {r['world']} | {r['sp']} x {r['dp']} | {r['length']:,} | {r['tokens_per_s']:,.0f} | "
                  f"{r['tflops_per_gpu']:.1f} | {r['efficiency']:.1%} | "
                  f"{'-' if r['efficiency_same'] is None else format(r['efficiency_same'], '.1%')} |" for r in weak_rows]
        lines += ["", f"Efficiency is against {weak_rows[0]['baseline']} "
                  f"({max(r['tokens_per_s'] for r in _ok(single['results'], 'weak')):,.0f} tokens/s).", ""]
    if strong_rows:
        lines += [f"## Strong scaling ({strong_rows[0]['length']:,} tokens, no recomputation)", "",
                  "| attention | GPUs | sp x dp | step ms | 1-GPU step ms | speed-up | efficiency |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['attention']} | {r['world']} | {r['sp']} x {r['dp']} | {r['step_ms']:.1f} | {r['base_ms']:.1f} | "
                  f"{r['speedup']:.2f}x | {r['efficiency']:.1%} |" for r in strong_rows]
        lines.append("")
    profiled = [r for r in _ok(multi["results"], "weak") if r.get("comm_ms") is not None]
    if profiled:
        lines += ["## Communication against attention (one profiled weak-scaling step, kernel time per GPU)", "",
                  "| attention | GPUs | sp x dp | step ms | NCCL kernels ms | attention kernels ms | all kernels ms | NCCL / step |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['attention']} | {r['world']} | {r['sp']} x {r['dp']} | {r['step_ms']:.1f} | {r['comm_ms']:.1f} | "
                  f"{r['attention_ms']:.1f} | {'-' if r.get('kernel_ms') is None else format(r['kernel_ms'], '.1f')} | "
                  f"{r['comm_ms'] / r['step_ms']:.1%} |" for r in profiled]
        lines.append("")
    longest = [r for r in multi["results"] if r["section"] == "longest"]
    if longest:
        lines += ["## Longest sequence (one step, per-block activation checkpointing, optimizer state created)", "",
                  "| model | attention | GPUs | L | status | step s | TFLOP/s per GPU | peak GiB | note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in longest:
            step = "-" if r["step_ms"] is None else f"{r['step_ms'] / 1e3:.1f}"
            tflops = "-" if r["tflops_per_gpu"] is None else f"{r['tflops_per_gpu']:.1f}"
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            lines.append(f"| {r['model']} | {r['attention']} | {r['world']} | {r['length']:,} | {r['status']} | {step} | "
                         f"{tflops} | {peak} | {r['note'] if r['status'] != 'ok' else ''} |")
        lines.append("")
    return "\n".join(lines), {"weak": weak_rows, "strong": strong_rows, "longest": longest, "world": multi["world"],
                              "tokens_per_gpu": multi["sizes"]["tokens_per_gpu"]}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("weak", "strong", "longest") if data[k]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        rows = data[panel]
        if panel == "longest":
            ok = [r for r in rows if r["status"] == "ok"]
            for model in sorted({r["model"] for r in ok}):
                for attention in sorted({r["attention"] for r in ok if r["model"] == model}):
                    mine = [r for r in ok if r["model"] == model and r["attention"] == attention]
                    ax.plot([r["length"] for r in mine], [r["peak_gib"] for r in mine], "o-", label=f"{model} {attention}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per sample")
            ax.set_ylabel("peak GiB per GPU")
            ax.set_title(f"trained across {data['world']} GPUs")
            ax.legend(fontsize=8)
            continue
        labels = [f"{r['attention']}\n{r['sp']}x{r['dp']}" for r in rows]
        ax.bar(labels, [r["efficiency"] for r in rows], color="tab:blue" if panel == "weak" else "tab:orange")
        ax.axhline(0.95 if panel == "weak" else 1.0, ls="--", c="k", lw=1)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel(f"{panel}-scaling efficiency")
        title = (f"weak: {data['tokens_per_gpu']:,} tokens per GPU" if panel == "weak"
                 else f"strong: {rows[0]['length']:,} tokens")
        ax.set_title(f"{data['world']} GPUs, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(paths: list[str]) -> None:
    if len(paths) < 2:
        raise SystemExit("usage: scaling_report.py ONE_GPU.json N_GPU.json [MORE.json ...]")
    text, data = report(paths)
    out = Path(paths[1]).with_name(Path(paths[1]).stem + "_report.md")
    out.write_text(text)
    print(text)
    try:
        plot(data, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main(sys.argv[1:])
