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


def side_effect(path: str, token: str, seconds: float = 1.0) -> str:
    """Side effect counted per execution: appends ``<token> <pid>`` to ``path`` (one short
    O_APPEND write, atomic), then lasts ``seconds`` (the cluster fault suite's ledger)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{token} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return token


def flaky(counter: str, fail_times: int = 2) -> int:
    """Fails its first ``fail_times`` calls (counted in the file ``counter``), then returns the
    number of calls made (retries, issue 16)."""
    path = Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls <= fail_times:
        raise RuntimeError(f"flaky failure {calls}")
    return calls


def spin(seconds: float = 60.0, marker_dir: str | None = None) -> str:
    """A busy Python loop that ignores everything but an exception raised into it (a timeout)."""
    if marker_dir is not None:
        record(marker_dir, "spin")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "spun"


def stubborn(marker_dir: str, seconds: float = 60.0) -> str:
    """Ignores its timeout: records its process, then blocks in one long C-level sleep (an
    exception raised into its thread waits for the sleep to return), catching anything."""
    record(marker_dir, "stubborn")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(end - time.monotonic())
        except BaseException:  # noqa: BLE001 - it means to ignore its timeout
            pass
    return "outlasted"


def retry_flows(name: str) -> object:
    """A ``--flow-resolver`` for named flows whose pyoco tasks carry retry attributes."""
    from pyoco.core.models import Flow, Task
    from pyoco.dsl.syntax import TaskWrapper

    task = Task(func=flaky, name="flaky", retries=2)
    if name == "flaky":
        task.retry_delay_sec = 0.05  # type: ignore[attr-defined]
        task.retry_backoff = 1  # type: ignore[attr-defined]
    elif name == "bad_policy":
        task.retries = "twice"  # type: ignore[assignment]
    else:
        raise KeyError(name)
    flow = Flow(name=name)
    flow >> TaskWrapper(task)
    return flow


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


def fail_unless_file(path: str) -> str:
    """Fails until ``path`` exists (a dead letter that a re-submission can fix)."""
    if not os.path.exists(path):
        raise RuntimeError(f"not ready: {path} is missing")
    return "ready"
