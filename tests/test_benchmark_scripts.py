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


def test_single_gpu_benchmark_smoke(tmp_path):
    """The single-GPU benchmark's smoke mode runs on the CPU: plain and strategy paths (several Trainer fits in one
    process), the distributed attention kinds and the memory ladder, and renders its tables and plot."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_single_gpu.py"), "--smoke", "--out", str(tmp_path),
           "--sections", "speed,attention-kinds,ladder"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "single_gpu.json").read_text())
    trials = results["trials"]
    assert trials and all(t["status"] == "ok" for t in trials), [(t["mode"], t["note"]) for t in trials if t["status"] != "ok"]
    modes = {t["mode"] for t in trials}
    assert {"plain", "strategy", "plain+compile", "strategy+compile", "strategy-lss", "strategy-ring", "strategy-hybrid"} <= modes
    # every strategy trial trained: same loss as its neighbours (same seed and data), not a skipped fit
    assert all(t["note"].startswith("loss ") for t in trials if t["mode"].startswith("strategy"))
    md = (tmp_path / "single_gpu.md").read_text()
    for heading in ("## Targets", "## Strategy overhead", "## Distributed attention kinds", "## Memory configurations"):
        assert heading in md
    assert "| vit | 512 | strategy vs plain | sdpa |" in md and "| 512 | ring |" in md
    assert (tmp_path / "single_gpu.png").stat().st_size > 0


def test_strategy_trials_leave_no_process_group():
    """Each strategy trial tears its process group down (the NCCL group would keep DDP's gradient buckets alive into
    the next trial's peak memory) and restores the exception hook that init_process_group wraps."""
    script = (
        "import sys, torch, torch.distributed as dist\n"
        "import bench_single_gpu as b\n"
        "hook = sys.excepthook\n"
        "s = b.Sizes.smoke()\n"
        "for _ in range(2):\n"
        "    t = b.measure(b.run_strategy, 'vit', s, s.speed_lengths[0], 'sdpa', 'amp', torch.device('cpu'),\n"
        "                  steps=(1, 1), section='speed')\n"
        "    assert t.status == 'ok', t.note\n"
        "    assert not dist.is_initialized()\n"
        "    assert sys.excepthook is hook\n"
        "print('clean')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "benchmarks")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
