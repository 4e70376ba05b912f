"""Retries with backoff, task timeouts that stop work, and run deadlines (issue 16), end to end:
real nats-server, gateway, conductor, worker and run processes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from pyoco_es.conductor.deadline import Deadlines
from pyoco_es.core import decide
from pyoco_es.core.errors import ValidationError
from pyoco_es.core.events import RunCancelRequested, RunClaimed, TaskCompleted, TaskRetryScheduled, TaskStarted
from pyoco_es.core.fold import fold
from pyoco_es.core.model import RunStatus
from pyoco_es.flows.policy import TaskPolicy, policy_of
from pyoco_es.testing.stack import Stack, open_stack
from pyoco_es.worker.attempt import add_task_event
from pyoco_es.worker.timeouts import HARD_STOP_GRACE, AttemptTimeouts
from test_core import history, submitted
from test_worker import TWO_TASKS, fast_settings, wait_for
from test_worker_faults import cli_worker, gone, marker_pids

ENDINGS = {"run.completed", "run.failed", "run.cancelled"}


# -- the pure parts ------------------------------------------------------------------------------


def test_retries_fold_into_tries_and_a_success_clears_the_error() -> None:
    claimed = RunClaimed(worker_id="w1", attempt=1, lease_seconds=15.0, tasks=["a"])
    retry = TaskRetryScheduled(attempt=1, task="a", try_number=1, max_tries=3, error="E: 1", delay_sec=0.5, failed_at=101.5)
    snap = fold(None, history(submitted(), claimed, TaskStarted(attempt=1, task="a", started_at=101.0), retry))
    assert snap is not None
    rec = snap.tasks["a"]
    assert rec.state.value == "RUNNING" and rec.tries == 2 and rec.error == "E: 1" and rec.started_at == 101.0
    snap = fold(snap, history(submitted(), claimed, TaskStarted(attempt=1, task="a", started_at=101.0), retry,
                              TaskCompleted(attempt=1, task="a", ended_at=103.0, output=1)))
    assert snap is not None
    out = snap.to_json()["task_records"]["a"]  # type: ignore[index]
    assert out["state"] == "SUCCEEDED" and out["tries"] == 2 and out["error"] is None and out["started_at"] == 101.0  # type: ignore[index]
    # A retried task keeps its task.started in a batch (the merge never skips a retry).
    pending: list[object] = []
    for e in (TaskStarted(attempt=1, task="a", started_at=1.0), retry, TaskCompleted(attempt=1, task="a", ended_at=2.0)):
        add_task_event(pending, e)  # type: ignore[arg-type]
    assert [type(e).__name__ for e in pending] == ["TaskStarted", "TaskRetryScheduled", "TaskCompleted"]


def test_the_deadline_decision_by_status() -> None:
    base = [submitted(timeout_sec=5.0)]  # submitted_at 100: due at 105
    pending = fold(None, history(*base))
    assert decide.expire_run(pending, run_id="r1", now=104.9) == []
    [failed] = decide.expire_run(pending, run_id="r1", now=105.0)
    assert failed.reason == "timeout" and "timeout_sec=5s" in failed.error  # type: ignore[attr-defined]
    claimed = [*base, RunClaimed(worker_id="w1", attempt=1, lease_seconds=15.0, tasks=["a"])]
    assert decide.expire_run(fold(None, history(*claimed)), run_id="r1", now=106)[0].reason == "timeout"  # type: ignore[attr-defined]
    cancelling = fold(None, history(*claimed, RunCancelRequested(requested_at=101.0)))
    assert cancelling is not None and cancelling.status is RunStatus.CANCELLING
    [cancelled] = decide.expire_run(cancelling, run_id="r1", now=106)
    assert type(cancelled).__name__ == "RunCancelled"  # a timeout during a cancel is a cancel
    ended = fold(None, history(*claimed, *decide.expire_run(fold(None, history(*claimed)), run_id="r1", now=106)))
    assert ended is not None and ended.status is RunStatus.FAILED and ended.failure_reason == "timeout"
    assert decide.expire_run(ended, run_id="r1", now=200) == []  # exactly one ending
    assert decide.expire_run(fold(None, history(submitted())), run_id="r1", now=1e12) == []  # no deadline


def test_policies_back_off_and_named_tasks_carry_them() -> None:
    p = TaskPolicy(retries=4, retry_delay_sec=0.5, retry_backoff=3, retry_max_delay_sec=2)
    assert [p.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 2, 2] and p.max_tries == 5
    from pyoco.core.models import Task

    task = Task(func=print, name="t", retries=2, timeout_sec=3)
    assert policy_of(task) == TaskPolicy(retries=2, timeout_sec=3.0)
    assert policy_of(Task(func=print, name="plain")) is None
    task.retry_backoff = 0  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="task 't': retry_backoff"):
        policy_of(task)


def test_conductor_and_worker_deadline_bookkeeping() -> None:
    d = Deadlines()
    d.note("r1", {"status": "RUNNING", "deadline_at": 5.0})
    d.note("r2", {"status": "PENDING"})
    d.note("r3", {"status": "COMPLETED", "deadline_at": 5.0})
    assert d.due == {"r1": 5.0}
    d.note("r1", {"status": "FAILED", "deadline_at": 5.0})
    assert d.due == {}
    t = AttemptTimeouts.for_job(1005.0, 5.0, wall_now=1000.0, trio_now=10.0)
    assert t.next_at() == 15.0 and not t.run_due(14.9) and t.run_due(15.0) and not t.run_due(16.0)
    t.note({"ev": "task.try", "task": "a", "try_number": 1, "timeout_sec": 2}, now=20.0)
    assert t.next_at() == 22.0 + HARD_STOP_GRACE and t.overdue_try(22.0) is None
    assert t.overdue_try(22.0 + HARD_STOP_GRACE).task == "a"  # type: ignore[union-attr]
    t.note({"ev": "task.retry_scheduled", "task": "a"}, now=21.0)
    assert t.overdue_try(100.0) is None


# -- end to end -------------------------------------------------------------------------------


@asynccontextmanager
async def stack_with_worker(
    tmp_path: Path, *, worker: bool = True, lease: float = 3.0, flow_resolver: str | None = None
) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    settings = fast_settings(run_lease_seconds=lease)
    async with open_stack(
        tmp_path, settings=settings, worker=worker, concurrency=2, allowed_modules=("examples", "tests.tasks"), flow_resolver=flow_resolver  # type: ignore[arg-type]
    ) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=10.0) as client:
            yield stack, client


def one_task(task: str, spec: str, more: str = "") -> str:
    """A flow of the one task ``task`` (``spec``: its YAML mapping's entries), then ``more`` YAML."""
    return f"flow:\n  graph: {task}\ntasks:\n  {task}: {{{spec}}}\n{more}"


async def submit_yaml(client: httpx.AsyncClient, text: str, **form: str) -> str:
    r = await client.post("/runs/yaml", data={"flow_name": "main", **form}, files={"workflow": ("flow.yaml", text.encode())})
    assert r.status_code == 200, r.text
    return str(r.json()["run_id"])


async def ended(client: httpx.AsyncClient, run_id: str, timeout: float = 20.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        doc = (await client.get(f"/runs/{run_id}", params={"include": "records"})).json()
        return doc if doc.get("status") in ("COMPLETED", "FAILED", "CANCELLED") else None

    return await wait_for(check, f"run {run_id} to end", timeout)  # type: ignore[return-value]


async def events(client: httpx.AsyncClient, run_id: str) -> list[dict[str, Any]]:
    body = (await client.get(f"/runs/{run_id}/events")).json()
    return list(body if isinstance(body, list) else body["events"])


async def test_a_flaky_task_succeeds_on_its_third_try(tmp_path: Path) -> None:
    """Two failed tries, each an event with its try number, error and backoff delay (0.05 s,
    then 0.1 s), visible in the events and the snapshot; the task record ends SUCCEEDED with
    three tries and no error (pyoco would have kept the last try's)."""
    counter = tmp_path / "calls"
    flow = f"""\
flow:
  graph: flaky >> after
tasks:
  flaky:
    callable: "tests.tasks:flaky"
    inputs: {{counter: "{counter}", fail_times: 2}}
    retries: 3
    retry_delay_sec: 0.05
    retry_backoff: 2
  after: {{callable: "examples.tasks:to_text", inputs: {{value: "$node.flaky.output"}}}}
"""
    with trio.fail_after(40):
        async with stack_with_worker(tmp_path) as (_stack, client):
            run_id = await submit_yaml(client, flow)
            doc = await ended(client, run_id)
            assert doc["status"] == "COMPLETED", doc
            rec = doc["task_records"]["flaky"]
            assert rec["state"] == "SUCCEEDED" and rec["tries"] == 3 and rec["error"] is None and rec["output"] == 3
            assert doc["task_records"]["after"]["output"] == "value=3"
            history = await events(client, run_id)
            retries = [e["data"] for e in history if e["type"] == "task.retry_scheduled"]
            assert [(r["try_number"], r["max_tries"], r["delay_sec"], r["reason"]) for r in retries] == [(1, 4, 0.05, "error"), (2, 4, 0.1, "error")]
            assert retries[0]["error"] == "RuntimeError: flaky failure 1" and retries[1]["error"] == "RuntimeError: flaky failure 2"
            assert retries[1]["failed_at"] - retries[0]["failed_at"] >= 0.05  # the first delay was waited
            assert counter.read_text() == "3"
            types = [e["type"] for e in history]
            assert types.index("task.started") < types.index("task.retry_scheduled") < types.index("task.completed")


async def test_named_flows_honour_retry_attributes_on_their_tasks(tmp_path: Path) -> None:
    """A resolver's pyoco task with ``retries``/``retry_delay_sec``/``retry_backoff`` set: the
    same retries and events as YAML; an attribute of the wrong type fails the build."""
    counter = tmp_path / "calls"
    with trio.fail_after(40):
        async with stack_with_worker(tmp_path, flow_resolver="tests.tasks:retry_flows") as (_stack, client):
            r = await client.post("/runs", json={"flow_name": "flaky", "params": {"counter": str(counter)}})
            doc = await ended(client, r.json()["run_id"])
            assert doc["status"] == "COMPLETED" and doc["task_records"]["flaky"]["tries"] == 3, doc
            retries = [e["data"] for e in await events(client, doc["run_id"]) if e["type"] == "task.retry_scheduled"]
            assert [(r["try_number"], r["delay_sec"]) for r in retries] == [(1, 0.05), (2, 0.05)]
            r = await client.post("/runs", json={"flow_name": "bad_policy"})
            doc = await ended(client, r.json()["run_id"])
            assert doc["status"] == "FAILED" and doc["failure_reason"] == "build_error" and "retries" in doc["error"], doc


async def test_a_busy_task_is_interrupted_at_its_timeout_and_retried(tmp_path: Path) -> None:
    """A Python busy loop past its timeout_sec is interrupted inside its run process: each try
    fails with reason timeout, the retry applies, and the run fails with reason timeout.  The
    process that had an exception raised into it is retired after the run."""
    markers = tmp_path / "markers"
    markers.mkdir()
    flow = one_task("spin", f'callable: "tests.tasks:spin", inputs: {{seconds: 30, marker_dir: "{markers}"}}, timeout_sec: 0.3, retries: 1, retry_delay_sec: 0.05')
    with trio.fail_after(40):
        async with stack_with_worker(tmp_path) as (_stack, client):
            started = time.monotonic()
            run_id = await submit_yaml(client, flow)
            doc = await ended(client, run_id)
            took = time.monotonic() - started
            assert doc["status"] == "FAILED" and doc["failure_reason"] == "timeout", doc
            rec = doc["task_records"]["spin"]
            assert rec["state"] == "FAILED" and rec["failure_reason"] == "timeout" and rec["tries"] == 2
            assert "exceeded its timeout of 0.3s (try 2 of 2)" in rec["error"]
            retries = [e["data"] for e in await events(client, run_id) if e["type"] == "task.retry_scheduled"]
            assert len(retries) == 1 and retries[0]["reason"] == "timeout" and "TaskTimeout" in retries[0]["error"]
            assert took < 5.0  # two 0.3 s tries, not 30 s of spinning
            # The interrupted process is retired (both tries ran in it); the worker serves on.
            [pid] = set(marker_pids(markers))
            await wait_for(lambda: _true(gone(pid)), "the interrupted run process to be retired", timeout=5)
            doc = await ended(client, await submit_yaml(client, TWO_TASKS))
            assert doc["status"] == "COMPLETED", doc


async def test_a_task_ignoring_its_timeout_is_stopped_with_its_process(tmp_path: Path) -> None:
    """A task blocked in C that swallows the interrupt: the worker kills its run process at the
    deadline; the run is FAILED (timeout) within timeout + 1 s of the task's start, and the
    process is gone."""
    markers = tmp_path / "markers"
    markers.mkdir()
    flow = one_task("stubborn", f'callable: "tests.tasks:stubborn", inputs: {{marker_dir: "{markers}", seconds: 30}}, timeout_sec: 1, retries: 2')
    with trio.fail_after(40):
        async with stack_with_worker(tmp_path) as (_stack, client):
            run_id = await submit_yaml(client, flow)
            await wait_for(lambda: _true(any(markers.iterdir())), "the task to start", timeout=20)
            started = time.monotonic()
            [pid] = marker_pids(markers)
            doc = await ended(client, run_id, timeout=10)
            assert time.monotonic() - started <= 1.0 + 1.0
            assert doc["status"] == "FAILED" and doc["failure_reason"] == "timeout", doc
            rec = doc["task_records"]["stubborn"]
            assert rec["state"] == "FAILED" and rec["failure_reason"] == "timeout" and "run process was killed" in rec["error"]
            await wait_for(lambda: _true(gone(pid)), "the run process to be gone", timeout=2)
            assert sum(e["type"] in ENDINGS for e in await events(client, run_id)) == 1
            # The worker goes on serving, in a fresh run process.
            doc = await ended(client, await submit_yaml(client, TWO_TASKS))
            assert doc["status"] == "COMPLETED", doc


async def _true(value: bool) -> bool:
    return value


async def test_the_run_deadline_holds_after_its_worker_was_sigkilled(tmp_path: Path) -> None:
    """timeout_sec on POST /runs/yaml: the worker is SIGKILLed mid-run with a lease longer than
    the deadline; the conductor ends the run FAILED (timeout) at its deadline from the events."""
    markers = tmp_path / "markers"
    markers.mkdir()
    flow = one_task("hold", f'callable: "tests.tasks:stubborn", inputs: {{marker_dir: "{markers}", seconds: 60}}')
    with trio.fail_after(60):
        async with stack_with_worker(tmp_path, worker=False, lease=30.0) as (stack, client):
            proc = cli_worker(stack.server, "victim")
            try:
                submitted = time.time()
                run_id = await submit_yaml(client, flow, timeout_sec="4")
                await wait_for(lambda: _true(any(markers.iterdir())), "the task to start", timeout=20)
                [pid] = marker_pids(markers)
            finally:
                proc.kill()
                proc.wait()
            doc = await ended(client, run_id, timeout=15)
            assert doc["status"] == "FAILED" and doc["failure_reason"] == "timeout", doc
            assert doc["timeout_sec"] == 4 and abs(doc["deadline_at"] - submitted) < 4 + 1
            assert doc["end_time"] - doc["deadline_at"] < 2.0
            history = await events(client, run_id)
            ending = [e for e in history if e["type"] in ENDINGS]
            assert len(ending) == 1 and ending[0]["producer"]["kind"] == "conductor", ending
            assert history[0]["data"]["timeout_sec"] == 4
            await wait_for(lambda: _true(gone(pid)), "the run process to be gone", timeout=5)


async def test_a_live_worker_stops_the_run_at_its_deadline(tmp_path: Path) -> None:
    """timeout_sec on POST /runs (a named flow) and runtime.timeout_sec in YAML: the worker stops
    the run process at the deadline and the run is FAILED (timeout), by the worker."""
    markers = tmp_path / "markers"
    markers.mkdir()
    flow = one_task("hold", f'callable: "tests.tasks:stubborn", inputs: {{marker_dir: "{markers}", seconds: 60}}', "runtime:\n  timeout_sec: 1.5\n")
    with trio.fail_after(40):
        async with stack_with_worker(tmp_path) as (_stack, client):
            run_id = await submit_yaml(client, flow)
            doc = await ended(client, run_id, timeout=15)
            assert doc["status"] == "FAILED" and doc["failure_reason"] == "timeout" and doc["timeout_sec"] == 1.5, doc
            assert doc["end_time"] - doc["deadline_at"] < 1.5
            ending = [e for e in await events(client, run_id) if e["type"] in ENDINGS]
            assert len(ending) == 1 and ending[0]["producer"]["kind"] == "worker", ending
            [pid] = marker_pids(markers)
            await wait_for(lambda: _true(gone(pid)), "the run process to be gone", timeout=5)
            # A named flow with a deadline: a PENDING run nobody can serve ends too (conductor).
            r = await client.post("/runs", json={"flow_name": "nobody", "tag": "nowhere", "timeout_sec": 0.5})
            assert r.status_code == 200, r.text
            doc = await ended(client, r.json()["run_id"], timeout=10)
            assert doc["status"] == "FAILED" and doc["failure_reason"] == "timeout", doc


async def test_a_cancel_stops_retries(tmp_path: Path) -> None:
    """A task waiting 5 s for its next try: a cancel ends the wait and the run at once."""
    counter = tmp_path / "calls"
    flow = one_task("flaky", f'callable: "tests.tasks:flaky", inputs: {{counter: "{counter}", fail_times: 100}}, retries: 5, retry_delay_sec: 5')
    with trio.fail_after(40):
        async with stack_with_worker(tmp_path) as (_stack, client):
            run_id = await submit_yaml(client, flow)

            async def retrying() -> bool:
                return any(e["type"] == "task.retry_scheduled" for e in await events(client, run_id))

            await wait_for(retrying, "the first retry to be scheduled", timeout=20)
            asked = time.monotonic()
            assert (await client.post(f"/runs/{run_id}/cancel")).status_code == 200
            doc = await ended(client, run_id)
            assert time.monotonic() - asked < 3.0  # not the 5 s delay
            assert doc["status"] == "CANCELLED", doc
            assert counter.read_text() == "1"
            assert "RetriesStopped: cancelled before try 2 of 6" in doc["task_records"]["flaky"]["error"]


BAD_KEYS = [
    ("retries: '3'", "tasks.a.retries (line 5): must be an integer"),
    ("retries: -1", "tasks.a.retries (line 5): must be an integer at least 0"),
    ("retry_delay_sec: soon", "tasks.a.retry_delay_sec (line 5): must be a number"),
    ("retry_backoff: 0.5", "tasks.a.retry_backoff (line 5): must be a number at least 1"),
    ("retry_max_delay_sec: [1]", "tasks.a.retry_max_delay_sec (line 5): must be a number"),
    ("timeout_sec: 0", "tasks.a.timeout_sec (line 5): must be a number greater than 0"),
    ("timeout_sec: .inf", "tasks.a.timeout_sec (line 5)"),
    ("retries: 1" + "0" * 400, "tasks.a.retries (line 5): must be an integer at least 0 and at most 100, got 1000"),
]


async def test_bad_retry_keys_and_run_timeouts_are_422(tmp_path: Path) -> None:
    """Each wrong key is a 422 naming it (with its line); nothing is stored."""
    with trio.fail_after(30):
        async with stack_with_worker(tmp_path, worker=False) as (stack, client):
            for fragment, message in BAD_KEYS:
                flow = f"flow:\n  graph: a\ntasks:\n  a:\n    {fragment}\n    callable: 'examples.tasks:add_one'\n"
                r = await client.post("/runs/yaml", data={"flow_name": "main"}, files={"workflow": ("flow.yaml", flow.encode())})
                assert r.status_code == 422 and message in r.json()["detail"], (fragment, r.text)
            for bad in (0, -1, "soon", True, 10**9, [1], 10**400, float("nan")):
                body = json.dumps({"flow_name": "f", "timeout_sec": bad}).encode()  # NaN as the literal
                r = await client.post("/runs", content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == 422 and "timeout_sec" in json.dumps(r.json()), (bad, r.text)
            r = await client.post("/runs/yaml", data={"flow_name": "main", "timeout_sec": "nan"}, files={"workflow": ("f.yaml", b"flow: {graph: a}\ntasks: {a: {callable: 'm:f'}}\n")})
            assert r.status_code == 422 and "timeout_sec" in r.text, r.text
            r = await client.post("/runs/yaml", data={"flow_name": "main"}, files={"workflow": ("f.yaml", b"flow: {graph: a}\ntasks: {a: {callable: 'm:f'}}\nruntime: {timeout_sec: x}\n")})
            assert r.status_code == 422 and "runtime.timeout_sec" in r.text, r.text
            assert (await stack.nats.stream_info("PYOCO_EVENTS"))["messages"] == 0
