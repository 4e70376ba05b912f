"""Batch submit vs single submits (issue 18): runs/s accepted through ``POST /runs/batch`` on
pyoco-es, beside single ``POST /runs/yaml`` and ``POST /runs`` submits on pyoco-es and on
pyoco-server 0.5.1 (the target: a batch ≥ 10x pyoco-server's single-submit rate).

Each system is started as in bench_e2e.py (its own NATS, over HTTP only), with no worker, so
the numbers are the submit path alone; besides runs/s, the CPU its processes (server and NATS)
spent per run, which a loaded machine disturbs less than the rate.  Single submits use C concurrent clients; batches send
``--batch`` items per request from ``--batch-clients`` concurrent clients.

    .venv/bin/python benchmarks/bench_batch.py [--runs 4000] [--batch-runs 20000] [--batch 1000] [--skip-theirs]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import leanhttp  # noqa: E402
from bench_e2e import FLOW, JSON, Procs, ours, singles, theirs  # noqa: E402

async def batches(url: str, n: int, size: int, clients: int, kind: str) -> float:
    """Runs/s accepted through POST /runs/batch (``size`` items a request)."""
    if kind == "yaml":
        item = {"flow_name": "main", "tag": "nobody", "workflow_yaml": FLOW.decode()}
    else:
        item = {"flow_name": "main", "tag": "nobody", "params": {"x": 1}}
    body = json.dumps({"items": [item] * size}).encode()
    async with leanhttp.Client(url) as client:
        (await client.post("/runs/batch", json.dumps({"items": [item]}).encode(), JSON)).raise_for_status()  # warm-up
        todo = iter(range(n // size))
        accepted = 0
        t0 = time.perf_counter()

        async def submitter() -> None:
            nonlocal accepted
            for _ in todo:
                r = await client.post("/runs/batch", body, JSON)
                r.raise_for_status()
                accepted += r.json()["accepted"]

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(submitter)
        elapsed = time.perf_counter() - t0
        if accepted != (n // size) * size:
            print(f"  only {accepted} of {(n // size) * size} batch items were accepted", file=sys.stderr)
        return accepted / elapsed


def settle(url: str, timeout: float = 120.0) -> None:
    """Until the server's projector has caught up (pyoco_projector_lag 0; pyoco-server has none)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        lag = [line.split()[-1] for line in text.splitlines() if line.startswith("pyoco_projector_lag")]
        if not lag or float(lag[0]) == 0:
            return
        time.sleep(0.1)
    print(f"  {url}: the projector did not catch up within {timeout:g} s", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=4000, help="single submits per measurement")
    ap.add_argument("--clients", type=int, default=16, help="concurrent single-submit clients")
    ap.add_argument("--batch-runs", type=int, default=20000, help="runs submitted through batches")
    ap.add_argument("--batch", type=int, default=1000, help="items per batch request")
    ap.add_argument("--batch-clients", type=int, default=2, help="concurrent batch requests")
    ap.add_argument("--skip-theirs", action="store_true")
    args = ap.parse_args()
    rows: list[tuple[str, str, float, float]] = []  # system, metric, runs/s, server CPU ms per run

    def timed(system: str, metric: str, procs: Procs, n: int, fn, *fn_args) -> None:  # type: ignore[no-untyped-def]
        settle(fn_args[0])
        cpu0 = procs.cpu()
        rate = trio.run(fn, *fn_args)
        settle(fn_args[0])  # the CPU per run includes projecting what was submitted
        rows.append((system, metric, rate, (procs.cpu() - cpu0) * 1000 / n))

    with tempfile.TemporaryDirectory() as tmp, ours(Path(tmp), 0, 1) as (url, procs):
        for kind in ("yaml", "named"):
            timed("pyoco-es", f"single {kind} submits/s (C={args.clients})", procs, args.runs, singles, url, args.runs, args.clients, kind)
            timed("pyoco-es", f"batch {kind} runs/s ({args.batch}/request, C={args.batch_clients})", procs, args.batch_runs,
                  batches, url, args.batch_runs, args.batch, args.batch_clients, kind)
            print(f"  pyoco-es {kind} done", file=sys.stderr)
    if not args.skip_theirs:
        with tempfile.TemporaryDirectory() as tmp, theirs(Path(tmp), 0) as (url, procs):
            for kind in ("yaml", "named"):
                timed("pyoco-server", f"single {kind} submits/s (C={args.clients})", procs, args.runs, singles, url, args.runs, args.clients, kind)
            print("  pyoco-server done", file=sys.stderr)
    print(f"\n{'system':<14} {'metric':<52} {'runs/s':>10} {'server CPU ms/run':>18}")
    for system, metric, value, cpu in rows:
        print(f"{system:<14} {metric:<52} {value:>10.0f} {cpu:>18.2f}")
    theirs_single = {m.split()[1]: v for s, m, v, _ in rows if s == "pyoco-server"}
    for system, metric, value, _ in rows:
        if metric.startswith("batch") and metric.split()[1] in theirs_single:
            kind = metric.split()[1]
            print(f"batch {kind} vs pyoco-server single {kind}: {value / theirs_single[kind]:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
