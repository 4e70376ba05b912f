"""How long each pyoco-es process takes to exit after SIGTERM, with NATS fine, killed
(SIGKILL) or frozen (SIGSTOP), idle or with a run in progress (a worker's run is a task that
sleeps 60 s, so it never ends on its own within the drain).

    .venv/bin/python benchmarks/bench_stop.py [--kinds worker,conductor,gateway] [--nats fine,killed,frozen]

Prints one line per case: the process, NATS's state, idle/running, seconds from SIGTERM to exit,
the exit code.  The timers are the defaults except ``PYOCO_CANCEL_GRACE_PERIOD_SEC`` (2) and
``PYOCO_WORKER_DRAIN_TIMEOUT_SEC`` (3), so a run in progress adds at most ~5 s of documented wait.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyoco_es.nats.embedded import EmbeddedNats  # noqa: E402
from pyoco_es.testing.fleet import Fleet, wait_for  # noqa: E402

SLEEPY = """\
flow:
  graph: hold
tasks:
  hold: {callable: "tests.tasks:wait_for_file", inputs: {path: "/nonexistent/never", seconds: 60}}
"""
ENV = {"PYOCO_CANCEL_GRACE_PERIOD_SEC": "2", "PYOCO_WORKER_DRAIN_TIMEOUT_SEC": "3", "PYTHONPATH": str(ROOT)}


def one(kind: str, nats_state: str, running: bool, root: Path) -> tuple[float, int | None]:
    server = EmbeddedNats(data_dir=root / "nats")
    server.start()
    fleet = Fleet(server.url, root / "logs", ROOT, ENV)
    try:
        fleet.add("gateway", "g")
        fleet.add("conductor", "c")
        fleet.add("worker", "w", ["--allow-module", "tests.tasks"])
        if running:
            g = fleet.members["g"].url
            with httpx.Client(timeout=10) as client:
                r = client.post(f"{g}/runs/yaml", files={"workflow": ("flow.yaml", SLEEPY)}, data={"flow_name": "main"})
                r.raise_for_status()
                rid = r.json()["run_id"]
                wait_for("the run to run", lambda: client.get(f"{g}/runs/{rid}").json()["status"] == "RUNNING", 30)
        target = {"worker": "w", "conductor": "c", "gateway": "g"}[kind]
        assert server.proc is not None
        if nats_state == "killed":
            server.proc.kill()
            server.proc.wait()
        elif nats_state == "frozen":
            os.kill(server.proc.pid, signal.SIGSTOP)
        m = fleet.members[target]
        assert m.proc is not None
        t0 = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = m.proc.wait(timeout=90)
        except Exception:
            code = None
        took = time.monotonic() - t0
        if VERBOSE:
            print(m.log_text()[-4000:], file=sys.stderr)
        return took, code
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        fleet.stop(timeout=5)
        server.stop()


VERBOSE = False


def main() -> None:
    global VERBOSE
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="worker,conductor,gateway")
    ap.add_argument("--nats", default="fine,killed,frozen")
    ap.add_argument("--runs", default="idle,running")
    ap.add_argument("--verbose", action="store_true", help="print each stopped process's log tail")
    ns = ap.parse_args()
    VERBOSE = ns.verbose
    for kind in ns.kinds.split(","):
        for state in ns.nats.split(","):
            for run in ns.runs.split(","):
                if run == "running" and kind != "worker":
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    took, code = one(kind, state, run == "running", Path(tmp))
                print(f"{kind:9} nats={state:6} {run:7} exit after {took:6.2f} s  code={code}", flush=True)


if __name__ == "__main__":
    main()
