"""API keys on vs off (issue 13): completed runs/s of pyoco-es, the same workload as bench_e2e.py.

Starts ``pyoco-server up`` plus one worker, alternately with ``PYOCO_HTTP_AUTH_MODE`` unset and
``api_key`` (a key made with ``pyoco-server-admin``, sent on every request: submit and each poll),
``--rounds`` times each, and prints every round and the medians.

    .venv/bin/python benchmarks/bench_auth.py [--runs 1000] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402
import leanhttp  # noqa: E402
from pyoco_es.lifeline import tied_to_this_process  # noqa: E402


def one_round(auth: bool, args: argparse.Namespace) -> float:
    saved = dict(os.environ)
    os.environ["PYOCO_LOAD_DOTENV"] = "0"
    if auth:
        os.environ["PYOCO_HTTP_AUTH_MODE"] = "api_key"
    else:
        os.environ.pop("PYOCO_HTTP_AUTH_MODE", None)
    try:
        with tempfile.TemporaryDirectory() as tmp, bench_e2e.ours(Path(tmp), 1, args.concurrency) as (url, _procs):
            leanhttp.Client.extra_headers = b""
            if auth:
                log = (Path(tmp) / "ours-up.log").read_text()
                nats = next(line.split()[3] for line in log.splitlines() if "embedded NATS at" in line)
                out = subprocess.run(
                    [str(bench_e2e.VENV / "pyoco-server-admin"), "--nats-url", nats, "api-key", "create", "--tenant", "bench"],
                    capture_output=True, text=True, check=True, **tied_to_this_process(),
                )
                leanhttp.Client.extra_headers = b"X-API-Key: " + json.loads(out.stdout)["api_key"].encode() + b"\r\n"
            done, _, failed = trio.run(bench_e2e.throughput, url, args.runs, args.clients)
            if failed:
                raise RuntimeError(f"{failed} runs did not complete")
            return done
    finally:
        os.environ.clear()
        os.environ.update(saved)
        leanhttp.Client.extra_headers = b""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    results: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for auth in (False, True):
            rate = one_round(auth, args)
            results[auth].append(rate)
            print(f"  auth {'on ' if auth else 'off'}: {rate:.1f} completed runs/s", file=sys.stderr)
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print(f"completed runs/s (median of {args.rounds}, {args.runs} runs, C={args.clients}, 1 worker): "
          f"auth off {off:.1f}, auth on {on:.1f} ({(on - off) / off * 100:+.1f} %)")


if __name__ == "__main__":
    main()
