"""Soak: the README's `pyoco-server up --with-worker` left up past every timer in the system while
runs are submitted and cancelled, a worker is SIGKILLed, a worker is frozen past its lease and
NATS is frozen.  A ledger of every submit (ok / refused / unknown) is checked at the end.

Timers outlived: Trio's idle-thread reaping (10 s), the run lease (15 s), the consumer ack wait and
the cancel grace (30 s).  The faults come from a schedule (they are the scenario, not waits for
state); every wait for state polls with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.testing.fleet import wait_for as _poll
from pyoco_es.testing.ledger import listed_runs

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
TERMINAL_EVENTS = {"run.completed", "run.failed", "run.cancelled"}

# One task sleeps cooperatively, so runs are in flight when the faults land.
SLOW_FLOW = b"""\
version: 1
flow:
  graph: wait_for_cancel >> to_text
tasks:
  wait_for_cancel: {callable: "examples.tasks:wait_for_cancel", inputs: {seconds: 1.5}}
  to_text: {callable: "examples.tasks:to_text", inputs: {value: "$node.wait_for_cancel.output"}}
"""
FAST_FLOW = (ROOT / "examples" / "flow.yaml").read_bytes()

# Seconds after the stack serves.
KILL_UP_WORKER_AT = 12.0
FREEZE_SECOND_WORKER_AT, THAW_SECOND_WORKER_AT = 28.0, 48.0  # 20 s > the 15 s lease
FREEZE_NATS_AT, THAW_NATS_AT = 60.0, 68.0
STOP_SUBMITTING_AT = 92.0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Ledger:
    """Every submit and its outcome, as the client saw it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: dict[str, str] = {}  # idempotency key -> run id
        self.refused: dict[str, str] = {}  # idempotency key -> status + body
        self.unknown: dict[str, tuple[bytes, str]] = {}  # idempotency key -> (flow, why)
        self.cancelled: set[str] = set()  # run ids a cancel was accepted for
        self.fault_log: list[tuple[float, str]] = []


def _submit(client: httpx.Client, url: str, key: str, flow: bytes) -> httpx.Response:
    return client.post(
        f"{url}/runs/yaml",
        files={"workflow": ("flow.yaml", flow)},
        data={"flow_name": "main", "tag": "default"},
        headers={"Idempotency-Key": key},
    )


def _submitter(url: str, ledger: Ledger, stop: threading.Event) -> None:
    n = 0
    with httpx.Client(timeout=30.0) as client:
        while not stop.is_set():
            n += 1
            key = str(uuid.uuid4())
            flow = SLOW_FLOW if n % 3 == 0 else FAST_FLOW
            try:
                r = _submit(client, url, key, flow)
            except httpx.HTTPError as exc:
                with ledger.lock:
                    ledger.unknown[key] = (flow, f"{type(exc).__name__}: {exc}")
                continue
            with ledger.lock:
                if r.status_code == 200:
                    ledger.ok[key] = r.json()["run_id"]
                elif r.status_code >= 500:
                    ledger.unknown[key] = (flow, f"{r.status_code} {r.text[:200]}")
                else:
                    ledger.refused[key] = f"{r.status_code} {r.text[:200]}"
            if r.status_code == 200 and n % 10 == 0:  # cancel some, a few of them while running
                try:
                    c = client.post(f"{url}/runs/{r.json()['run_id']}/cancel")
                    if c.status_code in (200, 202):
                        with ledger.lock:
                            ledger.cancelled.add(r.json()["run_id"])
                except httpx.HTTPError:
                    pass
            stop.wait(0.2)  # pacing: ~4 submits/s


