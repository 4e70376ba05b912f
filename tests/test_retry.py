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

from pyoco_es.testing.stack import Stack, open_stack
from test_worker import fast_settings, wait_for
from test_worker_faults import cli_worker, gone, marker_pids

ENDINGS = {"run.completed", "run.failed", "run.cancelled"}


@asynccontextmanager
async def stack_with_worker(tmp_path: Path, *, worker: bool = True, lease: float = 3.0) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    settings = fast_settings(run_lease_seconds=lease)
    async with open_stack(tmp_path, settings=settings, worker=worker, concurrency=2, allowed_modules=("examples", "tests.tasks")) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=10.0) as client:
            yield stack, client


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


async def test_a_busy_task_is_interrupted_at_its_timeout_and_retried(tmp_path: Path) -> None:
    """A Python busy loop past its timeout_sec is interrupted inside its run process: each try
    fails with reason timeout, the retry applies, and the run fails with reason timeout."""
    flow = """\
flow:
  graph: spin
tasks:
  spin: {callable: "tests.tasks:spin", inputs: {seconds: 30}, timeout_sec: 0.3, retries: 1, retry_delay_sec: 0.05}
"""
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


async def test_a_task_ignoring_its_timeout_is_stopped_with_its_process(tmp_path: Path) -> None:
    """A task blocked in C that swallows the interrupt: the worker kills its run process at the
    deadline; the run is FAILED (timeout) within timeout + 1 s of the task's start, and the
    process is gone."""
    markers = tmp_path / "markers"
    markers.mkdir()
    flow = f"""\
flow:
  graph: stubborn
tasks:
  stubborn: {{callable: "tests.tasks:stubborn", inputs: {{marker_dir: "{markers}", seconds: 30}}, timeout_sec: 1, retries: 2}}
"""
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


async def _true(value: bool) -> bool:
    return value


async def test_the_run_deadline_holds_after_its_worker_was_sigkilled(tmp_path: Path) -> None:
    """timeout_sec on POST /runs/yaml: the worker is SIGKILLed mid-run with a lease longer than
    the deadline; the conductor ends the run FAILED (timeout) at its deadline from the events."""
    markers = tmp_path / "markers"
    markers.mkdir()
    flow = f"""\
flow:
  graph: hold
tasks:
  hold: {{callable: "tests.tasks:stubborn", inputs: {{marker_dir: "{markers}", seconds: 60}}}}
"""
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
    flow = f"""\
flow:
  graph: hold
tasks:
  hold: {{callable: "tests.tasks:stubborn", inputs: {{marker_dir: "{markers}", seconds: 60}}}}
runtime:
  timeout_sec: 1.5
"""
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
    flow = f"""\
flow:
  graph: flaky
tasks:
  flaky: {{callable: "tests.tasks:flaky", inputs: {{counter: "{counter}", fail_times: 100}}, retries: 5, retry_delay_sec: 5}}
"""
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


@pytest.mark.parametrize(
    "fragment, message",
    [
        ("retries: '3'", "tasks.a.retries (line 5): must be an integer"),
        ("retries: -1", "tasks.a.retries (line 5): must be an integer at least 0"),
        ("retry_delay_sec: soon", "tasks.a.retry_delay_sec (line 5): must be a number"),
        ("retry_backoff: 0.5", "tasks.a.retry_backoff (line 5): must be a number at least 1"),
        ("retry_max_delay_sec: [1]", "tasks.a.retry_max_delay_sec (line 5): must be a number"),
        ("timeout_sec: 0", "tasks.a.timeout_sec (line 5): must be a number greater than 0"),
        ("timeout_sec: .inf", "tasks.a.timeout_sec (line 5)"),
    ],
)
async def test_bad_retry_keys_are_422(tmp_path: Path, fragment: str, message: str) -> None:
    flow = f"flow:\n  graph: a\ntasks:\n  a:\n    {fragment}\n    callable: 'examples.tasks:add_one'\n"
    with trio.fail_after(20):
        async with stack_with_worker(tmp_path, worker=False) as (stack, client):
            r = await client.post("/runs/yaml", data={"flow_name": "main"}, files={"workflow": ("flow.yaml", flow.encode())})
            assert r.status_code == 422, r.text
            assert message in r.json()["detail"], r.text
            assert (await stack.nats.stream_info("PYOCO_EVENTS"))["messages"] == 0  # nothing stored


async def test_bad_run_timeouts_are_422(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with stack_with_worker(tmp_path, worker=False) as (stack, client):
            for bad in (0, -1, "soon", True, 10**9, [1]):
                r = await client.post("/runs", json={"flow_name": "f", "timeout_sec": bad})
                assert r.status_code == 422 and "timeout_sec" in json.dumps(r.json()), (bad, r.text)
            r = await client.post("/runs/yaml", data={"flow_name": "main", "timeout_sec": "nan"}, files={"workflow": ("f.yaml", b"flow: {graph: a}\ntasks: {a: {callable: 'm:f'}}\n")})
            assert r.status_code == 422 and "timeout_sec" in r.text, r.text
            r = await client.post("/runs/yaml", data={"flow_name": "main"}, files={"workflow": ("f.yaml", b"flow: {graph: a}\ntasks: {a: {callable: 'm:f'}}\nruntime: {timeout_sec: x}\n")})
            assert r.status_code == 422 and "runtime.timeout_sec" in r.text, r.text
            assert (await stack.nats.stream_info("PYOCO_EVENTS"))["messages"] == 0
