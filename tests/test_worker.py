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
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.service import RunStore, new_run_id
from pyoco_es.worker.actor import WorkerActor, run_worker

GW = Producer(kind="gateway", id="test")
ROOT = Path(__file__).resolve().parents[1]

TWO_TASKS = """\
version: 1
flow:
  graph: |
    add_one >> to_text
  defaults: {x: 1}
tasks:
  add_one: {callable: "examples.tasks:add_one"}
  to_text: {callable: "examples.tasks:to_text", inputs: {value: "$node.add_one.output"}}
"""


def fast_settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "worker_heartbeat_interval": 0.2,
        "run_lease_seconds": 3.0,
        "cancel_grace_period": 1.0,
        "worker_poll_timeout": 0.25,
        "worker_drain_timeout": 5.0,
        "allowed_modules": ("examples",),
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
            "callable 'os:system' refused: module 'os' is not in the allowed modules "
            "(--allow-module / PYOCO_ALLOWED_MODULES)"
        )

        info = await nats.stream_info(subjects.DLQ_STREAM)
        assert info["messages"] >= 2  # flow_not_found + execution_error
