"""A run stopped by ``max_steps`` in the middle of an epoch, resumed from the checkpoint written as it stopped
(``ModelCheckpoint(save_last=True)``), trains the same batches as the uninterrupted run: the rest of the stopped
epoch, then the next epoch from its first batch (Lightning counts that epoch as processed; before the fix the resumed
run started the next epoch and also skipped its first batches). CPU, gloo, 2 data-parallel ranks."""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed


def worker(directory: str) -> dict:
    import os
    import shutil

    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy
    from tests.test_tensor_parallel_strategy import TensorParallelModule
    from tests.tp_workers import dataset

    def fit(steps: int, ckpt: str | None, root: str) -> list[list[int]]:
        seed_everything(0)
        module = TensorParallelModule()
        trainer = Trainer(accelerator="cpu", devices=2, max_steps=steps, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=root, save_last=True)],
                          strategy=SeqParStrategy(sequence_parallel_size=1, timeout=300))
        trainer.fit(module, DataLoader(dataset("block"), batch_size=8, shuffle=True), ckpt_path=ckpt)
        return module.seen

    full = fit(7, None, os.path.join(directory, "full"))  # 64 samples / (8 x 2 ranks): 4 batches an epoch
    first = fit(3, None, os.path.join(directory, "first"))
    stopped = os.path.join(directory, f"stopped{os.environ['RANK']}.ckpt")
    shutil.copy(os.path.join(directory, "first", "last.ckpt"), stopped)  # the resumed run writes last.ckpt again
    resumed = fit(7, stopped, os.path.join(directory, "resumed"))
    return {"full": full, "first": first, "resumed": resumed}


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_resume_after_a_max_steps_stop_continues_the_stopped_epoch(tmp_path):
    for rank in run_distributed("tests.test_resume_max_steps:worker", 2, timeout=540, directory=str(tmp_path)):
        assert len(rank["full"]) == 7 and len(rank["first"]) == 3 and len(rank["resumed"]) == 4
        assert rank["first"] + rank["resumed"] == rank["full"], rank
