"""Run a test function in several gloo processes with a free port and a hard timeout, and collect what each returns.

Each rank runs ``python -m tests.dist_utils MODULE:FUNCTION`` with the torchrun environment variables set
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so Lightning treats the
processes as launched externally. The function gets ``**kwargs`` and its return value comes back to the
test through ``torch.save``. A hung collective cannot outlive ``timeout``: every process is killed and the
test fails with the tail of each rank's output.

Process start-up (importing torch, Lightning, DeepSpeed) dominates a launch on a loaded 2-core machine, so tests that
need several workers of one world size run them in one launch with :func:`run_distributed_each` (the ranks call each
worker in turn on the same default process group) and assert on each worker's results separately.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(
    target: str, world_size: int, *, timeout: float = 600.0, env: dict[str, str] | None = None, **kwargs: Any
) -> list[Any]:
    """Run ``target`` ("module:function") on ``world_size`` processes; return each rank's result, rank order."""
    with tempfile.TemporaryDirectory(prefix="seqpar-dist-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "kwargs.pkl").write_bytes(pickle.dumps(kwargs))
        port = free_port()
        procs, logs = [], []
        for rank in range(world_size):
            child_env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "NODE_RANK": "0",
                "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "SEQPAR_TEST_OUT": tmp,
                **(env or {}),
            }
            log = open(tmp_path / f"rank{rank}.log", "w+")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.dist_utils", target],
                    env=child_env,
                    cwd=kwargs.get("cwd", REPO_ROOT),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        failed = _wait_all(procs, timeout)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
        if failed:
            tails = "\n".join(
                f"--- rank {r} (exit {p.returncode}) ---\n{out[-4000:]}"
                for r, (p, out) in enumerate(zip(procs, outputs))
            )
            raise AssertionError(f"{target} on {world_size} processes: {failed}\n{tails}")
        return [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(world_size)]


def run_distributed_each(
    calls: list[tuple[str, dict[str, Any]]], world_size: int, *, timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> list[list[Any]]:
    """Run each ``("module:function", kwargs)`` of ``calls`` in order, in ONE launch of ``world_size`` processes.

    Returns, per call, each rank's result in rank order. ``timeout`` bounds the whole launch. The workers share the
    default process group (:func:`init_gloo` initialises it once, a Lightning Trainer finds it initialised) and the
    process; each starts from the launch's environment variables, and must not depend on other state an earlier one
    leaves (seeds are set by each worker)."""
    per_rank = run_distributed("tests.dist_utils:call_each", world_size, timeout=timeout, env=env, calls=calls)
    return [[ranks[i] for ranks in per_rank] for i in range(len(calls))]


def call_each(calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Worker of :func:`run_distributed_each`: call each target with its kwargs in order; the list of results.

    Each target starts from the launch's environment variables (Lightning's teardown deletes ``WORLD_SIZE``)."""
    results = []
    for target, kwargs in calls:
        environment = dict(os.environ)
        results.append(_resolve(target)(**kwargs))
        os.environ.clear()
        os.environ.update(environment)
    return results


def _resolve(target: str):
    module_name, fn_name = target.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            bad = [r for r, c in enumerate(codes) if c != 0]
            return f"ranks {bad} failed" if bad else ""
        if any(c not in (None, 0) for c in codes):
            # One rank died: give the others a moment to fail on their own, then stop them.
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
    codes = [p.returncode for p in procs]
    return f"timed out or a rank failed after at most {timeout:.0f} s (exit codes {codes})"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the error measure of the equivalence tests."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def init_gloo() -> None:
    """Initialise the default gloo group from the environment, with a short timeout (once: several workers of one
    launch, :func:`run_distributed_each`, each call this)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)


class CollectiveCounter:
    """Count collective calls (name, elements) made through ``torch.distributed`` while active."""

    NAMES = (
        "all_to_all_single",
        "all_to_all",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "reduce_scatter",
        "all_reduce",
        "broadcast",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
    )

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveCounter:
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapper(*args, __name=name, __original=original, **kwargs):
                numel = args[1].numel() if len(args) > 1 and isinstance(args[1], torch.Tensor) else (
                    args[0].numel() if args and isinstance(args[0], torch.Tensor) else 0
                )
                self.calls.append((__name, numel))
                return __original(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def counts(self) -> Counter:
        return Counter(name for name, _ in self.calls)

    def reset(self) -> None:
        self.calls.clear()


def _main() -> None:
    target = sys.argv[1]
    out = Path(os.environ["SEQPAR_TEST_OUT"])
    kwargs = pickle.loads((out / "kwargs.pkl").read_bytes())
    kwargs.pop("cwd", None)
    result = _resolve(target)(**kwargs)
    torch.save(result, out / f"result{os.environ['RANK']}.pt")
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _main()
