"""History at scale (issue 18): a gateway over 100,000 or 1,000,000 stored runs.

Fills a private nats-server quickly (each run's ``run.submitted``, ``run.claimed`` and terminal
event appended to PYOCO_EVENTS and its folded snapshot written to the runs bucket, as the
projector would, pipelined in thousands), then starts gateways as separate processes and
measures, for each:

* cold start: process start → first ``GET /runs?limit=50`` answered 200;
* RSS of the gateway process after the list measurements;
* ``GET /runs?limit=50`` p50/p99 with no filter, one filter, three filters, and the new filters;
* ``GET /runs/{id}`` p50;
* ``pyoco-es replay`` (fold the whole stream again and compare) and ``replay --read-model`` time.

The new gateway is measured twice: with no read model file (it builds it from the bucket) and
restarted over the file it built (the normal case).  ``--main`` also measures a gateway from
another checkout (default /work/main's venv: today's in-memory index) on the same data.

    .venv/bin/python benchmarks/bench_history.py --runs 100000 [--main /work/main/.venv/bin/pyoco-es]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats.client import open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.resources import ensure_resources
from pyoco_es.testing.history import fill, fill_snapshots

HERE = Path(__file__).resolve().parent
PYOCO_ES = str(Path(sys.executable).with_name("pyoco-es"))
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("no filter", {}),
    ("1 filter: status=FAILED", {"status": "FAILED"}),
    ("1 filter: flow=flow7", {"flow": "flow7"}),
    ("1 filter: tag=t3", {"tag": "t3"}),
    ("3 filters: status, flow, tag", {"status": "COMPLETED", "flow": "flow3", "tag": "t3"}),
    ("3 filters: status, flow, tag (rare)", {"status": "CANCELLED", "flow": "flow9", "tag": "t4"}),
    ("tenant_id", {"tenant_id": "tenant3"}),
    ("worker_id", {"worker_id": "w7"}),
    ("run_id_prefix", {"run_id_prefix": "8a"}),
    ("updated time range", {"updated_after": "0", "updated_before": "9999999999"}),
    ("error_contains (common)", {"error_contains": "division"}),
    ("error_contains (absent)", {"error_contains": "no such text anywhere"}),
)


async def measure(cmd: list[str], env: dict[str, str], label: str, samples: int, new: bool, max_start: float = 1800.0) -> dict[str, Any]:
    port = free_port()
    out: dict[str, Any] = {"label": label}
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--port", str(port)], **tied_to_this_process(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while True:
                try:
                    if (await client.get("/runs", params={"limit": 50})).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - t0 > max_start:
                    out["cold_start"] = float("inf")
                    try:
                        out["note"] = (await client.get("/ready")).json()["run_index"]
                    except (httpx.HTTPError, ValueError, KeyError):
                        pass
                    out["rss"] = rss_mb(proc.pid)
                    print(f"{label}: not serving lists after {max_start:.0f} s ({out.get('note')}), RSS {out['rss']:.0f} MB", flush=True)
                    return out
                if proc.poll() is not None:
                    raise RuntimeError(f"{label}: gateway exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
                await trio.sleep(0.05)
            out["cold_start"] = time.perf_counter() - t0
            some = (await client.get("/runs", params={"limit": 50})).json()
            for name, params in CASES:
                if not new and name not in ("no filter",) and not name.startswith(("1 filter", "3 filters")):
                    continue  # today's gateway ignores the new filters
                times = []
                for _ in range(samples):
                    t1 = time.perf_counter()
                    r = await client.get("/runs", params={"limit": 50, **params})
                    times.append(time.perf_counter() - t1)
                    assert r.status_code == 200, r.text
                out[name] = statistics.median(times)
            times = []
            for k in range(samples):
                t1 = time.perf_counter()
                r = await client.get(f"/runs/{some[k % len(some)]['run_id']}")
                times.append(time.perf_counter() - t1)
                assert r.status_code == 200
            out["GET /runs/{id}"] = statistics.median(times)
            out["rss"] = rss_mb(proc.pid)
            print(f"{label}: {out}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, **tied_to_this_process(env), capture_output=True, text=True)
    return time.perf_counter() - t0, (res.stdout + res.stderr).strip().splitlines()[-1] if (res.stdout + res.stderr).strip() else ""


def table(results: list[dict[str, Any]]) -> None:
    rows = ["cold_start", "rss"] + [name for name, _ in CASES] + ["GET /runs/{id}"]
    width = max(len(r) for r in rows) + 22
    print("".ljust(width) + "".join(r["label"][:28].rjust(30) for r in results))
    for row in rows:
        cells = []
        for r in results:
            v = r.get(row)
            if v is None:
                cells.append("-".rjust(30))
            elif row == "rss":
                cells.append(f"{v:.0f} MB".rjust(30))
            elif row == "cold_start":
                cells.append((f"{v:.2f} s" if v != float("inf") else "not serving").rjust(30))
            else:
                cells.append(f"{v * 1000:.2f} ms".rjust(30))
        label = {"cold_start": "cold start to serving lists", "rss": "gateway RSS"}.get(row, row)
        print(("GET /runs?limit=50 p50, " + row if row not in ("cold_start", "rss", "GET /runs/{id}") else label + (" p50" if row == "GET /runs/{id}" else "")).ljust(width) + "".join(cells))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--main", default="/work/main/.venv/bin/pyoco-es", help="today's pyoco-es to compare with ('' to skip)")
    ap.add_argument("--no-replay", action="store_true")
    ap.add_argument("--main-max-start", type=float, default=600.0, help="give up on main's cold start after this many seconds")
    ap.add_argument("--snapshots-only", action="store_true",
                    help="write only the runs bucket (what gateways read; ~10x faster to fill): for 1,000,000; replay of the events is then skipped")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-history-"))
    server = EmbeddedNats(data_dir=tmp / "nats")
    server.start()
    try:
        async with open_nats(server.url, name="bench-history") as nats:
            await ensure_resources(nats)
            if args.snapshots_only:
                rate = await fill_snapshots(nats, args.runs)
                print(f"filled {args.runs:,} run snapshots (no events) at {rate:,.0f} runs/s")
            else:
                rate = await fill(nats, args.runs)
                print(f"filled {args.runs:,} runs ({args.runs * 3 - args.runs // 10:,} events + {args.runs:,} snapshots) at {rate:,.0f} runs/s")
        env = {**os.environ, "PYOCO_LOAD_DOTENV": "0", "PYOCO_LOG_LEVEL": "warning", "PYOCO_READ_MODEL_PATH": str(tmp / "rm.sqlite3")}
        gateway = [PYOCO_ES, "gateway", "--nats-url", server.url]
        results = []
        results.append(await measure(gateway, env, "new: build read model", args.samples, True))
        size = sum(f.stat().st_size for f in tmp.glob("rm.sqlite3*"))
        results.append(await measure(gateway, env, "new: restart over the file", args.samples, True))
        if args.main and Path(args.main).exists():
            results.append(await measure([args.main, "gateway", "--nats-url", server.url], env, "main: in-memory index", args.samples, False,
                                         max_start=args.main_max_start))
        print(f"\n{args.runs:,} runs stored; machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared with other work)")
        print(f"read model file: {size / 1e6:.0f} MB")
        table(results)
        if not args.no_replay:
            if not args.snapshots_only:
                seconds, last = run_timed([PYOCO_ES, "replay", "--nats-url", server.url], env)
                print(f"\npyoco-es replay: {seconds:.1f} s ({last})")
            seconds, last = run_timed([PYOCO_ES, "replay", "--nats-url", server.url, "--read-model", str(tmp / "rm.sqlite3"), "--skip-events"], env)
            print(f"pyoco-es replay --read-model FILE --skip-events (check the read model against the bucket): {seconds:.1f} s ({last})")
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    trio.run(main)
