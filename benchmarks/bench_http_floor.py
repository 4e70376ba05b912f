"""What one HTTP request costs before any pyoco work: the floor under issue 18's single-submit target.

Serves an ASGI app that does nothing (reads the body, answers a fixed submit-shaped JSON) with
the HTTP servers involved, and drives ``POST /runs`` with the same client and concurrency as
bench_e2e.py's single submits; then, in the same run, the real ``POST /runs`` of pyoco-es (`pyoco-server
up`, no worker) and of pyoco-server 0.5.1.  Prints requests/s and the server processes' CPU per
request (nats-server included for the real systems).

- hypercorn, trio worker: pyoco-es's server (the design card's hypercorn + quart-trio);
- uvicorn (h11, asyncio) and uvicorn + FastAPI + a pydantic model: pyoco-server's stack, from
  its venv (benchmarks/.pyoco-server-venv, made on first use as in bench_e2e.py).

    .venv/bin/python benchmarks/bench_http_floor.py [--requests 6000] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as e2e  # noqa: E402 - the same launchers, client and CPU accounting
import leanhttp  # noqa: E402

HERE = Path(__file__).resolve().parent
BODY = json.dumps({"flow_name": "main", "tag": "nobody", "params": {"x": 1}}).encode()


async def drive(url: str, n: int, clients: int) -> float:
    async with leanhttp.Client(url) as client:
        (await client.post("/runs", BODY, e2e.JSON)).raise_for_status()  # warm-up
        todo = iter(range(n))
        t0 = time.perf_counter()

        async def one() -> None:
            for _ in todo:
                (await client.post("/runs", BODY, e2e.JSON)).raise_for_status()

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one)
        return n / (time.perf_counter() - t0)


def bare_server(cmd: list[str], args: argparse.Namespace) -> tuple[float, float]:
    """(requests/s, CPU ms per request) of a server started with ``cmd`` (PORT replaced)."""
    port = e2e.free_port()
    procs = e2e.Procs()
    procs.start([c.replace("PORT", str(port)) for c in cmd], stderr=subprocess.DEVNULL, cwd=HERE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                trio.run(drive, url, 1, 1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        cpu0 = procs.cpu()
        rate = trio.run(drive, url, args.requests, args.clients)
        return rate, (procs.cpu() - cpu0) * 1000 / args.requests
    finally:
        procs.stop()


def real_system(start, args: argparse.Namespace) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp, start(Path(tmp), 0) as (url, procs):
        trio.run(drive, url, 200, args.clients)  # start-up work out of the numbers
        cpu0 = procs.cpu()
        rate = trio.run(drive, url, args.requests, args.clients)
        return rate, (procs.cpu() - cpu0) * 1000 / args.requests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds; the table shows medians")
    args = ap.parse_args()
    theirs_bin = e2e.ensure_their_venv()
    cases = {
        "hypercorn (trio), bare ASGI app": lambda: bare_server([str(e2e.VENV / "hypercorn"), "-k", "trio", "-b", "127.0.0.1:PORT", "floor_apps:bare"], args),
        "uvicorn (h11, asyncio), bare ASGI app": lambda: bare_server(
            [str(theirs_bin / "uvicorn"), "--port", "PORT", "--log-level", "warning", "floor_apps:bare"], args),
        "uvicorn + FastAPI + pydantic, no work": lambda: bare_server(
            [str(theirs_bin / "uvicorn"), "--port", "PORT", "--log-level", "warning", "floor_apps:fastapi_app"], args),
        "pyoco-es POST /runs (up, no worker)": lambda: real_system(lambda tmp, w: e2e.ours(tmp, w, 1), args),
        "pyoco-server 0.5.1 POST /runs (no worker)": lambda: real_system(e2e.theirs, args),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for round_ in range(args.rounds):
        for name, case in cases.items():
            results[name].append(case())
            print(f"  round {round_ + 1}: {name} done", file=sys.stderr)
    print(f"\n{'POST /runs, C=' + str(args.clients):<44} {'req/s':>8} {'server CPU ms/request':>22}")
    for name, rows in results.items():
        print(f"{name:<44} {statistics.median(r for r, _ in rows):>8.0f} {statistics.median(c for _, c in rows):>22.3f}")


if __name__ == "__main__":
    main()
