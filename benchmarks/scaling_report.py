"""Scaling report from bench_multi_gpu.py results: weak-scaling efficiency, strong-scaling speed-up, communication
against attention time and the longest sequences, as markdown and a plot.

    python benchmarks/scaling_report.py benchmarks/results/multi_gpu_n1.json \
        benchmarks/results/multi_gpu_n8.json [more.json]

Rows of all files are merged: rows on 1 GPU are the baseline, the others the multi-GPU results; where two files hold
the same configuration, the later file's row is used (a re-measurement). Weak-scaling efficiency = (tokens/s on N)
/ (N x tokens/s on 1 GPU) against the fastest 1-GPU row (at sp = 1 Ulysses and LSS both run plain local attention).
Tokens per GPU are fixed, so the sequence grows with N and attention's FLOPs per token with it: the formula's ideal is
below 100%, and the model-FLOP efficiency, (model TFLOP/s per GPU on N) / (model TFLOP/s on 1 GPU), is the
work-normalised measure shown beside it. Strong scaling: speed-up = step time on 1 GPU / step time on N at the same
sequence, efficiency = speed-up / N. Writes ``multi_gpu_n<N>_report.md`` and ``.png`` next to the first file
(``--out`` to choose the markdown path).
"""

from __future__ import annotations

import json
from pathlib import Path


def _ok(results: list[dict], section: str) -> list[dict]:
    return [r for r in results if r["section"] == section and r["status"] == "ok"]


def load(paths: list[str]) -> tuple[list[dict], list[dict], dict]:
    """(1-GPU rows, multi-GPU rows, metadata of the last multi-GPU file), later files replacing earlier rows of the
    same configuration."""
    rows: dict[tuple, dict] = {}
    meta: dict | None = None
    for path in paths:
        data = json.loads(Path(path).read_text())
        for r in data["results"]:
            key = (r["section"], r.get("model", "vit"), r["attention"], r["world"], r["sp"], r["dp"], r["length"])
            rows.pop(key, None)
            rows[key] = r
        if meta is None or data["world"] > 1:
            meta = data
    results = list(rows.values())
    return [r for r in results if r["world"] == 1], [r for r in results if r["world"] > 1], meta


def efficiency(single: list[dict], multi: list[dict]) -> list[dict]:
    """One row per weak-scaling result of ``multi``: token and model-FLOP efficiency against the fastest 1-GPU weak
    row, and the token efficiency against the same attention kind's 1-GPU row where there is one (else None)."""
    base_rows = _ok(single, "weak")
    if not base_rows:
        return []
    best = max(base_rows, key=lambda r: r["tokens_per_s"])
    same = {r["attention"]: r["tokens_per_s"] for r in base_rows}
    rows = []
    for r in _ok(multi, "weak"):
        own = same.get(r["attention"])
        rows.append(
            {
                "attention": r["attention"],
                "world": r["world"],
                "sp": r["sp"],
                "dp": r["dp"],
                "length": r["length"],
                "tokens_per_s": r["tokens_per_s"],
                "tflops_per_gpu": r["tflops_per_gpu"],
                "efficiency": r["tokens_per_s"] / (r["world"] * best["tokens_per_s"]),
                "flop_efficiency": r["tflops_per_gpu"] / best["tflops_per_gpu"],
                "efficiency_same": None if own is None else r["tokens_per_s"] / (r["world"] * own),
                "baseline": best,
            }
        )
    return rows


def strong(single: list[dict], multi: list[dict]) -> list[dict]:
    """Speed-up of each strong-scaling result of ``multi`` over the fastest 1-GPU row at the same length."""
    rows = []
    for r in _ok(multi, "strong"):
        base = [b for b in _ok(single, "strong") if b["length"] == r["length"]]
        if not base:
            continue
        b = min(base, key=lambda b: b["step_ms"])
        speedup = b["step_ms"] / r["step_ms"]
        rows.append(
            {
                "attention": r["attention"],
                "world": r["world"],
                "sp": r["sp"],
                "dp": r["dp"],
                "length": r["length"],
                "step_ms": r["step_ms"],
                "base_ms": b["step_ms"],
                "speedup": speedup,
                "efficiency": speedup / r["world"],
                "peak_gib": r["peak_gib"],
                "resident_gib": r.get("resident_gib"),
            }
        )
    return rows


