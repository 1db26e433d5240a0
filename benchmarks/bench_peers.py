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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_device, call_times, device_info, fmt  # noqa: E402
from workloads import OUT_DIM, GenericViT, vit_flops  # noqa: E402

K = 1024
TOLERANCE = 2e-2


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
# The methods: each gives an attention function on local shards [B, L_r, H, d] -> [B, L_r, H, d] and a context
# to run it in (PyTorch's context parallelism patches SDPA inside its context, forward and backward).
# ---------------------------------------------------------------------------------------------------------


def _sdpa(q, k, v, causal: bool = False):
    """SDPA on the [B, L, H, d] layout (kernel chosen by the active ``sdpa_kernel`` context)."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)


def _divisors(n: int) -> list[int]:
    return [u for u in range(1, n + 1) if n % u == 0]


def hybrid_degrees(world: int, heads: int) -> list[int]:
    """Ulysses degrees of the hybrid rows: the proper divisors of N (u x r with both > 1), or u = 1 and u = N where
    N has none (N = 2: ring through the hybrid path, and Ulysses through it)."""
    inner = [u for u in _divisors(world) if 1 < u < world and u <= heads]
    return inner or [u for u in (1, world) if u <= heads]


class Methods:
    """Builds every method once per process (groups are collective to create)."""

    def __init__(self, world: int, device: torch.device) -> None:
        from lightning_seqpar.attention import lss_attention, ring_attention, ulysses_attention
        from lightning_seqpar.attention.hybrid import build_hybrid_groups, hybrid_attention

        self.world, self.device = world, device
        self.group = dist.new_group(list(range(world)))
        self.hybrid_groups = {u: build_hybrid_groups(range(world), u) for u in _divisors(world)}
        self._ours = {
            "ulysses": lambda q, k, v, causal: ulysses_attention(q, k, v, self.group, causal=causal),
            "lss": lambda q, k, v, causal: lss_attention(q, k, v, self.group, causal=causal),
            "ring": lambda q, k, v, causal: ring_attention(q, k, v, self.group, causal=causal),
            "ring_rank_order": lambda q, k, v, causal: ring_attention(
                q, k, v, self.group, causal=causal, load_balance=False
            ),
        }
        self._hybrid = hybrid_attention
        self.mesh = None
        if device.type == "cuda":
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh("cuda", (world,))
        self.deepspeed_error: str | None = None  # set by the first DeepSpeed row (its import takes seconds)

    def _init_deepspeed(self) -> str:
        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed"
        try:
            import deepspeed

            deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)  # needed even when torch's is up
            return ""
        except Exception as err:  # noqa: BLE001 - recorded in the row
            return f"deepspeed.init_distributed failed: {err}"

    def names(self, heads: int, causal: bool = False) -> list[tuple[str, str]]:
        """(method, family) rows for ``heads`` heads; causal rows add ring in rank order (no load balance)."""
        rows = [(m, "ours") for m in ("ulysses", "lss", "ring")] + ([("ring_rank_order", "ours")] if causal else [])
        rows += [(f"hybrid u{u}xr{self.world // u}", "ours") for u in hybrid_degrees(self.world, heads)]
        rows += [("deepspeed_ulysses", "peer")]
        rows += [
            (f"torch_cp_{kernel}_{rotate}", "peer")
            for kernel in ("cudnn", "flash")
            for rotate in ("allgather", "alltoall")
        ]
        rows += [("ring_flash_attn", "peer"), ("yunchang_usp", "peer")]
        return rows

    def get(self, name: str, heads: int, causal: bool = False):
        """``(attend, context factory)`` for ``name``; raises ``Unavailable`` with the reason when it cannot run."""
        if name in self._ours:
            fn = self._ours[name]
            return (lambda q, k, v: fn(q, k, v, causal)), contextlib.nullcontext
        if name.startswith("hybrid"):
            u = int(name.split()[1][1:].split("x")[0])
            ulysses_group, ring_group = self.hybrid_groups[u]
            return (
                lambda q, k, v: self._hybrid(q, k, v, ulysses_group, ring_group, causal=causal)
            ), contextlib.nullcontext
        if name == "deepspeed_ulysses":
            if self.deepspeed_error is None:
                self.deepspeed_error = self._init_deepspeed()
            if self.deepspeed_error:
                raise Unavailable(self.deepspeed_error)
            from deepspeed.sequence.layer import DistributedAttention

            # [B, L_r, H, d]: heads scattered (dim 2), tokens gathered (dim 1), batch at dim 0.
            layer = DistributedAttention(_sdpa, self.group, scatter_idx=2, gather_idx=1)
            return (lambda q, k, v: layer(q, k, v, 0, None, causal=causal)), contextlib.nullcontext
        if name.startswith("torch_cp_"):
            _, _, kernel, rotate = name.split("_")
            return (lambda q, k, v: _sdpa(q, k, v, causal)), lambda: _torch_cp_scope(
                self.mesh, kernel, rotate, self.device, causal
            )
        if name == "ring_flash_attn":
            if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("ring_flash_attn") is None:
                raise Unavailable("cannot run: ring-flash-attn needs flash-attn, which has no wheel for this image")
            from ring_flash_attn import ring_flash_attn_func

            return (
                lambda q, k, v: ring_flash_attn_func(q, k, v, causal=causal, group=self.group)
            ), contextlib.nullcontext
        if name == "yunchang_usp":
            if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("yunchang") is None:
                raise Unavailable(
                    "cannot run: yunchang's torch kernels have no backward; it needs flash-attn, which has"
                    " no wheel for this image"
                )
            from yunchang import LongContextAttention, set_seq_parallel_pg

            set_seq_parallel_pg(
                min(self.world, heads), self.world // min(self.world, heads), dist.get_rank(), self.world
            )
            layer = LongContextAttention()
            return (lambda q, k, v: layer(q, k, v, causal=causal)), contextlib.nullcontext
        raise ValueError(f"unknown method {name!r}")


class Unavailable(RuntimeError):
    """A method that cannot run here (missing package or kernel); the row records why."""


@contextlib.contextmanager
def _torch_cp_scope(mesh, kernel: str, rotate: str, device: torch.device, causal: bool = False):
    """PyTorch's context parallelism around forward and backward: SDPA on local shards becomes its ring, with the
    given SDPA kernel and rotate method; load balancing (head-tail order) on for causal attention, off otherwise
    (it refuses non-causal attention with it). With it on, torch assumes the shards are in its head-tail order:
    the causal rows are timed on shards in rank order, which is the same work (the values do not change it)."""
    if mesh is None:
        raise Unavailable(
            f"torch context_parallel runs on CUDA only (its ring wraps the CUDA SDPA ops), not on {device.type}"
        )
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kernel]
    previous = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = causal
    set_rotate_method(rotate)
    # A buffer is required: 2 elements per rank, which context_parallel shards (head-tail when balancing).
    dummy = torch.zeros(2 * mesh.size(), device=device)
    try:
        with (
            context_parallel(mesh, buffers=[dummy], buffer_seq_dims=[0], no_restore_buffers={dummy}),
            sdpa_kernel([backend]),
        ):
            _cp_options.enable_load_balance = causal  # context_parallel sets it from the buffer; the ring reads it
            yield
    finally:
        _cp_options.enable_load_balance = previous


# ---------------------------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------------------------


def _shard(x: torch.Tensor, world: int, rank: int, dim: int = 1) -> torch.Tensor:
    return x.chunk(world, dim=dim)[rank]


def _inputs(seed: int, length: int, heads: int, head_dim: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, length, heads, head_dim, device=device, dtype=dtype, generator=g) for _ in range(4)]


def _slowest(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks (a step ends when the slowest rank ends)."""
    t = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def timed(fn, steps: tuple[int, int], device: torch.device) -> list[float]:
    """Milliseconds of each timed call of ``fn`` after the warm-up calls, all ranks starting each call together."""
    return call_times(fn, steps, device, before=dist.barrier)


