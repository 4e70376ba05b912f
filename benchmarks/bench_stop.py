"""How long each pyoco-es process takes to exit after SIGTERM, with NATS fine, killed
(SIGKILL) or frozen (SIGSTOP), idle or with a run in progress (a worker's run is a task that
sleeps 60 s, so it never ends on its own within the drain).  ``up`` is ``pyoco-server up
--with-worker``; its NATS is its own nats-server child, killed or frozen; ``up-ext`` is the same
on a separate nats-server (``--nats-url``).

    .venv/bin/python benchmarks/bench_stop.py [--kinds worker,conductor,gateway,up,up-ext] [--nats fine,killed,frozen]

Prints one line per case: the process, NATS's state, idle/running, seconds from SIGTERM to exit,
the exit code.  The timers are the defaults except ``PYOCO_CANCEL_GRACE_PERIOD_SEC`` (2) and
``PYOCO_WORKER_DRAIN_TIMEOUT_SEC`` (3), so a run in progress adds at most ~5 s of documented wait.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyoco_es.nats.embedded import EmbeddedNats  # noqa: E402
from pyoco_es.lifeline import tied_to_this_process  # noqa: E402
from pyoco_es.testing.fleet import Fleet, wait_for  # noqa: E402

SLEEPY = """\
flow:
  graph: hold
tasks:
  hold: {callable: "tests.tasks:wait_for_file", inputs: {path: "/nonexistent/never", seconds: 60}}
"""
ENV = {"PYOCO_CANCEL_GRACE_PERIOD_SEC": "2", "PYOCO_WORKER_DRAIN_TIMEOUT_SEC": "3", "PYTHONPATH": str(ROOT)}


def _children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (nats-server is forked by a spawner thread)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def up_case(nats_state: str, running: bool, root: Path, external: EmbeddedNats | None = None) -> tuple[float, int | None]:
    """``pyoco-server up --with-worker``; NATS is its own nats-server child, or ``external``."""
    log = root / "up.log"
    where = ["--nats-url", external.url] if external is not None else ["--data-dir", str(root / "d")]
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "pyoco-server"), "--port", "0", *where, "--with-worker",
                                 "--allow-module", "tests.tasks"], cwd=ROOT, **tied_to_this_process({**os.environ, **ENV}),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out)  # fmt: skip
    try:
        wait_for("up's worker to serve", lambda: " serving " in log.read_text(), 60)
        g = wait_for("the gateway URL", lambda: next((ln.split("gateway on ")[1].split()[0].rstrip("/") for ln in log.read_text().splitlines() if "gateway on" in ln), None), 60)
        if running:
            _run_something(g)
        if external is not None and external.proc is not None:
            nats_pid = external.proc.pid
        else:
            nats_pid = next(p for p in _children(proc.pid) if "nats-server" in Path(f"/proc/{p}/cmdline").read_text(errors="replace"))
        return _fault_then_stop(nats_pid, nats_state, proc, log.read_text)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _fault_then_stop(nats_pid: int, nats_state: str, proc: subprocess.Popen[bytes], log_text: Callable[[], str]) -> tuple[float, int | None]:
    """Kill or freeze NATS (or leave it), SIGTERM ``proc``; seconds until it exited, its code."""
    if nats_state == "killed":
        os.kill(nats_pid, signal.SIGKILL)
    elif nats_state == "frozen":
        os.kill(nats_pid, signal.SIGSTOP)
    time.sleep(GONE_FOR)  # how long NATS has been away when the stop comes
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - t0
    if VERBOSE:
        print(log_text()[-4000:], file=sys.stderr)
    return took, code


def _run_something(g: str) -> None:
    with httpx.Client(timeout=10) as client:
        r = client.post(f"{g}/runs/yaml", files={"workflow": ("flow.yaml", SLEEPY)}, data={"flow_name": "main"})
        r.raise_for_status()
        rid = r.json()["run_id"]
        wait_for("the run to run", lambda: client.get(f"{g}/runs/{rid}").json()["status"] == "RUNNING", 30)


def one(kind: str, nats_state: str, running: bool, root: Path) -> tuple[float, int | None]:
    if kind == "up":
        return up_case(nats_state, running, root)
    if kind == "up-ext":
        server = EmbeddedNats(data_dir=root / "nats")
        server.start()
        try:
            return up_case(nats_state, running, root, server)
        finally:
            if server.proc is not None and server.proc.poll() is None:
                os.kill(server.proc.pid, signal.SIGCONT)
            server.stop()
    server = EmbeddedNats(data_dir=root / "nats")
    server.start()
    fleet = Fleet(server.url, root / "logs", ROOT, ENV)
    try:
        fleet.add("gateway", "g")
        fleet.add("conductor", "c")
        fleet.add("worker", "w", ["--allow-module", "tests.tasks"])
        if running:
            _run_something(fleet.members["g"].url)
        target = {"worker": "w", "conductor": "c", "gateway": "g"}[kind]
        assert server.proc is not None
        m = fleet.members[target]
        assert m.proc is not None
        took, code = _fault_then_stop(server.proc.pid, nats_state, m.proc, m.log_text)
        server.proc.poll()
        return took, code
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        fleet.stop(timeout=5)
        server.stop()


VERBOSE = False
GONE_FOR = 0.0


def main() -> None:
    global VERBOSE, GONE_FOR
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="worker,conductor,gateway,up,up-ext")
    ap.add_argument("--nats", default="fine,killed,frozen")
    ap.add_argument("--runs", default="idle,running")
    ap.add_argument("--verbose", action="store_true", help="print each stopped process's log tail")
    ap.add_argument("--drain", type=float, default=3.0, help="PYOCO_WORKER_DRAIN_TIMEOUT_SEC (default 3; pyoco-es's own default is 30)")
    ap.add_argument("--gone-for", type=float, default=0.0, help="seconds between killing/freezing NATS and the SIGTERM")
    ns = ap.parse_args()
    VERBOSE = ns.verbose
    GONE_FOR = ns.gone_for
    ENV["PYOCO_WORKER_DRAIN_TIMEOUT_SEC"] = str(ns.drain)
    for kind in ns.kinds.split(","):
        for state in ns.nats.split(","):
            for run in ns.runs.split(","):
                if run == "running" and kind not in ("worker", "up", "up-ext"):
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    took, code = one(kind, state, run == "running", Path(tmp))
                print(f"{kind:9} nats={state:6} {run:7} exit after {took:6.2f} s  code={code}", flush=True)


if __name__ == "__main__":
    main()
