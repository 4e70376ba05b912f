"""The worker actor end to end: real nats-server, the real conductor, real child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from pyoco_es.conductor.service import run_conductor
from pyoco_es.config import Settings
from pyoco_es.core import decide
from pyoco_es.core.events import Producer, RunSubmitted
from pyoco_es.core.model import RunSnapshot, RunStatus, TaskState
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.service import RunStore, new_run_id
from pyoco_es.worker.actor import WorkerActor
from pyoco_es.worker.supervisor import run_worker

GW = Producer(kind="gateway", id="test")
ROOT = Path(__file__).resolve().parents[1]

TWO_TASKS = (ROOT / "examples" / "flow.yaml").read_text()  # add_one >> to_text, x = 1


def fast_settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "worker_heartbeat_interval": 0.2,
        "run_lease_seconds": 3.0,
        "cancel_grace_period": 1.0,
        "worker_poll_timeout": 0.25,
        "worker_drain_timeout": 5.0,
        "allowed_modules": ("examples", "tests.tasks"),
    }
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


async def submit(
    store: RunStore,
    *,
    yaml_text: str | None = TWO_TASKS,
    flow_name: str = "main",
    params: dict[str, object] | None = None,
    tag: str = "default",
    max_attempts: int = 3,
) -> str:
    run_id = new_run_id()
    sha = None
    if yaml_text is not None:
        import hashlib

        sha = hashlib.sha256(yaml_text.encode()).hexdigest()
    ev = RunSubmitted(
        flow_name=flow_name,
        params=params or {},
        tag=tag,
        tags=[tag],
        submitted_at=time.time(),
        max_attempts=max_attempts,
        workflow_yaml=yaml_text,
        workflow_yaml_sha256=sha,
        workflow_yaml_bytes=len(yaml_text.encode()) if yaml_text else None,
    )
    await store.execute(run_id, lambda s: decide.submit_run(s, ev, run_id=run_id), producer=GW)
    return run_id


async def wait_for(predicate: Callable[[], Awaitable[object]], what: str, timeout: float = 10.0) -> object:
    with trio.move_on_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_status(store: RunStore, run_id: str, statuses: set[RunStatus], timeout: float = 10.0) -> RunSnapshot:
    async def check() -> RunSnapshot | None:
        snap = await store.load(run_id)
        return snap if snap is not None and snap.status in statuses else None

    snap = await wait_for(check, f"run {run_id} to reach {statuses}", timeout)
    assert isinstance(snap, RunSnapshot)
    return snap


TERMINAL = {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}


async def start_stack(
    nursery: trio.Nursery, nats: NatsClient, settings: Settings, **worker: object
) -> tuple[WorkerActor, trio.Event]:
    await nursery.start(run_conductor, nats, settings)
    stop = trio.Event()
    kwargs: dict[str, object] = {"worker_id": "w1", "tags": ["default"], "concurrency": 2}
    kwargs.update(worker)
    actor = await nursery.start(lambda task_status: run_worker(nats, settings, stop=stop, task_status=task_status, **kwargs))  # type: ignore[arg-type]
    return actor, stop


async def test_yaml_flow_completes_with_task_records(nats: NatsClient, nursery: trio.Nursery) -> None:
    """A submitted YAML flow runs in a child and its task records carry inputs and outputs."""
    with trio.fail_after(30):
        settings = fast_settings()
        await start_stack(nursery, nats, settings)
        store = RunStore(nats)
        run_id = await submit(store, params={"x": 41})
        snap = await wait_status(store, run_id, TERMINAL)
        assert snap.status is RunStatus.COMPLETED, snap.error
        assert list(snap.tasks) == ["add_one", "to_text"]
        assert snap.tasks["add_one"].state is TaskState.SUCCEEDED
        assert snap.tasks["add_one"].inputs == {"x": 41}
        assert snap.tasks["add_one"].output == 42
        assert snap.tasks["to_text"].inputs == {"value": 42}
        assert snap.tasks["to_text"].output == "value=42"
        assert snap.worker_id == "w1" and snap.attempt == 1
        # the work item was acked once the terminal event was durable
        await wait_for(lambda: _work_empty(nats), "work stream to drain")


async def _work_empty(nats: NatsClient) -> bool:
    return (await nats.stream_info(subjects.WORK_STREAM))["messages"] == 0


async def test_named_flow_and_failures(nats: NatsClient, nursery: trio.Nursery) -> None:
    """Named flows via the resolver; unknown flow → flow_not_found + DLQ; a raising task → failed
    with its traceback; a refused callable → build_error naming the module."""
    with trio.fail_after(30):
        settings = fast_settings()
        await start_stack(nursery, nats, settings, flow_resolver="examples.flows:resolve")
        store = RunStore(nats)
        named = await submit(store, yaml_text=None, flow_name="hello", params={"x": 1})
        missing = await submit(store, yaml_text=None, flow_name="nope")
        failing = await submit(store, yaml_text=TWO_TASKS.replace("examples.tasks:add_one", "examples.tasks:boom"))
        refused = await submit(
            store,
            yaml_text=TWO_TASKS.replace("examples.tasks:to_text", "os:system"),
        )
        snap = await wait_status(store, named, TERMINAL)
        assert snap.status is RunStatus.COMPLETED, snap.error
        assert snap.tasks["add_one"].output == 2 and snap.tasks["to_text"].output == "value=2"

        snap = await wait_status(store, missing, TERMINAL)
        assert snap.status is RunStatus.FAILED and snap.failure_reason == "flow_not_found"
        assert "nope" in (snap.error or "")

        snap = await wait_status(store, failing, TERMINAL)
        assert snap.status is RunStatus.FAILED and snap.failure_reason == "error"
        assert snap.tasks["add_one"].state is TaskState.FAILED
        assert "boom" in (snap.tasks["add_one"].error or "")
        assert "Traceback" in (snap.tasks["add_one"].traceback or "")
        assert snap.tasks["to_text"].state is TaskState.PENDING

        snap = await wait_status(store, refused, TERMINAL)
        assert snap.status is RunStatus.FAILED and snap.failure_reason == "build_error"
        assert snap.error == (
            "callable 'os:system' refused: module 'os' can never be allowed (it can run commands, load or "
            "evaluate code, or reach files, the network or the interpreter)"
        )

        info = await nats.stream_info(subjects.DLQ_STREAM)
        assert info["messages"] >= 2  # flow_not_found + execution_error



async def test_a_child_whose_prepare_failed_serves_the_next_run(nats: NatsClient, nursery: trio.Nursery) -> None:
    """The claim's hook starts the child from the NATS thread even when its prepare failed; the
    child drops that go, so the one child (concurrency 1) runs the next flow with clean records."""
    with trio.fail_after(30):
        settings = fast_settings()
        actor, _stop = await start_stack(nursery, nats, settings, concurrency=1, flow_resolver="examples.flows:resolve")
        store = RunStore(nats)
        refused = await submit(store, yaml_text=TWO_TASKS.replace("examples.tasks:to_text", "os:system"))
        assert (await wait_status(store, refused, TERMINAL)).failure_reason == "build_error"
        missing = await submit(store, yaml_text=None, flow_name="nope")
        assert (await wait_status(store, missing, TERMINAL)).failure_reason == "flow_not_found"
        started = actor.pool.started
        good = await submit(store, params={"x": 6})
        snap = await wait_status(store, good, TERMINAL)
        assert snap.status is RunStatus.COMPLETED, snap.error
        assert snap.tasks["add_one"].output == 7 and snap.tasks["to_text"].output == "value=7"
        assert actor.pool.started == started == 1  # the one warm child served all three


async def test_parallel_branches_still_run_at_once(nats: NatsClient, nursery: trio.Nursery, tmp_path: Path) -> None:
    """The child runs a lone task in the engine's own thread; tasks that are runnable together
    still run concurrently (both RUNNING at the same moment, then both released)."""
    flow = f"""\