def attention_flops(length: int, heads: int, head_dim: int) -> float:
    """Forward + backward: 3.5 x (4 L^2 H d)."""
    return 3.5 * 4.0 * length**2 * heads * head_dim


def check_method(methods: Methods, name: str, length: int, heads: int, head_dim: int, device, dtype) -> dict:
    """Relative errors of this rank's output and q/k/v gradient shards against one-GPU float32 SDPA."""
    world, rank = methods.world, dist.get_rank()
    q, k, v, grad = _inputs(7, length, heads, head_dim, device, dtype)
    full = [t.detach().float().clone().requires_grad_() for t in (q, k, v)]
    with _tf32_off():
        ref = _sdpa(*full)
        ref.backward(grad.float())
    attend, scope = methods.get(name, heads)
    local = [_shard(t, world, rank).clone().requires_grad_() for t in (q, k, v)]
    with scope():
        out = attend(*local)
        out.backward(_shard(grad, world, rank))
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    errors = {"out": rel(out, _shard(ref.detach(), world, rank))}
    errors |= {f"d{n}": rel(t.grad, _shard(f.grad, world, rank)) for n, t, f in zip("qkv", local, full)}
    return {n: _slowest(e, device) for n, e in errors.items()}


@contextlib.contextmanager
def _tf32_off():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def time_attention(methods: Methods, name: str, length: int, heads: int, head_dim: int, steps, device, dtype,
                   causal: bool = False) -> list[float]:
    world, rank = methods.world, dist.get_rank()
    q, k, v, grad = (_shard(t, world, rank).contiguous() for t in _inputs(11, length, heads, head_dim, device, dtype))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    attend, scope = methods.get(name, heads, causal)

    def step():
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad)

    with scope():
        return timed(step, steps, device)


