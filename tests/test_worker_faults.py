"""Faults a real deployment meets, each run past the timer it tests (issue 11 #2, issue 10 #3):
a worker frozen past its lease, a SIGKILLed worker whose stale work item comes back, skewed
worker clocks, NATS frozen, and poison items, outputs and frames.  Real nats-server, real
conductor, real child processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import attrs
import pytest
import trio

from pyoco_es.conductor.service import run_conductor
from pyoco_es.config import Settings
from pyoco_es.core import decide
from pyoco_es.core.errors import ConcurrencyConflict
from pyoco_es.core.events import Envelope, Producer, RunClaimed
from pyoco_es.core.model import RunStatus
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.service import RunStore, new_run_id
from pyoco_es.worker.attempt import CANCEL_WATCH_DELAY
from pyoco_es.worker.supervisor import run_worker
from test_worker import (
    ROOT,
    TERMINAL,
    TWO_TASKS,
    _work_empty,
    fast_settings,
    start_stack,
    submit,
    task_running,
    wait_for,
    wait_status,
    worker_env,
)

ENDINGS = {"run.completed", "run.failed", "run.cancelled"}


def hold_flow(markers: Path, gate: Path | str) -> str:
    return f"""\
flow:
  graph: mark >> hold
tasks:
  mark: {{callable: "tests.tasks:record", inputs: {{marker_dir: "{markers}", label: "mark"}}}}
  hold: {{callable: "tests.tasks:wait_for_file", inputs: {{path: "{gate}", seconds: 60}}}}