@pytest.mark.soak
def test_the_readme_stack_survives_past_every_timer_with_faults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")}
    env["PYOCO_LOAD_DOTENV"] = "0"
    up_log = tmp_path / "up.log"
    w2_log = tmp_path / "w2.log"
    data = tmp_path / "data"
    procs: list[subprocess.Popen[bytes]] = []
    with open(up_log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-c", "from pyoco_es.cli.main import server_main; server_main()", "up",
             "--port", "0", "--data-dir", str(data), "--with-worker", "--allow-module", "examples"],
            cwd=ROOT, **tied_to_this_process(env), stdout=subprocess.DEVNULL, stderr=out, start_new_session=True,
        )
    procs.append(up)
    stop = threading.Event()
    ledger = Ledger()
    try:
        def gateway_url() -> str:
            assert up.poll() is None, up_log.read_text()
            for line in up_log.read_text().splitlines():
                if "gateway on" in line:
                    return line.split("gateway on ")[1].split()[0].rstrip("/")
            return ""

        url = _poll("the gateway", gateway_url, 60)
        nats_pid = int((data / "nats" / "nats-server.pid").read_text())
        nats_url = _poll("the NATS url", lambda: next(
            (w for line in up_log.read_text().splitlines() if "embedded NATS at" in line
             for w in line.split() if w.startswith("nats://")), ""), 10)
        with open(w2_log, "wb") as out:
            w2 = subprocess.Popen(
                [sys.executable, "-c", "from pyoco_es.cli.main import worker_main; worker_main()",
                 "--nats-url", nats_url, "--worker-id", "soak-w2", "--allow-module", "examples", "--log-level", "info"],
                cwd=ROOT, **tied_to_this_process(env), stdout=subprocess.DEVNULL, stderr=out, start_new_session=True,
            )
        procs.append(w2)

        def up_worker_pids() -> list[int]:
            return [p for p in _children(up.pid) if " worker" in _cmdline(p) and _alive(p)]

        first_worker = _poll("up's worker", lambda: up_worker_pids(), 30)[0]
        t0 = time.monotonic()
        submitter = threading.Thread(target=_submitter, args=(url, ledger, stop), daemon=True)
        submitter.start()

        def at(t: float) -> None:
            time.sleep(max(0.0, t0 + t - time.monotonic()))

        at(KILL_UP_WORKER_AT)
        assert up.poll() is None and _alive(first_worker), "up or its worker exited by itself:\n" + up_log.read_text()[-3000:]
        os.kill(first_worker, signal.SIGKILL)
        killed_at = time.time()
        ledger.fault_log.append((killed_at, f"SIGKILL up's worker {first_worker}"))
        def still_up(when: str) -> None:
            assert up.poll() is None, f"up exited {when}:\n" + up_log.read_text()[-3000:]

        at(FREEZE_SECOND_WORKER_AT)
        still_up("after its worker was SIGKILLed")
        os.kill(w2.pid, signal.SIGSTOP)
        w2_frozen_at = time.time()
        at(THAW_SECOND_WORKER_AT)
        os.kill(w2.pid, signal.SIGCONT)
        w2_thawed_at = time.time()
        at(FREEZE_NATS_AT)
        still_up("while a second worker was frozen")
        os.kill(nats_pid, signal.SIGSTOP)
        at(THAW_NATS_AT)
        os.kill(nats_pid, signal.SIGCONT)
        at(STOP_SUBMITTING_AT)
        stop.set()
        submitter.join(timeout=40)
        assert not submitter.is_alive()

        # The server, both workers and NATS are still up.
        assert up.poll() is None, up_log.read_text()[-3000:]
        assert w2.poll() is None, w2_log.read_text()[-3000:]
        assert _alive(nats_pid)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        _poll("up's worker restarted", up_worker_pids, 30)

        with httpx.Client(timeout=30.0) as client:
            # Unknown outcomes are resolved the way the 503 says: retry with the same key.
            for key, (flow, _why) in list(ledger.unknown.items()):
                r = _submit(client, url, key, flow)
                assert r.status_code == 200, r.text
                ledger.ok[key] = r.json()["run_id"]

            def all_terminal() -> bool:
                return all(
                    client.get(f"{url}/runs/{rid}").json().get("status") in TERMINAL for rid in ledger.ok.values()
                )

            _poll("every acknowledged run to end", all_terminal, 120, every=1.0)

            stored = listed_runs(client, url)

            lost_healthy: list[str] = []
            lost_faulted = 0
            for rid in ledger.ok.values():
                events = client.get(f"{url}/runs/{rid}/events").json()
                items = events["events"] if isinstance(events, dict) else events
                terminal = [e for e in items if e["type"] in TERMINAL_EVENTS]
                assert len(terminal) == 1, (rid, [e["type"] for e in items])
                if terminal[0]["type"] == "run.cancelled":
                    assert rid in ledger.cancelled, (rid, terminal[0])
                claims = {e["data"]["attempt"]: e for e in items if e["type"] == "run.claimed"}
                for lost in (e for e in items if e["type"] == "run.worker_lost"):
                    claim = claims[lost["data"]["attempt"]]
                    worker = claim["data"]["worker_id"]
                    claimed = claim["occurred_at"]
                    # Only the attempts of the killed worker and of the frozen one may be lost.
                    killed = worker != "soak-w2" and claimed <= killed_at + 1
                    frozen = worker == "soak-w2" and claimed <= w2_thawed_at + 1 and lost["occurred_at"] >= w2_frozen_at
                    if not (killed or frozen):
                        lost_healthy.append(f"{rid} attempt {lost['data']['attempt']} on {worker}")
                    else:
                        lost_faulted += 1
                snap = client.get(f"{url}/runs/{rid}").json()
                if snap["status"] == "FAILED":
                    lost_healthy.append(f"{rid} FAILED: {snap.get('error')}")
            assert not lost_healthy, lost_healthy
            assert set(ledger.ok.values()) <= stored
            assert stored <= set(ledger.ok.values()), "a run nobody got a 2xx or an unknown for is stored"
        print(f"soak ledger: ok {len(ledger.ok)} (of which unknown, then resolved {len(ledger.unknown)}), "
              f"refused {len(ledger.refused)}, cancelled {len(ledger.cancelled)}, stored {len(stored)}, "
              f"attempts lost with a faulted worker {lost_faulted}")
        assert len(ledger.ok) >= 200, (len(ledger.ok), len(ledger.refused), len(ledger.unknown))
        assert not ledger.refused, ledger.refused
        assert "Traceback" not in up_log.read_text(), up_log.read_text()[-5000:]
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

