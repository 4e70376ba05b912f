"""Example task callables for YAML flows (``callable: "examples.tasks:add_one"``)."""

from __future__ import annotations

import time
from typing import Any


def add_one(x: int) -> int:
    return x + 1


def to_text(value: Any) -> str:  # noqa: ANN401 - any JSON value
    return f"value={value}"


def boom(x: int = 0) -> None:
    raise ValueError(f"boom: x={x}")


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


def chatty(lines: int = 20, interval: float = 0.2) -> int:
    """Prints a numbered line every ``interval`` seconds (watch it live: ``pyoco-client logs RUN_ID
    --follow``, or the dashboard's task output pane). At most 1,000 lines, 10 s apart."""
    lines = max(0, min(int(lines), 1000))
    interval = max(0.0, min(float(interval), 10.0))
    for i in range(lines):
        print(f"line {i + 1} of {lines}", flush=True)
        time.sleep(interval)
    return lines
