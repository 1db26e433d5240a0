"""Held-out ViT kinds under SeqParStrategy on 2 gloo ranks, against single-process training, and the refusals of
attention that cannot follow the token sharding.

- Relative position biases (BEiT, timm ``vit_relpos_*``, ``beit_*``): the bias reaches SDPA as ``attn_mask`` over all
  ``L x L`` token pairs, built inside the attention (Hugging Face ``BeitModel(use_relative_position_bias=True)``) or
  handed to every block as an argument (``use_shared_relative_position_bias=True``). Both train equal to one process
  (parameters after 3 SGD-with-momentum steps within relative error 1e-5, fp32), with Ulysses and with hybrid, and
  with the eager (hand-written softmax) attention, where the bias is added to the scores ``[B, H, L_r, L]``.
- A rotary table ``[L, 2d]`` whose width happens to equal the sequence length L (timm ``Eva`` without a class token,
  16 tokens and head dim 8): sliced along its rows, not refused as a mask over token pairs.
- Refused clearly: attention over windows (Swin, SAM), a mask built from the token count a rank sees, Hugging Face
  Swin (a note naming the block and windowed attention).
- ``attention="hybrid"`` builds its mesh by dimension index (torch 2.11's ``DeviceMesh._unflatten`` refuses names).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import Dataset

from tests.dist_utils import run_distributed

SEED, STEPS, BATCH, WORLD = 99, 3, 2, 2
# name -> (attention, tokens in the region)
CASES = {
    "hf_beit_relpos": ("auto", 37),
    "hf_beit_shared_relpos_hybrid": ("hybrid", 37),
    "hf_beit_relpos_eager": ("auto", 37),  # softmax written by hand: the bias is added to the [B, H, L_r, L] scores
    "rope_square_table": ("auto", 16),
}


def build(name: str) -> nn.Module:
    if name == "rope_square_table":
        from tests.test_third_party_models import RopeModel

        return RopeModel()  # head dim 8: rope table [L, 16], and L = 16
    from transformers import BeitConfig, BeitModel

    config = BeitConfig(  # 24 x 24 image, patch 4: 36 patches + CLS = 37 tokens, 4 heads
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=24, patch_size=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, layer_scale_init_value=0.5,
        use_relative_position_bias=name in ("hf_beit_relpos", "hf_beit_relpos_eager"),
        use_shared_relative_position_bias=name == "hf_beit_shared_relpos_hybrid",
    )
    if name == "hf_beit_relpos_eager":
        config._attn_implementation = "eager"
    return BeitModel(config, add_pooling_layer=False)


class Samples(Dataset):
    def __init__(self, name: str, size: int = 12) -> None:
        shape = (16, 6) if name == "rope_square_table" else (3, 24, 24)
        self.x = torch.randn(size, *shape, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"index": i, "x": self.x[i]}


def loss_of(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x) if name == "rope_square_table" else model(pixel_values=x).last_hidden_state
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum(-1).square().mean()


class Module(LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.model, self.seen = name, build(name), []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return loss_of(self.name, self.model, batch["x"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class WindowedSDPA(nn.Module):
    """Attention over windows of 4 tokens (Swin/SAM-style), not over the sequence."""

    def forward(self, x):  # [B, L, 8] -> [B, L, 8]
        B, L, C = x.shape
        w = x.reshape(B * L // 4, 4, 2, C // 2).transpose(1, 2)  # [B * L / 4, 2 heads, 4, 4]
        return F.scaled_dot_product_attention(w, w, w).transpose(1, 2).reshape(B, L, C)


class LocalMaskSDPA(nn.Module):
    """A mask built from the token count the module sees (on one device, the whole sequence; here, one rank's)."""

    def forward(self, x):  # [B, L, 8]
        q = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2).reshape(x.shape)


