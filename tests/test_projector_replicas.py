"""On an R3 stream a direct get may be answered by a replica still catching up, so a read of a run
can miss its newest events.  The cluster fault suite found a projector that met such a short read
while filling a gap (events of one run split between two conductors) and marked the run not
projectable: it stayed RUNNING in the read model for good.  Here the lagging replica is simulated
(direct reads drop the newest event); the leader read must make up for it."""

from __future__ import annotations

import time
from typing import Any

import trio

from pyoco_es.conductor.projector import Projector, _Cached
from pyoco_es.core import decide
from pyoco_es.core.events import Producer
from pyoco_es.core.model import RunStatus
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient
from pyoco_es.service import RunStore, new_run_id
from test_conductor import submitted

W = Producer(kind="worker", id="w1", attempt=1)


class LaggingReplica:
    """The client, except that direct reads of a run miss every event after stream seq ``upto``
    (a replica that has not caught up; the leader has them)."""

    def __init__(self, nats: NatsClient, upto: int) -> None:
        self._nats = nats
        self.upto = upto
        self.short_reads = 0

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - everything else is the real client
        return getattr(self._nats, name)

    async def read_run(self, run_id: str, *, after_stream_seq: int = 0, from_leader: bool = False) -> list[Any]:
        events = await self._nats.read_run(run_id, after_stream_seq=after_stream_seq, from_leader=from_leader)
        if from_leader:
            return events
        self.short_reads += 1
        return [e for e in events if e.stream_seq <= self.upto]


async def test_a_gap_filled_from_a_lagging_replica_is_read_again_from_the_leader(nats: NatsClient) -> None:
    with trio.fail_after(20):
        store = RunStore(nats)
        run_id = new_run_id()
        ev = submitted()
        await store.execute(run_id, lambda s: decide.submit_run(s, ev, run_id=run_id), producer=Producer(kind="gateway", id="g"))
        await store.execute(run_id, lambda s: decide.claim_run(s, run_id=run_id, attempt=1, worker_id="w1", lease_seconds=15), producer=W)
        done = await store.execute(
            run_id, lambda s: decide.finish_run(s, run_id=run_id, attempt=1, worker_id="w1", outcome=RunStatus.COMPLETED, now=time.time()), producer=W
        )
        assert done.snapshot is not None and done.snapshot.version == 3
        events = await nats.read_run(run_id)
        lagging = LaggingReplica(nats, upto=events[0].stream_seq)
        proj = Projector(lagging)  # type: ignore[arg-type]
        # This projector saw the submit; the claim went to another conductor; now the completion,
        # while the replica answering direct gets has only the submit.
        proj._remember(run_id, _Cached(None, 0))  # what absorb() does for a run's first event
        await proj._fold_run(run_id, events[:1])
        await proj._fold_run(run_id, events[2:])
        assert lagging.short_reads == 1  # the gap was filled from the replica first...
        cached = proj._cache[run_id]
        assert cached.blocked is None, cached.blocked  # ...and not judged corrupt
        assert cached.snapshot is not None and cached.snapshot.status is RunStatus.COMPLETED and cached.snapshot.version == 3
        await proj.flush()
        entry = await nats.kv_get(subjects.RUNS_BUCKET, run_id)
        assert entry is not None and b'"COMPLETED"' in entry.value