def time_one_gpu(length: int, heads: int, head_dim: int, steps, device, dtype, causal: bool = False) -> list[float]:
    """The whole sequence on this GPU alone, SDPA's cuDNN kernel (SDPA's own choice on the CPU)."""
    q, k, v, grad = _inputs(11, length, heads, head_dim, device, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scope = sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if device.type == "cuda" else contextlib.nullcontext()

    def step():
        q.grad = k.grad = v.grad = None
        _sdpa(q, k, v, causal).backward(grad)

    with scope:
        return call_times(step, steps, device)


class SwappedAttention(nn.Module):
    """The generic ViT's attention with its qkv / proj weights and ``attend`` on local shards in place of SDPA."""

    def __init__(self, inner: nn.Module, attend) -> None:
        super().__init__()
        self.inner, self.attend = inner, attend

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L_r, D] -> [B, L_r, D]
        B, L, D = x.shape
        qkv = self.inner.qkv(x).view(B, L, 3, self.inner.num_heads, self.inner.head_dim)  # [B, L_r, 3, H, d]
        out = self.attend(*qkv.unbind(2))  # [B, L_r, H, d]
        return self.inner.proj(out.reshape(B, L, D))


def time_vit(methods: Methods, name: str, length: int, sizes: Sizes, steps, device, checkpoint: bool) -> list[float]:
    world, rank = methods.world, dist.get_rank()
    torch.manual_seed(0)
    model = GenericViT(sizes.width, sizes.depth, sizes.heads, device=device)
    attend, scope = methods.get(name, sizes.heads)
    for block in model.blocks:
        block.attn = SwappedAttention(block.attn, attend)
    g = torch.Generator(device=device).manual_seed(3)
    x = _shard(torch.randn(1, length, sizes.width, device=device, generator=g), world, rank)  # [1, L_r, D]
    y = _shard(torch.randn(1, length, OUT_DIM, device=device, generator=g), world, rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    params = [p for p in model.parameters()]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def forward(h):
        for block in model.blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if checkpoint else block(h)
        return model.head(model.norm(h))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.mse_loss(forward(x).float(), y)
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one all-reduce of all gradients
        dist.all_reduce(flat, group=methods.group)
        for p, g_ in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g_.view_as(p))
        optimizer.step()

    with scope():
        return timed(step, steps, device)


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
    parser.add_argument("--vit-steps", default=None, help="warm-up,timed steps of the ViT rows (default 1,2)")
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
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 4.5), squeeze=False)
    colours = {"ours": "tab:blue", "peer": "tab:orange", "one-gpu": "tab:gray"}
    for ax, (section, L, H, d) in zip(axes[0], shapes):
        rows = [
            r
            for r in payload["rows"]
            if (r["section"], r["length"], r["heads"], r["head_dim"]) == (section, L, H, d) and r["status"] == "ok"
        ]
        ax.barh(
            [r["method"] for r in rows], [r["tflops_per_gpu"] for r in rows], color=[colours[r["family"]] for r in rows]
        )
        ax.invert_yaxis()
        ax.set_title(f"{section}, L={L // K if L >= K else L}{'K' if L >= K else ''}, {H}x{d}", fontsize=9)
        ax.set_xlabel("TFLOP/s per GPU")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    dev = payload["device"]
    fig.suptitle(f"{payload['world']} x {dev.get('name', dev['device'])}, torch {dev['torch']}: blue = this project,"
                 " orange = peers, grey = one GPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
