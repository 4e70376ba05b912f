"""Live task output (issue 16): how fast a print reaches a follower, and what output costs a run.

pyoco-es runs as ``pyoco-server up`` plus one ``pyoco-worker`` (separate processes, as in
bench_e2e.py), driven over HTTP:

1. **print → follower latency**: a task prints ``ping I T`` every 20 ms (T: the time of the
   print); a client follows ``GET /runs/{id}/logs/stream`` (SSE) and records arrival − T per
   line (same machine, same clock).  Target: p50 ≤ 200 ms.
2. **cost of output**: a task prints N lines with a calibrated bit of CPU work before each, so it
   prints ~10,000 lines per CPU second when its output goes to /dev/null; the same task printing
   to its (captured, shipped) stdout, alternated with the /dev/null variant.  Target: ≤ 10 % more
   wall time.  Printed: the task loop's wall time, the run process's CPU time (all its threads),
   the run's submit-to-end, and the CPU the worker and nats-server spent meanwhile (on a busy
   machine every CPU second anywhere shows up as wall time, so the CPU figures are the stable
   ones).

    .venv/bin/python benchmarks/bench_logs.py [--pings 200] [--lines 30000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402 - starts pyoco-es the way the end-to-end benchmark does
from logtasks import spew  # noqa: E402

from pyoco_es.testing.flows import one_task_flow, submit_yaml  # noqa: E402

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
FLOW_NAME = "bench-logs"


async def wait_end(http: httpx.AsyncClient, run_id: str) -> dict:  # type: ignore[type-arg]
    while True:
        doc = (await http.get(f"/runs/{run_id}", params={"include": "records"})).json()
        if doc.get("status") in TERMINAL:
            return doc  # type: ignore[no-any-return]
        await trio.sleep(0.05)


async def latency(url: str, pings: int) -> list[float]:
    out: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        run_id = await submit_yaml(http, one_task_flow("ping", "benchmarks.logtasks:ping", {"count": pings, "interval": 0.02}), flow_name=FLOW_NAME)
        async with http.stream("GET", f"/runs/{run_id}/logs/stream") as resp:
            async for raw in resp.aiter_lines():
                now = time.time()
                if raw.startswith("event: end"):
                    break
                if not raw.startswith("data: "):
                    continue
                for line in json.loads(raw[6:]).get("lines", []):
                    parts = str(line.get("text", "")).split()
                    if len(parts) == 3 and parts[0] == "ping":
                        out.append((now - float(parts[2])) * 1000)
        await wait_end(http, run_id)
    return out


async def cost(url: str, lines: int, work: int, devnull: bool) -> tuple[float, float, int, float]:
    """(the task's loop seconds, the run's submit-to-end seconds, lines stored, run process CPU s)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        t0 = time.time()
        run_id = await submit_yaml(http, one_task_flow("spew", "benchmarks.logtasks:spew", {"lines": lines, "work": work, "devnull": devnull}), flow_name=FLOW_NAME)
        doc = await wait_end(http, run_id)
        wall = float(doc.get("end_time") or time.time()) - t0
        out = doc["task_records"]["spew"]["output"]
        loop, cpu = float(out["wall"]), float(out["cpu"])
        stored = 0
        after = 0
        while True:
            body = (await http.get(f"/runs/{run_id}/logs", params={"after": after, "limit": 5000})).json()
            stored += sum(1 for line in body["lines"] if line["stream"] == "stdout")
            after = body["next"]
            if not body["more"]:
                break
        return loop, wall, stored, cpu


def calibrate(target_lines_per_sec: float = 10000.0) -> int:
    """The ``work`` that makes spew(devnull=True) print ~target lines per CPU second here (CPU,
    not wall: on a loaded machine the wall clock says more about the neighbours)."""
    work = 300
    for _ in range(4):
        t = spew(lines=5000, work=work, devnull=True)["cpu"]
        rate = 5000 / t
        work = max(1, int(work * rate / target_lines_per_sec))
    return work


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--lines", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = calibrate()
    print(f"calibrated: work={work} gives ~10,000 lines/s to /dev/null here", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, bench_e2e.ours(Path(tmp), 0, 1) as (url, procs):
        procs.start(
            [str(bench_e2e.VENV / "pyoco-worker"), "--nats-url", _nats_url(Path(tmp)), "--tags", "default", "--worker-id", "bench-logs",
             "--concurrency", "1", "--allow-module", "benchmarks.logtasks"],
            stderr=open(Path(tmp) / "worker.log", "wb"), cwd=bench_e2e.REPO, env={**bench_e2e.os.environ, "PYTHONPATH": str(bench_e2e.REPO)},  # noqa: SIM115
        )
        trio.run(_warm, url)
        lat = trio.run(latency, url, args.pings)
        print(f"print -> SSE follower latency over {len(lat)} lines: p50 {statistics.median(lat):.1f} ms, "
              f"p90 {pct(lat, 0.9):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, max {max(lat):.1f} ms (target p50 <= 200 ms)")
        rows: dict[bool, list[tuple[float, float, int, float]]] = {True: [], False: []}
        others: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for devnull in (True, False):
                before = procs.cpu_by_role()
                rows[devnull].append(trio.run(cost, url, args.lines, work, devnull))
                after = procs.cpu_by_role()
                others[devnull].append(sum(after.get(r, 0.0) - before.get(r, 0.0) for r in ("workers", "nats-server")))
        for devnull in (True, False):
            loops = [r[0] for r in rows[devnull]]
            walls = [r[1] for r in rows[devnull]]
            label = "stdout to /dev/null " if devnull else "stdout captured+shipped"
            cpus = [r[3] for r in rows[devnull]]
            print(f"{label}: task loop {', '.join(f'{x:.2f}' for x in loops)} s (median {statistics.median(loops):.2f}, "
                  f"{args.lines / statistics.median(loops):,.0f} lines/s); run process CPU {', '.join(f'{x:.2f}' for x in cpus)} s; "
                  f"run submit-to-end median {statistics.median(walls):.2f} s; worker+nats-server CPU meanwhile "
                  f"{', '.join(f'{x:.2f}' for x in others[devnull])} s; lines stored {[r[2] for r in rows[devnull]]}")
        base, cap = statistics.median([r[0] for r in rows[True]]), statistics.median([r[0] for r in rows[False]])
        wbase, wcap = statistics.median([r[1] for r in rows[True]]), statistics.median([r[1] for r in rows[False]])
        cbase, ccap = statistics.median([r[3] for r in rows[True]]), statistics.median([r[3] for r in rows[False]])
        print(f"cost of output: task loop wall +{(cap / base - 1) * 100:.1f} %, run wall +{(wcap / wbase - 1) * 100:.1f} %, "
              f"run process CPU +{(ccap / cbase - 1) * 100:.1f} % (target <= 10 % wall); worker+nats-server CPU per 1,000 lines "
              f"{(statistics.median(others[False]) - statistics.median(others[True])) / args.lines * 1e6:.1f} ms")


def _nats_url(tmp: Path) -> str:
    for line in (tmp / "ours-up.log").read_text().splitlines():
        if "embedded NATS at" in line:
            return line.split()[3]
    raise RuntimeError("no embedded NATS url in the up log")


async def _warm(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for _ in range(3):
            await wait_end(http, await submit_yaml(http, one_task_flow("ping", "benchmarks.logtasks:ping", {"count": 1, "interval": 0}), flow_name=FLOW_NAME))


if __name__ == "__main__":
    main()
