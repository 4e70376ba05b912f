"""Event store and projector throughput through our own bridge and adapter (issue 2).

Prints appends/s (sequential and pipelined) and the projector's events/s and KV writes per run.
Each measurement uses a private nats-server (default sync 1s, like `pyoco-server up`).

    .venv/bin/python benchmarks/bench_eventstore.py [--runs 5000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import trio

from pyoco_es.conductor.projector import Projector, run_projector
from pyoco_es.core import decide
from pyoco_es.core.events import Envelope, Producer, RunClaimed, RunCompleted, RunSubmitted, TaskCompleted, TaskStarted
from pyoco_es.nats import subjects
from pyoco_es.nats.client import open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.resources import ensure_resources

P = Producer(kind="bench", id="b")
TASKS = ["t1", "t2", "t3", "t4"]


def run_history(run_id: str) -> list[Envelope]:
    """A realistic 10-event run: submitted, claimed, 4 tasks started/completed... ended."""
    events = [
        RunSubmitted(flow_name="main", params={"x": 1}, tag="default", tags=["default"], submitted_at=time.time()),
        RunClaimed(worker_id="w1", attempt=1, lease_seconds=15.0, tasks=TASKS),
    ]
    for t in TASKS:
        events.append(TaskStarted(attempt=1, task=t, started_at=1.0))
        events.append(TaskCompleted(attempt=1, task=t, ended_at=2.0, duration_ms=1.0, output={"v": 1}))
    events = events[:9] + [RunCompleted(attempt=1, ended_at=3.0)]
    return decide.stamp(None, events, run_id=run_id, producer=P, now=time.time(), new_id=lambda: uuid.uuid4().hex)


async def bench(runs: int, sync: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(data_dir=Path(tmp), sync=sync)
        url = server.start()
        try:
            async with open_nats(url, name="bench") as nats:
                await ensure_resources(nats)
                histories = [(uuid.uuid4().hex, None) for _ in range(runs)]
                hist = {r: run_history(r) for r, _ in histories}

                # Sequential: one event at a time, one crossing each.
                n_seq = min(2000, runs // 5) or 1
                seq_runs = list(hist)[:n_seq // 10 or 1]
                t0 = time.perf_counter()
                count = 0
                for r in seq_runs:
                    last = 0
                    for env in hist[r]:
                        [last] = await nats.append(r, [env], expected_last=last)
                        count += 1
                seq_rate = count / (time.perf_counter() - t0)

                # Pipelined: 100 runs in flight, each run's 10 events in order, one crossing per 100 runs.
                rest = list(hist)[len(seq_runs):]
                t0 = time.perf_counter()
                events = 0
                for i in range(0, len(rest), 100):
                    chunk = rest[i : i + 100]
                    res = await nats.append_many([(r, hist[r], 0) for r in chunk])
                    events += sum(len(x) for x in res if isinstance(x, list))
                pipe_rate = events / (time.perf_counter() - t0)
                total_events = count + events
                print(f"[sync {sync}] appends: sequential {seq_rate:,.0f} ev/s; pipelined (100 runs in flight) {pipe_rate:,.0f} ev/s ({events} events)")

                # Projector over everything just appended (runs interleaved in 100-run waves).
                proj = Projector(nats)
                t0 = time.perf_counter()
                async with trio.open_nursery() as n:
                    await n.start(lambda task_status: run_projector(nats, projector=proj, task_status=task_status))
                    while proj.statistics().events_projected < total_events:
                        await trio.sleep(0.01)
                    elapsed = time.perf_counter() - t0
                    n.cancel_scope.cancel()
                st = proj.statistics()
                n_runs = len(hist)
                print(
                    f"[sync {sync}] projector: {st.events_projected / elapsed:,.0f} ev/s, {st.kv_writes / n_runs:.2f} KV writes/run "
                    f"({st.kv_writes} writes, {st.kv_conflicts} conflicts, {st.work_items_published} work items) in {elapsed:.2f}s"
                )
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5000)
    ap.add_argument("--sync", default="1s", choices=["1s", "always", "default"])
    args = ap.parse_args()
    trio.run(bench, args.runs, args.sync)


if __name__ == "__main__":
    main()
