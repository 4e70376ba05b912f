"""Helpers for the gateway tests: a real stack (nats-server, conductor, gateway on a random port),
an httpx client, an SSE frame reader, and a fake worker that appends real events.

No test sleeps to wait for state: ``wait_until`` polls with a deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import pytest
import trio

from pyoco_es.config import Settings
from pyoco_es.core import decide
from pyoco_es.core.events import Producer, TaskCompleted, TaskStarted
from pyoco_es.core.model import RunSnapshot
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient
from pyoco_es.service import RunStore
from pyoco_es.testing.stack import Stack, open_stack

T = TypeVar("T")

# httpx/httpcore read streams through nested async generators; a test that leaves an SSE stream
# early has the inner ones finalized by Trio with a ResourceWarning (encode/httpx#3686).
HTTPX_STREAM_WARNINGS = [
    pytest.mark.filterwarnings("ignore:Async generator 'httpx.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore.:ResourceWarning"),
]

FLOW_YAML = b"""\
version: 1
flow:
  graph: |
    first >> second
  defaults:
    x: 1
    label: demo
tasks:
  first:
    callable: examples.tasks:add_one
  second:
    callable: examples.tasks:to_text
    inputs:
      value: $node.first.output
"""


@attrs.define(eq=False)
class GW:
    client: httpx.AsyncClient
    stack: Stack

    @property
    def nats(self) -> NatsClient:
        return self.stack.nats

    @property
    def url(self) -> str:
        return self.stack.url


@asynccontextmanager
async def open_gateway(
    tmp_path: Path, *, settings: Settings | None = None, conductor: bool = True
) -> AsyncIterator[GW]:
    # Writes hold for NATS up to nats_unavailable_wait before a 503; short here, so tests that
    # stop NATS see their 503 quickly.
    settings = settings or Settings(sse_heartbeat_interval=0.2, nats_unavailable_wait=1.0)
    async with open_stack(tmp_path, settings=settings, conductor=conductor) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=10.0) as client:
            yield GW(client, stack)


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[GW]:
    """A stack with conductor and gateway (import this fixture into a test module to use it)."""
    async with open_gateway(tmp_path) as g:
        yield g


async def wait_until(fn: Callable[[], Awaitable[T | None]], *, timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``fn`` until it returns something truthy (no fixed sleeps; a short yield between)."""
    deadline = trio.current_time() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await trio.sleep(0.005)


