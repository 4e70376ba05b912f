"""Task callables for benchmarks/bench_logs.py (allowed as ``benchmarks.logtasks``)."""

from __future__ import annotations

import os
import sys
import time


def ping(count: int = 200, interval: float = 0.02) -> int:
    """Prints ``ping I T`` (T: the time of the print) every ``interval`` seconds."""
    for i in range(count):
        print(f"ping {i} {time.time():.6f}", flush=True)
        time.sleep(interval)
    return count


def spew(lines: int = 30000, work: int = 300, devnull: bool = False) -> dict[str, float]:
    """Prints ``lines`` lines with ``work`` units of CPU work before each (calibrated by the
    benchmark to ~10,000 lines per CPU second); with ``devnull`` the same prints go to /dev/null.
    Returns the loop's wall seconds and the CPU seconds of the whole run process meanwhile (every
    thread: the capture's sender and pipe reader included)."""
    # /dev/null the way a task sees it: print() still goes through pyoco's per-task capture
    # (its sys.stdout proxy), whose real stream becomes /dev/null for this loop.
    proxy = sys.stdout
    sink = open(os.devnull, "w") if devnull else None  # noqa: SIM115 - closed below
    real = getattr(proxy, "original", None)
    if sink is not None and real is not None:
        proxy.original = sink
    started, cpu = time.perf_counter(), time.process_time()
    try:
        acc = 0
        for i in range(lines):
            acc += sum(range(work))
            print(f"line {i} of a task that talks a lot: {acc % 1000}", file=sink if real is None else None)
    finally:
        if sink is not None:
            if real is not None:
                proxy.original = real
            sink.close()
    return {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu}