def report(paths: list[str]) -> tuple[str, dict]:
    single_rows, multi_rows, meta = load(paths)
    multi = {"world": max((r["world"] for r in multi_rows), default=1), "results": multi_rows, "sizes": meta["sizes"],
             "device": meta["device"]}
    weak_rows, strong_rows = efficiency(single_rows, multi_rows), strong(single_rows, multi_rows)
    dev = multi["device"]
    lines = [
        f"# Multi-GPU scaling: {multi['world']} x {dev.get('name', dev.get('device'))}",
        "",
        f"torch {dev.get('torch')}, CUDA {dev.get('cuda')}, lightning {dev.get('lightning')}; bf16-mixed, fused AdamW, "
        f"generic ViT width {multi['sizes']['width']}, depth {multi['sizes']['depth']}, {multi['sizes']['heads']} "
        f"heads.",
        "",
    ]
    if weak_rows:
        lines += [
            f"## Weak scaling ({multi['sizes']['tokens_per_gpu']:,} tokens per GPU, no recomputation)",
            "",
            "| attention | GPUs | sp x dp | L | tokens/s | model TFLOP/s per GPU | token efficiency | ideal token "
            "efficiency "
            "| model-FLOP efficiency |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['attention']} | {r['world']} | {r['sp']} x {r['dp']} | {r['length']:,} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops_per_gpu']:.1f} | {r['efficiency']:.1%} | {r['efficiency'] / r['flop_efficiency']:.1%} | "
            f"{r['flop_efficiency']:.1%} |"
            for r in weak_rows
        ]
        base = weak_rows[0]["baseline"]
        lines += [
            "",
            f"Against {base['attention']} on 1 GPU at {base['length']:,} tokens: {base['tokens_per_s']:,.0f} tokens/s, "
            f"{base['tflops_per_gpu']:.1f} model TFLOP/s. Token efficiency = tokens/s on N / (N x that); its ideal, "
            "from the model's FLOPs per token at each length, is below 100% because attention's cost per token grows "
            "with the sequence; model-FLOP efficiency = token efficiency / ideal.",
            "",
        ]
    if strong_rows:
        lines += [f"## Strong scaling ({strong_rows[0]['length']:,} tokens, no recomputation)", "",
                  "| attention | GPUs | sp x dp | step ms | 1-GPU step ms | speed-up | efficiency | peak GiB per GPU |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {r['attention']} | {r['world']} | {r['sp']} x {r['dp']} | {r['step_ms']:.1f} | {r['base_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {r['efficiency']:.1%} | {_gib(r)} |"
            for r in strong_rows
        ]
        lines.append("")
    profiled = [r for r in _ok(multi["results"], "weak") if r.get("comm_ms") is not None]
    if profiled:
        lines += [
            "## Communication against attention (one profiled weak-scaling step, kernel time per GPU)",
            "",
            "| attention | GPUs | sp x dp | step ms | NCCL kernels ms | attention kernels ms | all kernels ms | NCCL / "
            "step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['attention']} | {r['world']} | {r['sp']} x {r['dp']} | {r['step_ms']:.1f} | {r['comm_ms']:.1f} | "
            f"{r['attention_ms']:.1f} | {'-' if r.get('kernel_ms') is None else format(r['kernel_ms'], '.1f')} | "
            f"{r['comm_ms'] / r['step_ms']:.1%} |"
            for r in profiled
        ]
        lines.append("")
    longest = [r for r in multi["results"] if r["section"] == "longest"]
    if longest:
        lines += [
            "## Longest sequence (one step, per-block activation checkpointing, optimizer state created)",
            "",
            "| model | attention | GPUs | L | status | step s | model TFLOP/s per GPU | peak GiB per GPU | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in longest:
            step = "-" if r["step_ms"] is None else f"{r['step_ms'] / 1e3:.1f}"
            tflops = "-" if r["tflops_per_gpu"] is None else f"{r['tflops_per_gpu']:.1f}"
            lines.append(
                f"| {r['model']} | {r['attention']} | {r['world']} | {r['length']:,} | {r['status']} | {step} | "
                f"{tflops} | {_gib(r)} | {r['note'] if r['status'] != 'ok' else ''} |"
            )
        lines += [
            "",
            "Peak GiB: `torch.cuda.max_memory_allocated` of the step; in parentheses the memory still allocated "
            "when the configuration started (DDP buckets of earlier configurations in the same process), included "
            "in the peak. Model FLOPs do not count recomputation.",
            "",
        ]
    return "\n".join(lines), {"weak": weak_rows, "strong": strong_rows, "longest": longest, "world": multi["world"],
                              "tokens_per_gpu": multi["sizes"]["tokens_per_gpu"]}


def _gib(r: dict) -> str:
    if r.get("peak_gib") is None:
        return "-"
    resident = r.get("resident_gib")
    return f"{r['peak_gib']:.1f}" + (f" ({resident:.1f})" if resident else "")


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
                    ax.plot(
                        [r["length"] for r in mine], [r["peak_gib"] for r in mine], "o-", label=f"{model} {attention}"
                    )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per sample")
            ax.set_ylabel("peak GiB per GPU")
            ax.set_title(f"trained across {data['world']} GPUs")
            ax.legend(fontsize=8)
            continue
        labels = [f"{r['attention']}\n{r['sp']}x{r['dp']}" for r in rows]
        if panel == "weak":
            xs = range(len(rows))
            ax.bar(
                [x - 0.2 for x in xs], [r["efficiency"] for r in rows], width=0.4, color="tab:cyan", label="tokens/s"
            )
            ax.bar([x + 0.2 for x in xs], [r["flop_efficiency"] for r in rows], width=0.4, color="tab:blue",
                   label="model FLOP/s")
            ideal = rows[0]["efficiency"] / rows[0]["flop_efficiency"]
            ax.axhline(ideal, ls=":", c="tab:cyan", lw=1.5, label=f"ideal tokens/s ({ideal:.0%})")
            ax.axhline(0.95, ls="--", c="k", lw=1, label="95%")
            ax.set_xticks(list(xs), labels)
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.bar(labels, [r["efficiency"] for r in rows], color="tab:orange")
            ax.axhline(1.0, ls="--", c="k", lw=1)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel(f"{panel}-scaling efficiency")
        title = (f"weak: {data['tokens_per_gpu']:,} tokens per GPU" if panel == "weak"
                 else f"strong: {rows[0]['length']:,} tokens")
        ax.set_title(f"{data['world']} GPUs, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench_multi_gpu.py JSON files; later ones win")
    parser.add_argument("--out", type=Path, default=None, help="markdown path (the plot goes beside it, .png)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    text, data = report([str(p) for p in args.results])
    out = args.out or args.results[0].with_name(f"multi_gpu_n{data['world']}_report.md")
    out.write_text(text)
    print(text)
    try:
        plot(data, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
