"""Resumable data loaders: the position in the epoch survives state_dict/load_state_dict, nothing else changes."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lightning_seqpar.resumable import ResumableDataLoader, make_resumable


def _loader(num_workers=0):
    data = TensorDataset(torch.arange(20))
    sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    return DataLoader(data, batch_size=3, sampler=sampler, num_workers=num_workers)


def _epoch(loader, epoch):
    loader.batch_sampler.sampler.set_epoch(epoch)
    return [b[0].tolist() for b in loader]


def test_same_batches_as_the_plain_loader():
    plain, resumable = _loader(), make_resumable(_loader())
    assert isinstance(resumable, ResumableDataLoader) and len(resumable) == len(plain) == 4
    for epoch in range(2):
        assert _epoch(resumable, epoch) == _epoch(plain, epoch)


def test_resume_continues_with_the_next_batch():
    full = _epoch(make_resumable(_loader()), 1)
    first = make_resumable(_loader())
    first.batch_sampler.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it)[0].tolist(), next(it)[0].tolist()]
    state = first.state_dict()
    assert state == {"batches_served": 2, "samples_per_batch": 6, "epoch": 1}
    second = make_resumable(_loader())
    second.load_state_dict(state)
    rest = _epoch(second, 1)
    assert seen + rest == full
    assert _epoch(second, 2) == _epoch(make_resumable(_loader()), 2)  # the skip applies once


def test_a_position_of_another_epoch_is_not_skipped():
    """Lightning ends the epoch when fit stops at max_steps mid-epoch and resumes at the next one: the position of
    the stopped epoch must not skip the first batches of the new epoch (they were never seen); a warning says the
    rest of the stopped epoch is not trained."""
    import pytest

    first = make_resumable(_loader())
    first.batch_sampler.sampler.set_epoch(0)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches_served"] == 2
    second = make_resumable(_loader())
    second.load_state_dict(state)
    with pytest.warns(UserWarning, match="2 batches of epoch 0, whose other batches are not trained"):
        epoch1 = _epoch(second, 1)
    assert epoch1 == _epoch(make_resumable(_loader()), 1)  # the whole of epoch 1, from its first batch
    assert second.state_dict()["batches_served"] == len(epoch1) and second.state_dict()["epoch"] == 1


def test_a_finished_epoch_skips_nothing_of_the_next():
    """A checkpoint written at the end of an epoch holds the whole epoch's count: the next epoch starts at its first
    batch, silently."""
    import warnings

    first = make_resumable(_loader())
    whole = _epoch(first, 0)
    state = first.state_dict()
    assert state["batches_served"] == len(whole) and state["epoch"] == 0
    second = make_resumable(_loader())
    second.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _epoch(second, 1) == _epoch(make_resumable(_loader()), 1)


def test_position_counts_delivered_batches_with_workers():
    loader = make_resumable(_loader(num_workers=2))
    loader.batch_sampler.sampler.set_epoch(0)
    it = iter(loader)
    next(it)
    assert loader.state_dict()["batches_served"] == 1  # prefetched batches are not counted


class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(4)


def test_loaders_that_cannot_be_rebuilt_are_left_alone():
    stream = DataLoader(_Stream(), batch_size=2)
    assert make_resumable(stream) is stream


def _dp_loader(num_replicas, rank, batch_size):
    data = TensorDataset(torch.arange(24))
    sampler = DistributedSampler(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=4)
    return make_resumable(DataLoader(data, batch_size=batch_size, sampler=sampler))


def test_position_moves_in_samples_to_another_data_parallel_size():
    import pytest

    # 2 batches of 4 on one replica, then 2 replicas with 2 samples each: they continue after sample 8 of the order.
    first = _dp_loader(1, 0, 4)
    order = [i for b in _epoch(first, 0) for i in b]
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state == {"batches_served": 2, "samples_per_batch": 4, "epoch": 0}
    rest = []
    for rank in range(2):
        loader = _dp_loader(2, rank, 2)
        loader.load_state_dict(state)
        rest += [i for b in _epoch(loader, 0) for i in b]
    assert sorted(rest) == sorted(order[8:])
    odd = _dp_loader(1, 0, 3)
    with pytest.raises(
        ValueError, match="after 8 samples of the epoch .* not a whole number of this run's batches of 3"
    ):
        odd.load_state_dict(state)
