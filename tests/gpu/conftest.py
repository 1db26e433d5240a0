"""GPU tier: a one-rank NCCL process group shared by the tests of this folder (skipped without CUDA)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="session")
def nccl_group():
    """The world group of a one-process NCCL job on cuda:0 (NCCL refuses two ranks on one GPU, so one rank)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
