"""Models and per-rank training loops shared by tests/test_tensor_parallel.py and tests/test_fsdp2.py.

Every run builds the model from one seed on every rank, splits it (tensor parallel over ``tp``, sequence parallel
over ``sp``, FSDP2 over ``dp x sp``), trains ``STEPS`` steps on the global batches of :data:`GLOBAL_BATCHES`
(each data-parallel rank takes its slice) and returns its losses and the full single-device-layout state dict, which
the tests compare with :func:`train_single_process`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tests.models import HEADS, IN_DIM, OUT_DIM, TOKENS, WIDTH, build_dataset

SEED, STEPS = 1234, 3
GLOBAL_BATCHES = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # 4 samples per step, split over the dp ranks


class BundledBlockViT(nn.Module):
    """The bundled timm-shaped ``Block`` (lightning_seqpar.weather.models.layers): embed, position, 2 blocks, head."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_seqpar.weather.models.layers import Block

        self.patch_embed = nn.Linear(IN_DIM, WIDTH)
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS, WIDTH) * 0.1)
        self.blocks = nn.ModuleList(Block(WIDTH, HEADS, mlp_ratio=2.0) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, OUT_DIM)

    def forward(self, x):  # [B, L, IN_DIM] -> [B, L, OUT_DIM]
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    if name == "block":
        return BundledBlockViT()
    from tests.models import build_model

    return build_model({"block": "timm_vit"}.get(name, name))


def dataset(name: str):
    return build_dataset("timm_vit" if name == "block" else name)


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def forward_loss(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def train_single_process(name: str, optimizer: str = "sgd", steps: int = STEPS) -> dict:
    """Ground truth: one process, the whole global batch per step."""
    model, data = build(name), dataset(name)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, optimizer)
    losses = []
    for indices in GLOBAL_BATCHES[:steps]:
        opt.zero_grad()
        loss = forward_loss(model, name, data.x[indices], data.y[indices])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {
        "initial": initial,
        "final": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "losses": losses,
    }


def full_state_dict(model: nn.Module) -> dict:
    """Every entry of ``model.state_dict()`` whole (DTensors gathered), in the single-device layout."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()
    }


def average_gradients(model: nn.Module, group) -> None:
    """Average the (local shards of the) gradients over ``group`` (data x sequence parallel ranks), what DDP does."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    size = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(local, group=group)
        local.div_(size)


def parallel_worker(runs: list[dict], tp: int = 1, sp: int = 1, dp: int = 1) -> list[dict]:
    """On a (dp, sp, tp) mesh of this rank, :func:`train_split` each of ``runs`` (keyword dicts); their results."""
    from torch.distributed.device_mesh import init_device_mesh

    from tests.dist_utils import init_gloo

    init_gloo()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dp, sp, tp), mesh_dim_names=("dp", "sp", "tp"))
    dp_sp = mesh["dp", "sp"]._flatten("dp_sp")
    return [train_split(mesh, dp_sp, **run) for run in runs]


def norm_token_counts(model: nn.Module) -> tuple[list[int], list]:
    """Hooks that record the token count (dim 1) of the block stack's input, then of each LayerNorm input inside the
    blocks; returns ``(counts, handles)``. With Megatron-LM sequence parallelism over tp the norms see this rank's
    share of the stack's tokens."""
    from torch.distributed.tensor import DTensor

    from lightning_seqpar.plan import find_block_stacks

    counts: list[int] = []
    _, stack = find_block_stacks(model)[0]
    # (SequenceParallel's own pre-hook ran first: the norm's input is a DTensor then, its local shard is what it sees)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    handles = [m.register_forward_pre_hook(lambda m, args: counts.append(local(args[0]).shape[1]))
               for m in stack.modules() if isinstance(m, nn.LayerNorm)]
    # The first block's hooks run outside the split: they see the block stack's whole input [B, L_r, D].
    handles.append(stack[0].register_forward_pre_hook(lambda m, args: counts.insert(0, args[0].shape[1])))
    return counts, handles