flow:
  graph: left | right
tasks:
  left: {{callable: "tests.tasks:wait_for_file", inputs: {{path: "{tmp_path}/go", seconds: 20}}}}
  right: {{callable: "tests.tasks:wait_for_file", inputs: {{path: "{tmp_path}/go", seconds: 20}}}}
"""
    with trio.fail_after(30):
        await start_stack(nursery, nats, fast_settings(), concurrency=1)
        store = RunStore(nats)
        run_id = await submit(store, yaml_text=flow)

        async def both_running() -> RunSnapshot | None:
            snap = await store.load(run_id)
            ok = snap is not None and all(t in snap.tasks and snap.tasks[t].state is TaskState.RUNNING for t in ("left", "right"))
            return snap if ok else None

        await wait_for(both_running, "both branches to be RUNNING at once")
        (tmp_path / "go").write_text("")
        snap = await wait_status(store, run_id, TERMINAL)
        assert snap.status is RunStatus.COMPLETED, snap.error
        assert snap.tasks["left"].output == "released" and snap.tasks["right"].output == "released"


async def test_known_documents_start_with_one_write_and_big_ones_still_run(nats: NatsClient, nursery: trio.Nursery) -> None:
    """A child that has built a document gets prepare and go together from the claim's hook; a
    prepare too big for one atomic pipe write (large params) is sent by the actor instead.  Both
    run on the same child with correct records."""
    with trio.fail_after(30):
        actor, _stop = await start_stack(nursery, nats, fast_settings(), concurrency=1)
        store = RunStore(nats)
        first = await submit(store, params={"x": 1})
        assert (await wait_status(store, first, TERMINAL)).status is RunStatus.COMPLETED
        started = actor.pool.started
        known = await submit(store, params={"x": 2})
        big = await submit(store, params={"x": 3, "pad": "y" * 6000})
        for run_id, x in ((known, 2), (big, 3)):
            snap = await wait_status(store, run_id, TERMINAL)
            assert snap.status is RunStatus.COMPLETED, snap.error
            assert snap.tasks["add_one"].inputs == {"x": x} and snap.tasks["to_text"].output == f"value={x + 1}"
        assert actor.pool.started == started == 1  # one child (warmed at start) served them all

COOPERATIVE = """\
flow:
  graph: wait
