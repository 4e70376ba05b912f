"""CPU cost per HTTP request of `pyoco-server up`, by kind (where the gateway's time goes).

Starts `pyoco-server up` (no worker), sends N requests of each kind with 8 concurrent clients from
this process, and prints the CPU the server's processes (gateway + conductor, nats-server) used
per request.  `/health` is the floor that Quart + Hypercorn cost before any pyoco-es work.

    .venv/bin/python benchmarks/bench_request_cost.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as e2e  # noqa: E402 - the same launcher and CPU accounting
import leanhttp  # noqa: E402 - a client cheap enough not to skew the server's share of the cores


async def drive(url: str, n: int, kind: str) -> None:
    async with leanhttp.Client(url) as client:
        run_id, _ = await e2e.submit(client, tag="nobody")
        todo = iter(range(n))

        async def one() -> None:
            for _ in todo:
                if kind == "GET /health":
                    await client.get("/health")
                elif kind == "GET /runs/{id}":
                    await client.get(f"/runs/{run_id}")
                elif kind == "GET /runs?limit=50":
                    await client.get("/runs?limit=50")
                else:
                    await e2e.submit(client, tag="nobody")

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, e2e.ours(Path(tmp), 0, 1) as (url, procs):
        for kind in ("GET /health", "GET /runs/{id}", "GET /runs?limit=50", "POST /runs/yaml (+ projection)"):
            cpu0, t0 = procs.cpu(), time.perf_counter()
            trio.run(drive, url, args.requests, kind)
            elapsed = time.perf_counter() - t0
            print(f"{kind:<34} {(procs.cpu() - cpu0) * 1000 / args.requests:5.2f} ms CPU/request  {args.requests / elapsed:6.0f} req/s")


if __name__ == "__main__":
    main()