async def wait_status(client: httpx.AsyncClient, run_id: str, status: str, *, timeout: float = 5.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await client.get(f"/runs/{run_id}")
        doc = r.json()
        return doc if r.status_code == 200 and doc["status"] == status else None

    return await wait_until(check, timeout=timeout, what=f"run {run_id} to be {status}")


async def wait_projected(nats: NatsClient, run_id: str, version: int) -> None:
    """Until the projector wrote at least ``version`` of the run into KV."""

    async def check() -> bool:
        entry = await nats.kv_get(subjects.RUNS_BUCKET, run_id)
        return entry is not None and entry.value is not None and json.loads(entry.value)["version"] >= version

    await wait_until(check, what=f"run {run_id} v{version} in KV")


async def submit(client: httpx.AsyncClient, flow_name: str = "hello", **body: Any) -> str:
    r = await client.post("/runs", json={"flow_name": flow_name, **body})
    assert r.status_code == 200, r.text
    return str(r.json()["run_id"])


async def submit_yaml(
    client: httpx.AsyncClient,
    text: bytes = FLOW_YAML,
    *,
    flow_name: str | None = "main",
    tag: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    data = {}
    if flow_name is not None:
        data["flow_name"] = flow_name
    if tag is not None:
        data["tag"] = tag
    return await client.post("/runs/yaml", files={"workflow": ("flow.yaml", text, "application/x-yaml")}, data=data, headers=headers)


async def events_last_seq(nats: NatsClient) -> int:
    return (await nats.stream_info(subjects.EVENTS_STREAM))["last_seq"]


@attrs.define(eq=False)
class FakeWorker:
    """Appends the events a worker would (claim, tasks, ending) through the real RunStore."""

    nats: NatsClient
    worker_id: str = "w1"

    @property
    def store(self) -> RunStore:
        return RunStore(self.nats)

    def producer(self, attempt: int = 1) -> Producer:
        return Producer(kind="worker", id=self.worker_id, attempt=attempt)

    async def claim(self, run_id: str, tasks: tuple[str, ...] = ("first", "second")) -> RunSnapshot:
        out = await self.store.execute(
            run_id,
            lambda s: decide.claim_run(s, run_id=run_id, attempt=1, worker_id=self.worker_id, lease_seconds=15.0, tasks=tasks),
            producer=self.producer(),
        )
        assert out.snapshot is not None
        return out.snapshot

    async def task_done(self, run_id: str, task: str, output: Any = None) -> None:
        now = time.time()
        for ev in (TaskStarted(attempt=1, task=task, started_at=now), TaskCompleted(attempt=1, task=task, started_at=now, ended_at=now, output=output)):
            await self.store.execute(
                run_id,
                lambda s, ev=ev: decide.worker_event(s, ev, run_id=run_id, attempt=1, worker_id=self.worker_id),  # type: ignore[misc]
                producer=self.producer(),
            )

    async def finish(self, run_id: str, outcome: str = "COMPLETED", **kw: Any) -> RunSnapshot:
        out = await self.store.execute(
            run_id,
            lambda s: decide.finish_run(s, run_id=run_id, attempt=1, worker_id=self.worker_id, outcome=outcome, now=time.time(), **kw),
            producer=self.producer(),
        )
        assert out.snapshot is not None
        return out.snapshot


async def put_worker(nats: NatsClient, worker_id: str, *, visible_on: httpx.AsyncClient | None = None, **fields: Any) -> None:
    """Write a registry record as a worker's heartbeat would; with ``visible_on``, wait until that
    gateway's registry index shows it (the index follows the bucket by a watch)."""
    now = time.time()
    record = {
        "worker_id": worker_id,
        "instance_id": f"{worker_id}-i",
        "state": "IDLE",
        "hidden": False,
        "tags": ["default"],
        "last_seen_at": now,
        "last_heartbeat_at": now,
        "heartbeat_at": now,
        "updated_at": now,
        **fields,
    }
    await nats.kv_put(subjects.WORKERS_BUCKET, worker_id, json.dumps(record).encode())
    if visible_on is not None:
        client = visible_on

        async def visible() -> bool:
            r = await client.get("/workers", params={"scope": "all", "include_hidden": "true", "limit": 500})
            return any(w["worker_id"] == worker_id and w["updated_at"] == record["updated_at"] for w in r.json())

        await wait_until(visible, what=f"worker {worker_id} in the gateway's registry")


@attrs.frozen
class Frame:
    event: str
    data: Any
    id: str | None


class SSEReader:
    """Parses frames from a streaming httpx response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, *, skip_heartbeats: bool = True) -> Frame | None:
        """The next frame, or None when the server closed the stream."""
        event, data, fid = "message", "", None
        async for line in self._lines:
            if line == "":
                if data:
                    frame = Frame(event, json.loads(data), fid)
                    if skip_heartbeats and frame.event == "heartbeat":
                        event, data, fid = "message", "", None
                        continue
                    return frame
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data += value
            elif name == "id":
                fid = value
        return None

    async def rest(self) -> list[Frame]:
        out = []
        while (f := await self.next()) is not None:
            out.append(f)
        return out


@asynccontextmanager
async def open_sse(client: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None) -> AsyncIterator[SSEReader]:
    async with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SSEReader(response)


async def seed_runs(nats: NatsClient, n: int, *, batch: int = 1000) -> list[str]:
    """Write ``n`` realistic snapshots straight into the runs KV (as the projector would)."""
    from pyoco_es.core.codec import encode_snapshot
    from pyoco_es.core.model import RunStatus

    statuses = [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.RUNNING, RunStatus.PENDING]
    base = time.time() - n
    ids = []
    items: list[tuple[str, bytes, str | None, dict[str, str] | None]] = []
    for i in range(n):
        run_id = f"seed{i:06d}"
        ids.append(run_id)
        snap = RunSnapshot(
            run_id=run_id, flow_name=f"flow{i % 7}", tag=f"t{i % 3}", tags=(f"t{i % 3}",), params={"i": i},
            status=statuses[i % 4], submitted_at=base + i, updated_at=base + i + 0.5, version=1, last_stream_seq=0,
        )
        items.append((subjects.kv_subject(subjects.RUNS_BUCKET, run_id), encode_snapshot(snap), None, None))
        if len(items) == batch:
            await nats.publish_many(items)
            items = []
    if items:
        await nats.publish_many(items)
    return ids