tasks:
  wait: {callable: "examples.tasks:wait_for_cancel", inputs: {seconds: 30}}
"""

STUBBORN = """\
flow:
  graph: first >> sleep
tasks:
  first: {callable: "examples.tasks:add_one", inputs: {x: 1}}
  sleep: {callable: "examples.tasks:ignore_cancel", inputs: {seconds: 60}}
"""


async def task_running(store: RunStore, run_id: str, task: str) -> RunSnapshot | None:
    snap = await store.load(run_id)
    if snap is not None and task in snap.tasks and snap.tasks[task].state is TaskState.RUNNING:
        return snap
    return None


async def cancel(store: RunStore, run_id: str) -> None:
    await store.execute(run_id, lambda s: decide.request_cancel(s, run_id=run_id, now=time.time(), by="test"), producer=GW)


async def test_cancel_cooperative_and_forced(nats: NatsClient, nursery: trio.Nursery) -> None:
    """A cooperative task stops at the cancel (reason requested); a task that ignores it
    (``time.sleep(60)``) is killed after the grace period (reason forced), well within grace + 2 s."""
    with trio.fail_after(30):
        settings = fast_settings(cancel_grace_period=1.0)
        actor, _ = await start_stack(nursery, nats, settings, concurrency=2)
        store = RunStore(nats)
        coop = await submit(store, yaml_text=COOPERATIVE)
        stubborn = await submit(store, yaml_text=STUBBORN)
        await wait_for(lambda: task_running(store, coop, "wait"), "cooperative task to run")
        await wait_for(lambda: task_running(store, stubborn, "sleep"), "stubborn task to run")
        started = trio.current_time()
        await cancel(store, coop)
        await cancel(store, stubborn)

        snap = await wait_status(store, coop, TERMINAL)
        assert snap.status is RunStatus.CANCELLED and snap.cancel_reason == "requested"
        assert snap.tasks["wait"].state is TaskState.SUCCEEDED  # it returned early, cooperatively
        assert snap.tasks["wait"].output == "stopped-early"

        snap = await wait_status(store, stubborn, TERMINAL, timeout=settings.cancel_grace_period + 2)
        assert trio.current_time() - started < settings.cancel_grace_period + 2
        assert snap.status is RunStatus.CANCELLED and snap.cancel_reason == "forced"
        assert snap.tasks["first"].state is TaskState.SUCCEEDED
        assert snap.tasks["sleep"].state is TaskState.CANCELLED
        # the killed child is never handed out again; the worker keeps serving
        again = await submit(store)
        assert (await wait_status(store, again, TERMINAL)).status is RunStatus.COMPLETED
        assert actor.pool._idle and all(c.healthy and c.proc.poll() is None for c in actor.pool._idle)


async def test_two_workers_share_a_tag(nats: NatsClient, nursery: trio.Nursery) -> None:
    """Two workers on one tag both take runs; every run completes exactly once."""
    with trio.fail_after(30):
        settings = fast_settings()
        w1, _ = await start_stack(nursery, nats, settings, worker_id="w1", concurrency=2)
        stop2 = trio.Event()
        w2 = await nursery.start(
            lambda task_status: run_worker(nats, settings, worker_id="w2", tags=["default"], concurrency=2, stop=stop2, task_status=task_status)
        )
        store = RunStore(nats)
        slow = TWO_TASKS.replace("examples.tasks:to_text", "examples.tasks:wait_for_cancel").replace(
            '{value: "$node.add_one.output"}', "{seconds: 0.2}"
        )
        ids = [await submit(store, yaml_text=slow) for _ in range(12)]
        snaps = [await wait_status(store, r, TERMINAL, timeout=20) for r in ids]
        assert all(s.status is RunStatus.COMPLETED for s in snaps), [s.error for s in snaps]
        by = {s.worker_id for s in snaps}
        assert by == {"w1", "w2"}
        assert w1.completed + w2.completed == 12
        for r in ids:
            terminal = [e for e in await store.history(r) if e.type in ("run.completed", "run.failed", "run.cancelled")]
            assert len(terminal) == 1


async def test_tags_are_served_fairly(nats: NatsClient, nursery: trio.Nursery) -> None:
    """A worker on tags a,b with a backlog on both serves both while the backlog lasts."""
    with trio.fail_after(30):
        settings = fast_settings()
        store = RunStore(nats)
        await nursery.start(run_conductor, nats, settings)
        ids = {"a": [await submit(store, tag="a") for _ in range(15)], "b": [await submit(store, tag="b") for _ in range(15)]}
        # wait until every work item is queued before the worker starts (a real backlog)
        await wait_for(lambda: _work_count(nats, 30), "30 work items")
        stop = trio.Event()
        await nursery.start(lambda task_status: run_worker(nats, settings, worker_id="wab", tags=["a", "b"], concurrency=1, stop=stop, task_status=task_status))
        snaps = [await wait_status(store, r, TERMINAL, timeout=20) for r in ids["a"] + ids["b"]]
        assert all(s.status is RunStatus.COMPLETED for s in snaps)
        order = sorted(snaps, key=lambda s: s.end_time or 0)
        first_half = [s.tag for s in order[:15]]
        assert 4 <= first_half.count("a") <= 11, first_half  # interleaved, not one tag first


async def _work_count(nats: NatsClient, n: int) -> bool:
    return (await nats.stream_info(subjects.WORK_STREAM))["messages"] >= n


async def test_registry_heartbeat_drain_and_hidden(nats: NatsClient, nursery: trio.Nursery, tmp_path: Path) -> None:
    """The registry lists the claimed run in ``runs`` while it runs, keeps a concurrent ``hidden``
    PATCH, and a graceful stop releases a run that outlives the drain timeout, then writes
    STOPPED_GRACEFUL."""
    with trio.fail_after(30):
        settings = fast_settings(worker_drain_timeout=0.5)
        actor, stop = await start_stack(nursery, nats, settings, worker_id="wreg")
        store = RunStore(nats)
        gate = tmp_path / "never"
        blocking = f"""\
