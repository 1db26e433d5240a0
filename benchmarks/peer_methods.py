"""The methods the peer benchmark (``bench_peers.py``) compares: this project's attentions and the peers' (DeepSpeed
Ulysses, PyTorch's ``context_parallel`` ring, ring-flash-attn, yunchang), each as an attention function on local
shards [B, L_r, H, d] -> [B, L_r, H, d] with the context it runs in.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
