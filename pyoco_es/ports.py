"""The ports the shells use, as ``Protocol``s (eventsourcing's recorders): the event log, the
snapshot store, the work queue and the clock, with the records that cross them.

``pyoco_es.nats`` implements every port on one connection (:class:`~.nats.client.NatsClient`:
``nats/event_log.py``, ``nats/kv.py``, ``nats/work.py``); a shell that names the port it needs
in its signature states what it depends on.  ``tests/test_structure.py`` holds the adapter to
these signatures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Callable, Protocol

import attrs
import trio

from .core.errors import PyocoError
from .core.events import Envelope

OnStored = Callable[[list[int]], None]
"""A hook run on the NATS thread with the stream seqs of a stored append."""

AppendBatch = tuple[str, Sequence[Envelope], int] | tuple[str, Sequence[Envelope], int, OnStored | None]
"""One run's append in a batch: run id, envelopes, expected last subject sequence[, hook]."""
KVWrite = tuple[str, bytes, int]
"""A compare-and-swap write: key, value, expected revision (0: create)."""
WorkPublish = tuple[str, bytes, str | None, dict[str, str] | None]
"""A publish: subject, payload, Nats-Msg-Id (dedupe), headers."""
DueWork = tuple[str, bytes, str | None]
"""A work item the projector dispatches: subject, payload, Nats-Msg-Id (``run_id:attempt``)."""


@attrs.frozen
class PubAck:
    """The stream's answer to a publish: its sequence, and whether it was a duplicate."""

    seq: int
    duplicate: bool


@attrs.frozen
class KVEntry:
    """A key's latest value in a bucket (``value`` None: a delete / purge marker)."""

    key: str
    value: bytes | None
    revision: int


@attrs.define(eq=False)
class Delivered:
    """A message delivered by a pull consumer, with its JetStream metadata (``msg`` is the
    adapter's handle for acks)."""

    data: bytes
    subject: str
    headers: dict[str, str] | None
    stream_seq: int
    num_delivered: int
    num_pending: int
    msg: Any = attrs.field(repr=False)


class Clock(Protocol):
    """Wall-clock seconds (``time.time``); injected so tests and the fold never read the clock."""

    def __call__(self) -> float: ...


class EventLog(Protocol):
    """Each run's events on its own subject, appended with optimistic concurrency."""

    async def append(
        self, run_id: str, envelopes: Sequence[Envelope], *, expected_last: int, on_stored: OnStored | None = None
    ) -> list[int]:
        """Append one run's events after ``expected_last``; raises ConcurrencyConflict if another
        writer got there first.  Returns the stream seqs."""
        ...

    async def append_many(self, batches: Sequence[AppendBatch]) -> list[list[int] | PyocoError]:
        """Many runs' appends in one crossing; per batch its seqs or its error."""
        ...

    async def read_run(self, run_id: str, *, after_stream_seq: int = 0, from_leader: bool = False) -> list[Envelope]:
        """A run's events after a stream position (``from_leader``: none missing on a cluster)."""
        ...

    async def read_runs(self, run_ids: Sequence[str]) -> list[list[Envelope] | PyocoError]:
        """Several runs' whole histories; per run its events or its error."""
        ...

    async def read_events(self, subject_filter: str, *, after_stream_seq: int, limit: int = 1024) -> list[tuple[int, bytes]]:
        """Up to ``limit`` raw (stream seq, bytes) events on a subject filter after a position."""
        ...

    async def read_stream(self, *, after_stream_seq: int, limit: int = 1024) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` raw (stream seq, subject, bytes) events of any subject after a position."""
        ...


class SnapshotStore(Protocol):
    """Key/value buckets (the run snapshots, the worker registry) with compare-and-swap writes."""

    async def kv_get(self, bucket: str, key: str) -> KVEntry | None: ...

    async def kv_get_many(self, bucket: str, keys: Sequence[str]) -> list[KVEntry | None]: ...

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int: ...

    async def kv_update(self, bucket: str, key: str, value: bytes, *, last: int) -> int:
        """Compare-and-swap; raises ConcurrencyConflict on a lost race."""
        ...

    async def kv_update_many(self, bucket: str, items: Sequence[KVWrite]) -> list[int | PyocoError]: ...

    async def kv_keys(self, bucket: str) -> list[str]: ...

    def kv_batches(self, bucket: str, *, batch: int = 1024) -> AbstractAsyncContextManager[AsyncIterator[list[KVEntry]]]:
        """Every value of a bucket (a delete: value None), in batches, one pass."""
        ...

    def kv_watch(self, bucket: str, key: str = ">") -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[KVEntry | None]]:
        """Every key's current value, then ``None`` once caught up, then each change."""
        ...


class WorkSubscription(Protocol):
    """A durable pull consumer, bound for one fetching task."""

    async def fetch(self, batch: int, timeout: float) -> list[Delivered]: ...


class WorkQueue(Protocol):
    """Work items on per-tag subjects, taken by pull consumers and acknowledged."""

    async def publish(
        self, subject: str, data: bytes, *, msg_id: str | None = None, headers: dict[str, str] | None = None
    ) -> PubAck: ...

    async def publish_many(self, items: Sequence[WorkPublish]) -> list[PubAck | PyocoError]: ...

    async def work_items(self, subject: str) -> list[tuple[str, int]]:
        """(run id, attempt) of every item waiting on a work subject."""
        ...

    async def ensure_pull_consumer(self, stream: str, durable: str, config: dict[str, Any], *, update: bool = True) -> None: ...

    def pull_subscription(
        self, stream: str, durable: str, *, recreate: dict[str, Any] | None = None
    ) -> AbstractAsyncContextManager[WorkSubscription]: ...

    async def ack_many(self, msgs: Sequence[Delivered]) -> None: ...

    async def nak(self, msg: Delivered, delay: float | None = None) -> None: ...

    async def term(self, msg: Delivered) -> None: ...

    async def in_progress_many(self, msgs: Sequence[Delivered]) -> None: ...

    async def consumer_pending(self, stream: str, durable: str) -> dict[str, int]: ...


class ProcessRecorder(Protocol):
    """Store a projection's writes and the work they cause, then record its position (the acks
    of the events it absorbed) only when all of it was stored: a crash in between replays the
    events, and the fold is idempotent."""

    async def store_then_ack(
        self, bucket: str, kv_items: Sequence[KVWrite], publishes: Sequence[DueWork], acks: Sequence[Delivered]
    ) -> tuple[list[int | PyocoError], list[PubAck | PyocoError]]:
        """Per write its new revision or error, per publish its ack or error."""
        ...

