"""The gateway's in-memory run index: every run's list summary, kept current by one KV watch.

``GET /runs`` never scans the bucket: the index holds the summaries sorted by the list order
(``updated_at``, ``run_id``), so a page is a bisect plus a walk over at most the items it skips.
The same watch feeds the SSE streams: per-run subscribers get the newest full snapshot
(conflated, so a slow reader never buffers), and list subscribers wake on any change and read
the runs whose KV revision is newer than the last one they sent.

Resource handling: ``run`` owns the KV watch (a :class:`~pyoco_es.watch.BucketFollower`,
which restarts a broken or stalled watch; a restart re-reads every value, so nothing missed
while disconnected is lost).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Final

import attrs
import trio

from ..core.events import JSONObject
from ..nats import subjects
from ..nats.client import KVEntry, NatsClient
from ..watch import BucketFollower
from .registry import normalize_worker

log = logging.getLogger(__name__)

SUMMARY_KEYS: Final = (
    "run_id",
    "schedule_id",
    "flow_name",
    "tag",
    "tags",
    "tenant_id",
    "api_key_id",
    "status",
    "updated_at",
    "heartbeat_at",
    "worker_id",
    "error",
    # pyoco-es additions (clients ignore unknown keys); the dashboard sorts finished runs by them
    "start_time",
    "end_time",
    "version",
    "attempt",
    "max_attempts",
    "failure_reason",
    "projection_error",  # set by the projector on a run it cannot fold (a corrupt event)
)
FILTER_KEYS: Final = ("status", "flow_name", "tag", "workflow_yaml_sha256", "schedule_id", "tenant_id")

SortKey = tuple[float, str]
DOC_CACHE_SIZE: Final = 4096  # full snapshots kept for GET /runs/{id}


def summarize(doc: JSONObject) -> JSONObject:
    """The list item of a snapshot (contract §1.4: only these keys, when present)."""
    return {k: doc[k] for k in SUMMARY_KEYS if k in doc}


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
class _Entry:
    run_id: str
    key: SortKey
    summary: JSONObject
    filters: dict[str, Any]
    version: int
    revision: int  # KV revision; 0 for a provisional entry noted by this gateway before the projector wrote


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


class RunIndex:
    """Summaries of every run, sorted for listing, fed by a watch on the runs bucket."""

    def __init__(self, nats: NatsClient, *, bucket: str = subjects.RUNS_BUCKET, check_interval: float = 2.0) -> None:
        self.nats = nats
        self.bucket = bucket
        self.follower = BucketFollower(nats, bucket, self.apply, self._drop_missing, check_interval)
        self.ready = self.follower.ready
        self._entries: dict[str, _Entry] = {}
        self._keys: list[SortKey] = []  # ascending; lists walk it from the end
        self._by_revision: OrderedDict[str, int] = OrderedDict()  # run_id -> revision, ascending
        self._counts: dict[str, int] = {}
        self._slots: dict[str, set[RunSlot]] = {}
        self._changed = trio.Event()
        self.revision = 0  # highest KV revision applied
        # The full snapshots of the most recently changed runs, as the watch delivered them:
        # ``GET /runs/{id}`` answers from here without a KV round trip (bounded memory).
        self._docs: OrderedDict[str, JSONObject] = OrderedDict()
        self.doc_cache_size = DOC_CACHE_SIZE

    # -- feeding ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[RunIndex] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the bucket until cancelled; ``started`` once the current values are loaded (or
        the first attempt failed).  See :class:`~pyoco_es.watch.BucketFollower`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.follower.run)
            task_status.started(self)

    def apply(self, entry: KVEntry) -> None:
        """Apply one KV change (a value, or a delete when ``entry.value`` is None)."""
        if entry.revision > self.revision:
            self.revision = entry.revision
        if entry.value is None:
            self._remove(entry.key)
            self._docs.pop(entry.key, None)
            self._by_revision.pop(entry.key, None)
            self._notify_list()
            return
        try:
            doc = json.loads(entry.value)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            log.warning("run index: undecodable snapshot for %s (%s); skipped", entry.key, exc)
            return
        current = self._entries.get(entry.key)
        version = doc.get("version")
        if current is not None and isinstance(version, int) and version < current.version:
            current.revision = entry.revision  # a note of ours is newer: keep its summary
        else:
            self._store(doc, revision=entry.revision)
        self._docs[entry.key] = doc
        self._docs.move_to_end(entry.key)
        if len(self._docs) > self.doc_cache_size:
            self._docs.popitem(last=False)
        self._by_revision[entry.key] = entry.revision
        self._by_revision.move_to_end(entry.key)
        self._notify_list()
        for slot in self._slots.get(entry.key, ()):
            slot.latest = doc
            slot.changed.set()

    def note(self, doc: JSONObject) -> None:
        """Record a snapshot this gateway just produced (read-your-writes for lists before the
        projector's write arrives).  Ignored when the index already has that version or newer."""
        run_id = doc.get("run_id")
        if not isinstance(run_id, str):
            return
        current = self._entries.get(run_id)
        version = doc.get("version")
        if current is not None and (not isinstance(version, int) or current.version >= version):
            return
        self._store(doc, revision=current.revision if current is not None else 0)

    def _store(self, doc: JSONObject, *, revision: int) -> None:
        run_id = doc.get("run_id")
        if not isinstance(run_id, str):
            return
        updated = doc.get("updated_at")
        key: SortKey = (float(updated) if isinstance(updated, (int, float)) else 0.0, run_id)
        version = doc.get("version")
        self._remove(run_id)
        entry = _Entry(
            run_id=run_id,
            key=key,
            summary=summarize(doc),
            filters={k: doc.get(k) for k in FILTER_KEYS},
            version=version if isinstance(version, int) else 0,
            revision=revision,
        )
        self._entries[run_id] = entry
        bisect.insort(self._keys, key)
        status = str(doc.get("status") or "UNKNOWN")
        self._counts[status] = self._counts.get(status, 0) + 1

    def _remove(self, run_id: str) -> None:
        old = self._entries.pop(run_id, None)
        if old is None:
            return
        i = bisect.bisect_left(self._keys, old.key)
        if i < len(self._keys) and self._keys[i] == old.key:
            del self._keys[i]
        status = str(old.filters.get("status") or "UNKNOWN")
        self._counts[status] -= 1
        if not self._counts[status]:
            del self._counts[status]

    def _drop_missing(self, present: set[str]) -> None:
        """After a (re)load: forget runs that are gone from the bucket (never provisional ones)."""
        for run_id in [r for r, e in self._entries.items() if r not in present and e.revision]:
            self._remove(run_id)
            self._by_revision.pop(run_id, None)
        for run_id in [r for r in self._docs if r not in present]:
            del self._docs[run_id]

    def _notify_list(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self) -> dict[str, int]:
        """Runs per status."""
        return dict(self._counts)

    def summaries(self) -> Iterator[JSONObject]:
        for entry in self._entries.values():
            yield entry.summary

    def doc_of(self, run_id: str) -> JSONObject | None:
        """The full snapshot last delivered for ``run_id`` if it is still cached and is at least
        the newest version this gateway knows of (else None: read it from KV)."""
        doc = self._docs.get(run_id)
        if doc is None:
            return None
        version = doc.get("version")
        return doc if isinstance(version, int) and version >= self.version_of(run_id) else None

    def version_of(self, run_id: str) -> int:
        """The newest version of the run this gateway has seen (0 when unknown)."""
        entry = self._entries.get(run_id)
        return 0 if entry is None else entry.version

    def get(self, run_id: str) -> JSONObject | None:
        entry = self._entries.get(run_id)
        return None if entry is None else entry.summary

    def page(
        self,
        *,
        limit: int,
        filters: dict[str, str] | None = None,
        updated_after: float | None = None,
        before: SortKey | None = None,
    ) -> Page:
        """Up to ``limit`` summaries, newest first by (updated_at, run_id).

        ``updated_after`` keeps items with ``updated_at`` strictly greater; ``before`` (a decoded
        cursor) keeps items whose sort key is strictly smaller.  ``next_cursor`` is set only when
        more matching items remain.
        """
        filters = {k: v for k, v in (filters or {}).items() if v is not None}
        keys = self._keys
        i = len(keys) if before is None else bisect.bisect_left(keys, before)
        items: list[JSONObject] = []
        page_keys: list[SortKey] = []
        more = False
        while i > 0:
            i -= 1
            key = keys[i]
            if updated_after is not None and key[0] <= updated_after:
                break
            entry = self._entries[key[1]]
            if filters and any(entry.filters.get(k) != v for k, v in filters.items()):
                continue
            if len(items) == limit:
                more = True
                break
            items.append(entry.summary)
            page_keys.append(key)
        next_cursor = encode_cursor(page_keys[-1]) if more and page_keys else None
        return Page(items, next_cursor, page_keys)

    def changed_since(self, revision: int, *, filters: dict[str, str] | None = None) -> list[tuple[int, JSONObject]]:
        """(revision, summary) of the runs whose KV revision is above ``revision``, oldest first."""
        filters = {k: v for k, v in (filters or {}).items() if v is not None}
        out: list[tuple[int, JSONObject]] = []
        for run_id in reversed(self._by_revision):
            rev = self._by_revision[run_id]
            if rev <= revision:
                break
            entry = self._entries.get(run_id)
            if entry is None or (filters and any(entry.filters.get(k) != v for k, v in filters.items())):
                continue
            out.append((rev, entry.summary))
        out.reverse()
        return out

    def change_event(self) -> trio.Event:
        """An event that fires at the next change of any run (take it *before* reading, so a
        change made while the caller was busy is never missed)."""
        return self._changed

    def subscribe(self, run_id: str) -> RunSlot:
        slot = RunSlot(run_id)
        self._slots.setdefault(run_id, set()).add(slot)
        return slot

    def unsubscribe(self, slot: RunSlot) -> None:
        slots = self._slots.get(slot.run_id)
        if slots is not None:
            slots.discard(slot)
            if not slots:
                del self._slots[slot.run_id]

    def statistics(self) -> IndexStatistics:
        return IndexStatistics(
            runs=len(self._entries),
            ready=self.ready.is_set(),
            watching=self.follower.watching,
            revision=self.revision,
            run_subscribers=sum(len(s) for s in self._slots.values()),
            restarts=self.follower.restarts,
            stalls=self.follower.stalls,
        )


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