flow:
  graph: hold
tasks:
  hold: {{callable: "tests.tasks:wait_for_file", inputs: {{path: "{gate}", seconds: 30}}}}
"""
        run_id = await submit(store, yaml_text=blocking)
        await wait_for(lambda: task_running(store, run_id, "hold"), "blocking task to run")

        async def record() -> dict[str, object] | None:
            entry = await nats.kv_get(subjects.WORKERS_BUCKET, "wreg")
            return json.loads(entry.value) if entry is not None and entry.value else None

        async def listed() -> dict[str, object] | None:
            doc = await record()
            return doc if doc and doc.get("runs") == {run_id: 1} and doc["state"] == "RUNNING" else None

        doc = await wait_for(listed, "heartbeat listing the run")
        # an operator hides the worker (PATCH) between heartbeats: the next heartbeat keeps it
        entry = await nats.kv_get(subjects.WORKERS_BUCKET, "wreg")
        assert entry is not None and entry.value
        patched = json.loads(entry.value)
        patched["hidden"] = True
        from pyoco_es.core.codec import dumps

        try:
            await nats.kv_update(subjects.WORKERS_BUCKET, "wreg", dumps(patched), last=entry.revision)
        except Exception:  # a heartbeat won the race: patch again on top of it
            entry = await nats.kv_get(subjects.WORKERS_BUCKET, "wreg")
            assert entry is not None and entry.value
            patched = json.loads(entry.value)
            patched["hidden"] = True
            await nats.kv_update(subjects.WORKERS_BUCKET, "wreg", dumps(patched), last=entry.revision)
        before = float(patched["last_heartbeat_at"])  # type: ignore[arg-type]

        async def newer_and_hidden() -> bool:
            doc = await record()
            return bool(doc and float(doc["last_heartbeat_at"]) > before and doc["hidden"] is True)  # type: ignore[arg-type]

        await wait_for(newer_and_hidden, "a heartbeat that kept hidden")
        # graceful stop: the run outlives the 0.5 s drain, so it is released for another attempt
        stop.set()
        snap = await wait_status(store, run_id, {RunStatus.PENDING}, timeout=10)
        assert snap.attempt == 2 and snap.worker_id is None
        released = [e for e in await store.history(run_id) if e.type == "run.released"]
        assert len(released) == 1 and "drain" in released[0].event.reason  # type: ignore[attr-defined]

        async def stopped() -> dict[str, object] | None:
            doc = await record()
            return doc if doc and doc["state"] == "STOPPED_GRACEFUL" else None

        doc = await wait_for(stopped, "STOPPED_GRACEFUL")
        assert doc["runs"] == {} and doc["hidden"] is True and doc["stop_reason"] == "graceful_shutdown"  # type: ignore[index]


async def test_poison_run_fails_after_max_attempts(nats: NatsClient, nursery: trio.Nursery) -> None:
    """A task that kills its own process: each attempt is released, the last one fails."""
    with trio.fail_after(30):
        settings = fast_settings()
        await start_stack(nursery, nats, settings)
        store = RunStore(nats)
        poison = TWO_TASKS.replace("examples.tasks:to_text", "tests.tasks:die").replace(
            '{value: "$node.add_one.output"}', "{signal_number: 9}"
        )
        run_id = await submit(store, yaml_text=poison, max_attempts=2)
        snap = await wait_status(store, run_id, TERMINAL, timeout=20)
        assert snap.status is RunStatus.FAILED and snap.attempt == 2
        assert "child process died with signal 9" in (snap.error or "")
        types = [e.type for e in await store.history(run_id)]
        assert types.count("run.claimed") == 2 and types.count("run.released") == 1


def worker_env(nats_server: EmbeddedNats) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYOCO_LOAD_DOTENV": "0",
            "PYOCO_WORKER_HEARTBEAT_INTERVAL_SEC": "0.2",
            "PYOCO_RUN_LEASE_SEC": "2",
            "PYOCO_WORKER_POLL_TIMEOUT_SEC": "0.25",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


async def test_sigkilled_worker_process(nats_server: EmbeddedNats, nats: NatsClient, nursery: trio.Nursery, tmp_path: Path) -> None:
    """The CLI worker as a process: it claims a run and lists it in its heartbeat; SIGKILLed, its
    child process goes too (no execution continues behind the reaper's back); the reaper retries
    the attempt on another worker, which completes it exactly once."""
    with trio.fail_after(40):
        settings = fast_settings(run_lease_seconds=2.0)
        await nursery.start(run_conductor, nats, settings)
        store = RunStore(nats)
        markers = tmp_path / "markers"
        markers.mkdir()
        gate = tmp_path / "gate"
        flow = f"""\
flow:
  graph: mark >> hold
tasks:
  mark: {{callable: "tests.tasks:record", inputs: {{marker_dir: "{markers}", label: "mark"}}}}
  hold: {{callable: "tests.tasks:wait_for_file", inputs: {{path: "{gate}", seconds: 30}}}}
"""
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pyoco_es.cli.worker import worker_main; worker_main()",
             "--nats-url", nats_server.url, "--worker-id", "victim", "--concurrency", "1", "--allow-module", "examples", "--allow-module", "tests.tasks"],
            **tied_to_this_process(worker_env(nats_server)),
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            run_id = await submit(store, yaml_text=flow)
            await wait_for(lambda: task_running(store, run_id, "hold"), "the victim to run the task", timeout=20)

            async def listed() -> bool:
                entry = await nats.kv_get(subjects.WORKERS_BUCKET, "victim")
                return bool(entry and entry.value and json.loads(entry.value).get("runs") == {run_id: 1})

            await wait_for(listed, "the victim's heartbeat to list the run")
            [marker] = list(markers.iterdir())
            child_pid = int(marker.name.split("-")[1])
            proc.send_signal(signal.SIGKILL)
            await trio.to_thread.run_sync(proc.wait)

            async def child_gone() -> bool:
                try:
                    os.kill(child_pid, 0)
                except ProcessLookupError:
                    return True
                # a zombie (reparented, not yet reaped) counts as gone
                try:
                    with open(f"/proc/{child_pid}/stat") as f:
                        return f.read().split()[2] == "Z"
                except OSError:
                    return True

            await wait_for(child_gone, "the orphaned child to exit", timeout=2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # the reaper declares the attempt lost; a second worker takes attempt 2 and finishes it
        gate.write_text("go")
        stop = trio.Event()
        await nursery.start(lambda task_status: run_worker(nats, settings, worker_id="rescuer", tags=["default"], concurrency=1, stop=stop, task_status=task_status))
        snap = await wait_status(store, run_id, TERMINAL, timeout=20)
        assert snap.status is RunStatus.COMPLETED and snap.attempt == 2 and snap.worker_id == "rescuer"
        history = await store.history(run_id)
        assert [e.type for e in history].count("run.completed") == 1
        assert [e.type for e in history].count("run.worker_lost") == 1
        assert len(list(markers.iterdir())) == 2  # one execution per attempt, nothing more


async def test_a_sigkilled_workers_scratch_directory_is_removed_by_the_next_worker(
    nats_server: EmbeddedNats, nats: NatsClient, nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILLed worker cannot remove its scratch directory; the next worker to start on the
    machine removes it (a live worker's is left alone), so nothing piles up in /tmp over time."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with trio.fail_after(40):
        env = worker_env(nats_server)
        env["TMPDIR"] = str(tmp)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pyoco_es.cli.worker import worker_main; worker_main()",
             "--nats-url", nats_server.url, "--worker-id", "victim", "--concurrency", "1"],
            **tied_to_this_process(env),
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:

            async def registered() -> bool:
                entry = await nats.kv_get(subjects.WORKERS_BUCKET, "victim")
                return bool(entry and entry.value)

            await wait_for(registered, "the victim to register", timeout=20)

            def leftovers() -> list[Path]:
                return [p for p in tmp.rglob("*") if "victim" in p.name]

            assert leftovers(), "the victim keeps its scratch directory under TMPDIR"
            proc.send_signal(signal.SIGKILL)
            await trio.to_thread.run_sync(proc.wait)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert leftovers(), "SIGKILLed, the victim could not clean up"
        monkeypatch.setattr("tempfile.tempdir", str(tmp))
        stop = trio.Event()
        await nursery.start(
            lambda task_status: run_worker(
                nats, fast_settings(), worker_id="next", tags=["default"], concurrency=1, stop=stop, task_status=task_status
            )
        )
        assert leftovers() == []
        assert [p for p in tmp.rglob("*") if "next" in p.name], "the live worker's own directory is kept"
        stop.set()


async def test_invalid_job_is_termed_and_dead_lettered(nats: NatsClient, nursery: trio.Nursery) -> None:
    """A work item that is not a job (bad JSON, no run_id) is TERMed and sent to the DLQ; the
    worker keeps serving."""
    with trio.fail_after(30):
        settings = fast_settings()
        await start_stack(nursery, nats, settings)
        await nats.publish(subjects.work_subject("default"), b"{not json")
        await nats.publish(subjects.work_subject("default"), b'{"flow_name": "x"}')

        async def dead_lettered() -> bool:
            return (await nats.stream_info(subjects.DLQ_STREAM))["messages"] >= 2

        await wait_for(dead_lettered, "two invalid_job DLQ messages")
        await wait_for(lambda: _work_empty(nats), "the invalid items to leave the work queue")
        store = RunStore(nats)
        run_id = await submit(store)
        assert (await wait_status(store, run_id, TERMINAL)).status is RunStatus.COMPLETED


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tags", "a.b"], "invalid tag 'a.b'"),
        (["--flow-resolver", "nocolon"], "--flow-resolver"),
        (["--flow-resolver", "missing_file.py:fn"], "file not found"),
        (["--flow-resolver", "no_such_module_xyz:fn"], "cannot find module"),
        (["--worker-id", "bad.id"], "invalid worker id"),
    ],
)
def test_cli_argument_errors(args: list[str], message: str) -> None:
    """Bad arguments exit 1 with pyoco-server's ERR-PYOCO-0018 message (no NATS needed)."""
    out = subprocess.run(
        [sys.executable, "-c", "from pyoco_es.cli.worker import worker_main; worker_main()", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYOCO_LOAD_DOTENV": "0"},
    )
    assert out.returncode == 1, out.stderr
    assert "ERR-PYOCO-0018" in out.stderr and message in out.stderr


async def test_cancel_of_a_queued_run(nats: NatsClient, nursery: trio.Nursery) -> None:
    """A run cancelled while still queued ends CANCELLED (not_started); the worker that later
    receives its work item finds it obsolete, acks it, and never claims or runs it."""
    with trio.fail_after(30):
        settings = fast_settings()
        await nursery.start(run_conductor, nats, settings)
        store = RunStore(nats)
        run_id = await submit(store)
        await wait_for(lambda: _work_count(nats, 1), "the work item")
        await cancel(store, run_id)
        stop = trio.Event()
        actor = await nursery.start(lambda task_status: run_worker(nats, settings, worker_id="wq", tags=["default"], concurrency=1, stop=stop, task_status=task_status))
        await wait_for(lambda: _work_empty(nats), "the obsolete item to be acked")
        snap = await wait_status(store, run_id, TERMINAL)
        assert snap.status is RunStatus.CANCELLED and snap.cancel_reason == "not_started"
        assert [e.type for e in await store.history(run_id)] == ["run.submitted", "run.cancelled"]
        assert actor.completed == 0


async def test_claim_from_the_dispatched_position(nats: NatsClient, nursery: trio.Nursery) -> None:
    """A stand-in dispatcher: work items carrying the run's position (``run_seq`` /
    ``run_stream_seq``) are claimed without a read; a stale position only costs a re-read."""
    with trio.fail_after(30):
        settings = fast_settings()
        stop = trio.Event()
        await nursery.start(lambda task_status: run_worker(nats, settings, worker_id="wd", tags=["default"], concurrency=2, stop=stop, task_status=task_status))
        store = RunStore(nats)
        fresh = await submit(store)
        stale = await submit(store)
        # a PENDING run cannot change without leaving PENDING, so stand in for a stale position
        # with a wrong stream seq
        for run_id, stream_seq in ((fresh, None), (stale, 1)):
            [submitted] = await store.history(run_id)
            body = {
                "run_id": run_id,
                "attempt": 1,
                "max_attempts": 3,
                "flow_name": "main",
                "tag": "default",
                "tags": ["default"],
                "params": {"x": 5},
                "submitted_at": time.time(),
                "workflow_yaml": TWO_TASKS,
                "run_seq": 1,
                "run_stream_seq": stream_seq or submitted.stream_seq,
            }
            await nats.publish(subjects.work_subject("default"), json.dumps(body).encode(), msg_id=subjects.work_msg_id(run_id, 1))
        for run_id in (fresh, stale):
            snap = await wait_status(store, run_id, TERMINAL)
            assert snap.status is RunStatus.COMPLETED, snap.error
            assert snap.tasks["to_text"].output == "value=6"
