"""The wheel registry (issue 14): upload, download and list times, and the gateway's peak memory,
for pyoco-es and pyoco-server 0.5.1 (its scratch venv, as bench_e2e.py), per wheel size.

Each size is a wheel whose payload is random bytes stored uncompressed; every system gets the
same bytes.  Prints one line per system and size, then the list/history request times.

    .venv/bin/python benchmarks/bench_wheels.py [--sizes 1,20,100] [--only ours|theirs]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import bench_e2e  # noqa: E402
from wheelmaker import make_wheel  # noqa: E402


def _status_mib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return -1


def _reset_peak(pid: int) -> int:
    """Start the process's peak RSS (VmHWM) again from its RSS now; returns that RSS (MiB)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return _status_mib(pid, "VmRSS")


def _gateway_pid(procs: bench_e2e.Procs) -> int:
    for p in procs.procs:
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            if b"pyoco-server" in f.read():
                return p.pid
    raise RuntimeError("no gateway process")


def measure(system: str, url: str, pid: int, wheels: list[tuple[str, bytes]]) -> None:
    with httpx.Client(base_url=url, timeout=600) as c:
        for name, data in wheels:
            mib = len(data) / 1024 / 1024
            rss = _reset_peak(pid)
            t = time.perf_counter()
            r = c.post("/wheels", files={"wheel": (name, data, "application/octet-stream")}, data={"tags": "bench"})
            up = time.perf_counter() - t
            r.raise_for_status()
            up_peak = _status_mib(pid, "VmHWM") - rss
            rss = _reset_peak(pid)
            t = time.perf_counter()
            got = c.get(f"/wheels/{name}")
            down = time.perf_counter() - t
            assert got.content == data, "downloaded bytes differ"
            print(
                f"{system:<7} {mib:7.1f} MiB  upload {up:6.2f} s ({mib / up:6.1f} MiB/s)  download {down:6.2f} s "
                f"({mib / down:6.1f} MiB/s)  gateway RSS {rss} MiB; its peak above that: upload +{up_peak} MiB, "
                f"download +{_status_mib(pid, 'VmHWM') - rss} MiB",
                flush=True,
            )
        for path in ("/wheels", "/wheels/history"):
            t = time.perf_counter()
            for _ in range(20):
                c.get(path).raise_for_status()
            print(f"{system:<7} GET {path}: {(time.perf_counter() - t) / 20 * 1000:.1f} ms ({len(wheels)} wheels)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,20,100", help="wheel payload sizes in MiB")
    ap.add_argument("--only", choices=["ours", "theirs"], default=None)
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    wheels = [
        make_wheel("bench-pkg", f"1.{i}", extra_members={"bench_pkg/blob.bin": os.urandom(int(mib * 1024 * 1024))})
        for i, mib in enumerate(sizes)
    ]
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    if args.only in (None, "ours"):
        with tempfile.TemporaryDirectory() as tmp, bench_e2e.ours(Path(tmp), 0, 1) as (url, procs):
            measure("ours", url, _gateway_pid(procs), wheels)
    if args.only in (None, "theirs"):
        with tempfile.TemporaryDirectory() as tmp, bench_e2e.theirs(Path(tmp), 0) as (url, procs):
            measure("theirs", url, _gateway_pid(procs), wheels)


if __name__ == "__main__":
    main()
