"""First-failure reporting for `seqpar` runs whose ranks Lightning starts itself: the last thing printed is the
error of the rank that failed first, not the ``Connection closed by peer`` of the ranks that lost it.

Lightning's subprocess launcher runs rank 0 in the process the user started and re-runs the command for
ranks 1..N-1. When one rank raises, the others fail in their next collective, and whichever prints last
(often rank 1, with gloo's ``Connection closed by peer``) buries the real error. Here:

* the launching process creates a directory (``SEQPAR_FAILURE_DIR``) that the ranks inherit;
* every rank records ``(time, rank, traceback)`` there the moment Lightning reports an exception to the
  callbacks (:class:`FailureRecorder.on_exception`, before the teardown that makes the other ranks fail);
* a rank other than 0 prints its full traceback only when no rank failed before it, else one line;
* rank 0 stops Lightning's child-process observer (it would SIGKILL rank 0 mid-report), gives the other
  ranks a few seconds to record their errors, stops them, and prints the earliest error last.

Under ``torchrun`` the same role is played by torch's ``@record`` (its summary ends with the root cause); under
``srun``, each task's output is its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from lightning.pytorch.callbacks import Callback

__all__ = ["FailureRecorder", "first_failure", "record_failure", "report_failure", "start_failure_dir"]

FAILURE_DIR_ENV = "SEQPAR_FAILURE_DIR"
GRACE_SECONDS = 5.0
"""How long rank 0 waits for the other ranks to record (and print) their own errors before stopping them."""


def _launched_rank() -> int:
    """This process's rank among the ranks that Lightning's launcher started (LOCAL_RANK, set for the children)."""
    value = os.environ.get("LOCAL_RANK", "0")
    return int(value) if value.isdigit() else 0


def start_failure_dir() -> Path | None:
    """In the process the user started (not under torchrun/srun), a fresh directory the launched ranks inherit."""
    if FAILURE_DIR_ENV in os.environ:
        return Path(os.environ[FAILURE_DIR_ENV])
    if any(name in os.environ for name in ("TORCHELASTIC_RUN_ID", "SLURM_PROCID", "LOCAL_RANK", "RANK")):
        return None  # an external launcher started this rank: it reports failures its own way
    path = Path(tempfile.mkdtemp(prefix="seqpar-failures-"))
    os.environ[FAILURE_DIR_ENV] = str(path)
    return path


def record_failure(error: BaseException, when: float | None = None) -> None:
    """Writes this rank's first error (time, rank, one line, traceback) to the failure directory, if there is one."""
    directory = os.environ.get(FAILURE_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        return
    path = Path(directory) / f"rank{_launched_rank()}.json"
    if path.exists():
        return  # the first error of this rank is the one that matters
    record = {
        "time": time.time() if when is None else when,
        "rank": _launched_rank(),
        "summary": f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    }
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)  # a reader never sees half a record


def first_failure(directory: str | Path) -> dict | None:
    """The earliest recorded failure in ``directory`` (ties go to the lower rank), or ``None``."""
    records = []
    for path in Path(directory).glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being written: os.replace makes this rare
    return min(records, key=lambda r: (r["time"], r["rank"])) if records else None


class FailureRecorder(Callback):
    """Records the time of a rank's error when Lightning first reports it, before the teardown that makes the
    other ranks fail too."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        record_failure(exception)


def _stop_child_observer() -> None:
    """Lightning's observer thread SIGKILLs rank 0 a few seconds after a child fails; rank 0 is reporting now."""
    for thread in threading.enumerate():
        if thread.name == "child-process-observer":
            thread._finished = True  # its loop checks this flag before each look at the children


def _children(trainer) -> list[subprocess.Popen]:
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return list(getattr(launcher, "procs", []) or [])


def report_failure(error: BaseException, trainer=None) -> int:
    """Prints the error of the rank that failed first as the last thing of the run; returns the exit status (1).

    Called by `seqpar` on every rank with the exception that ended it. On a rank other than 0 it prints the
    traceback, or one line when another rank failed before. On rank 0 it stops the other ranks after
    :data:`GRACE_SECONDS` and prints the first failure's traceback, naming the rank.
    """
    directory = os.environ.get(FAILURE_DIR_ENV)
    record_failure(error)  # no-op when the callback already recorded it
    rank = _launched_rank()
    if not directory or not os.path.isdir(directory):
        traceback.print_exception(type(error), error, error.__traceback__)
        return 1
    if rank != 0:
        first = first_failure(directory)
        if first is not None and first["rank"] != rank:
            print(f"[rank {rank}] stopped after rank {first['rank']} failed: "
                  f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
                  file=sys.stderr, flush=True)
        else:
            traceback.print_exception(type(error), error, error.__traceback__)
        return 1
    _stop_child_observer()
    children = _children(trainer)
    deadline = time.monotonic() + GRACE_SECONDS
    while any(p.poll() is None for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # blocked in a collective with this rank: nothing more to say
            proc.wait()
    first = first_failure(directory) or {"rank": 0, "traceback": "".join(
        traceback.format_exception(type(error), error, error.__traceback__))}
    shutil.rmtree(directory, ignore_errors=True)
    if first["rank"] != 0:
        mine = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        print(f"[rank 0] stopped after rank {first['rank']} failed: {type(error).__name__}: {mine}", file=sys.stderr)
    others = "" if not children else f" (of {len(children) + 1} ranks)"
    print(f"\nseqpar: rank {first['rank']} failed first{others}; its error:\n", file=sys.stderr)
    print(first["traceback"].rstrip(), file=sys.stderr, flush=True)
    return 1