"""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def marker_pids(markers: Path) -> list[int]:
    return sorted(int(m.name.split("-")[1]) for m in markers.iterdir())


async def holding(store: RunStore, run_id: str, attempt: int) -> object:
    snap = await task_running(store, run_id, "hold")
    ok = snap is not None and snap.status is RunStatus.RUNNING and snap.attempt == attempt and snap.worker_id is not None
    return snap if ok else None


async def types_of(store: RunStore, run_id: str) -> list[str]:
    return [e.type for e in await store.history(run_id)]


async def hold_steady(store: RunStore, run_id: str, seconds: float, *, attempt: int) -> None:
    """For ``seconds`` the run stays RUNNING at ``attempt`` (nobody declares it lost)."""
    until = trio.current_time() + seconds
    while trio.current_time() < until:
        snap = await store.load(run_id)
        assert snap is not None and snap.status is RunStatus.RUNNING and snap.attempt == attempt, (snap, await types_of(store, run_id))
        await trio.sleep(0.1)


async def nothing_more(store: RunStore, run_id: str, seconds: float) -> None:
    """After its ending, nothing is appended to the run for ``seconds`` (more than a lease)."""
    count = len(await store.history(run_id))
    until = trio.current_time() + seconds
    while trio.current_time() < until:
        assert len(await store.history(run_id)) == count, await types_of(store, run_id)
        await trio.sleep(0.2)


async def holding_run(nursery: trio.Nursery, nats: NatsClient, settings: Settings, tmp_path: Path) -> tuple[RunStore, str, Path]:
    """Conductor and an in-process worker; a run that holds until its gate is written."""
    await start_stack(nursery, nats, settings)
    store = RunStore(nats)
    markers = tmp_path / "markers"
    markers.mkdir()
    run_id = await submit(store, yaml_text=hold_flow(markers, tmp_path / "gate"))
    await wait_for(lambda: task_running(store, run_id, "hold"), "the run to hold", timeout=20)
    return store, run_id, tmp_path / "gate"


async def conductor_for(nursery: trio.Nursery, nats: NatsClient, tmp_path: Path, *, lease: float) -> tuple[Settings, RunStore, Path, Path]:
    """A conductor with a short lease; returns its settings, a store, a marker dir and a gate path."""
    settings = fast_settings(run_lease_seconds=lease)
    await nursery.start(run_conductor, nats, settings)
    markers = tmp_path / "markers"
    markers.mkdir()
    return settings, RunStore(nats), markers, tmp_path / "gate"


def cli_worker(nats_server: EmbeddedNats, worker_id: str, *, concurrency: int = 1, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from pyoco_es.cli.worker import worker_main; worker_main()",
         "--nats-url", nats_server.url, "--worker-id", worker_id, "--concurrency", str(concurrency), "--allow-module", "examples", "--allow-module", "tests.tasks"],
        **tied_to_this_process({**worker_env(nats_server), **(env or {})}),
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )


async def test_frozen_worker_past_its_lease(nats_server: EmbeddedNats, nats: NatsClient, nursery: trio.Nursery, tmp_path: Path) -> None:
    """A worker frozen (SIGSTOP) past its lease, then resumed, while its run is running: the
    reaper retries the attempt; the resumed worker stops the stale attempt's process at once
    (it learns of the verdict from the run's events, not at its next append), runs the new
    attempt itself, and the new attempt is never declared lost: one ending, exactly once."""
    with trio.fail_after(60):
        settings, store, markers, gate = await conductor_for(nursery, nats, tmp_path, lease=2.0)
        proc = cli_worker(nats_server, "sleepy", concurrency=2)
        try:
            run_id = await submit(store, yaml_text=hold_flow(markers, gate))
            await wait_for(lambda: task_running(store, run_id, "hold"), "attempt 1 to hold", timeout=20)
            [stale_pid] = marker_pids(markers)
            proc.send_signal(signal.SIGSTOP)
            try:
                await wait_for(lambda: _has(store, run_id, "run.worker_lost"), "the reaper's verdict", timeout=10)
            finally:
                proc.send_signal(signal.SIGCONT)
            await wait_for(lambda: _true(gone(stale_pid)), "the stale attempt's process to be stopped", timeout=5)
            snap = await wait_for(lambda: holding(store, run_id, 2), "attempt 2 to hold", timeout=20)
            assert snap.attempt == 2 and snap.worker_id == "sleepy"  # type: ignore[attr-defined]
            await hold_steady(store, run_id, 2.0 * settings.run_lease_seconds, attempt=2)
            gate.write_text("go")
            snap = await wait_status(store, run_id, TERMINAL, timeout=20)
            assert snap.status is RunStatus.COMPLETED and snap.attempt == 2
            types = await types_of(store, run_id)
            assert sum(t in ENDINGS for t in types) == 1 and types.count("run.worker_lost") == 1, types
            await nothing_more(store, run_id, 1.5 * settings.run_lease_seconds)
            assert proc.poll() is None  # the worker serves on
        finally:
            proc.kill()
            proc.wait()


async def _work_count(nats: NatsClient) -> int:
    return int((await nats.stream_info(subjects.WORK_STREAM))["messages"])


async def _work_count_at_most(nats: NatsClient, n: int) -> bool:
    return await _work_count(nats) <= n


async def _has(store: RunStore, run_id: str, event_type: str) -> bool:
    return event_type in await types_of(store, run_id)


async def _true(value: bool) -> bool:
    return value


async def test_sigkilled_worker_and_its_stale_item_never_fail_the_retry(
    nats_server: EmbeddedNats, nats: NatsClient, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A worker SIGKILLed mid-run: its attempt is retried on a healthy worker.  When the dead
    worker's work item comes back to the healthy worker while it runs the retry (a redelivery
    after ack_wait; here published again, as the dispatcher made it), the stale item must not
    remove the live attempt from the heartbeat (it did: bookkeeping was keyed by run id, so the
    retry was declared lost, then the next one).  Watched for more than a lease before and after
    the run ends."""
    with trio.fail_after(60):
        settings, store, markers, gate = await conductor_for(nursery, nats, tmp_path, lease=2.0)
        flow = hold_flow(markers, "$ctx.params.gate")  # one document, a gate per run
        proc = cli_worker(nats_server, "victim")
        try:
            run_id = await submit(store, yaml_text=flow, params={"gate": str(gate)})
            await wait_for(lambda: task_running(store, run_id, "hold"), "the victim to hold", timeout=20)
        finally:
            proc.kill()
            proc.wait()
        await nursery.start(lambda task_status: run_worker(nats, settings, worker_id="healthy", tags=["default"], concurrency=2, task_status=task_status))
        # Both of the healthy worker's children build this document once (so a stale item for it
        # takes the fast path: claim at once from the position the item carries).
        warm = [tmp_path / "w1", tmp_path / "w2"]
        warmups = [await submit(store, yaml_text=flow, params={"gate": str(g)}) for g in warm]
        for w in warmups:
            await wait_for(lambda w=w: task_running(store, w, "hold"), "a warm-up run to hold", timeout=20)
        for g in warm:
            g.write_text("go")
        snap = await wait_for(lambda: holding(store, run_id, 2), "the retry to hold", timeout=20)
        assert snap.worker_id == "healthy"  # type: ignore[attr-defined]
        # The dead worker's item for attempt 1, as the dispatcher made it.
        submitted = (await store.history(run_id))[0]
        stale = {"run_id": run_id, "attempt": 1, "flow_name": "main", "tag": "default", "tags": ["default"],
                 "params": {"gate": str(gate)}, "workflow_yaml": flow, "workflow_yaml_sha256": hashlib.sha256(flow.encode()).hexdigest(),
                 "max_attempts": 3, "run_seq": submitted.seq, "run_stream_seq": submitted.stream_seq}
        before = await _work_count(nats)
        await nats.publish(subjects.work_subject("default"), json.dumps(stale).encode())
        await wait_for(lambda: _work_count_at_most(nats, before), "the stale item to be consumed")
        await hold_steady(store, run_id, 1.5 * settings.run_lease_seconds, attempt=2)
        gate.write_text("go")
        snap = await wait_status(store, run_id, TERMINAL, timeout=20)
        assert snap.status is RunStatus.COMPLETED and snap.attempt == 2, (snap, await types_of(store, run_id))
        types = await types_of(store, run_id)
        assert sum(t in ENDINGS for t in types) == 1 and types.count("run.worker_lost") == 1, types
        await nothing_more(store, run_id, 1.5 * settings.run_lease_seconds)


async def test_a_publish_jetstream_refused_never_fences_a_live_attempt(
    nats: NatsClient, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A stale writer's append that JetStream refuses (wrong last sequence) still reaches every
    plain subscriber of the run's subject.  The worker's cancel watch is one: seen in a newcomer
    session, the killed worker's redelivered item made the restarted worker try a stale claim, and
    that refused `run.claimed` stopped the live retry at once (declared lost a lease later, and so
    was the next one).  Only stored events may fence an attempt."""
    with trio.fail_after(60):
        settings = fast_settings(run_lease_seconds=2.0)
        store, run_id, gate = await holding_run(nursery, nats, settings, tmp_path)
        snap = await wait_for(lambda: holding(store, run_id, 1), "the run to hold", timeout=20)
        # A stale writer retrying for a while (paced, so some of its refused publishes land after
        # the watch went live, whenever that was): each append is refused, the run is further on.
        for _ in range(10):
            stale = decide.stamp(
                None, [RunClaimed(worker_id="stale", attempt=1, lease_seconds=2.0, tasks=("hold",))],
                run_id=run_id, producer=Producer(kind="worker", id="stale", attempt=1), now=time.time(), new_id=lambda: str(uuid.uuid4()),
            )
            with pytest.raises(ConcurrencyConflict):
                await nats.append(run_id, stale, expected_last=1)
            await trio.sleep(CANCEL_WATCH_DELAY)
        await hold_steady(store, run_id, 1.5 * settings.run_lease_seconds, attempt=1)
        gate.write_text("go")
        snap = await wait_status(store, run_id, TERMINAL, timeout=20)
        types = await types_of(store, run_id)
        assert snap.status is RunStatus.COMPLETED and snap.attempt == 1, (snap, types)
        assert sum(t in ENDINGS for t in types) == 1 and "run.worker_lost" not in types, types


async def test_skewed_worker_clocks_are_never_judged(nats: NatsClient, nursery: trio.Nursery, tmp_path: Path) -> None:
    """The reaper judges leases by its own monotonic clock: a worker 20 s behind keeps its run
    for several leases (every run used to fail as worker_lost); a worker 60 s ahead that dies is
    noticed about one lease later (it used to take 60 s more)."""
    with trio.fail_after(60):
        settings, store, markers, gate = await conductor_for(nursery, nats, tmp_path, lease=1.5)
        behind = attrs.evolve(settings, worker_clock_offset=-20.0)
        await nursery.start(lambda task_status: run_worker(nats, behind, worker_id="behind", tags=["default"], concurrency=1, task_status=task_status))
        run_id = await submit(store, yaml_text=hold_flow(markers, gate))
        await wait_for(lambda: task_running(store, run_id, "hold"), "the run to hold", timeout=20)
        await hold_steady(store, run_id, 3 * settings.run_lease_seconds, attempt=1)
        gate.write_text("go")
        snap = await wait_status(store, run_id, TERMINAL, timeout=20)
        assert snap.status is RunStatus.COMPLETED and snap.attempt == 1

        # A worker 60 s ahead runs a run, then dies without a word (its task is cancelled: no
        # STOPPED record, no release).
        ahead = attrs.evolve(settings, worker_clock_offset=60.0, worker_drain_timeout=0.0)
        gate.unlink()
        scope = trio.CancelScope()

        async def doomed(task_status: trio.TaskStatus[object]) -> None:
            with scope:
                await run_worker(nats, ahead, worker_id="ahead", tags=["late"], concurrency=1, task_status=task_status)

        await nursery.start(doomed)
        run_id = await submit(store, yaml_text=hold_flow(markers, gate), tag="late")
        await wait_for(lambda: task_running(store, run_id, "hold"), "a run to hold", timeout=20)
        scope.cancel()
        died = trio.current_time()
        await wait_for(lambda: _has(store, run_id, "run.worker_lost"), "the verdict on the dead worker", timeout=10)
        assert trio.current_time() - died < settings.run_lease_seconds + 2.0


async def test_nats_frozen_past_the_lease_loses_no_healthy_attempt(
    nats_server: EmbeddedNats, nats: NatsClient, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """NATS frozen (SIGSTOP) longer than the lease: no heartbeat can be written, and the reaper
    cannot see any either.  It must not count that time against the worker: the run completes on
    its first attempt, no worker_lost."""
    with trio.fail_after(60):
        settings = fast_settings(run_lease_seconds=2.0)
        store, run_id, gate = await holding_run(nursery, nats, settings, tmp_path)
        assert nats_server.proc is not None
        nats_server.proc.send_signal(signal.SIGSTOP)
        try:
            await trio.sleep(1.5 * settings.run_lease_seconds)  # the fault itself lasts this long
        finally:
            nats_server.proc.send_signal(signal.SIGCONT)
        await hold_steady(store, run_id, 1.5 * settings.run_lease_seconds, attempt=1)
        gate.write_text("go")
        snap = await wait_status(store, run_id, TERMINAL, timeout=20)
        assert snap.status is RunStatus.COMPLETED and snap.attempt == 1, await types_of(store, run_id)
        assert "run.worker_lost" not in await types_of(store, run_id)


# -- poison: nothing an item, event or output carries may crash a worker -------------------------


POISON_TASKS = '''
import math, os, sys


class Opaque:
    pass


class BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr for you")


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def give_set():
    return {1, 2}


def give_object():
    return Opaque()


def give_bytes():
    return b"\\xff\\x00"


def give_nan():
    return float("nan")


def give_surrogate():
    return "a\\ud800b"


def give_bad_repr():
    return BadRepr()


def raise_bad_str():
    raise BadStr()


def garbage():
    fd = int(sys.argv[sys.argv.index("--evt-fd") + 1])
    os.write(fd, b"\\x00\\x00\\x00\\x05hello")
    return "written"


def garbage_resolver(name):
    garbage()
    raise KeyError(name)


def bad_frame():
    fd = int(sys.argv[sys.argv.index("--evt-fd") + 1])
    body = b'{"ev":"task.completed","run_id":"x"}'
    os.write(fd, len(body).to_bytes(4, "big") + body)
    return "written"
'''


@pytest.fixture
def poison_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "poison_tasks.py").write_text(textwrap.dedent(POISON_TASKS))
    monkeypatch.syspath_prepend(str(tmp_path))  # the children inherit the worker's sys.path
    return "poison_tasks"


def chain_flow(*callables: str) -> str:
    names = [c.split(":")[1] for c in callables]
    tasks = "\n".join(f'  {n}: {{callable: "{c}"}}' for n, c in zip(names, callables, strict=True))
    return f"flow:\n  graph: {' >> '.join(names)}\ntasks:\n{tasks}\n"


async def test_task_outputs_that_are_not_json_never_crash_anything(nats: NatsClient, nursery: trio.Nursery, poison_module: str) -> None:
    """Tasks returning a set, an object, bytes, NaN, a string with a lone surrogate, an object
    whose repr raises, and an exception whose str() raises: every output is recorded (as its repr,
    or a placeholder), the run fails with a readable error, and the worker serves the next run."""
    with trio.fail_after(40):
        settings = fast_settings(allowed_modules=("examples", poison_module))
        actor, _ = await start_stack(nursery, nats, settings)
        store = RunStore(nats)
        outputs = [f"{poison_module}:give_{k}" for k in ("set", "object", "bytes", "nan", "surrogate", "bad_repr")]
        run_id = await submit(store, yaml_text=chain_flow(*outputs, f"{poison_module}:raise_bad_str"))
        snap = await wait_status(store, run_id, TERMINAL, timeout=20)
        assert snap.status is RunStatus.FAILED and "no str for you" in (snap.error or ""), snap
        records = snap.tasks
        assert records["give_set"].output == "{1, 2}" and records["give_nan"].output == "nan"
        assert records["give_surrogate"].output == "a\ud800b"  # carried faithfully, escaped on the wire
        assert records["give_bad_repr"].output == "<unrepresentable BadRepr>"
        assert records["give_bytes"].output == repr(b"\xff\x00")
        assert records["raise_bad_str"].state.value == "FAILED"
        nxt = await submit(store)
        assert (await wait_status(store, nxt, TERMINAL)).status is RunStatus.COMPLETED
        assert actor.pool.started >= 1


@pytest.mark.parametrize("task", ["garbage", "bad_frame"])
async def test_a_child_writing_garbage_fails_its_run_only(nats: NatsClient, nursery: trio.Nursery, poison_module: str, task: str) -> None:
    """A task that writes garbage (or a malformed frame) to the event pipe: the child is killed,
    the run FAILED at once (no retry: it would do the same again) with a reason naming the
    protocol, and the worker serves the next run."""
    with trio.fail_after(40):
        settings = fast_settings(allowed_modules=("examples", poison_module))
        await start_stack(nursery, nats, settings)
        store = RunStore(nats)
        run_id = await submit(store, yaml_text=chain_flow(f"{poison_module}:{task}"))
        snap = await wait_status(store, run_id, TERMINAL, timeout=20)
        assert snap.status is RunStatus.FAILED and snap.attempt == 1, snap
        assert "broke the pipe protocol" in (snap.error or ""), snap.error
        nxt = await submit(store)
        assert (await wait_status(store, nxt, TERMINAL)).status is RunStatus.COMPLETED


async def test_garbage_while_preparing_fails_the_run_not_the_worker(nats: NatsClient, nursery: trio.Nursery, poison_module: str) -> None:
    """A flow resolver (operator code, imported in the child) that writes garbage to the pipe
    while the run is prepared: the item would do the same on every redelivery, so it is TERMed and
    dead-lettered and its run FAILED (invalid_job); the worker serves the next run."""
    with trio.fail_after(40):
        settings = fast_settings(allowed_modules=("examples", poison_module))
        await start_stack(nursery, nats, settings, flow_resolver=f"{poison_module}:garbage_resolver")
        store = RunStore(nats)
        run_id = await submit(store, yaml_text=None, flow_name="anything")
        snap = await wait_status(store, run_id, TERMINAL, timeout=20)
        assert snap.status is RunStatus.FAILED and snap.failure_reason == "invalid_job", snap
        assert "broke the pipe protocol" in (snap.error or "")
        nxt = await submit(store)
        assert (await wait_status(store, nxt, TERMINAL)).status is RunStatus.COMPLETED


async def test_poison_work_items_are_termed_and_their_runs_failed(nats: NatsClient, nursery: trio.Nursery) -> None:
    """Work items the worker cannot decode (bad UTF-8, NaN, wrong shapes) are TERMed and dead-
    lettered; one that names a waiting run fails that run (reason invalid_job) instead of leaving
    it PENDING; the worker keeps serving."""
    with trio.fail_after(40):
        settings = fast_settings()
        actor, _ = await start_stack(nursery, nats, settings)
        store = RunStore(nats)
        subject = subjects.work_subject("default")
        await nats.publish(subject, b'{"run_id": "r\xff\xfe", "flow_name": "x"}')
        await nats.publish(subject, b'{"run_id": "abc", "flow_name": "x", "params": {"n": NaN}}')
        await nats.publish(subject, b'{"run_id": "abd", "flow_name": "x", "params": {"n": 1e400}}')
        await nats.publish(subject, b"[1, 2, 3]")
        # A real run whose dispatched item is replaced by a malformed one.
        victim = await submit(store, tag="parked")  # nobody serves its tag: it waits, PENDING
        await nats.publish(subject, json.dumps({"run_id": victim, "attempt": 1, "flow_name": "main", "params": [1]}).encode())

        async def dead_lettered() -> bool:
            return (await nats.stream_info(subjects.DLQ_STREAM))["messages"] >= 5

        await wait_for(dead_lettered, "five DLQ messages")
        snap = await wait_status(store, victim, TERMINAL)
        assert snap.status is RunStatus.FAILED and snap.failure_reason == "invalid_job" and "params" in (snap.error or "")
        run_id = await submit(store)
        assert (await wait_status(store, run_id, TERMINAL)).status is RunStatus.COMPLETED
        assert actor.completed >= 1


async def test_unencodable_submitted_content_never_crashes_the_worker(nats: NatsClient, nursery: trio.Nursery) -> None:
    """``run.submitted`` events with lone surrogates in flow_name and params (appended directly,
    bypassing the gateway, as a raw publish would): the conductor projects and dispatches them,
    the worker runs them without crashing (the pipe carries escapes), and the same worker
    completes the next run (it used to die with UnicodeEncodeError, every restart again)."""
    with trio.fail_after(40):
        settings = fast_settings()
        actor, _ = await start_stack(nursery, nats, settings, flow_resolver="examples.flows:resolve")
        store = RunStore(nats)
        bad_params = await submit(store, params={"x": 1, "note": "\ud800"})
        bad_name = await submit(store, yaml_text=None, flow_name="\ud800")
        for run_id in (bad_params, bad_name):
            snap = await wait_status(store, run_id, TERMINAL, timeout=20)
            assert snap.status in (RunStatus.COMPLETED, RunStatus.FAILED), snap
        assert (await store.load(bad_params)).status is RunStatus.COMPLETED  # type: ignore[union-attr]
        assert (await store.load(bad_name)).failure_reason == "flow_not_found"  # type: ignore[union-attr]
        # The same thing as raw bytes on the event subject: an escaped surrogate in the JSON.
        raw_id = new_run_id()
        ev = (await store.history(bad_params))[0]
        raw = json.dumps(_retarget(ev, raw_id)).encode()
        assert b"\\ud800" in raw
        await nats.publish(subjects.run_events_subject(raw_id), raw, msg_id=f"raw-{raw_id}")
        snap = await wait_status(store, raw_id, TERMINAL, timeout=20)
        assert snap.status is RunStatus.COMPLETED
        nxt = await submit(store)
        assert (await wait_status(store, nxt, TERMINAL)).status is RunStatus.COMPLETED
        assert actor.completed >= 4


def _retarget(env: Envelope, run_id: str) -> dict[str, object]:
    from pyoco_es.core.codec import envelope_to_json

    doc = envelope_to_json(env)
    doc["run_id"] = run_id
    doc["event_id"] = new_run_id()
    return doc


async def test_a_lease_shorter_than_the_idle_heartbeat(nats: NatsClient, nursery: trio.Nursery, tmp_path: Path) -> None:
    """An idle worker heartbeats every 5 s; a run's lease here is 1.5 s.  Taking a run makes the
    worker heartbeat at once and then at a third of the lease, so the run is never lost."""
    with trio.fail_after(40):
        settings = fast_settings(worker_heartbeat_interval=5.0, run_lease_seconds=1.5)
        store, run_id, gate = await holding_run(nursery, nats, settings, tmp_path)
        await hold_steady(store, run_id, 3 * settings.run_lease_seconds, attempt=1)
        gate.write_text("go")
        assert (await wait_status(store, run_id, TERMINAL, timeout=20)).status is RunStatus.COMPLETED


def cli_conductor(nats_server: EmbeddedNats, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pyoco_es.cli.main import main; main()", "conductor", "--nats-url", nats_server.url],
            **tied_to_this_process(worker_env(nats_server)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out,
        )
    return proc


async def wait_for_line(log: Path, text: str, count: int) -> None:
    async def there() -> bool:
        return log.read_text(errors="replace").count(text) >= count

    await wait_for(there, f"{text!r} in the log", timeout=20)


async def test_conductor_in_another_process_restarted_mid_run(
    nats_server: EmbeddedNats, nats: NatsClient, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The conductor runs in its own process (its own clock, its own view) and is SIGKILLed and
    restarted while a healthy worker runs a run: the new conductor has observed nothing yet and
    must not condemn the attempt for that; the run completes on its first attempt."""
    with trio.fail_after(60):
        settings = fast_settings(run_lease_seconds=2.0)
        log = tmp_path / "conductor.log"
        first = cli_conductor(nats_server, log)
        second: subprocess.Popen[bytes] | None = None
        try:
            await wait_for_line(log, "conductor running", 1)
            await nursery.start(lambda task_status: run_worker(nats, settings, worker_id="steady", tags=["default"], concurrency=1, task_status=task_status))
            store = RunStore(nats)
            markers, gate = tmp_path / "markers", tmp_path / "gate"
            markers.mkdir()
            run_id = await submit(store, yaml_text=hold_flow(markers, gate))
            await wait_for(lambda: task_running(store, run_id, "hold"), "the run to hold", timeout=20)
            await hold_steady(store, run_id, 1.5 * settings.run_lease_seconds, attempt=1)
            first.kill()
            first.wait()
            second = cli_conductor(nats_server, log)
            await wait_for_line(log, "conductor running", 2)
            await hold_steady(store, run_id, 2 * settings.run_lease_seconds, attempt=1)
            gate.write_text("go")
            snap = await wait_status(store, run_id, TERMINAL, timeout=20)
            assert snap.status is RunStatus.COMPLETED and snap.attempt == 1, await types_of(store, run_id)
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
