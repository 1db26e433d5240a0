"""GPU benchmark of ClimaX's variable aggregation (flat, hierarchical D-CHAG, channel-parallel) and of TILES tiling.

Run on one GPU (sections embed, step, longest, tiles), then on two with torchrun (section cp: channel-parallel)::

    PYTHONPATH=. python benchmarks/bench_aggregation.py --out $OUT
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/bench_aggregation.py --out $OUT --sections cp

Each writes ``aggregation[_cp].json``; ``--report`` merges them into ``aggregation.md`` and ``aggregation.png``.
Method: random data, bf16 autocast, fp32 weights; memory is ``torch.cuda.max_memory_allocated`` above what was
allocated before the measured step (weights, and for whole steps gradients and AdamW state, excluded), divided by
the tokens L; times are CUDA-event medians. ``--smoke`` runs tiny sizes on any device (CPU included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

try:
    import lightning_seqpar.weather  # noqa: F401
except ImportError:  # a GPU image without the [weather] extra: the model and tiling modules need only torch
    import types

    _package = types.ModuleType("lightning_seqpar.weather")
    _package.__path__ = [str(REPO / "lightning_seqpar" / "weather")]
    sys.modules["lightning_seqpar.weather"] = _package

from lightning_seqpar.weather.models import ClimaX  # noqa: E402
from lightning_seqpar.weather.tiles import TileLayout  # noqa: E402

K = 1024
FULL = {"width": 1024, "depth": 8, "heads": 16, "group": 8}
SMOKE = {"width": 64, "depth": 2, "heads": 4, "group": 2}


def grid_for(tokens: int, patch: int = 2) -> tuple[int, int]:
    """A (2h, 2w) grid of h x w = tokens patches, h <= w."""
    h = 2 ** (int(math.log2(tokens)) // 2)
    while tokens % h:
        h //= 2
    return patch * h, patch * (tokens // h)


def build(
    variables: int, tokens: int, aggregation: str, cfg: dict, device, depth: int | None = None, grid=None
) -> ClimaX:
    torch.manual_seed(0)
    names = [f"v{i}" for i in range(variables)]
    return ClimaX(
        names,
        grid or grid_for(tokens),
        patch_size=2,
        embed_dim=cfg["width"],
        depth=cfg["depth"] if depth is None else depth,
        num_heads=cfg["heads"],
        drop_path=0.0,
        aggregation=aggregation,
        aggregation_group_size=cfg["group"],
        device=device,
    )


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_above(fn, device) -> float:
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it (0 on CPU)."""
    if device.type != "cuda":
        fn()
        return 0.0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


def embed_trial(variables: int, tokens: int, mode: str, cfg: dict, device, reps: int) -> dict:
    """Tokenise + aggregate forward and backward alone (the embedding stage): memory per token and time."""
    model = build(variables, tokens, "flat" if mode == "flat" else "hierarchical", cfg, device, depth=0)
    if mode == "channel_parallel":
        model.set_channel_parallel(dist.group.WORLD)
    names = model.default_variables
    x = torch.randn(1, variables, *model.img_size, device=device)
    ids, lead = model.variable_ids(names, device), torch.full((1,), 72.0, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.embed(model.patchify(x), ids, lead)
        out.float().square().mean().backward()

    step()  # allocate the parameter gradients outside the measurement
    peak = peak_above(step, device)
    seconds = timed(step, device, reps)
    return {
        "section": "embed",
        "variables": variables,
        "tokens": tokens,
        "mode": mode,
        "bytes_per_token": peak / tokens,
        "peak_gib": peak / 2**30,
        "seconds": seconds,
    }


def train_step_fn(model: ClimaX, device):
    names = model.default_variables
    x = torch.randn(1, len(names), *model.img_size, device=device)
    y = torch.randn_like(x)
    lead = torch.full((1,), 72.0, device=device)
    for block in model.blocks:  # per-block activation checkpointing
        block.forward = lambda x, forward=block.forward: checkpoint(forward, x, use_reentrant=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))

    def step():
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x, lead, names, names)
        F.mse_loss(out.float(), y).backward()
        optimizer.step()

    return step


