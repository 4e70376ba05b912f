"""Gateway numbers over real HTTP (issue 3): submit throughput, list latency at 10,000 runs, and
SSE delivery latency (event appended → snapshot frame at a connected watcher).

Each part runs on a private stack (nats-server with sync 1s, conductor, gateway on a random port),
driven by httpx from the same Trio program.

    .venv/bin/python benchmarks/bench_gateway.py [--submits 2000] [--concurrency 32] [--runs 10000]

The submit load comes from a separate process (a small keep-alive HTTP/1.1 client), as an
external client would: an in-process httpx client takes most of the 2 cores itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from pyoco_es.config import Settings
from pyoco_es.core import decide
from pyoco_es.core.codec import encode_snapshot
from pyoco_es.core.events import Event, Producer
from pyoco_es.core.model import RunSnapshot, RunStatus
from pyoco_es.lifeline import exit_with_parent, tied_to_this_process
from pyoco_es.nats import subjects
from pyoco_es.service import RunStore
from pyoco_es.testing.stack import open_stack


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def ms(v: float) -> str:
    return f"{v * 1000:.2f} ms"


async def load_client(url: str, conc: int, n: int, keyed: bool) -> None:
    """A minimal keep-alive HTTP/1.1 load generator (runs in its own process, so the client's CPU
    does not compete with the gateway's event loop); prints runs/s and latency percentiles."""
    u = urlsplit(url)
    latencies: list[float] = []

    async def conn(start: int, count: int) -> None:
        stream = await trio.open_tcp_stream(u.hostname or "127.0.0.1", u.port or 80)
        buf = b""
        for i in range(start, start + count):
            body = json.dumps({"flow_name": "bench", "params": {"i": i}}).encode()
            key = f"Idempotency-Key: bench-{i}\r\n" if keyed else ""
            head = f"POST /runs HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n{key}Content-Length: {len(body)}\r\n\r\n"
            t0 = time.perf_counter()
            await stream.send_all(head.encode() + body)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    lines = buf[:end].decode().split("\r\n")
                    assert " 200 " in lines[0] + " ", lines[0]
                    length = int(next(ln for ln in lines if ln.lower().startswith("content-length")).split(":")[1])
                    if len(buf) >= end + 4 + length:
                        buf = buf[end + 4 + length :]
                        break
                buf += await stream.receive_some(65536)
            latencies.append(time.perf_counter() - t0)
        await stream.aclose()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        per = n // conc
        for c in range(conc):
            nursery.start_soon(conn, c * per, per)
    elapsed = time.perf_counter() - t0
    print(f"{len(latencies) / elapsed:.0f} {statistics.median(latencies)} {pct(latencies, 0.99)}")


async def bench_submits(n: int, concurrency: int) -> None:
    async with open_stack(Path(tempfile.mkdtemp()), settings=Settings()) as stack:
        for conc, keyed in ((1, False), (concurrency, False), (concurrency, True)):
            count = max(conc, n // (4 if conc == 1 else 1))
            cmd = [sys.executable, __file__, "--load-client", stack.url, str(conc), str(count), "1" if keyed else "0"]
            result = await trio.run_process(cmd, capture_stdout=True, **tied_to_this_process())  # it dies with us
            rate, p50, p99 = result.stdout.decode().split()
            label = f"{conc} concurrent connection{'s' if conc > 1 else ''}" + (", Idempotency-Key" if keyed else "")
            print(f"submit POST /runs ({label}; conductor in the same process): {float(rate):,.0f} runs/s, "
                  f"p50 {ms(float(p50))}, p99 {ms(float(p99))}")
        stack.nursery.cancel_scope.cancel()


async def bench_list(n: int) -> None:
    async with open_stack(Path(tempfile.mkdtemp()), settings=Settings(), conductor=False) as stack:
        statuses = list(RunStatus)
        base = time.time() - n
        items = []
        for i in range(n):
            snap = RunSnapshot(
                run_id=f"r{i:06d}", flow_name=f"flow{i % 7}", tag=f"t{i % 3}", tags=(f"t{i % 3}",), params={"i": i},
                status=statuses[i % len(statuses)], submitted_at=base + i, updated_at=base + i, version=1, last_stream_seq=0,
            )
            items.append((subjects.kv_subject(subjects.RUNS_BUCKET, snap.run_id), encode_snapshot(snap), None, None))
        t0 = time.perf_counter()
        for k in range(0, n, 1000):
            await stack.nats.publish_many(items[k : k + 1000])
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
            while (await client.get("/ready")).json()["run_index"]["runs"] < n:
                await trio.sleep(0.01)
            print(f"index: {n:,} snapshots written and indexed by the live watch in {time.perf_counter() - t0:.2f} s")
            cursor = (await client.get("/runs", params={"limit": 50, "updated_after": 0})).json()["next_cursor"]
            cases: tuple[tuple[str, dict[str, Any]], ...] = (
                ("GET /runs?limit=50", {"limit": 50}),
                ("GET /runs?limit=50&status=RUNNING", {"limit": 50, "status": "RUNNING"}),
                ("GET /runs?limit=50&flow=flow3&tag=t1", {"limit": 50, "flow": "flow3", "tag": "t1"}),
                ("GET /runs?limit=50&cursor=… (page 2)", {"limit": 50, "cursor": cursor}),
                ("GET /runs?limit=200&updated_after=0", {"limit": 200, "updated_after": 0}),
            )
            for label, params in cases:
                times = []
                for _ in range(100):
                    t1 = time.perf_counter()
                    r = await client.get("/runs", params=params)
                    times.append(time.perf_counter() - t1)
                    assert r.status_code == 200
                print(f"list at {n:,} runs, {label}: p50 {ms(statistics.median(times))}, p99 {ms(pct(times, 0.99))}")
        stack.nursery.cancel_scope.cancel()


def claim(snap: RunSnapshot | None, *, run_id: str) -> list[Event]:
    return decide.claim_run(snap, run_id=run_id, attempt=1, worker_id="bench", lease_seconds=15.0)


async def bench_sse(samples: int) -> None:
    async with open_stack(Path(tempfile.mkdtemp()), settings=Settings()) as stack:
        store = RunStore(stack.nats)
        worker = Producer(kind="worker", id="bench", attempt=1)
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
            latencies = []
            for _ in range(samples):
                run_id = (await client.post("/runs", json={"flow_name": "bench"})).json()["run_id"]
                async with client.stream("GET", f"/runs/{run_id}/watch") as resp:
                    lines = resp.aiter_lines()
                    async for line in lines:  # the initial snapshot
                        if line.startswith("data:"):
                            break
                    t0 = time.perf_counter()
                    await store.execute(run_id, partial(claim, run_id=run_id), producer=worker)
                    async for line in lines:
                        if line.startswith("data:") and '"RUNNING"' in line:
                            latencies.append(time.perf_counter() - t0)
                            break
            print(f"SSE delivery (append run.claimed → frame at a watcher, via projector + KV watch), {samples} samples: "
                  f"p50 {ms(statistics.median(latencies))}, p90 {ms(pct(latencies, 0.9))}, max {ms(max(latencies))}")
        stack.nursery.cancel_scope.cancel()


async def main(args: argparse.Namespace) -> None:
    if args.load_client:
        exit_with_parent()
        url, conc, n, keyed = args.load_client
        await load_client(url, int(conc), int(n), keyed == "1")
        return
    await bench_submits(args.submits, args.concurrency)
    await bench_list(args.runs)
    await bench_sse(args.sse_samples)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submits", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--sse-samples", type=int, default=50)
    parser.add_argument("--load-client", nargs=4, metavar=("URL", "CONC", "N", "KEYED"), help=argparse.SUPPRESS)
    trio.run(main, parser.parse_args())
