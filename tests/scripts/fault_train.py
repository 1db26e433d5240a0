"""Train for two epochs under SeqParStrategy with a checkpoint per epoch; optionally kill one rank mid-run.

Used by tests/test_reliability.py through torchrun:
    FAULT_KILL_RANK=1 FAULT_KILL_STEP=6 torchrun --nproc_per_node 2 fault_train.py OUT_DIR
A relaunch of the same command (without the FAULT_KILL_ variables) resumes from OUT_DIR/last.ckpt.
FAULT_ZERO_STAGE=3 trains with DeepSpeed ZeRO-3 (last.ckpt is then a directory of shards).
"""

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Subset

from lightning_seqpar import SeqParStrategy
from tests.models import RandomTokens, RegressionModule


class KillAt(Callback):
    """Kill this process (no clean-up, as a lost node would) before the given global step."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(17)


def main() -> None:
    out = Path(sys.argv[1])
    seed_everything(7)
    callbacks = [ModelCheckpoint(dirpath=out, save_last=True, every_n_epochs=1, save_top_k=-1)]
    if "FAULT_KILL_RANK" in os.environ:
        callbacks.append(KillAt(int(os.environ["FAULT_KILL_RANK"]), int(os.environ["FAULT_KILL_STEP"])))
    trainer = Trainer(
        accelerator="cpu",
        devices=int(os.environ["WORLD_SIZE"]),
        strategy=SeqParStrategy(
            timeout=float(os.environ.get("FAULT_TIMEOUT", "30")),
            zero_stage=int(os.environ.get("FAULT_ZERO_STAGE", "0")),
        ),
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    module = RegressionModule()
    last = out / "last.ckpt"
    trainer.fit(
        module,
        DataLoader(Subset(RandomTokens(), range(8)), batch_size=2),
        ckpt_path=str(last) if last.exists() else None,
    )
    weights = trainer.strategy.full_state_dict()  # gathers ZeRO-3 partitions: every rank takes part
    if trainer.is_global_zero:
        torch.save(weights, out / "final_weights.pt")


if __name__ == "__main__":
    main()
