"""Hugging Face CLIP and SigLIP vision towers under tensor parallelism through the strategy line, against one process.

Their blocks name the attention ``self_attn`` with ``q_proj/k_proj/v_proj/out_proj`` (not Llama's ``o_proj``), which
the plan took for torch's ``nn.MultiheadAttention`` ("MultiheadAttentionParallel needs an nn.MultiheadAttention, got
CLIPAttention"; found by a new user's trial). CPU, gloo, 2 ranks (tp 2, Megatron-LM sequence parallelism: 17 and 16
tokens over 2 ranks), width 32, 4 heads, depth 2, 2 samples per step, SGD with momentum, 3 steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from tests.dist_utils import run_distributed

SEED, STEPS, BATCH, TOLERANCE = 1234, 3, 2, 1e-5
TOWERS = {"clip": 17, "siglip": 16}  # tokens: CLIP adds a class token to the 16 patches, SigLIP does not


class Tower(LightningModule):
    """A CLIP or SigLIP vision tower (random weights) and a per-token linear head, MSE."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        import transformers

        torch.manual_seed(SEED)
        common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                      patch_size=4, num_channels=3)
        if kind == "clip":
            self.tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
        else:
            self.tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
        self.head = nn.Linear(32, 3)
        self.seen: list[list[int]] = []

    def model(self, x):  # [B, 3, 16, 16] -> [B, L, 3]
        return self.head(self.tower(pixel_values=x).last_hidden_state)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return F.mse_loss(self.model(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data(kind: str):
    from tests.models import RandomTokens

    return RandomTokens(x_shape=(3, 16, 16), y_shape=(TOWERS[kind], 3))


def towers_worker() -> dict:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    torch.set_num_threads(1)
    out = {}
    for kind in TOWERS:
        module = Tower(kind)
        trainer = Trainer(accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          strategy=SeqParStrategy(tensor_parallel_size=2, sequence_parallel_size=1, timeout=300))
        trainer.fit(module, DataLoader(data(kind), batch_size=BATCH))
        split = sorted(n for n, p in module.named_parameters() if type(p).__name__ == "DTensor")
        out[kind] = {"seen": module.seen, "final": trainer.strategy.full_state_dict(), "split": split}
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_clip_and_siglip_towers_under_tensor_parallelism_equal_one_process():
    from tests.reference import train_single_process
    from tests.test_tensor_parallel import max_rel_error

    pytest.importorskip("transformers")
    per_rank = run_distributed("tests.test_trial21_hf_towers:towers_worker", 2, timeout=800)
    for kind in TOWERS:
        ranks = [r[kind] for r in per_rank]
        assert any(n.endswith("self_attn.out_proj.weight") for n in ranks[0]["split"]), ranks[0]["split"]
        assert ranks[0]["seen"] == ranks[1]["seen"]
        reference = train_single_process(lambda kind=kind: Tower(kind), ranks[0]["seen"], data(kind), seed=None)
        for rank, r in enumerate(ranks):
            err, key = max_rel_error(r["final"], reference.state)
            assert err < TOLERANCE, f"{kind} rank {rank}: {key} off by relative error {err:.2e}"
