"""ReduceLROnPlateau under SeqParStrategy when the ranks see different values of the monitored metric (logged without
``sync_dist``): every rank must cut its learning rate on the same value, the world's mean, as one device seeing all
the data would. Before, each rank stepped on its own value: here rank 0's metric keeps improving and rank 1's never
does, so rank 1 alone halved its learning rate and the replicas trained apart, silently.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from tests.dist_utils import run_distributed
from tests.models import RandomTokens, TinyViT

EPOCHS, LR = 4, 0.1


class PlateauModule(LightningModule):
    """A small ViT; ``val_metric`` is ``10 - epoch`` on rank 0 and ``epoch`` on rank 1 (mean 5: a plateau)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyViT()

    def training_step(self, batch, batch_idx):
        return (self.model(batch["x"]) - batch["y"]).square().mean()

    def validation_step(self, batch, batch_idx):
        epoch = float(self.current_epoch)
        self.log("val_metric", epoch if self.global_rank else 10.0 - epoch)  # no sync_dist: per-rank values

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val_metric"}}


def worker(zero_stage: int) -> dict:
    from lightning.pytorch import Trainer

    from lightning_seqpar import SeqParStrategy

    data = RandomTokens(size=8)
    module = PlateauModule()
    trainer = Trainer(
        accelerator="cpu", devices=2, max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        strategy=SeqParStrategy(sequence_parallel_size=2, zero_stage=zero_stage, timeout=300),
    )
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    return {"lrs": [group["lr"] for group in trainer.optimizers[0].param_groups],
            "weights": {k: v.detach().clone() for k, v in module.state_dict().items()}}


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("zero_stage", [0, 1])  # the DDP path and DeepSpeed ZeRO
def test_reduce_lr_on_plateau_steps_on_the_same_value_on_every_rank(zero_stage):
    per_rank = run_distributed("tests.test_scheduler_decisions:worker", 2, timeout=500, zero_stage=zero_stage)
    # One device on the mean (5 every epoch): best after epoch 0, no improvement after epochs 1, 2, 3 -> 3 halvings.
    expected = LR * 0.5 ** (EPOCHS - 1)
    for rank, result in enumerate(per_rank):
        assert result["lrs"] == pytest.approx([expected]), f"rank {rank}: learning rates {result['lrs']}"
    torch.testing.assert_close(per_rank[0]["weights"], per_rank[1]["weights"], rtol=0, atol=0)
