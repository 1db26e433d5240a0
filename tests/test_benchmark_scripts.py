"""The benchmark scripts run end to end in smoke mode on the CPU (gloo), so they work when a GPU machine is
available: the multi-GPU benchmark and its scaling report, and the single-GPU benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import REPO_ROOT

pytestmark = [pytest.mark.multiprocess]

# The smoke runs must pass on a loaded 2-core CI machine (a load of 8 makes them ~4x slower than idle): no
# torch.compile (a first compile takes minutes there, and a run killed mid-compile leaves a half-filled cache
# that breaks the next one), no wall-clock budget that skips rows, and limits far above the idle times.
SUBPROCESS_LIMIT_S = 1500
SMOKE_ENV = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": str(REPO_ROOT)}
NO_BUDGET = ("--budget-s", "100000")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The smoke environment, with an inductor cache of this test's own (never a shared, half-written one)."""
    return {**os.environ, **SMOKE_ENV, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache"), **extra}


@pytest.mark.timeout(2 * SUBPROCESS_LIMIT_S)
def test_run_multi_gpu_script_end_to_end(tmp_path):
    """The documented launcher: the 1-process baseline, 2 processes (weak + strong, profiled), the longest-sequence
    ladders of the ViT and ClimaX, and the report merging the three files."""
    out = tmp_path / "out"
    env = _env(tmp_path, SEQPAR_BENCH_OUT=str(out),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [
            "bash",
            str(REPO_ROOT / "benchmarks" / "run_multi_gpu.sh"),
            "2",
            "--smoke",
            "--attention",
            "ulysses",
            "--climax-attention",
            "lss",
            *NO_BUDGET,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_LIMIT_S,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"multi_gpu_n1.json", "multi_gpu_n2.json", "multi_gpu_n2_longest.json", "multi_gpu_n2_report.md",
            "multi_gpu_n2_report.png"} <= names
    single, multi, longest = (json.loads((out / f"multi_gpu_{t}.json").read_text()) for t in ("n1", "n2", "n2_longest"))
    assert single["results"][0]["world"] == 1 and [r["section"] for r in single["results"]] == ["weak", "strong"]
    assert [r["status"] for r in multi["results"]] == ["ok"] * 2
    [weak] = [r for r in multi["results"] if r["section"] == "weak"]
    assert (weak["attention"], weak["sp"], weak["dp"], weak["length"]) == ("ulysses", 2, 1, 32)
    assert weak["tokens_per_s"] > 0 and len(weak["step_ms_all"]) == 2
    assert weak["comm_ms"] > 0  # the profiled step saw the gloo collectives
    assert all(r["note"].startswith("loss ") for r in multi["results"])  # each configuration trained
    rows = [(r["model"], r["attention"], r["length"], r["status"], len(r["step_ms_all"])) for r in longest["results"]]
    assert rows == [("vit", "ulysses", 32, "ok", 1), ("vit", "ulysses", 64, "ok", 1),
                    ("climax", "lss", 16, "ok", 1), ("climax", "lss", 32, "ok", 1)]
    report = (out / "multi_gpu_n2_report.md").read_text()
    for heading in (
        "## Weak scaling",
        "## Strong scaling",
        "## Communication against attention",
        "## Longest sequence",
    ):
        assert heading in report
    assert "| ulysses | 2 | 2 x 1 | 32 |" in report and "| climax | lss | 2 | 32 | ok |" in report


def test_scaling_report_merges_files_later_rows_win(tmp_path):
    """Rows of several files are merged, a re-measured configuration replaces the earlier one, and the efficiencies
    follow the documented formulas."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from scaling_report import report

    def row(section, world, length, step_ms, tflops, note=""):
        return {"section": section, "model": "vit", "attention": "ulysses", "world": world, "sp": world, "dp": 1,
                "length": length, "status": "ok", "step_ms": step_ms, "tokens_per_s": length / step_ms * 1e3,
                "tflops_per_gpu": tflops, "peak_gib": 1.0, "resident_gib": 0.0, "comm_ms": None, "attention_ms": None,
                "note": note}

    meta = {"sizes": {"width": 8, "depth": 1, "heads": 2, "tokens_per_gpu": 100}, "device": {"device": "cpu"}}
    files = {
        "n1.json": {
            "world": 1,
            **meta,
            "results": [row("weak", 1, 100, 1000.0, 10.0), row("strong", 1, 400, 8000.0, 10.0)],
        },
        "old.json": {
            "world": 2,
            **meta,
            "results": [row("weak", 2, 200, 4000.0, 5.0), row("strong", 2, 400, 5000.0, 8.0)],
        },
        "new.json": {"world": 2, **meta, "results": [row("weak", 2, 200, 2500.0, 9.6)]},
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    text, data = report([str(tmp_path / n) for n in files])
    [weak] = data["weak"]
    assert weak["tokens_per_s"] == 80.0  # the re-measured row, not the first one (50 tokens/s)
    assert weak["efficiency"] == pytest.approx(80.0 / (2 * 100.0)) and weak["flop_efficiency"] == pytest.approx(0.96)
    [strong] = data["strong"]
    assert strong["speedup"] == pytest.approx(1.6) and strong["efficiency"] == pytest.approx(0.8)
    assert "| ulysses | 2 | 2 x 1 | 200 | 80 | 9.6 | 40.0% | 41.7% | 96.0% |" in text


def test_longest_ladder_skips_what_it_predicts_will_not_fit():
    """The longest-sequence ladder stops before a length predicted past the memory or the time left, saying why."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_multi_gpu import Result, skip_reason

    def row(length, peak, step_ms, seconds):
        return Result("longest", "vit", "ulysses", 2, 2, 1, length, peak_gib=peak, step_ms=step_ms, seconds=seconds)

    rows = [row(512, 40.0, 10_000.0, 25.0), row(1024, 70.0, 40_000.0, 55.0)]
    assert skip_reason([], 512, 80.0, 1e9) == ""
    assert skip_reason(rows, 2048, 1000.0, 1e9) == ""
    assert "predicted peak 130 GiB > 80 GiB" in skip_reason(rows, 2048, 80.0, 1e9)  # 70 + 30 GiB per 512 tokens
    assert skip_reason(rows, 2048, 1000.0, 100.0) == \
        "predicted 175 s for one step > 100 s left (predicted peak 130 GiB)"  # 40 s x 4 + 15 s
    assert skip_reason([row(512, 40.0, 1.0, 1.0)], 1024, 79.0, 1e9).startswith("predicted peak 80 GiB")  # through zero
    assert skip_reason(
        rows[:1] + [Result("longest", "vit", "ulysses", 2, 2, 1, 1024, status="oom")], 2048, 80.0, 1e9
    ) == skip_reason(rows[:1], 2048, 80.0, 1e9)


@pytest.mark.timeout(2 * SUBPROCESS_LIMIT_S)
def test_single_gpu_benchmark_smoke(tmp_path):
    """The single-GPU benchmark's smoke mode runs on the CPU: plain and strategy paths (several Trainer fits in one
    process), the distributed attention kinds and the memory ladder, and renders its tables and plot. The
    "+compile" trials run eagerly here (TORCHDYNAMO_DISABLE); compiled blocks are tested in tests/test_compile.py."""
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_single_gpu.py"), "--smoke", "--out", str(tmp_path),
           "--sections", "speed,attention-kinds,ladder", *NO_BUDGET]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=SUBPROCESS_LIMIT_S
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "single_gpu.json").read_text())
    trials = results["trials"]
    assert trials and all(t["status"] == "ok" for t in trials), [
        (t["mode"], t["note"]) for t in trials if t["status"] != "ok"
    ]
    modes = {t["mode"] for t in trials}
    assert {
        "plain",
        "strategy",
        "plain+compile",
        "strategy+compile",
        "strategy-lss",
        "strategy-ring",
        "strategy-hybrid",
    } <= modes
    # every strategy trial trained: same loss as its neighbours (same seed and data), not a skipped fit
    assert all(t["note"].startswith("loss ") for t in trials if t["mode"].startswith("strategy"))
    md = (tmp_path / "single_gpu.md").read_text()
    for heading in ("## Targets", "## Strategy overhead", "## Distributed attention kinds", "## Memory configurations"):
        assert heading in md
    assert "| vit | 512 | strategy vs plain | sdpa |" in md and "| 512 | ring |" in md
    assert (tmp_path / "single_gpu.png").stat().st_size > 0


