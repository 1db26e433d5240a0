"""The single-GPU benchmark's outputs: the memory model fitted to the ladder, ``single_gpu.json``,
``single_gpu.md`` (with the targets table) and ``single_gpu.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import fmt
from single_gpu_trials import CLIMAX_MEMORY, MEMORY_CONFIGS, Trial
from workloads import K


def memory_model(results: dict) -> dict:
    """Bytes per token and intercept of each memory configuration from the two ladder lengths."""
    model = {}
    for memory in MEMORY_CONFIGS:
        points = sorted((t["length"], t["peak_gib"]) for t in results["trials"]
                        if t["section"] == "ladder" and t["memory"] == memory and t["status"] == "ok" and t["peak_gib"])
        if len(points) >= 2:
            (l0, p0), (l1, p1) = points[0], points[-1]
            slope = (p1 - p0) * 2**30 / (l1 - l0)
            intercept = p0 * 2**30 - slope * l0
            model[memory] = {"bytes_per_token": slope, "intercept_gib": intercept / 2**30,
                             "predicted_1m_gib": (intercept + slope * 2**20) / 2**30}
    return model


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


def _tokens(length: int) -> str:
    return f"{length // K}K" if length >= K else str(length)


def _row(t: Trial | dict) -> str:
    t = t if isinstance(t, dict) else t.__dict__
    return (f"{t['section']:<12} {t['model']:<6} {t['mode']:<8} {t['backend']:<11} L={t['length']:>8} {t['memory']:<19}"
            f" {t['status']:<7} step {fmt(t['step_ms'], '10.1f')} ms  {fmt(t['tokens_per_s'], '10.0f')} tok/s"
            f"  {fmt(t['tflops'], '6.1f')} TFLOP/s  peak {fmt(t['peak_gib'], '6.2f')} GiB {t['note']}")



def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["memory_model"] = memory_model(results)
    (out / "single_gpu.json").write_text(json.dumps(results, indent=1))
    (out / "single_gpu.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    info, trials = results["device"], results["trials"]
    lines = [
        "# Single-GPU benchmark",
        "",
        f"Device: {info.get('name', info['device'])} ({info.get('memory_gib', 0):.1f} GiB), torch {info['torch']},"
        f" CUDA {info['cuda']}, cuDNN {info.get('cudnn')}, Lightning {info['lightning']}."
        f" bf16 matmul ceiling (8192^3, random data): {fmt(results.get('matmul_tflops'), '.0f')} TFLOP/s.",
        "",
        "Model FLOPs per step = 3 x depth x (24 L D^2 + 4 L^2 D) for the ViT (recomputation not counted); ClimaX adds"
        " embedding and head. Step time: median over the timed steps (CUDA events); `largest` rows are one step"
        " after the optimizer state exists. Peak: torch.cuda.max_memory_allocated.",
        "",
        *targets(results),
        "## Speed: plain PyTorch vs SeqParStrategy (sp=1), autocast bf16 both, AdamW (fused) both",
        "",
        "| model | L | path | backend | step ms | tokens/s | TFLOP/s | peak GiB | measured (UTC) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        if t["section"] in ("speed", "speed-repeat"):
            path = t["mode"] + (" (repeat)" if t["section"] == "speed-repeat" else "")
            lines.append(f"| {t['model']} | {t['length']} | {path} | {t['backend']} | {fmt(t['step_ms'], '.1f')} |"
                         f" {fmt(t['tokens_per_s'], '.0f')} | {fmt(t['tflops'], '.1f')} | {fmt(t['peak_gib'], '.2f')} |"
                         f" {t.get('measured_at', '-')} |" + (f" {t['status']}" if t["status"] != "ok" else ""))
    lines += [
        "",
        "## Strategy overhead at sp=1 (strategy step / plain step - 1)",
        "",
        "| model | L | paths | backend | overhead |",
        "|---|---|---|---|---|",
    ]
    for t in trials:
        if t["section"] == "speed" and t["mode"] in ("strategy", "strategy+compile") and t["status"] == "ok":
            plain_mode = t["mode"].replace("strategy", "plain")
            plain = [p for p in trials if p["section"] == "speed" and p["mode"] == plain_mode and p["status"] == "ok"
                     and p["model"] == t["model"] and p["length"] == t["length"] and p["backend"] == t["backend"]]
            if plain:
                lines.append(f"| {t['model']} | {t['length']} | {t['mode']} vs {plain_mode} | {t['backend']} |"
                             f" {100 * (t['step_ms'] / plain[0]['step_ms'] - 1):+.1f}% |")
    kinds = [t for t in trials if t["section"] == "attention-kinds"]
    if kinds:
        lines += ["", "## Distributed attention kinds at sp=1 (strategy path, autocast bf16)", "",
                  "| L | attention | backend | step ms | tokens/s | TFLOP/s | peak GiB | measured (UTC) |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in kinds:
            lines.append(
                f"| {t['length']} | {t['mode'].removeprefix('strategy-')} | {t['backend']} |"
                f" {fmt(t['step_ms'], '.1f')} | {fmt(t['tokens_per_s'], '.0f')} | {fmt(t['tflops'], '.1f')} |"
                f" {fmt(t['peak_gib'], '.2f')} | {t.get('measured_at', '-')} |"
                + (f" {t['status']}" if t["status"] != "ok" else "")
            )
    lines += ["", "## Memory configurations (generic ViT, plain PyTorch)", ""]
    lines += [f"- `{k}`: {v}" for k, v in {**MEMORY_CONFIGS, **CLIMAX_MEMORY}.items()]
    lines += ["", "| memory | L | step ms | TFLOP/s | peak GiB |", "|---|---|---|---|---|"]
    for t in trials:
        if t["section"] == "ladder":
            lines.append(
                f"| {t['memory']} | {t['length']} | {fmt(t['step_ms'], '.1f')} | {fmt(t['tflops'], '.1f')} | "
                f"{fmt(t['peak_gib'], '.2f')} | {t['status'] if t['status'] != 'ok' else ''}"
            )
    lines += [
        "",
        "| memory | KB per token (slope) | fixed GiB | predicted peak at 1,048,576 tokens GiB |",
        "|---|---|---|---|",
    ]
    for k, m in results.get("memory_model", {}).items():
        lines.append(
            f"| {k} | {m['bytes_per_token'] / 1024:.1f} | {m['intercept_gib']:.2f} | {m['predicted_1m_gib']:.1f} |"
        )
    lines += [
        "",
        "## Longest sequence that trains (one step)",
        "",
        "| model | memory | backend | L | status | step s | TFLOP/s | peak GiB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted(
        (t for t in trials if t["section"] == "largest"),
        key=lambda t: (t["model"], t["memory"], t["backend"], t["length"]),
    ):
        note = t["note"].split(".")[0][:90] if t["status"] == "error" else ""
        lines.append(
            f"| {t['model']} | {t['memory']} | {t['backend']} | {t['length']} | {t['status']} |"
            f" {fmt(t['step_ms'] and t['step_ms'] / 1e3, '.1f')} | {fmt(t['tflops'], '.1f')} | "
            f"{fmt(t['peak_gib'], '.2f')} | {note} |"
        )
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[str]:
    """The issue's targets, read off the trials: strategy overhead at sp = 1, model TFLOP/s of the generic ViT at
    the longest speed length, and the longest sequences that trained."""
    trials = [t for t in results["trials"] if t["status"] == "ok"]
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    speed = [t for t in trials if t["section"] == "speed" and t["model"] == "vit" and t["backend"] == "sdpa"]
    for L in sorted({t["length"] for t in speed if t["length"] >= 16 * K}):
        s = [t for t in speed if t["length"] == L and t["mode"] == "strategy"]
        p = [t for t in speed if t["length"] == L and t["mode"] == "plain"]
        if s and p:
            overhead = 100 * (s[0]["step_ms"] / p[0]["step_ms"] - 1)
            lines.append(
                f"| strategy step (sp = 1) within 3% of plain PyTorch, {_tokens(L)} tokens | {overhead:+.1f}% |"
                f" {'yes' if overhead <= 3 else 'no'} |"
            )
    if speed:
        L = max(t["length"] for t in speed)
        for mode in ("plain", "strategy", "plain+compile", "strategy+compile"):
            best = [t for t in speed if t["length"] == L and t["mode"] == mode]
            if best:
                tf = best[0]["tflops"]
                lines.append(
                    f"| >= 380 model TFLOP/s, generic ViT, {_tokens(L)} tokens, {mode} | {tf:.1f} | "
                    f"{'yes' if tf >= 380 else 'no'} |"
                )
    largest = [t for t in trials if t["section"] == "largest" and t["model"] == "vit"]
    if largest:
        t = max(largest, key=lambda t: t["length"])
        lines.append(f"| generic ViT at 1,048,576 tokens trains on one GPU | {t['length']:,} tokens, {t['memory']},"
                     f" peak {fmt(t['peak_gib'], '.1f')} GiB | {'yes' if t['length'] >= 2**20 else 'no'} |")
    climax = [t for t in trials if t["section"] == "largest" and t["model"] == "climax"]
    if climax:
        t = max(climax, key=lambda t: t["length"])
        lines.append(f"| ClimaX largest trainable, {results['sizes']['variables']} variables | {t['length']:,} tokens,"
                     f" {t['memory']}, peak {fmt(t['peak_gib'], '.1f')} GiB | (reported) |")
    return lines + [""]


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[str, list] = {}
    for t in results["trials"]:
        if t["model"] != "vit" or t["status"] != "ok" or t["section"] == "speed-repeat":
            continue
        label = f"{t['mode']} {t['backend']} {t['memory']}"
        groups.setdefault(label, []).append(t)
    for i, (label, ts) in enumerate(sorted(groups.items())):
        # up to 20 colours, and a marker that changes with them, so that no two series look alike
        style = {"color": plt.cm.tab20.colors[i % 20], "marker": "os^Dv<>p"[i % 8], "label": label}
        ts = sorted(ts, key=lambda t: t["length"])
        xs = [t["length"] for t in ts]
        ax_speed.plot(xs, [t["tokens_per_s"] for t in ts], **style)
        mem = [(t["length"], t["peak_gib"]) for t in ts if t["peak_gib"] is not None]
        if mem:
            ax_mem.plot(*zip(*mem), **style)
    capacity = results["device"].get("memory_gib")
    if capacity:
        ax_mem.axhline(capacity, color="k", linestyle="--", linewidth=1, label="GPU memory")
    for ax, title in ((ax_speed, "tokens/s"), (ax_mem, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(f"generic ViT (8 x 1024): {title}")
        ax.grid(True, alpha=0.3)
    ax_mem.legend(fontsize=6, loc="upper left")
    fig.suptitle(
        f"{results['device'].get('name', results['device']['device'])}, torch {results['device']['torch']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out / "single_gpu.png", dpi=120)

