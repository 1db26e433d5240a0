"""Weights-only checkpoints of the FSDP2 engine (``trainer.save_checkpoint(path, weights_only=True)``,
``ModelCheckpoint(save_weights_only=True)``).

Fault this guards (found by a new user's trial): the engine wrote the optimizer's shards into every checkpoint
directory, weights-only ones too (with AdamW twice the model's size again). Now a weights-only directory holds the
model's shards only; ``validate(ckpt_path=...)`` loads its weights exactly, and resuming ``fit`` from it stops in
Lightning's own check that names ``save_weights_only``. CPU, gloo, 2 ranks (FSDP2 over 2), the bundled-Block ViT,
AdamW, 1 step.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed


def weights_only_worker(directory: str) -> dict:
    import os

    import torch.distributed.checkpoint as dcp
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy
    from tests.test_tensor_parallel_strategy import TensorParallelModule
    from tests.tp_workers import dataset

    torch.set_num_threads(1)

    class AdamWModule(TensorParallelModule):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def trainer(steps: int = 1) -> Trainer:
        return Trainer(accelerator="cpu", devices=2, max_steps=steps, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False,
                       strategy=SeqParStrategy(fsdp=True, sequence_parallel_size=1, timeout=300))

    loader = DataLoader(dataset("block"), batch_size=2)
    fitted = trainer()
    module = AdamWModule()
    fitted.fit(module, loader)
    weights, full = os.path.join(directory, "weights"), os.path.join(directory, "full")
    fitted.save_checkpoint(weights, weights_only=True)
    fitted.save_checkpoint(full)
    keys = {name: sorted(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
            for name, path in (("weights", weights), ("full", full))}
    evaluator = trainer()
    fresh = AdamWModule()
    evaluator.validate(fresh, loader, ckpt_path=weights)
    try:
        trainer(2).fit(AdamWModule(), loader, ckpt_path=weights)
        resumed = None
    except Exception as error:  # noqa: BLE001 - the test asserts on it
        resumed = f"{type(error).__name__}: {error}"
    return {"keys": keys, "trained": fitted.strategy.full_state_dict(),
            "loaded": evaluator.strategy.full_state_dict(), "resumed": resumed}


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_weights_only_fsdp2_checkpoint_holds_the_model_only(tmp_path):
    per_rank = run_distributed("tests.test_trial21_weights_only:weights_only_worker", 2, timeout=800,
                               directory=str(tmp_path))
    for r in per_rank:
        assert not any(k.startswith("optimizer") for k in r["keys"]["weights"]), r["keys"]["weights"][:5]
        assert any(k.startswith("optimizer") for k in r["keys"]["full"])
        assert all(torch.equal(r["loaded"][k], v) for k, v in r["trained"].items())
        assert r["resumed"] is not None and "save_weights_only" in r["resumed"], r["resumed"]
