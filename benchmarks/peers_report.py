"""The peer benchmark's outputs: ``peers_<tag>.json``, ``peers_<tag>.md`` and ``peers_<tag>.png``.

Runs too long for one call (a 1M-token ViT step takes minutes per method) are split by ``--methods`` and merged::

    python benchmarks/peers_report.py --merge benchmarks/results/peers_n2_a.json benchmarks/results/peers_n2_b.json \
        --tag n2_vit1m --out benchmarks/results

The merged rows' ``vs_best_peer`` is recomputed over all the inputs (the best peer of any input run); the inputs must
come from the same device and world size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import fmt
from peer_measure import TOLERANCE
from workloads import K

# ---------------------------------------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------------------------------------


def write_outputs(payload: dict, out: Path, tag: str, with_plot: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peers_{tag}.json").write_text(json.dumps(payload, indent=1))
    (out / f"peers_{tag}.md").write_text(markdown(payload) + "\n")
    if with_plot:
        plot(payload, out / f"peers_{tag}.png")


def markdown(payload: dict) -> str:
    dev = payload["device"]
    lines = [f"Peers on {payload['world']} x {dev.get('name', dev['device'])}, torch {dev['torch']}"
             f"{', smoke' if payload['smoke'] else ''}; peers installed: "
             + ", ".join(f"{k} {v}" for k, v in dev.get("peers", {}).items() if v) + "."]
    checks = [r for r in payload["rows"] if r["section"] == "check"]
    if checks:
        lines += ["", f"Correctness against one-GPU float32 SDPA (relative error, < {TOLERANCE} passes):", "",
                  "| method | status | out | dq | dk | dv | note |", "|---|---|---|---|---|---|---|"]
        for r in checks:
            e = r["errors"]
            lines.append(
                f"| {r['method']} | {r['status']} | "
                + " | ".join(fmt(e.get(n), ".1e") for n in ("out", "dq", "dk", "dv"))
                + f" | {r['note']} |"
            )
    for section, title in (("attention", "Attention forward + backward"),
                           ("causal", "Causal attention forward + backward (half the FLOPs counted)"),
                           ("vit", "ViT training step (width 1024, depth 8)")):
        rows = [r for r in payload["rows"] if r["section"] == section]
        if not rows:
            continue
        lines += ["", f"{title}: TFLOP/s per GPU (ms per iteration), ratio to the best peer:", "",
                  "| L | H x d | method | family | ms | TFLOP/s per GPU | vs best peer | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ms = fmt(r["ms"], ".1f") if r["status"] == "ok" else r["status"]
            lines.append(f"| {r['length']:,} | {r['heads']} x {r['head_dim']} | {r['method']} | {r['family']} | {ms} | "
                         f"{fmt(r['tflops_per_gpu'], '.1f')} | {fmt(r['vs_best_peer'], '.3f')} | {r['note']} |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = []
    for r in payload["rows"]:
        key = (r["section"], r["length"], r["heads"], r["head_dim"])
        if r["section"] != "check" and key not in shapes:
            shapes.append(key)
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(6.5, 4.2 * len(shapes)), 4.8), squeeze=False)
    colours = {"ours": "tab:blue", "peer": "tab:orange", "one-gpu": "tab:gray"}
    for ax, (section, L, H, d) in zip(axes[0], shapes):
        rows = [
            r
            for r in payload["rows"]
            if (r["section"], r["length"], r["heads"], r["head_dim"]) == (section, L, H, d) and r["status"] == "ok"
        ]
        bars = ax.barh(
            [r["method"] for r in rows], [r["tflops_per_gpu"] for r in rows], color=[colours[r["family"]] for r in rows]
        )
        ax.bar_label(bars, labels=[f"{r['tflops_per_gpu']:.1f}" for r in rows], fontsize=7, padding=2)
        ax.set_xlim(0, 1.18 * max((r["tflops_per_gpu"] for r in rows), default=1.0))
        ax.invert_yaxis()
        ax.set_title(f"{section}, L={L // K if L >= K else L}{'K' if L >= K else ''}, {H}x{d}", fontsize=9)
        ax.set_xlabel("TFLOP/s per GPU")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    dev = payload["device"]
    fig.suptitle(f"{payload['world']} x {dev.get('name', dev['device'])}, torch {dev['torch']}\n"
                 "blue = this project, orange = peers, grey = one GPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(payloads: list[dict]) -> dict:
    """One payload of several runs' rows (the first run's device and settings; check rows of one method once),
    with ``vs_best_peer`` recomputed over all of them.

    Raises:
        ValueError: The runs differ in world size or device, or a timed row (section, L, H, d, method) repeats.
    """
    from bench_peers import add_ratios

    first = payloads[0]
    rows: list[dict] = []
    seen: set[tuple] = set()
    for p in payloads:
        if p["world"] != first["world"] or p["device"].get("name") != first["device"].get("name"):
            raise ValueError(
                f"cannot merge runs on {p['world']} x {p['device'].get('name')} with {first['world']} x"
                f" {first['device'].get('name')}: ratios across devices mean nothing."
            )
        for r in p["rows"]:
            key = (r["section"], r["method"]) if r["section"] == "check" else (
                r["section"], r["length"], r["heads"], r["head_dim"], r["method"])
            if key in seen:
                if r["section"] == "check":
                    continue
                raise ValueError(f"row {key} is in more than one input; merge runs of different methods or lengths.")
            seen.add(key)
            rows.append(dict(r, vs_best_peer=None))
    add_ratios(rows)
    return dict(first, rows=rows, merged_from=len(payloads))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="merge peer benchmark runs (peers_<tag>.json) into one report")
    parser.add_argument("--merge", nargs="+", type=Path, required=True, help="peers_*.json files")
    parser.add_argument("--tag", required=True, help="output name: peers_<tag>.{json,md,png}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    payload = merge([json.loads(p.read_text()) for p in args.merge])
    write_outputs(payload, args.out, args.tag, with_plot=True)
    print(markdown(payload))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