def refusals() -> dict[str, str]:
    """The messages (with notes) of attention that cannot follow the token sharding, on 2 ranks."""
    import torch.distributed as dist
    from transformers import SwinConfig, SwinModel

    from lightning_seqpar import SequenceParallelPlan, UnsupportedAttentionError, apply_sequence_parallel, infer_plan

    found = {}
    plan = {"0": "shard_input:1, sdpa", "1": "sdpa, gather_output:1"}
    for name, block in (("windowed", WindowedSDPA), ("local_mask", LocalMaskSDPA)):
        model = nn.Sequential(block(), block())
        applied = apply_sequence_parallel(model, SequenceParallelPlan(plan), dist.group.WORLD)
        try:
            model(torch.randn(2, 16, 8))
            found[name] = "no error"
        except UnsupportedAttentionError as error:
            found[name] = str(error)
        applied.remove()
    swin = SwinModel(SwinConfig(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=3, image_size=24,
                                patch_size=4))
    applied = apply_sequence_parallel(swin, infer_plan(swin), dist.group.WORLD)
    try:
        swin(pixel_values=torch.randn(1, 3, 24, 24))
        found["swin"] = "no error"
    except RuntimeError as error:
        found["swin"] = " ".join([str(error), *getattr(error, "__notes__", [])])
    applied.remove()
    return found


def worker() -> dict:
    import os

    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    environment = dict(os.environ)
    results = {}
    for name, (attention, _) in CASES.items():
        os.environ.clear()
        os.environ.update(environment)  # Lightning's teardown deletes WORLD_SIZE
        seed_everything(SEED)
        module = Module(name)
        tokens: set[int] = set()

        def record(trainer_, pl_module, seen=tokens):
            for path, role in trainer_.strategy.applied_plan.resolved:
                if role.kind in ("attention", "sdpa"):
                    pl_module.get_submodule(path).register_forward_pre_hook(
                        lambda m, args, kwargs: seen.add((args[0] if args else next(iter(kwargs.values()))).shape[1]),
                        with_kwargs=True,
                    )

        from lightning.pytorch import Callback

        callback = type("Tokens", (Callback,), {"on_train_start": lambda self, t, m: record(t, m)})()
        trainer = Trainer(
            accelerator="cpu", devices=WORLD, max_steps=STEPS, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
            strategy=SeqParStrategy(sequence_parallel_size=WORLD, attention=attention, timeout=300),
        )
        trainer.fit(module, DataLoader(Samples(name), batch_size=BATCH))
        results[name] = {"final": {k: v.detach().clone() for k, v in module.state_dict().items()},
                         "seen": module.seen, "tokens": sorted(tokens), "attention": trainer.strategy.attention}
    results["refusals"] = refusals()
    return results


def reference(name: str, batches: list[list[int]]) -> dict:
    from lightning.pytorch import seed_everything

    seed_everything(SEED)
    module, data = Module(name), Samples(name)
    optimizer = module.configure_optimizers()
    for indices in batches:
        optimizer.zero_grad()
        loss_of(name, module.model, data.x[indices]).backward()
        optimizer.step()
    return module.state_dict()


def max_relative_error(got: dict, want: dict) -> float:
    errors = [(got[k] - v).norm().item() / max(v.norm().item(), 1e-3) for k, v in want.items() if v.is_floating_point()]
    return max(errors) if all(math.isfinite(e) for e in errors) else math.inf


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_relative_position_biases_and_square_rope_tables_train_equal_to_one_process():
    import transformers

    print("versions:", {"torch": torch.__version__, "transformers": transformers.__version__})
    per_rank = run_distributed("tests.test_attention_bias_models:worker", WORLD, timeout=850)
    for name, (_, length) in CASES.items():
        ranks = [r[name] for r in per_rank]
        assert sum(r["tokens"][0] for r in ranks) == length and all(len(r["tokens"]) == 1 for r in ranks), (
            f"{name}: tokens per rank {[r['tokens'] for r in ranks]} do not split {length}")
        want = reference(name, ranks[0]["seen"])
        for rank, r in enumerate(ranks):
            error = max_relative_error(r["final"], want)
            assert error < 1e-5, f"{name} rank {rank} ({r['attention']}): relative error {error:.2e}"
        print(f"{name}: attention {ranks[0]['attention']}, worst relative error {error:.1e}")
    found = per_rank[0]["refusals"]
    assert "attends over 4 tokens per call" in found["windowed"] and "windowed attention" in found["windowed"]
    assert "must cover the whole sequence" in found["local_mask"], found["local_mask"]
    assert "encoder.layers.0 raised this inside the sequence-parallel region" in found["swin"], found["swin"]
    assert "Swin's windowed" in found["swin"]


