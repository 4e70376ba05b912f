"""A client-side ledger of every submit (Jepsen-style: ok / refused / unknown) and the checks run
over it after a fault, shared by the fault suites.

Each submit is a one-task YAML run whose task (``tests.tasks:side_effect`` in this repository's
suite) appends one line ``<token> <pid>`` to a file per execution and then lasts ``seconds``; the
token is the submit's ``Idempotency-Key``, so executions are counted per run outside the system.

After the load stops, :func:`check` resolves every unknown outcome by retrying with the same key,
waits (with a deadline) for every ok run to end, and asserts: exactly one terminal event per run,
nothing after it; no run stored that nobody got a 2xx for; executions ≤ attempts recorded (and a
completed run executed at least once); ``pyoco-es replay`` finds no difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx

from ..lifeline import tied_to_this_process
from .fleet import wait_for

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
TERMINAL_EVENTS = frozenset({"run.completed", "run.failed", "run.cancelled"})
TASK = "tests.tasks:side_effect"
RECORDED: list[str] = []  # every case's figures line, in order (a test session prints them at the end)


def side_effect_flow(effects: Path, token: str, seconds: float, task: str = TASK) -> bytes:
    """The YAML of one run: a task that records one execution in ``effects`` and lasts ``seconds``."""
    defaults = json.dumps({"path": str(effects), "token": token, "seconds": seconds})
    return f"version: 1\nflow:\n  graph: side_effect\n  defaults: {defaults}\ntasks:\n  side_effect: {{callable: \"{task}\"}}\n".encode()


@attrs.define(eq=False)
class Ledger:
    """Every submit of one case and what the client saw.  ``tag`` is the runs' tag, so what the
    system stored for this case can be listed."""

    tag: str
    effects: Path
    ok: dict[str, str] = attrs.Factory(dict)  # idempotency key -> run id
    refused: dict[str, str] = attrs.Factory(dict)  # key -> status and body
    unknown: dict[str, str] = attrs.Factory(dict)  # key -> why (until resolved)
    resolved: int = 0  # unknown outcomes a retry with the same key turned into ok
    flows: dict[str, bytes] = attrs.Factory(dict)
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def submit(self, client: httpx.Client, url: str, key: str) -> None:
        """One submit (or a retry of ``key``) through ``url``, recorded as ok, refused or unknown."""
        try:
            r = client.post(f"{url}/runs/yaml", files={"workflow": ("flow.yaml", self.flows[key])},
                            data={"flow_name": "main", "tag": self.tag}, headers={"Idempotency-Key": key})  # fmt: skip
        except httpx.HTTPError as exc:
            with self.lock:
                self.unknown[key] = f"{type(exc).__name__}: {exc}"
            return
        with self.lock:
            if r.status_code == 200:
                if self.unknown.pop(key, None) is not None:
                    self.resolved += 1
                self.ok[key] = r.json()["run_id"]
            elif r.status_code >= 500:
                self.unknown[key] = f"{r.status_code} {r.text[:200]}"
            else:
                self.refused[key] = f"{r.status_code} {r.text[:200]}"


class Submitter(threading.Thread):
    """Paced submits (``rate`` per second) through the live gateways in turn, until :meth:`stop`."""

    def __init__(self, ledger: Ledger, gateways: Callable[[], list[str]], *, rate: float = 4.0, seconds: tuple[float, ...] = (1.0, 1.5)) -> None:
        super().__init__(name=f"submitter-{ledger.tag}", daemon=True)
        self.ledger = ledger
        self.gateways = gateways
        self.rate = rate
        self.seconds = seconds
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        with httpx.Client(timeout=15.0) as client:
            while not self._halt.is_set():
                urls = self.gateways()
                if urls:
                    key = f"{self.ledger.tag}-{n}-{uuid.uuid4().hex[:8]}"
                    self.ledger.flows[key] = side_effect_flow(self.ledger.effects, key, self.seconds[n % len(self.seconds)])
                    self.ledger.submit(client, urls[n % len(urls)], key)
                    n += 1
                self._halt.wait(1.0 / self.rate)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the submitter did not stop"


@attrs.frozen
class Figures:
    """What one case's ledger shows (printed for the record)."""

    case: str
    submitted: int
    ok: int
    resolved_unknown: int
    refused: int
    completed: int
    failed: dict[str, int]
    executions: int
    attempts: int
    re_executed: int
    worker_lost: int
    settle_seconds: float
    claims_by_worker: dict[str, int]

    def line(self) -> str:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "0"
        return (f"ledger {self.case}: submitted {self.submitted}, ok {self.ok} (of which unknown then resolved "
                f"{self.resolved_unknown}), refused {self.refused}, lost 0; completed {self.completed}, failed {failed}; "
                f"executions {self.executions} <= attempts {self.attempts} (runs executed twice {self.re_executed}, "
                f"worker_lost events {self.worker_lost}; claims by worker {dict(sorted(self.claims_by_worker.items()))}); all ended {self.settle_seconds:.1f} s after the load stopped")  # fmt: skip


def resolve_unknown(ledger: Ledger, gateways: Callable[[], list[str]], timeout: float = 60.0) -> None:
    """Retry every unknown submit with its own key until each is ok or refused."""
    with httpx.Client(timeout=15.0) as client:
        deadline = time.monotonic() + timeout
        while ledger.unknown:
            assert time.monotonic() < deadline, f"unknown submits still unresolved: {ledger.unknown}"
            for i, key in enumerate(list(ledger.unknown)):
                urls = gateways()
                ledger.submit(client, urls[i % len(urls)], key)
            if ledger.unknown:
                time.sleep(0.5)