def megatron_plan() -> dict:
    """A user's own Megatron-style plan of the bundled Block ViT, as torchtitan writes them: column-parallel inputs
    and row-parallel outputs sharded over the tokens, torch's ``SequenceParallel`` on the norms."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    from lightning_seqpar.tensor_parallel import FusedColwiseParallel

    return {"blocks.*.attn.qkv": FusedColwiseParallel(chunks=3, input_layouts=Shard(1)),
            "blocks.*.attn.proj": RowwiseParallel(output_layouts=Shard(1)),
            "blocks.*.mlp.fc1": ColwiseParallel(input_layouts=Shard(1)),
            "blocks.*.mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
            "blocks.*.norm1": SequenceParallel(), "blocks.*.norm2": SequenceParallel()}


def train_split(mesh, dp_sp, name: str, fsdp: bool = False, optimizer: str = "sgd", attention: str = "ulysses",
                steps: int = STEPS, save: str | None = None, load: str | None = None, at_step: int = 0,
                reload: bool = False, tp_sequence_parallel: bool = True, user_plan: bool = False) -> dict:
    """Train ``name`` split over ``mesh`` and return losses, full state dicts and the layout seen.

    ``save``: write a DCP checkpoint (model + optimizer) there after ``at_step`` steps. ``load``: start from the
    checkpoint there and train the steps after ``at_step``. ``reload``: load the trained weights, whole, into a
    freshly split model and return its state dict too. ``tp_sequence_parallel``: shard the activations between the
    projections over tp (``norm_tokens``: the token counts the blocks' LayerNorms saw in the first step).
    ``user_plan``: :func:`megatron_plan` as the ``tp_plan``."""
    import torch.distributed as dist

    from lightning_seqpar.fsdp import apply_fsdp, load_checkpoint, save_checkpoint
    from lightning_seqpar.parallelize import apply_sequence_parallel
    from lightning_seqpar.plan import infer_plan
    from lightning_seqpar.tensor_parallel import apply_tensor_parallel, describe_plan

    dp, sp, tp = (mesh[d].size() for d in ("dp", "sp", "tp"))
    model, data = build(name), dataset(name)
    single_device = {k: v.clone() for k, v in model.state_dict().items()}
    tp_plan = describe_plan(apply_tensor_parallel(model, mesh["tp"], megatron_plan() if user_plan else None,
                                                  sequence_parallel=tp_sequence_parallel)) if tp > 1 else None
    local_heads = [
        getattr(m, a)
        for m in model.modules()
        for a in ("num_heads", "num_attention_heads")
        if isinstance(getattr(m, a, None), int)
    ]
    after_split = full_state_dict(model)
    if sp > 1:
        apply_sequence_parallel(model, infer_plan(model), mesh["sp"].get_group(), attention=attention)
    if fsdp:
        apply_fsdp(model, dp_sp)
    norm_tokens, hooks = norm_token_counts(model)  # after the sp shard's pre-hook: the first block's L_r
    opt = make_optimizer(model, optimizer)
    dp_rank = mesh["dp"].get_local_rank()
    losses, start, at_checkpoint = [], 0, None
    if load is not None:
        load_checkpoint(load, model, opt)
        start, at_checkpoint = at_step, full_state_dict(model)
    for step, indices in enumerate(GLOBAL_BATCHES[:steps]):
        if step < start:
            continue
        if save is not None and step == at_step:
            save_checkpoint(save, model, opt)
            at_checkpoint = full_state_dict(model)
        share = len(indices) // dp
        mine = indices[dp_rank * share:(dp_rank + 1) * share]
        opt.zero_grad()
        loss = forward_loss(model, name, data.x[mine], data.y[mine])
        loss.backward()
        for hook in hooks:  # the first step's counts only
            hook.remove()
        if not fsdp and dp * sp > 1:
            average_gradients(model, dp_sp.get_group())
        opt.step()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced, group=mesh["dp"].get_group())
        losses.append(reduced.item() / dp)
    final = full_state_dict(model)
    reloaded = None
    if reload:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        fresh = build(name)
        if tp > 1:
            apply_tensor_parallel(fresh, mesh["tp"], megatron_plan() if user_plan else None,
                                  sequence_parallel=tp_sequence_parallel)
        if fsdp:
            apply_fsdp(fresh, dp_sp)
        # (it replaces the values of the dict it is given by its DTensors: hand it a copy)
        set_model_state_dict(fresh, dict(final), options=StateDictOptions(full_state_dict=True))
        reloaded = full_state_dict(fresh)
    return {
        "rank": int(os.environ["RANK"]),
        "reloaded": reloaded,
        "at_checkpoint": at_checkpoint,
        "single_device": single_device,
        "after_split": after_split,
        "final": final,
        "losses": losses,
        "local_heads": local_heads,
        "tp_plan": tp_plan,
        "norm_tokens": norm_tokens,
        "tp_rank": mesh["tp"].get_local_rank(),
        "sp_rank": mesh["sp"].get_local_rank(),
    }