@pytest.mark.timeout(2 * SUBPROCESS_LIMIT_S)
def test_strategy_trials_leave_no_process_group(tmp_path):
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
    env = _env(tmp_path, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=SUBPROCESS_LIMIT_S
    )
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_pipeline_benchmark_records_an_out_of_memory_configuration(tmp_path):
    """The configuration that runs out of memory gets its own row, written beside the rows measured before it, by the
    rank that ran out (the run then ends at once instead of waiting in a collective)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import torch
    from bench_pipeline import markdown, record_oom

    measured = {"config": "pipeline", "step_ms": 1401.6, "step_ms_all": [1401.6], "peak_gib": 99.3,
                "losses": [1.0, 0.9], "tokens_per_s": 11689.0}
    payload = {"world": 2, "device": "cpu", "parameters": 9.67e9, "results": [measured],
               "args": {"width": 4096, "depth": 48, "batch": 4, "tokens": 4096, "micro_batches": 4, "steps": 3,
                        "warmup": 1}}
    record_oom(payload, "zero3", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), 1,
               torch.device("cpu"), tmp_path, "t")
    written = json.loads((tmp_path / "pipeline_t.json").read_text())
    assert [r["config"] for r in written["results"]] == ["pipeline", "zero3"]
    assert written["results"][1]["status"] == "oom"
    note = written["results"][1]["note"]
    assert note.startswith("rank 1: ") and "Tried to allocate 2.00 GiB" in note
    table = (tmp_path / "pipeline_t.md").read_text()
    assert "| pipeline | 1401.6 | 11689 | 99.3 |" in table
    assert "| zero3 | out of memory | | rank 1: " in table
    assert "Largest relative difference" not in table  # no loss comparison against a configuration that did not run
    assert markdown(written) == table
