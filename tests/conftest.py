"""Fixtures shared by the CPU tests."""

from __future__ import annotations

import datetime
import tempfile

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def group():
    """A one-rank gloo world group (file rendezvous, 30 s timeout) for tests that call collectives in-process."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group(
            "gloo", init_method=f"file://{f.name}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
        )
        yield dist.group.WORLD
        dist.destroy_process_group()
