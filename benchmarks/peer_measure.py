"""What the peer benchmark (``bench_peers.py``) measures for one method and shape: its correctness against one-GPU
float32 SDPA, the time of attention forward + backward, and the time of a generic-ViT training step with the
attention call swapped; times are per-rank milliseconds, reduced to the slowest rank by ``run_row``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import call_times  # noqa: E402
from peer_methods import Methods, _sdpa  # noqa: E402
from workloads import OUT_DIM, GenericViT  # noqa: E402

if TYPE_CHECKING:
    from bench_peers import Sizes

TOLERANCE = 2e-2

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
