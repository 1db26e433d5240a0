"""Where one training step of the generic ViT spends its GPU time, and how step-level variants compare.

    PYTHONPATH=. python benchmarks/profile_step.py --length 65536 --out benchmarks/results

1. Attention alone: SDPA forward + backward on [B, H, L, d] bf16 random data, per kernel and per input layout
   (the strided q/k/v views a fused qkv projection gives, and contiguous copies), median of CUDA-event timings.
2. Whole training steps of several variants, measured in interleaved rounds (A B C A B C ...) so that a drift of
   the card between rounds shows up as spread instead of as a difference between variants.
3. A torch.profiler trace of one step of each variant, its kernel time summed by category (attention, matrix
   products, everything else), written as JSON next to the tables.

Prints a markdown summary last; ``profile_step.json`` holds every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import call_times, device_info  # noqa: E402
from workloads import (  # noqa: E402
    OUT_DIM,
    GenericViT,
    Sizes,
    sdpa_context,
    vit_flops,
)

from lightning_seqpar.memory import MasterWeightAdamW  # noqa: E402


def attention_alone(length: int, heads: int, head_dim: int, depth: int) -> list[dict]:
    """SDPA forward + backward per backend and layout; TFLOP/s counted as the model counts it (3 x 4 L^2 D)."""
    rows = []
    width = heads * head_dim
    for layout in ("qkv-strided", "contiguous"):
        qkv = torch.randn(1, length, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        if layout == "contiguous":
            q, k, v = (t.transpose(1, 2).contiguous() for t in qkv.unbind(2))  # [B, H, L, d] each
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided [B, H, L, d] views
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        grad = torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        for backend in ("sdpa_cudnn", "sdpa_flash"):
            def step(backend=backend, q=q, k=k, v=v, grad=grad):
                with sdpa_context(backend):
                    F.scaled_dot_product_attention(q, k, v).backward(grad)

            try:
                times = call_times(step, (2, 5), torch.device("cuda"))
            except RuntimeError as exc:
                rows.append({"layout": layout, "backend": backend, "error": str(exc).splitlines()[0][:200]})
                continue
            ms = statistics.median(times)
            flops = 3 * 4 * length**2 * width
            rows.append({"layout": layout, "backend": backend, "ms": ms, "tflops_model": flops / ms / 1e9,
                         "tflops_actual": 3.5 / 3 * flops / ms / 1e9, "depth_ms": depth * ms})
            print(rows[-1], flush=True)
        del q, k, v, qkv, grad
    torch.cuda.empty_cache()
    return rows


def build_variant(name: str, sizes: Sizes, length: int):
    """(step function, description) of one variant; every variant trains the same model on the same data."""
    torch.manual_seed(0)
    bf16 = "bf16" in name
    model = GenericViT(sizes.width, sizes.depth, sizes.heads, device="cuda", dtype=torch.bfloat16 if bf16 else None)
    if "compile" in name:
        for block in model.blocks:
            block.compile()
    x = torch.randn(1, length, sizes.width, device="cuda", dtype=torch.bfloat16 if bf16 else torch.float32)
    y = torch.randn(1, length, OUT_DIM, device="cuda")
    optimizer = (MasterWeightAdamW if bf16 else torch.optim.AdamW)(model.parameters(), lr=1e-4, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with sdpa_context("sdpa_cudnn"):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not bf16):
                out = model(x)
            loss = F.mse_loss(out.float(), y)
            loss.backward()
        optimizer.step()
        return loss

    return step


CATEGORIES = (("attention", ("fmha", "flash", "cudnn", "attention", "sdpa", "mha")),
              ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90", "matmul")),
              ("optimizer", ("adam",)))


def categorize(name: str) -> str:
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def profile_one(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        entry = kernels.setdefault(event.name, [0.0, 0])
        entry[0] += event.time_range.elapsed_us() / 1e3
        entry[1] += 1
    by_category: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        by_category[categorize(name)] = by_category.get(categorize(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {"total_kernel_ms": sum(v[0] for v in kernels.values()), "by_category_ms": by_category,
            "top": [{"name": n[:160], "ms": v[0], "calls": v[1]} for n, v in top]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=64 * 1024)
    parser.add_argument("--variants", default="amp,bf16,amp-compile,bf16-compile")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timed", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    sizes = Sizes()
    L = args.length
    flops = vit_flops(L, sizes.width, sizes.depth)
    result = {"device": device_info(torch.device("cuda")), "length": L, "flops_per_step": flops}
    result["attention_alone"] = attention_alone(L, sizes.heads, sizes.width // sizes.heads, sizes.depth)

    names = args.variants.split(",")
    steps = {}
    for name in names:
        try:
            steps[name] = build_variant(name, sizes, L)
            steps[name]()  # compile / first-touch outside the rounds
            steps[name]()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
            print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            steps.pop(name, None)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            torch.cuda.reset_peak_memory_stats()
            t = call_times(step, (1, args.timed), torch.device("cuda"))
            times[name] += t
            print(
                f"round {r} {name}: median {statistics.median(t):.1f} ms  "
                f"({flops / statistics.median(t) / 1e9:.1f} TFLOP/s) peak "
                f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
                flush=True,
            )
    result["variants"] = {}
    for name, step in steps.items():
        try:
            prof = profile_one(step)
        except Exception as exc:  # noqa: BLE001 - the timings stand without a trace
            prof = {"error": f"{type(exc).__name__}: {exc}", "total_kernel_ms": 0.0, "by_category_ms": {}, "top": []}
        med = statistics.median(times[name])
        result["variants"][name] = {"step_ms_all": times[name], "step_ms": med, "tflops": flops / med / 1e9,
                                    "profile": prof}
        gc.collect()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_step.json").write_text(json.dumps(result, indent=1))

    lines = [
        f"## One training step at L = {L} ({result['device'].get('name')}, torch {result['device']['torch']})",
        "",
        "| variant | step ms (median) | min-max ms | TFLOP/s | kernels ms | attention | matmul | optimizer | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        c = v["profile"]["by_category_ms"]
        lines.append(
            f"| {name} | {v['step_ms']:.1f} | {min(v['step_ms_all']):.1f}-{max(v['step_ms_all']):.1f} | "
            f"{v['tflops']:.1f} |"
            f" {v['profile']['total_kernel_ms']:.1f} | {c.get('attention', 0):.1f} | {c.get('matmul', 0):.1f} |"
            f" {c.get('optimizer', 0):.1f} | {c.get('other', 0):.1f} |"
        )
    lines += ["", "| attention alone | backend | fwd+bwd ms | x depth ms | model TFLOP/s |", "|---|---|---|---|---|"]
    for row in result["attention_alone"]:
        if "ms" in row:
            lines.append(
                f"| {row['layout']} | {row['backend']} | {row['ms']:.1f} | {row['depth_ms']:.1f} | "
                f"{row['tflops_model']:.1f} |"
            )
    for name, v in result["variants"].items():
        lines += ["", f"top kernels, {name}:"] + [
            f"  {k['ms']:8.1f} ms {k['calls']:4d}x {k['name'][:110]}" for k in v["profile"]["top"][:12]
        ]
    (args.out / "profile_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
