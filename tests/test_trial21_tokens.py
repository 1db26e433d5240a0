"""tp 2 x sp 2 with a sequence too short for both splits, through the strategy line (4 gloo ranks).

Fault this guards (found by a new user's trial): 3 tokens split over sp as 2 and 1, then over tp: the second sp
rank's single token leaves one of its tp ranks empty. Only those two ranks raised (the per-rank check at the first
block); the other two waited in the attention's collectives and failed with gloo's "Connection closed by peer" (on
NCCL: a hang until the timeout). Now every rank checks the whole layout where the sequence is split over sp and
raises the same TensorParallelError. 5 tokens (3 and 2, then 2 + 1 and 1 + 1) still train.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.dist_utils import run_distributed


def tokens_worker() -> dict:
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_seqpar import SeqParStrategy
    from lightning_seqpar.weather.models.layers import Block

    torch.set_num_threads(1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.blocks = nn.Linear(6, 16), nn.ModuleList(Block(16, 4, mlp_ratio=2.0) for _ in range(2))

        def forward(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            return x

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Net()

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    out = {}
    for tokens in (3, 5):
        g = torch.Generator().manual_seed(0)  # the same samples on every rank
        data = TensorDataset(torch.randn(4, tokens, 6, generator=g), torch.randn(4, tokens, 16, generator=g))
        trainer = Trainer(accelerator="cpu", devices=4, max_steps=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          strategy=SeqParStrategy(tensor_parallel_size=2, sequence_parallel_size=2,
                                                  attention="ulysses", timeout=120))
        try:
            trainer.fit(Module(), DataLoader(data, batch_size=2))
            out[tokens] = None
        except Exception as error:  # noqa: BLE001 - the test asserts on what each rank raised
            out[tokens] = (type(error).__name__, str(error))
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_too_few_tokens_for_tp_times_sp_is_refused_on_every_rank():
    per_rank = run_distributed("tests.test_trial21_tokens:tokens_worker", 4, timeout=800)
    for rank, raised in enumerate(per_rank):
        assert raised[5] is None, (rank, raised[5])
        kind, message = raised[3]
        assert kind == "TensorParallelError", (rank, kind, message)
        assert "as [2, 1]" in message and "[[1, 1], [1, 0]]" in message and "at least 4 tokens" in message, message
