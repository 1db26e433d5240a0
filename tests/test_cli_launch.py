"""`seqpar fit` on 2 CPU processes that Lightning launches itself: when a rank fails after the process group is up,
the last thing printed is the error of the rank that failed first, not another rank's `Connection closed by peer`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from tests.dist_utils import REPO_ROOT, free_port
from tests.test_cli import TINY

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(900)]


class FailOnRank(Callback):
    """Raises on one rank when training starts (after DDP setup), as a data or model error on one rank would."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank}")


def _fit_two_ranks(tmp_path: Path, failing_rank: int) -> subprocess.CompletedProcess:
    trainer = dict(TINY["trainer"], devices=2, max_steps=2, val_check_interval=2, num_sanity_val_steps=0,
                   strategy={"class_path": "lightning_seqpar.SeqParStrategy", "init_args": {"timeout": 120}},
                   callbacks=[{"class_path": "tests.test_cli_launch.FailOnRank", "init_args": {"rank": failing_rank}}])
    config = tmp_path / f"fail{failing_rank}.yaml"
    config.write_text(yaml.safe_dump(dict(TINY, trainer=trainer)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "SEQPAR_FAILURE_DIR"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "lightning_seqpar.cli", "fit", "--config", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def test_first_failing_rank_is_printed_last(tmp_path):
    """Rank 0 fails first; rank 1 would print gloo's `Connection closed by peer` after it. (Rank 1 failing first goes
    through the same records: tests/test_cli.py::test_failure_records_pick_the_first_rank.)"""
    failing_rank = 0
    proc = _fit_two_ranks(tmp_path, failing_rank)
    assert proc.returncode != 0
    tail = proc.stderr.strip().splitlines()[-1]
    assert tail == f"RuntimeError: injected failure on rank {failing_rank}", proc.stderr[-3000:]
    assert "seqpar: rank 0 failed first (of 2 ranks); its error:" in proc.stderr
    assert "Connection closed by peer" not in proc.stderr.split("its error:")[-1]
