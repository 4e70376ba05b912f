"""RunStore's decide/append loop against a real server, including a conflict in the middle of a
multi-event append (another writer lands between two of our events)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import trio

from pyoco_es.core import decide
from pyoco_es.core.errors import ConcurrencyConflict
from pyoco_es.core.events import Envelope, Event, Producer, RunSubmitted, TaskCompleted, TaskStarted
from pyoco_es.core.model import RunSnapshot, RunStatus
from pyoco_es.nats.client import NatsClient
from pyoco_es.service import RunStore, new_run_id

GW = Producer(kind="gateway", id="g")
WK = Producer(kind="worker", id="w", attempt=1)


class InterleavingLog:
    """The real client, except that the next multi-event append is interrupted after its first
    event by another writer's append (what the server does when someone races us)."""

    def __init__(self, nats: NatsClient, intruder: Any) -> None:
        self._nats = nats
        self._intruder = intruder
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nats, name)

    async def append(self, run_id: str, envelopes: Sequence[Envelope], *, expected_last: int, on_stored: Any = None) -> list[int]:
        if self.armed and len(envelopes) > 1:
            self.armed = False
            [first] = await self._nats.append(run_id, envelopes[:1], expected_last=expected_last)
            await self._intruder()
            raise ConcurrencyConflict(f"run {run_id}", first, appended=1)
        return await self._nats.append(run_id, envelopes, expected_last=expected_last, on_stored=on_stored)


async def test_a_conflict_mid_append_never_stores_an_event_twice(nats: NatsClient) -> None:
    with trio.fail_after(10):
        store = RunStore(nats)
        run_id = new_run_id()
        sub = RunSubmitted(flow_name="main", params={}, tag="t", tags=["t"], submitted_at=time.time())
        await store.execute(run_id, lambda s: decide.submit_run(s, sub, run_id=run_id), producer=GW)
        claimed = await store.execute(
            run_id, lambda s: decide.claim_run(s, run_id=run_id, attempt=1, worker_id="w", lease_seconds=30), producer=WK
        )

        async def cancel_in_between() -> None:
            await store.execute(run_id, lambda s: decide.request_cancel(s, run_id=run_id, now=time.time(), by="user"), producer=GW)

        racing = RunStore(InterleavingLog(nats, cancel_in_between))  # type: ignore[arg-type]
        pending: list[Event] = [
            TaskStarted(attempt=1, task="a", started_at=1.0),
            TaskCompleted(attempt=1, task="a", ended_at=2.0, output=1),
        ]

        def finish(s: RunSnapshot | None) -> list[Event]:
            # The worker's terminal decision: its pending task events, then the ending.
            return pending + decide.finish_run(s, run_id=run_id, attempt=1, worker_id="w", outcome="COMPLETED", now=3.0)

        out = await racing.execute(run_id, finish, producer=WK, hint=claimed.snapshot)
        types = [e.type for e in await store.history(run_id)]
        assert types == ["run.submitted", "run.claimed", "task.started", "run.cancel_requested", "task.completed", "run.completed"]
        assert out.snapshot is not None and out.snapshot.status is RunStatus.COMPLETED
        assert out.snapshot.cancel_requested_by == "user"
        assert await store.load(run_id) == out.snapshot
