"""Fault injection for tests: freeze a process (SIGSTOP) the way a stalled VM or a GC pause does."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from ``/proc`` (``T``: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextmanager
def frozen(pid: int, *, timeout: float = 5.0) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block and SIGCONT it on the way out, whatever happens.

    Entering waits until the process is really stopped (signal delivery is asynchronous: on a
    busy machine the process may run a little longer), so what the block sends meets a frozen peer.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while process_state(pid) != "T":
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {pid} did not stop")
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