def _events(client: httpx.Client, url: str, run_id: str) -> list[dict[str, Any]]:
    body = client.get(f"{url}/runs/{run_id}/events").json()
    return list(body["events"] if isinstance(body, dict) else body)


def listed_runs(client: httpx.Client, url: str, tag: str | None = None) -> set[str]:
    """Every run ``GET /runs`` lists through ``url`` (of ``tag``), all pages."""
    out: set[str] = set()
    cursor: str | None = None
    while True:  # the delta form of GET /runs pages with a cursor
        params: dict[str, Any] = {"limit": 200, "updated_after": 0} | ({"tag": tag} if tag else {})
        if cursor:
            params["cursor"] = cursor
        body = client.get(f"{url}/runs", params=params).json()
        out |= {item["run_id"] for item in body["items"]}
        cursor = body.get("next_cursor")
        if not cursor:
            return out


def replay_differences(nats_url: str, *, cwd: Path | None = None, timeout: float = 30.0) -> list[Any]:
    """``pyoco-es replay``'s differences, polled until there are none or ``timeout`` passed (a
    projector may still be writing the last snapshots)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")} | {"PYOCO_LOAD_DOTENV": "0"}
    cmd = [sys.executable, "-c", "from pyoco_es.cli.main import main; main()", "replay", "--nats-url", nats_url, "--output", "json"]
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, **tied_to_this_process(env))
        assert out.stdout.strip(), out.stderr
        diffs = list(json.loads(out.stdout)["differences"])
        if not diffs and out.returncode == 0:
            return []
        if time.monotonic() > deadline:
            return diffs
        time.sleep(1.0)


def check(ledger: Ledger, gateways: Callable[[], list[str]], nats_url: str, *, settle: float, case: str) -> Figures:
    """Resolve unknowns, wait for every ok run to end (``settle`` s at most: lease + grace), assert
    the invariants, print the figures and return them."""
    started = time.monotonic()
    resolve_unknown(ledger, gateways)
    with httpx.Client(timeout=15.0) as client:
        pending = dict(ledger.ok)

        def all_ended() -> bool:
            url = gateways()[0]
            for key, rid in list(pending.items()):
                if client.get(f"{url}/runs/{rid}").json().get("status") in TERMINAL:
                    del pending[key]
            return not pending

        try:
            wait_for("every ok run to end", all_ended, settle, every=0.5)
        except AssertionError:
            stuck = {rid: (client.get(f"{gateways()[0]}/runs/{rid}").json().get("status"),
                           [(e["type"], e.get("stream_seq")) for e in _events(client, gateways()[0], rid)]) for rid in pending.values()}  # fmt: skip
            raise AssertionError(f"{case}: runs not ended {settle:g} s after the load stopped: {stuck}") from None
        settled = time.monotonic() - started
        lines = ledger.effects.read_text().splitlines() if ledger.effects.exists() else []
        executions = Counter(line.split()[0] for line in lines if line.strip())
        url = gateways()[-1]  # another gateway than the one polled, when there are several
        completed, attempts, re_executed, lost = 0, 0, 0, 0
        failed: Counter[str] = Counter()
        by_worker: Counter[str] = Counter()
        for key, rid in ledger.ok.items():
            events = _events(client, url, rid)
            types = [e["type"] for e in events]
            terminal = [t for t in types if t in TERMINAL_EVENTS]
            assert len(terminal) == 1 and types[-1] == terminal[0], (case, rid, types)
            claims = {e["data"]["attempt"] for e in events if e["type"] == "run.claimed"}
            by_worker.update(e["data"]["worker_id"] for e in events if e["type"] == "run.claimed")
            lost += types.count("run.worker_lost")
            attempts += len(claims)
            ran = executions.get(key, 0)
            assert ran <= len(claims), (case, rid, f"{ran} executions, {len(claims)} attempts", types)
            re_executed += ran > 1
            if terminal[0] == "run.completed":
                completed += 1
                assert ran >= 1, (case, rid, "completed without executing", types)
            else:
                snap = client.get(f"{url}/runs/{rid}").json()
                failed[str(snap.get("failure_reason") or snap.get("error") or terminal[0])[:40]] += 1
        want = set(ledger.ok.values())
        seen: list[set[str]] = [set()]

        def listed() -> bool:  # a gateway's list follows the runs bucket: it may lag a moment
            seen[0] = listed_runs(client, url, ledger.tag)
            return seen[0] == want

        try:
            wait_for("the list to show exactly the ok runs", listed, 20, every=0.5)
        except AssertionError:
            raise AssertionError((case, "stored but never ok:", seen[0] - want, "ok but not listed:", want - seen[0])) from None
    diffs = replay_differences(nats_url)
    assert not diffs, (case, "replay differences", diffs[:5])
    figures = Figures(case, len(ledger.flows), len(ledger.ok), ledger.resolved, len(ledger.refused), completed, dict(failed),
                      sum(executions.values()), attempts, re_executed, lost, settled, dict(by_worker))  # fmt: skip
    print(figures.line(), flush=True)
    RECORDED.append(figures.line())
    return figures
