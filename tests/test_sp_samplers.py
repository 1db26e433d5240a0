"""The ranks of a sequence-parallel group see the same batches, whatever sampler the user hands in.

One launch of 2 processes (sp 2, dp 1): a user's ``DistributedSampler(ds)`` (keyed to the global rank) is re-keyed
to the data-parallel rank and training equals one process on the same samples; a sampler class that cannot be
rebuilt is refused by name; loaders of different lengths or different contents on the two ranks fail with an
error naming the ranks instead of mixing samples or hanging until the collective timeout.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from tests.dist_utils import init_gloo, run_distributed
from tests.models import RandomTokens, RegressionModule, train_reference

SEED = 11
_WORLD = int(os.environ.get("WORLD_SIZE", 1))


class RankSampler(DistributedSampler):
    """A user's own DistributedSampler subclass (it may add state the strategy cannot rebuild)."""


def _trainer(tmp, **kwargs):
    from lightning.pytorch import Trainer

    from lightning_seqpar import SeqParStrategy

    return Trainer(accelerator="cpu", devices=_WORLD, strategy=SeqParStrategy(sequence_parallel_size=2, timeout=300),
                   default_root_dir=tmp, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, **kwargs)


def _error(run) -> str | None:
    try:
        run()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def sampler_worker(tmp: str) -> dict:
    from lightning.pytorch import seed_everything

    init_gloo()  # the user's DistributedSampler(ds) reads the world from the process group; the Trainer reuses it
    rank = int(os.environ["RANK"])
    data = RandomTokens(size=16)
    out: dict = {}

    seed_everything(SEED)
    module = RegressionModule()
    _trainer(tmp, max_steps=3, num_sanity_val_steps=0).fit(
        module, DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=True, seed=5)))
    out["rekeyed"] = {"seen": module.seen, "final": {k: v.clone() for k, v in module.state_dict().items()}}

    out["subclass"] = _error(lambda: _trainer(tmp, max_steps=1).fit(
        RegressionModule(), DataLoader(data, batch_size=2, sampler=RankSampler(data))))
    # The validation set of rank 1 is one sample longer: the loaders' lengths differ (Lightning would hang).
    out["lengths"] = _error(lambda: _trainer(tmp).validate(
        RegressionModule(), DataLoader(Subset(data, range(4 + rank)), batch_size=1), verbose=False))
    # Same length, different samples (a per-rank dataset): caught by the first batch's checksum.
    out["contents"] = _error(lambda: _trainer(tmp, max_steps=1).fit(
        RegressionModule(), DataLoader(RandomTokens(size=8, seed=rank), batch_size=2)))
    return out


@pytest.fixture(scope="module")
def sampler_runs(tmp_path_factory):
    return run_distributed(
        "tests.test_sp_samplers:sampler_worker", 2, timeout=400, tmp=str(tmp_path_factory.mktemp("samplers"))
    )


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_user_distributed_sampler_is_rekeyed_to_the_data_parallel_rank(sampler_runs):
    seen = [r["rekeyed"]["seen"] for r in sampler_runs]
    assert seen[0] == seen[1], "the two ranks of the SP group trained on different samples"
    order = list(DistributedSampler(RandomTokens(size=16), num_replicas=1, rank=0, shuffle=True, seed=5))
    assert [i for batch in seen[0] for i in batch] == order[:6]  # the user's shuffle and seed, over dp = 1
    reference = train_reference("timm_vit", SEED, seen[0], RandomTokens(size=16))
    for r in sampler_runs:
        for key, expected in reference.items():
            if not key.startswith("samples"):
                torch.testing.assert_close(r["rekeyed"]["final"][key], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_disagreeing_loaders_fail_with_the_ranks_named(sampler_runs):
    for r in sampler_runs:
        assert r["subclass"] is not None and r["subclass"].startswith("SamplerLayoutError"), r["subclass"]
        assert "RankSampler(num_replicas=2" in r["subclass"] and "distributed_sampler_kwargs" in r["subclass"]
        assert "SamplerLayoutError" in r["lengths"] and "different lengths" in r["lengths"], r["lengths"]
        assert "global rank 0: [4]" in r["lengths"] and "global rank 1: [5]" in r["lengths"]
        assert "SamplerLayoutError" in r["contents"] and "different batches" in r["contents"], r["contents"]
        assert "global rank 0" in r["contents"] and "global rank 1" in r["contents"]


def test_rekey_keeps_shuffle_seed_and_batches():
    from lightning_seqpar.sampling import SamplerLayoutError, rekey_sampler

    data = RandomTokens(size=10)
    loader = DataLoader(
        data,
        batch_size=3,
        drop_last=True,
        sampler=DistributedSampler(data, num_replicas=4, rank=3, shuffle=True, seed=2),
    )
    rekeyed = rekey_sampler(loader, num_replicas=2, rank=1)
    sampler = rekeyed.batch_sampler.sampler
    assert (sampler.num_replicas, sampler.rank, sampler.shuffle, sampler.seed) == (2, 1, True, 2)
    assert rekeyed.batch_size == 3 and rekeyed.drop_last
    assert rekey_sampler(rekeyed, 2, 1) is rekeyed  # already keyed to the data-parallel rank
    with pytest.raises(SamplerLayoutError, match=r"RankSampler\(num_replicas=4, rank=3\) is keyed to the global rank"):
        rekey_sampler(DataLoader(data, sampler=RankSampler(data, num_replicas=4, rank=3)), 2, 1)