def test_hybrid_mesh_names_the_sp_dimension_by_index(monkeypatch, group):
    """torch 2.11's ``DeviceMesh._unflatten`` refuses a dimension given by name (its check is inverted), so
    ``attention="hybrid"`` (and "auto" choosing it) stopped at setup on torch 2.11 with "dim sp specified in
    `_unflatten` is not in ('pp', 'dp', 'sp', 'tp')". Reproduced here on any torch by refusing names the same way."""
    from torch.distributed.device_mesh import DeviceMesh

    from lightning_seqpar.topology import ParallelDims, Topology

    real = DeviceMesh._unflatten

    def torch_2_11_unflatten(self, dim, *args, **kwargs):
        if isinstance(dim, str):
            raise ValueError(f"dim {dim} specified in `_unflatten` is not in {self.mesh_dim_names}")
        return real(self, dim, *args, **kwargs)

    monkeypatch.setattr(DeviceMesh, "_unflatten", torch_2_11_unflatten)
    topology = Topology(ParallelDims(world_size=1, sequence_parallel_size=1))
    assert topology.hybrid_mesh(1).mesh_dim_names == ("pp", "dp", "ring", "ulysses", "tp")


class DropPathBlock(nn.Module):
    """Attention, then a stochastic-depth branch of ones: its output is 0 (dropped) or 1 / keep (kept) per sample."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.beit.modeling_beit import BeitDropPath

        self.qkv, self.drop_path = nn.Linear(8, 8), BeitDropPath(0.5)

    def forward(self, x):  # [B, L, 8]
        q = self.qkv(x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
        x = x + F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(x.shape)
        return x + self.drop_path(torch.ones_like(x))


def drop_path_worker() -> dict:
    """The per-token branch values each drop path produced, gathered over the group, in training mode."""
    import torch.distributed as dist

    from lightning_seqpar import apply_sequence_parallel, infer_plan
    from tests.dist_utils import init_gloo

    init_gloo()
    torch.manual_seed(3 + dist.get_rank())  # the ranks' streams differ, as they do inside the region anyway
    model = nn.Sequential(DropPathBlock(), DropPathBlock()).train()
    branches: list[torch.Tensor] = []
    for block in model:
        block.drop_path.register_forward_hook(lambda m, args, out: branches.append(out[..., 0].detach()))
    applied = apply_sequence_parallel(model, infer_plan(model), dist.group.WORLD)
    model(torch.randn(16, 9, 8)).sum().backward()
    applied.remove()
    gathered = []
    for branch in branches:  # [B, L_r]: rank 0 holds 5 tokens, rank 1 holds 4
        parts = [torch.zeros(16, 5) for _ in range(WORLD)]
        dist.all_gather(parts, F.pad(branch, (0, 5 - branch.shape[1])))  # gloo gathers equal shapes: pad to 5
        gathered.append(torch.cat([parts[0], parts[1][:, :4]], dim=1))  # [B, L]
    return {"branches": gathered}


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_drop_path_draws_agree_across_the_sequence_parallel_group():
    """Stochastic depth keeps or drops a whole sample's branch: every token of a sample, on every rank, must see the
    same draw (before the fix each rank drew from its own stream: about half the samples were split)."""
    per_rank = run_distributed("tests.test_attention_bias_models:drop_path_worker", WORLD, timeout=250)
    for branch in per_rank[0]["branches"]:
        per_sample = branch[:, :1].expand_as(branch)
        assert torch.equal(branch, per_sample), f"a sample's tokens disagree on its drop-path draw:\n{branch}"
        assert 0 < (branch[:, 0] == 0).sum() < 16  # some samples dropped, some kept: the draw is random