def step_trial(variables: int, tokens: int, mode: str, cfg: dict, device, reps: int) -> dict:
    """A whole training step (bf16 autocast, checkpointed blocks, AdamW): memory per token above the static state."""
    model = build(variables, tokens, "flat" if mode == "flat" else "hierarchical", cfg, device)
    if mode == "channel_parallel":
        model.set_channel_parallel(dist.group.WORLD)
    step = train_step_fn(model, device)
    step()  # gradients and optimizer state exist from here on: the static part
    peak = peak_above(step, device)
    seconds = timed(step, device, reps)
    return {"section": "step", "variables": variables, "tokens": tokens, "mode": mode, "bytes_per_token": peak / tokens,
            "peak_gib": peak / 2**30, "seconds": seconds, "tokens_per_s": tokens / seconds}


def longest_trial(variables: int, tokens: int, mode: str, cfg: dict, device) -> dict:
    """One training step at ``tokens``: ok or out of memory, with the total peak."""
    row = {"section": "longest", "variables": variables, "tokens": tokens, "mode": mode}
    try:
        model = build(variables, tokens, mode, cfg, device)
        step = train_step_fn(model, device)
        start = time.perf_counter()
        step()
        sync(device)
        row.update(status="ok", seconds=time.perf_counter() - start,
                   total_peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
    except torch.OutOfMemoryError:
        row.update(status="oom")
    finally:
        model = step = None  # noqa: F841
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return row


def tiles_trial(tokens: int, tile_cells: int, halo: int, cfg: dict, device, reps: int, variables: int) -> list[dict]:
    """Training step (forward + backward) over one whole field: full attention vs every tile of it at a fixed
    tile size."""
    grid = grid_for(tokens)
    tiles = max(1, grid[0] // tile_cells)
    layout = TileLayout(grid, tiles, halo)
    rows = []
    for mode, shape in (("full", grid), ("tiled", layout.tile_shape)):
        model = build(variables, 0, "flat", cfg, device, grid=shape)
        names = model.default_variables
        field = torch.randn(1, variables, *grid, device=device)
        x = field if mode == "full" else layout.split(field)  # [1 or T, V, H or Th, W or Tw]
        lead = torch.full((x.shape[0],), 72.0, device=device)

        def step(model=model, x=x, lead=lead, names=names):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(x, lead, names, names)
            out.float().square().mean().backward()

        seconds = timed(step, device, reps if tokens < 256 * K else 1)
        rows.append(
            {
                "section": "tiles",
                "tokens": tokens,
                "mode": mode,
                "tiles": layout.num_tiles if mode == "tiled" else 1,
                "tokens_per_sequence": model.num_patches,
                "seconds": seconds,
                "variables": variables,
            }
        )
        del model, step  # step's defaults hold the model too: free it before the next build
    return rows


def run(args) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = SMOKE if args.smoke else FULL
    sections = args.sections.split(",")
    scale = (lambda n: max(64, n // 256)) if args.smoke else (lambda n: n)
    deadline = time.monotonic() + args.budget_s
    results: list[dict] = []

    def record(row: dict) -> None:
        results.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)

    for variables in (48, 80):
        for tokens in (16 * K, 64 * K):
            for mode in (["channel_parallel"] if "cp" in sections else ["flat", "hierarchical"]):
                if "embed" in sections or "cp" in sections:
                    record(embed_trial(variables, scale(tokens), mode, cfg, device, args.reps))
        for mode in (["channel_parallel"] if "cp" in sections else ["flat", "hierarchical"]):
            if "step" in sections or "cp" in sections:
                record(step_trial(variables, scale(64 * K), mode, cfg, device, args.reps))
    if "longest" in sections:
        for mode in ("flat", "hierarchical"):
            predicted = 0.0  # attention dominates: a doubling of L costs about 4x the time
            for tokens in (128 * K, 256 * K, 512 * K):
                if time.monotonic() + predicted > deadline:
                    record({"section": "longest", "variables": 48, "tokens": scale(tokens), "mode": mode,
                            "status": f"not run (predicted {predicted:.0f} s, over the time budget)"})
                    break
                row = longest_trial(48, scale(tokens), mode, cfg, device)
                record(row)
                if row["status"] != "ok":
                    break
                predicted = 4.0 * row["seconds"]
    if "tiles" in sections:
        tile_cfg = {**cfg, "depth": 4}
        for tokens in (16 * K, 64 * K, 256 * K):
            if time.monotonic() > deadline:
                break
            for row in tiles_trial(
                scale(tokens), 8 if args.smoke else 128, 4, tile_cfg, device, args.reps, variables=8
            ):
                record(row)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "aggregation_cp.json" if "cp" in sections else "aggregation.json"
        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "world_size": dist.get_world_size() if distributed else 1, "config": cfg, "torch": torch.__version__}
        (out / name).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if distributed:
        dist.destroy_process_group()


def report(out: Path) -> None:
    """aggregation.md (tables) and aggregation.png (memory per token of the embedding stage, TILES time) from the
    JSON."""
    rows, metas = [], []
    for name in ("aggregation.json", "aggregation_cp.json"):
        if (out / name).exists():
            data = json.loads((out / name).read_text())
            rows += [{**r, "world": data["meta"]["world_size"]} for r in data["results"]]
            metas.append(data["meta"])
    kb = lambda r: f"{r['bytes_per_token'] / 1024:,.1f}"  # noqa: E731
    lines = [
        "# Variable aggregation and TILES benchmark",
        "",
        f"Devices: {[m['device'] for m in metas]}; config {metas[0]['config'] if metas else {}}.",
        "",
        "## Tokenise + aggregate (forward + backward), memory per token above the weights",
        "",
        "| variables | tokens | mode | ranks | KiB / token | peak GiB | time (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['variables']} | {r['tokens']:,} | {r['mode']} | {r['world']} | {kb(r)} | {r['peak_gib']:.2f} | "
        f"{1e3 * r['seconds']:.1f} |"
        for r in rows
        if r["section"] == "embed"
    ]
    lines += [
        "",
        "## Whole training step (bf16 autocast, checkpointed blocks, AdamW), memory per token above weights, "
        "gradients and optimizer state",
        "",
        "| variables | tokens | mode | ranks | KiB / token | peak GiB | step (s) | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['variables']} | {r['tokens']:,} | {r['mode']} | {r['world']} | {kb(r)} | {r['peak_gib']:.2f} | "
        f"{r['seconds']:.3f} | {r['tokens_per_s']:,.0f} |"
        for r in rows
        if r["section"] == "step"
    ]
    lines += [
        "",
        "## Longest ClimaX sequence, 48 variables, one GPU (one training step)",
        "",
        "| mode | tokens | status | total peak GiB | step (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['mode']} | {r['tokens']:,} | {r['status']} | {r.get('total_peak_gib', float('nan')):.1f} | "
        f"{r.get('seconds', float('nan')):.1f} |"
        for r in rows
        if r["section"] == "longest"
    ]
    lines += [
        "",
        "## TILES: forward + backward over one whole field, full attention vs all tiles (fixed tile size)",
        "",
        "| field tokens | mode | tiles | tokens / sequence | time (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['tokens']:,} | {r['mode']} | {r['tiles']} | {r['tokens_per_sequence']:,} | {r['seconds']:.3f} |"
        for r in rows
        if r["section"] == "tiles"
    ]
    (out / "aggregation.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    embed = [
        r
        for r in rows
        if r["section"] == "embed" and r["tokens"] == max(x["tokens"] for x in rows if x["section"] == "embed")
    ]
    labels = [f"{r['variables']}v {r['mode']}" for r in embed]
    left.barh(labels, [r["bytes_per_token"] / 1024 for r in embed])
    left.set_xlabel("KiB per token (tokenise + aggregate, fwd + bwd)")
    for mode in ("full", "tiled"):
        pts = [r for r in rows if r["section"] == "tiles" and r["mode"] == mode]
        right.plot([r["tokens"] for r in pts], [r["seconds"] for r in pts], "o-", label=mode)
    if any(r["section"] == "tiles" for r in rows):
        right.set_xscale("log", base=2)
        right.set_yscale("log")
    right.set_xlabel("tokens per field")
    right.set_ylabel("fwd + bwd seconds per field")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "aggregation.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--sections", default="embed,step,longest,tiles", help="comma list of embed, step, longest, tiles, cp"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="skip the remaining long trials after this many seconds"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    parser.add_argument(
        "--report", action="store_true", help="only merge the JSON files in --out into markdown and a plot"
    )
    args = parser.parse_args()
    if args.report:
        report(Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
