"""Task callables the test suite needs and a shared worker must never offer: they write files
where they are told, wait on paths, kill their own process or make huge values.  Tests allow
them as ``tests.tasks``; the README's ``--allow-module examples`` does not reach them."""

from __future__ import annotations

import os
import time
from pathlib import Path


def big(size: int = 200_000) -> str:
    return "x" * size


def fail_loudly(size: int = 2_000_000) -> None:
    """Raise an exception whose message is ``size`` characters (oversized events)."""
    raise RuntimeError("E" * size)


def record(marker_dir: str, label: str = "run") -> str:
    """Side effect: one file per execution, so tests can count executions."""
    path = Path(marker_dir) / f"{label}-{os.getpid()}-{time.time_ns()}"
    path.write_text(label)
    return str(path)


def wait_for_file(path: str, seconds: float = 30.0) -> str:
    """Blocks until ``path`` exists (tests release it), without polling NATS."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return "released"
        time.sleep(0.01)
    return "timeout"


def die(signal_number: int = 9) -> None:
    """Kills its own process (a poison run)."""
    os.kill(os.getpid(), signal_number)


def fail_unless_file(path: str) -> str:
    """Fails until ``path`` exists (a dead letter that a re-submission can fix)."""
    if not os.path.exists(path):
        raise RuntimeError(f"not ready: {path} is missing")
    return "ready"
