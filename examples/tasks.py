"""Example task callables for YAML flows (``callable: "examples.tasks:add_one"``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def add_one(x: int) -> int:
    return x + 1


def to_text(value: Any) -> str:  # noqa: ANN401 - any JSON value
    return f"value={value}"


def boom(x: int = 0) -> None:
    raise ValueError(f"boom: x={x}")


def big(size: int = 200_000) -> str:
    return "x" * size


def fail_loudly(size: int = 2_000_000) -> None:
    """Raise an exception whose message is ``size`` characters (oversized events)."""
    raise RuntimeError("E" * size)


def wait_for_cancel(ctx: Any, seconds: float = 30.0) -> str:  # noqa: ANN401 - pyoco's Context
    """Cooperative: polls ``ctx.is_cancelled`` and stops early."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctx.is_cancelled:
            return "stopped-early"
        time.sleep(0.01)
    return "finished"


def ignore_cancel(seconds: float = 60.0) -> str:
    """Ignores cancellation entirely (the worker has to kill the process)."""
    time.sleep(seconds)
    return "slept"


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
