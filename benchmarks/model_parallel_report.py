"""The report of ``bench_model_parallel.py``: the measured table, the memory model fitted to it with its predictions
for 4 and 8 GPUs, and a plot (peak memory and model TFLOP/s per GPU against sequence length).

Memory model, per configuration, fitted to the measured lengths on ``W`` GPUs::

    peak(L, N) = state * W / N + max(step_floor * W / N, transient + c * L / N)

- ``state(N)``: weights, gradients and optimizer state per GPU, measured between steps at ``N = W`` and divided by
  ``N / W`` elsewhere (tensor parallelism over N, or FSDP2 / ZeRO-3 over N, all split every block's state N ways;
  the few unsplit parameters, norms and the head, are under 0.01% here);
- ``c``: activation bytes per token held by one GPU (the least-squares slope of peak against L, times W): every
  configuration splits the tokens of the block stack N ways (sequence parallelism by sp; tensor parallelism by its
  sequence-parallel norms and split heads), and activation checkpointing keeps it linear in L;
- ``transient``: what the line's intercept adds above the state (gathered blocks of FSDP2 / ZeRO-3, workspaces);
- ``step_floor``: at short sequences the optimizer step's temporaries, not the activations, set the peak (torch's
  multi-tensor AdamW allocates them the size of the rank's parameter shards); taken at the shortest measured length,
  it divides with the shards.

``c`` and ``transient`` come from the two longest measured lengths, where activations dominate.

Run as a script to rebuild the report from a JSON file: ``python benchmarks/model_parallel_report.py FILE.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

FIT_MIN_ROWS = 2
PREDICT_GPUS = (4, 8)
PREDICT_LENGTHS = (131072, 262144, 524288)
HEADROOM = 0.97  # fraction of the GPU's memory a configuration may plan to use


def fit(rows: list[dict], world: int) -> dict | None:
    """The memory model of one configuration from its measured rows (None with fewer than two).

    The slope ``c`` and the ``transient`` come from the two longest lengths, where activations dominate the peak.
    At short lengths the peak can instead be the optimizer step's (torch's multi-tensor AdamW allocates temporaries
    the size of the rank's parameter shards): ``step_floor_gib`` is the shortest length's peak above the state when
    it exceeds that line, and the model's peak is ``state + max(step_floor, transient + activations)``. (Excess at
    longer lengths is the activations' slight growth above linear, which the line through the two longest already
    bounds; taking it as a floor would predict short lengths above their measured peaks.)"""
    ok = sorted((r for r in rows if r.get("status") == "ok" and r.get("peak_gib") is not None),
                key=lambda r: r["length"])
    if len(ok) < FIT_MIN_ROWS:
        return None
    a, b = ok[-2], ok[-1]
    slope = (b["peak_gib"] - a["peak_gib"]) / (b["length"] - a["length"])
    state = statistics.median(r["state_gib"] for r in ok)
    transient = b["peak_gib"] - slope * b["length"] - state
    short = ok[0]
    above_line = short["peak_gib"] - state > transient + slope * short["length"] + 1e-9
    floor = short["peak_gib"] - state if above_line else 0.0
    model = {"state_gib": state, "transient_gib": transient, "kib_per_token_per_gpu": slope * world * 2**20,
             "step_floor_gib": floor}
    model["worst_fit_error_gib"] = max(abs(predict(model, world, world, r["length"]) - r["peak_gib"]) for r in ok)
    return model


def predict(model: dict, world: int, gpus: int, length: int) -> float:
    """Predicted peak GiB per GPU of the configuration on ``gpus`` GPUs at ``length`` tokens (the state and the
    optimizer step's temporaries divide with the shards; activations with the tokens each GPU holds)."""
    activations = model["transient_gib"] + model["kib_per_token_per_gpu"] / 2**20 * length / gpus
    return model["state_gib"] * world / gpus + max(model.get("step_floor_gib", 0.0) * world / gpus, activations)


def longest(model: dict, world: int, gpus: int, capacity_gib: float) -> int:
    """The longest sequence (a multiple of 1,024 tokens) predicted to fit in ``HEADROOM`` of the GPU."""
    free = HEADROOM * capacity_gib - model["state_gib"] * world / gpus - model["transient_gib"]
    per_token = model["kib_per_token_per_gpu"] / 2**20 / gpus
    return max(0, int(free / per_token) // 1024 * 1024) if per_token > 0 else 0


def markdown(payload: dict) -> str:
    m, world = payload["model"], payload["world"]
    device = next(iter(payload["devices"].values()), {})
    lines = [
        f"# Tensor parallelism vs FSDP2 vs ZeRO-3, {world} x {device.get('name', device.get('device', '?'))}",
        "",
        f"Generic ViT: width {m['width']}, depth {m['depth']}, {m['heads']} heads ({m['parameters'] / 1e9:.2f}e9"
        f" parameters), one sample per step, {m.get('precision', 'bf16-mixed')}, AdamW, activation checkpointing; torch"
        f" {device.get('torch', '?')}. Model TFLOP/s per GPU counts 3 x depth x (24 L D^2 + 4 L^2 D) per step"
        " (recomputation not counted). Peak and state: GiB per GPU, the largest over the ranks.",
        "",
        "| configuration | L | step (s) | model TFLOP/s per GPU | tokens/s | peak (GiB) | state (GiB) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['length']:,} | | | | | | {r['status']}: {r.get('note', '')} |")
            continue
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        state = "" if r.get("state_gib") is None else f"{r['state_gib']:.1f}"
        lines.append(f"| {r['config']} | {r['length']:,} | {r['step_ms'] / 1e3:.2f} | {r['tflops_per_gpu']:.0f} |"
                     f" {r['tokens_per_s']:,.0f} | {peak} | {state} | loss {r['loss']:.4f}"
                     f"{'; ' + r['note'] if r.get('note') else ''} |")
    capacity = m.get("capacity_gib")
    models = {c: fit([r for r in payload["rows"] if r["config"] == c], world) for c in _configs(payload)}
    models = {c: v for c, v in models.items() if v is not None}
    if models and capacity:
        lines += [
            "",
            "## Memory model (fitted to the rows above) and its predictions",
            "",
            f"peak(L, N) = state x {world} / N + max(step floor x {world} / N, transient + c x L / N); state expected"
            f" 16 bytes x {m['parameters'] / 1e9:.2f}e9 / N = {16 * m['parameters'] / world / 2**30:.1f} GiB at"
            f" N = {world} (fp32 weights, gradients, two AdamW moments). Configurations at N GPUs: tp over N, or"
            " FSDP2 / ZeRO-3 over sp = N.",
            "",
            "| configuration | state (GiB) | step floor (GiB) | transient (GiB) | c (KiB per token per GPU) |"
            " worst fit error (GiB) |"
            + "".join(f" longest L on {n} GPUs |" for n in (world, *PREDICT_GPUS))
            + "".join(f" peak at {L // 1024}K on {n} GPUs |" for n in PREDICT_GPUS for L in PREDICT_LENGTHS[:2]),
            "|---|---|---|---|---|---|" + "---|" * (1 + len(PREDICT_GPUS) + 2 * len(PREDICT_GPUS)),
        ]
        for c, v in models.items():
            cells = [f"{longest(v, world, n, capacity):,}" for n in (world, *PREDICT_GPUS)]
            cells += [f"{predict(v, world, n, L):.1f}" for n in PREDICT_GPUS for L in PREDICT_LENGTHS[:2]]
            lines.append(f"| {c} | {v['state_gib']:.1f} | {v['step_floor_gib']:.1f} | {v['transient_gib']:.1f} |"
                         f" {v['kib_per_token_per_gpu']:.0f}"
                         f" | {v['worst_fit_error_gib']:.2f} | " + " | ".join(cells) + " |")
        lines += ["", f"Longest L: the largest multiple of 1,024 tokens whose predicted peak stays within"
                      f" {HEADROOM:.0%} of {capacity:.1f} GiB. Predictions for 4 and 8 GPUs are the model's, not"
                      " measurements."]
    return "\n".join(lines) + "\n"


def _configs(payload: dict) -> list[str]:
    seen: list[str] = []
    for r in payload["rows"]:
        if r["config"] not in seen:
            seen.append(r["config"])
    return seen


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world, capacity = payload["world"], payload["model"].get("capacity_gib")
    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in _configs(payload):
        rows = [r for r in payload["rows"] if r["config"] == c and r["status"] == "ok"]
        if not rows:
            continue
        xs = [r["length"] / 1024 for r in rows]
        ax_speed.plot(xs, [r["tflops_per_gpu"] for r in rows], "o-", label=c)
        if any(r.get("peak_gib") is None for r in rows):  # a CPU (smoke) run measures no memory
            continue
        line, = ax_mem.plot(xs, [r["peak_gib"] for r in rows], "o-", label=f"{c} (measured)")
        model = fit(rows, world)
        if model and capacity:
            far = max(xs[-1], longest(model, world, world, capacity) / 1024)
            grid = [far * i / 64 for i in range(65)]
            ax_mem.plot(grid, [predict(model, world, world, x * 1024) for x in grid], "--",
                        color=line.get_color(), alpha=0.6, label=f"{c} (model)")
    if capacity:
        ax_mem.axhline(capacity, color="grey", lw=1, ls=":", label="GPU memory")
    ax_mem.set(xlabel="tokens per sample (K)", ylabel="peak memory per GPU (GiB)", title="Memory")
    ax_speed.set(xlabel="tokens per sample (K)", ylabel="model TFLOP/s per GPU", title="Speed")
    for ax in (ax_mem, ax_speed):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = payload["model"]
    fig.suptitle(f"{m['parameters'] / 1e9:.1f}e9-parameter ViT (D {m['width']}, depth {m['depth']}) on {world} GPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(payload: dict, stem: Path, with_plot: bool = True) -> None:
    """Writes ``stem.md`` and (with ``with_plot``) ``stem.png``."""
    stem.with_suffix(".md").write_text(markdown(payload))
    if with_plot:
        plot(payload, stem.with_suffix(".png"))


if __name__ == "__main__":
    source = Path(sys.argv[1])
    data = json.loads(source.read_text())
    write_report(data, source.with_suffix(""))
    print(markdown(data))
