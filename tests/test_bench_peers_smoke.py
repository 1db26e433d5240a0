"""The peer benchmark (benchmarks/bench_peers.py) runs end to end in smoke mode on the CPU (gloo, 2 processes, no
compilation): every section, this project's attentions exact against one-process SDPA, the peers that cannot run
here recorded with their reason, and the ratio to the best peer filled in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_bench_peers_smoke(tmp_path):
    methods = ("ulysses,ring,ring_rank_order,hybrid u1xr2,deepspeed_ulysses,torch_cp_cudnn_allgather,yunchang_usp,"
               "one_gpu_cudnn")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO_ROOT / "benchmarks" / "bench_peers.py"), "--smoke", "--out", str(tmp_path), "--methods", methods,
           "--attention", "64:4:16", "--causal", "48:2:16", "--vit-lengths", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "peers_n2.json").read_text())
    rows = {(r["section"], r["method"]): r for r in payload["rows"]}
    for name in ("ulysses", "ring", "hybrid u1xr2"):
        check = rows[("check", name)]
        assert check["status"] == "ok" and max(check["errors"].values()) < 1e-5, check
        for section in ("attention", "vit"):
            assert rows[(section, name)]["status"] == "ok" and rows[(section, name)]["ms"] > 0
    assert rows[("causal", "ring")]["status"] == rows[("causal", "ring_rank_order")]["status"] == "ok"
    assert rows[("attention", "one_gpu_cudnn")]["status"] == "ok"
    cp = rows[("check", "torch_cp_cudnn_allgather")]
    assert cp["status"] == "unavailable" and "CUDA only" in cp["note"]
    assert (
        rows[("check", "yunchang_usp")]["status"] == "unavailable"
        and "needs flash-attn" in rows[("check", "yunchang_usp")]["note"]
    )
    if payload["device"]["peers"]["deepspeed"]:  # the DeepSpeed peer runs on gloo too: exact, and the best peer
        assert rows[("check", "deepspeed_ulysses")]["status"] == "ok"
        assert rows[("attention", "deepspeed_ulysses")]["vs_best_peer"] == 1.0
        assert rows[("attention", "ulysses")]["vs_best_peer"] > 0
    md = (tmp_path / "peers_n2.md").read_text()
    assert "| 64 | 4 x 16 | ring | ours |" in md and "Causal attention" in md


def test_ratio_to_best_peer_and_hybrid_degrees():
    from bench_peers import add_ratios, hybrid_degrees

    def row(method, family, tflops, status="ok", length=8):
        return {"section": "attention", "method": method, "family": family, "length": length, "heads": 2,
                "head_dim": 4, "status": status, "tflops_per_gpu": tflops, "vs_best_peer": None}

    rows = [
        row("ring", "ours", 300.0),
        row("a", "peer", 400.0),
        row("b", "peer", 200.0),
        row("c", "peer", 900.0, "error"),
        row("ring", "ours", 100.0, length=16),
    ]
    add_ratios(rows)
    assert [r["vs_best_peer"] for r in rows] == [0.75, 1.0, 0.5, None, None]  # no peer at length 16: no ratio
    assert hybrid_degrees(2, 16) == [1, 2] and hybrid_degrees(8, 16) == [2, 4] and hybrid_degrees(8, 2) == [2]
    assert hybrid_degrees(2, 1) == [1]


def test_merge_recomputes_ratio_over_runs(tmp_path):
    from peers_report import main as report_main
    from peers_report import merge

    def payload(rows, name="H200"):
        return {"world": 2, "smoke": False, "device": {"device": "cuda", "name": name, "torch": "2.11", "peers": {}},
                "rows": rows}

    def row(method, family, tflops, section="vit"):
        return {"section": section, "method": method, "family": family, "length": 1024, "heads": 2, "head_dim": 4,
                "status": "ok", "tflops_per_gpu": tflops, "vs_best_peer": 1.0, "ms": 1.0, "note": "",
                "errors": {"out": 1e-3}}

    a = payload([row("ulysses", "check", None, "check"), row("ulysses", "ours", 300.0), row("ds", "peer", 200.0)])
    b = payload([row("ulysses", "check", None, "check"), row("cp", "peer", 400.0), row("lss", "ours", 396.0)])
    merged = merge([a, b])
    ratios = {r["method"]: r["vs_best_peer"] for r in merged["rows"] if r["section"] == "vit"}
    assert ratios == {"ulysses": 0.75, "ds": 0.5, "cp": 1.0, "lss": 0.99}  # best peer across both runs
    assert [r["method"] for r in merged["rows"]].count("ulysses") == 2  # one check row, one timed row
    with pytest.raises(ValueError, match="more than one input"):
        merge([a, a])
    with pytest.raises(ValueError, match="across devices"):
        merge([a, payload([], name="H100")])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    report_main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--tag", "m", "--out", str(tmp_path)])
    assert "| 1,024 | 2 x 4 | lss | ours | 1.0 | 396.0 | 0.990 |" in (tmp_path / "peers_m.md").read_text()
    assert (tmp_path / "peers_m.png").stat().st_size > 0
