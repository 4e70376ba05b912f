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


def chatter(count: int = 20, interval: float = 0.1, text: str = "tick") -> int:
    """Prints a line every ``interval`` seconds (live logs: seen while the run is running)."""
    for i in range(count):
        print(f"{text} {i}", flush=True)
        time.sleep(interval)
    return count


def chatter_until(path: str, text: str = "tick", seconds: float = 30.0) -> int:
    """Prints a line every 0.1 s until ``path`` exists (tests release it once they saw a line)."""
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline and not os.path.exists(path):
        print(f"{text} {i}", flush=True)
        i += 1
        time.sleep(0.1)
    return i


def flood(lines: int = 2000, text: str = "line") -> int:
    """Prints ``lines`` lines as fast as it can (the log limits and drop markers)."""
    for i in range(lines):
        print(f"{text} {i}")
    return lines


def noisy(text: str = "hello") -> str:
    """Writes every way a task can: print, stderr, logging, a subprocess, terminal escapes."""
    import logging
    import subprocess
    import sys

    print(f"out: {text}")
    print(f"err: {text}", file=sys.stderr)
    logging.getLogger("tests.noisy").warning("logged: %s", text)
    subprocess.run(["echo", f"sub: {text}"], check=True)
    print("esc: \x1b[2J\x1b[31mred\x1b[0m")
    return text
