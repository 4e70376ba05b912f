"""A 3-node NATS cluster (R3) against one embedded server (R1), each with ``sync_interval`` 1s and
always: completed runs/s and end-to-end latency (p50/p99) under a closed-loop load.

The same processes run on both, all on this machine: 2 gateways (clients alternate between them),
1 conductor, 3 workers (concurrency 4 each), the trivial 2-task flow of examples/flow.yaml.
``--clients`` clients each submit a run, poll it until it ends, and submit the next;
end-to-end latency is the run's ``end_time`` minus the client's submit time.  The four
configurations alternate (``--rounds`` times), so a load change on a shared machine hits all of
them; the median of the rounds is reported.

    .venv/bin/python benchmarks/bench_cluster.py [--runs 400] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import leanhttp  # noqa: E402 - the benchmark's own cheap HTTP client
from bench_e2e import pct, submit, wait_terminal  # noqa: E402

from pyoco_es.nats.cluster import NatsCluster  # noqa: E402
from pyoco_es.nats.embedded import EmbeddedNats  # noqa: E402
from pyoco_es.testing.fleet import Fleet  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = (("one server R1", "1s"), ("3-node cluster R3", "1s"), ("one server R1", "always"), ("3-node cluster R3", "always"))


@contextmanager
def system(tmp: Path, kind: str, sync: str) -> Iterator[list[str]]:
    """NATS of ``kind`` plus 2 gateways, 1 conductor, 3 workers; yields the gateway URLs."""
    if kind.startswith("3-node"):
        cluster = NatsCluster(root=tmp / "nodes", sync=sync)
        urls, replicas, stop = cluster.start(), "3", cluster.stop
    else:
        server = EmbeddedNats(data_dir=tmp / "nats", sync=sync)
        urls, replicas, stop = server.start(), "1", server.stop
    fleet = Fleet(urls, tmp / "logs", REPO, {"PYOCO_NATS_REPLICAS": replicas})
    try:
        fleet.add("conductor", "c1")
        for g in ("g1", "g2"):
            fleet.add("gateway", g)
        for w in ("w1", "w2", "w3"):
            fleet.add("worker", w, ["--concurrency", "4", "--allow-module", "examples"])
        yield fleet.gateways()
    finally:
        fleet.stop()
        stop()


async def closed_loop(urls: list[str], n: int, clients: int) -> tuple[float, list[float], int]:
    """(completed runs/s, end-to-end latencies in ms, runs not COMPLETED)"""
    latencies: list[float] = []
    failed = 0
    todo = iter(range(n))
    async with leanhttp.Client(urls[0]) as a, leanhttp.Client(urls[1]) as b:
        for c in (a, b):  # warm-up
            await wait_terminal(c, (await submit(c))[0], poll=0.02)
        t0 = time.time()
        ends: list[float] = []

        async def client(http: leanhttp.Client) -> None:
            nonlocal failed
            for _ in todo:
                run_id, t = await submit(http)
                snap = await wait_terminal(http, run_id, poll=0.01)
                end = float(snap["end_time"] or time.time())
                ends.append(end)
                latencies.append((end - t) * 1000)
                failed += snap["status"] != "COMPLETED"

        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, a if i % 2 == 0 else b)
    return n / (max(ends) - t0), latencies, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for rnd in range(args.rounds):
        for kind, sync in CONFIGS:
            with tempfile.TemporaryDirectory() as tmp, system(Path(tmp), kind, sync) as urls:
                rate, lat, failed = trio.run(closed_loop, urls, args.runs, args.clients)
            results.setdefault((kind, sync), []).append((rate, statistics.median(lat), pct(lat, 0.99)))
            print(f"round {rnd + 1}: {kind}, sync {sync}: {rate:.0f} runs/s, p50 {statistics.median(lat):.0f} ms, "
                  f"p99 {pct(lat, 0.99):.0f} ms{f', {failed} not completed' if failed else ''}", file=sys.stderr, flush=True)  # fmt: skip
    print(f"\n{args.runs} runs x {args.rounds} rounds, {args.clients} closed-loop clients, 2 gateways, 1 conductor, 3 workers x 4")
    print(f"{'NATS':<20} {'sync':<7} {'runs/s':>8} {'p50 ms':>8} {'p99 ms':>8}   (median of rounds)")
    for (kind, sync), rows in results.items():
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        print(f"{kind:<20} {sync:<7} {med[0]:>8.0f} {med[1]:>8.0f} {med[2]:>8.0f}")


if __name__ == "__main__":
    main()
