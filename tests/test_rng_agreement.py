"""The ranks of a sequence-parallel group draw the same random numbers outside the region at every step, also after
code that draws on some ranks only.

Hugging Face ViTMAE draws its random mask before the first block (outside the region, replicated on every rank); a
callback that draws random numbers on rank 0 only (a visualisation callback sampling images, say) moved rank 0's
stream ahead, so from the next step on each rank masked the sample differently and sharded a different token set:
silently wrong training. Checked: the masks (``ids_restore``) every rank drew at every step are identical, and the
parameters after 4 SGD steps equal single-process training replaying rank 0's masks (relative error 1e-5, fp32).
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from tests.dist_utils import run_distributed
from tests.test_third_party_models import Samples, ThirdPartyModule, _max_rel_error, train_reference

STEPS, WORLD = 4, 2


class RankZeroDraws(Callback):
    """Draws random numbers on global rank 0 only, after every training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 0:
            torch.rand(7)


def worker() -> dict:
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    from lightning_seqpar import SeqParStrategy

    seed_everything(4321)
    module = ThirdPartyModule("hf_vitmae")
    trainer = Trainer(
        accelerator="cpu", devices=WORLD, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[RankZeroDraws()],
        strategy=SeqParStrategy(sequence_parallel_size=WORLD, timeout=300),
    )
    trainer.fit(module, DataLoader(Samples("hf_vitmae"), batch_size=2))
    return {"masks": module.masks, "seen": module.seen,
            "final": {k: v.detach().clone() for k, v in module.state_dict().items()}}


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_rank_zero_only_draws_do_not_split_the_group_random_state():
    ranks = run_distributed("tests.test_rng_agreement:worker", WORLD, timeout=500)
    assert len(ranks[0]["masks"]) == STEPS
    for step, (a, b) in enumerate(zip(ranks[0]["masks"], ranks[1]["masks"])):
        assert torch.equal(a, b), f"step {step}: the ranks drew different ViTMAE masks for the same sample"
    want = train_reference("hf_vitmae", ranks[0]["seen"], ranks[0]["masks"])
    for rank, result in enumerate(ranks):
        error, key = _max_rel_error(result["final"], want)
        assert error < 1e-5, f"rank {rank}: {key} off by relative error {error:.2e}"
