"""The multi-GPU benchmark and its scaling report run end to end in smoke mode on the CPU (gloo), so they work
when a multi-GPU machine is available."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.dist_utils import REPO_ROOT, free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


def _bench(out, nproc, tag, sections, attention=("ulysses", "lss")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(REPO_ROOT / "benchmarks" / "bench_multi_gpu.py"), "--smoke", "--out", str(out), "--tag", tag,
           "--sections", sections, "--attention", *attention]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / f"multi_gpu_{tag}.json").read_text())


def test_weak_scaling_smoke_and_report(tmp_path):
    single = _bench(tmp_path, 1, "n1", "weak")
    multi = _bench(tmp_path, 2, "n2", "weak,profile")
    assert [r["status"] for r in multi["results"]] == ["ok"] * 4
    weak = [r for r in multi["results"] if r["section"] == "weak"]
    assert {(r["attention"], r["sp"], r["dp"], r["length"]) for r in weak} == {("ulysses", 2, 1, 32), ("lss", 2, 1, 32)}
    assert all(r["tokens_per_s"] > 0 and len(r["step_ms_all"]) == 2 for r in weak)
    profiled = [r for r in multi["results"] if r["section"] == "profile"]
    assert all(r["comm_ms"] > 0 for r in profiled)  # gloo collectives were seen by the profiler
    report = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "scaling_report.py"),
                             str(tmp_path / "multi_gpu_n1.json"), str(tmp_path / "multi_gpu_n2.json")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "| ulysses | 2 | 2 x 1 |" in report.stdout and "| lss | 2 | 2 x 1 |" in report.stdout
    assert (tmp_path / "multi_gpu_n2_scaling.md").exists() and (tmp_path / "multi_gpu_n2_scaling.png").exists()
    assert single["results"][0]["world"] == 1
