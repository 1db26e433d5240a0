"""Weak-scaling efficiency from bench_multi_gpu.py results: (tokens/s on N) / (N x tokens/s on 1), as a table and a plot.

    python benchmarks/scaling_report.py benchmarks/results/multi_gpu_n1.json benchmarks/results/multi_gpu_n8.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def efficiency(single: dict, multi: dict) -> list[dict]:
    """One row per (attention, sp x dp) weak-scaling result of ``multi`` against the 1-GPU weak result of the same attention."""
    base = {r["attention"]: r["tokens_per_s"] for r in single["results"] if r["section"] == "weak" and r["status"] == "ok"}
    rows = []
    for r in multi["results"]:
        if r["section"] != "weak" or r["status"] != "ok" or r["attention"] not in base:
            continue
        rows.append({"attention": r["attention"], "world": r["world"], "sp": r["sp"], "dp": r["dp"],
                     "tokens_per_s": r["tokens_per_s"], "efficiency": r["tokens_per_s"] / (r["world"] * base[r["attention"]])})
    return rows


def main(paths: list[str]) -> None:
    single, multi = (json.loads(Path(p).read_text()) for p in paths)
    rows = efficiency(single, multi)
    lines = ["| attention | GPUs | sp x dp | tokens/s | weak-scaling efficiency |", "|---|---|---|---|---|"]
    lines += [f"| {r['attention']} | {r['world']} | {r['sp']} x {r['dp']} | {r['tokens_per_s']:,.0f} | {r['efficiency']:.1%} |" for r in rows]
    out = Path(paths[1]).with_name(Path(paths[1]).stem + "_scaling.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for attention in sorted({r["attention"] for r in rows}):
            mine = [r for r in rows if r["attention"] == attention]
            ax.bar([f"{attention}\n{r['sp']}x{r['dp']}" for r in mine], [r["efficiency"] for r in mine])
        ax.axhline(0.95, ls="--", c="k", lw=1)
        ax.set_ylabel("weak-scaling efficiency")
        ax.set_title(f"{multi['world']} GPUs, {multi['sizes']['tokens_per_gpu']} tokens per GPU")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
