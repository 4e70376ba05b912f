"""What the gateway's indexes share: list cursors, pages, per-run subscription slots, and the
in-memory worker registry index (the run index is :mod:`.runindex`, over the SQLite read model).

Resource handling: ``WorkerIndex.run`` owns a KV watch (a :class:`~pyoco_es.watch.BucketFollower`,
which restarts a broken or stalled watch; a restart re-reads every value).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Final

import attrs
import trio

from ..core.events import JSONObject
from ..nats import subjects
from ..nats.client import KVEntry, NatsClient
from ..watch import BucketFollower
from .registry import normalize_worker

log = logging.getLogger(__name__)


SortKey = tuple[float, str]


def encode_cursor(key: SortKey) -> str:
    raw = json.dumps({"u": key[0], "r": key[1]}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> SortKey:
    """Inverse of :func:`encode_cursor`.

    Raises:
        ValueError: naming what is wrong with the cursor.
    """
    if not cursor or len(cursor) > 2048:
        raise ValueError("cursor must be the non-empty next_cursor of a previous page")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        doc = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("cursor is not a next_cursor value returned by GET /runs (not base64url JSON)") from exc
    if not isinstance(doc, dict):
        raise ValueError("cursor does not decode to an object")
    u, r = doc.get("u"), doc.get("r")
    if isinstance(u, bool) or not isinstance(u, (int, float)) or not math.isfinite(u) or not isinstance(r, str):
        raise ValueError('cursor must decode to {"u": <updated_at>, "r": "<run_id>"}')
    return (float(u), r)


@attrs.define(eq=False)
class RunSlot:
    """A per-run subscription: the newest snapshot seen, and an event that fires when it changes."""

    run_id: str
    latest: JSONObject | None = None
    changed: trio.Event = attrs.field(factory=trio.Event)

    def take(self) -> JSONObject | None:
        doc, self.latest = self.latest, None
        self.changed = trio.Event()
        return doc


@attrs.frozen
class IndexStatistics:
    runs: int
    ready: bool
    watching: bool
    revision: int
    run_subscribers: int
    restarts: int
    stalls: int


@attrs.frozen
class Page:
    items: list[JSONObject]
    next_cursor: str | None
    keys: list[SortKey]


class WorkerIndex:
    """The worker registry (KV ``pyoco_workers``) kept in memory by a watch: ``GET /workers`` and
    ``/metrics`` read it without a key scan per request.

    It also notes, on the gateway's own monotonic clock, when it last saw each record *change*
    (a new KV revision that is more than this gateway's hide/show toggle): a worker is judged by
    that, never by comparing the gateway's clock with the times the worker stamped (issue 11's
    rule, as the conductor's reaper applies it).
    """

    def __init__(
        self,
        nats: NatsClient,
        *,
        bucket: str = subjects.WORKERS_BUCKET,
        check_interval: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._records: dict[str, tuple[int, JSONObject]] = {}
        self._changed: dict[str, float] = {}  # key -> monotonic time the record last changed
        self.monotonic = monotonic
        self.follower = BucketFollower(nats, bucket, self.apply, self._drop_missing, check_interval)
        self.ready = self.follower.ready

    async def run(self, *, task_status: trio.TaskStatus[WorkerIndex] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.follower.run)
            task_status.started(self)

    def apply(self, entry: KVEntry) -> None:
        """Apply one change; an entry older than what is held (a write this gateway noted) is ignored."""
        held = self._records.get(entry.key)
        if held is not None and held[0] > entry.revision:
            return
        if entry.value is None:
            self._records.pop(entry.key, None)
            self._changed.pop(entry.key, None)
            return
        try:
            record = json.loads(entry.value)
        except ValueError:
            log.warning("worker index: undecodable record for %s; skipped", entry.key)
            return
        if isinstance(record, dict):
            if held is None or (held[0] != entry.revision and _beat(entry.key, held[1]) != _beat(entry.key, record)):
                self._changed[entry.key] = self.monotonic()
            self._records[entry.key] = (entry.revision, record)

    def _drop_missing(self, present: set[str]) -> None:
        for key in [k for k in self._records if k not in present]:
            del self._records[key]
            self._changed.pop(key, None)

    def records(self) -> list[tuple[str, JSONObject]]:
        return [(key, record) for key, (_, record) in self._records.items()]

    def get(self, key: str) -> JSONObject | None:
        held = self._records.get(key)
        return None if held is None else held[1]

    def silence(self, key: str) -> float | None:
        """Seconds, on this gateway's monotonic clock, since it last saw ``key``'s record change
        (None: no record)."""
        changed = self._changed.get(key)
        return None if changed is None else self.monotonic() - changed

    def __len__(self) -> int:
        return len(self._records)


_NOT_A_BEAT: Final = frozenset({"hidden", "updated_at"})  # what PATCH /workers/{id} writes


def _beat(key: str, record: JSONObject) -> JSONObject:
    """What a worker's own write changes: its record (normalised, as the toggle writes it) without
    the fields the gateway's hide/show toggle writes (a toggle is no sign of the worker's life)."""
    return {k: v for k, v in normalize_worker(record, key=key).items() if k not in _NOT_A_BEAT}
