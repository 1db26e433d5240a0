"""`seqpar fit` on 2 CPU processes that Lightning launches itself: when a rank fails after the process group is up,
the last thing printed is the error of the rank that failed first, not another rank's `Connection closed by peer`;
`seqpar predict` writes one forecast file from the ranks' forecasts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from lightning.pytorch.callbacks import Callback

from tests.dist_utils import REPO_ROOT, free_port
from tests.weather.test_cli import TINY

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(900)]


class FailOnRank(Callback):
    """Raises on one rank when training starts (after DDP setup), as a data or model error on one rank would."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank}")


def _seqpar_two_ranks(tmp_path: Path, subcommand: str, *args: str, **trainer_options) -> subprocess.CompletedProcess:
    """`seqpar SUBCOMMAND` on TINY with 2 processes (Ulysses over 2 ranks) that Lightning starts itself."""
    trainer = dict(TINY["trainer"], devices=2, strategy={"class_path": "lightning_seqpar.SeqParStrategy",
                                                         "init_args": {"timeout": 120}}, **trainer_options)
    config = tmp_path / f"{subcommand}.yaml"
    config.write_text(yaml.safe_dump(dict(TINY, trainer=trainer)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "SEQPAR_FAILURE_DIR"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "lightning_seqpar.weather.cli", subcommand, "--config", str(config), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _fit_two_ranks(tmp_path: Path, failing_rank: int) -> subprocess.CompletedProcess:
    return _seqpar_two_ranks(
        tmp_path,
        "fit",
        max_steps=2,
        val_check_interval=2,
        num_sanity_val_steps=0,
        callbacks=[{"class_path": "tests.weather.test_cli_launch.FailOnRank", "init_args": {"rank": failing_rank}}],
    )


def test_first_failing_rank_is_printed_last(tmp_path):
    """Rank 0 fails first; rank 1 would print gloo's `Connection closed by peer` after it. (Rank 1 failing first goes
    through the same records: tests/weather/test_cli.py::test_failure_records_pick_the_first_rank.)"""
    failing_rank = 0
    proc = _fit_two_ranks(tmp_path, failing_rank)
    assert proc.returncode != 0
    tail = proc.stderr.strip().splitlines()[-1]
    assert tail == f"RuntimeError: injected failure on rank {failing_rank}", proc.stderr[-3000:]
    assert "seqpar: rank 0 failed first (of 2 ranks); its error:" in proc.stderr
    assert "Connection closed by peer" not in proc.stderr.split("its error:")[-1]


def test_fit_then_predict_on_two_ranks_writes_one_forecast_file(tmp_path):
    """fit ends on rank 0 alone (no collective after the other rank has left); both ranks of the sequence-parallel
    group forecast the same samples, and rank 0 gathers and writes them once."""
    fit = _seqpar_two_ranks(tmp_path, "fit", max_steps=1, val_check_interval=1)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "seqpar: run written to runs/lightning_logs/version_0" in fit.stdout
    proc = _seqpar_two_ranks(tmp_path, "predict", "--ckpt_path", "last", limit_predict_batches=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seqpar: --ckpt_path last -> runs/lightning_logs/version_0/checkpoints/" in proc.stderr
    forecasts = xr.open_dataset(tmp_path / "runs/lightning_logs/version_1/forecasts.nc")
    assert list(forecasts.data_vars) == ["geopotential_500"]  # TINY's one output field
    assert forecasts["geopotential_500"].shape == (12, 1, 8, 16)  # 3 batches of 4 initial times, once each
    assert np.isfinite(forecasts["geopotential_500"].values).all()
    assert (np.diff(forecasts["time"].values) == np.timedelta64(24, "h")).all()
