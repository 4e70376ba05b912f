"""The gateway's run index: list queries served from the persistent SQLite read model
(:mod:`pyoco_es.readmodel`), kept current from the runs bucket after its checkpoint.

* Catch-up: a pull consumer from the file's checkpoint (the highest KV revision applied), one
  batch in memory at a time; a missing, unreadable or foreign file is rebuilt from revision 0.
* Live: an ordered watch from the revision caught up to; a stalled watch is restarted from the
  last revision received (never from 0).
* Writes go to SQLite in batches, one transaction each (the checkpoint in the same transaction),
  on a worker thread; reads run on worker threads too (a small pool of connections), so the Trio
  loop never waits on the file.  A read first waits for the writes queued before it (a run this
  gateway just submitted is in its next list).
* In memory, bounded: the full snapshots of the most recently changed runs (``GET /runs/{id}``
  without a KV round trip), the newest version seen of recently changed runs, and the per-run
  SSE subscriptions.  Memory does not grow with history.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from ..core.events import JSONObject
from ..nats import subjects
from ..nats.client import KVEntry, NatsClient
from ..readmodel import Change, Query, ReadModelStore, open_store, summarize
from ..watch import follow_forever, watch_stalled
from .index import IndexStatistics, Page, RunSlot, SortKey, encode_cursor

log = logging.getLogger(__name__)

DOC_CACHE_SIZE: Final = 4096  # full snapshots kept for GET /runs/{id}
VERSION_CACHE_SIZE: Final = 65536  # newest versions of recently changed runs
PULL_BATCH: Final = 2000
MAX_PENDING: Final = 5000  # changes queued for SQLite before the follower waits for the writer
LINGER: Final = 0.02  # s the writer waits for more changes before a small write (unless a reader waits)
LINGER_BATCH: Final = 200  # ... a batch this big is written at once
T = TypeVar("T")


def coalesce(changes: list[Change]) -> list[Change]:
    """``changes`` without those a later one in the list makes moot: a value or note whose run
    gets a later value with the same or a newer version (the upserts keep the newest version,
    so the file ends the same).  Deletes stay, and so does everything without a version."""
    newest: dict[str, int] = {}  # run -> the newest version of a later value change
    kept: list[Change] = []
    for change in reversed(changes):
        version = change.doc.get("version") if change.doc is not None else None
        if not isinstance(version, int) or isinstance(version, bool):
            kept.append(change)
            continue
        later = newest.get(change.run_id)
        if later is not None and later >= version:
            continue
        kept.append(change)
        if change.revision > 0:
            newest[change.run_id] = version
    kept.reverse()
    return kept


class RunIndex:
    """List queries over the read model file, fed from the runs bucket."""

    def __init__(
        self,
        nats: NatsClient,
        *,
        path: Path | None = None,
        bucket: str = subjects.RUNS_BUCKET,
        check_interval: float = 2.0,
    ) -> None:
        self.nats = nats
        self.bucket = bucket
        self.check_interval = check_interval
        self._tempdir: str | None = None
        self.path = path  # None: a temporary file, made when the index opens and removed with it
        self.store: ReadModelStore | None = None
        self.rebuilt: str | None = None  # why the file was (re)built at start, None if reused
        self.ready = trio.Event()
        self.watching = False
        self.restarts = 0
        self.stalls = 0
        self.revision = 0  # highest KV revision received
        self._pending: list[Change] = []
        self._writing: list[Change] = []  # the batch the writer thread is putting in the file
        self._queued = 0  # changes queued so far (a sequence number)
        self._written = 0  # ... of which written to the file
        self._wrote = trio.Event()
        self._work = trio.Event()
        self._hurry = trio.Event()  # a reader waits for the file: write now
        self._changed = trio.Event()
        self._slots: dict[str, set[RunSlot]] = {}
        self._docs: OrderedDict[str, JSONObject] = OrderedDict()
        self._versions: OrderedDict[str, int] = OrderedDict()
        self.doc_cache_size = DOC_CACHE_SIZE
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(4)
        self._runs = 0  # rows in the file as of the last write (for len())
        self._offline = False
        self._indexes_deferred = False

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[RunIndex] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the file, catch up, then follow the bucket until cancelled; ``started`` once
        caught up (or after the first failed attempt, so the gateway starts and answers 503)."""
        self.store, self.rebuilt = await trio.to_thread.run_sync(functools.partial(open_store, self._file(), identity=self.bucket))
        if self.rebuilt:
            log.info("run index: %s", self.rebuilt)
        self.revision = await self._on_writer(self.store.checkpoint)
        self._runs = await self._on_writer(self.store.runs)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await nursery.start(self._follow)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    def _file(self) -> Path:
        if self.path is None:
            self._tempdir = tempfile.mkdtemp(prefix="pyoco-read-model-")
            weakref.finalize(self, shutil.rmtree, self._tempdir, True)
            self.path = Path(self._tempdir) / "runs.sqlite3"
        return self.path

    async def _close(self) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            await trio.to_thread.run_sync(store.close)
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)

    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._write_limiter)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        await self.synced()
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._read_limiter)

    async def _follow(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await follow_forever(f"run index on {self.bucket}", self._attempt, self, task_status)

    async def _attempt(self, loaded: Callable[[], None]) -> None:
        await self._catch_up()
        loaded()
        async with trio.open_nursery() as nursery:
            async with self.nats.kv_watch_from(self.bucket, self.revision) as updates:
                self.watching = True
                nursery.start_soon(self._watchdog, nursery.cancel_scope)
                async for entry in updates:
                    await self._take(entry)
            nursery.cancel_scope.cancel()

    async def _watchdog(self, watch_scope: trio.CancelScope) -> None:
        if await watch_stalled(self.nats, self.bucket, self.check_interval, lambda: self.revision):
            self.stalls += 1
            watch_scope.cancel()

    async def _catch_up(self) -> None:
        """Apply every change after the current revision, batch by batch (a new bucket whose
        last revision is below the checkpoint: the file is rebuilt)."""
        last = (await self.nats.stream_info(subjects.kv_stream(self.bucket)))["last_seq"]
        if last < self.revision:
            log.warning("run index: bucket %s is at revision %d, below the read model's %d; rebuilding", self.bucket, last, self.revision)
            await self._reset()
        fresh = self.revision == 0
        if last <= self.revision:
            return  # nothing new (a pull would wait out its timeout to say so)
        if fresh:  # a build: the indexes once at the end (a file reopened after a stop here gets them at open)
            await self._on_writer(self.store_or_fail().drop_indexes)
            self._indexes_deferred = True
        async with self.nats.kv_pull(self.bucket, self.revision) as fetch:
            while True:
                entries, pending = await fetch(PULL_BATCH)
                for entry in entries:
                    await self._take(entry)
                if not entries or not pending:
                    break
        await self.synced()
        if self._indexes_deferred:
            await self._on_writer(self.store_or_fail().create_indexes)
            self._indexes_deferred = False

    async def _reset(self) -> None:
        await self.synced()
        store = self.store_or_fail()
        await self._on_writer(store.close)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self._file()}{suffix}").unlink(missing_ok=True)
        self.store, self.rebuilt = await trio.to_thread.run_sync(functools.partial(open_store, self._file(), identity=self.bucket))
        self.revision = 0
        self._runs = 0
        self._docs.clear()
        self._versions.clear()

    def store_or_fail(self) -> ReadModelStore:
        if self.store is None:
            raise RuntimeError("the run index is not open")
        return self.store

    async def _take(self, entry: KVEntry) -> None:
        self.apply(entry)
        if len(self._pending) >= MAX_PENDING:
            await self.synced()

    async def _writer(self) -> None:
        while True:
            await self._work.wait()
            self._work = trio.Event()
            if len(self._pending) < LINGER_BATCH:
                # a change rarely comes alone under load: one transaction for a few ms of them
                # costs a fraction of one each (and a run's several revisions fold into one row)
                with trio.move_on_after(LINGER):
                    await self._hurry.wait()
            while self._pending:
                self._hurry = trio.Event()
                checkpoint = max((c.revision for c in self._pending), default=0)
                batch, self._pending = coalesce(self._pending), []
                queued = self._queued
                store = self.store_or_fail()
                self._writing = batch  # still readable by get() until the file has it
                try:
                    self._runs = await self._on_writer(store.write, batch, checkpoint)
                finally:
                    self._writing = []
                self._written = queued
                self._wrote.set()
                self._wrote = trio.Event()
                self._changed.set()  # list streams read the file: wake them once it has the rows
                self._changed = trio.Event()

    async def synced(self) -> None:
        """Wait until every change queued before this call is in the file."""
        target = self._queued
        while self._written < target:
            self._hurry.set()
            await self._wrote.wait()

    # -- feeding ----------------------------------------------------------------------------

    def open_offline(self) -> RunIndex:
        """Open the file now and write every change at once, on the calling thread (no NATS, no
        writer task): for units fed by hand."""
        self.store, self.rebuilt = open_store(self._file(), identity=self.bucket)
        self._offline = True
        self.ready.set()
        return self

    def _queue(self, change: Change) -> None:
        if self._offline:
            self._runs = self.store_or_fail().write([change], change.revision)
            self._changed.set()
            self._changed = trio.Event()
            return
        self._pending.append(change)
        self._queued += 1
        self._work.set()
        if len(self._pending) >= LINGER_BATCH:
            self._hurry.set()

    def apply(self, entry: KVEntry) -> None:
        """One KV change (a value, or a delete when ``entry.value`` is None)."""
        self.revision = max(self.revision, entry.revision)
        if entry.value is None:
            self._docs.pop(entry.key, None)
            self._versions.pop(entry.key, None)
            self._queue(Change(entry.key, None, entry.revision))
            return
        try:
            doc = json.loads(entry.value)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            log.warning("run index: undecodable snapshot for %s (%s); skipped", entry.key, exc)
            return
        self._queue(Change(entry.key, doc, entry.revision))
        self._docs[entry.key] = doc
        self._docs.move_to_end(entry.key)
        if len(self._docs) > self.doc_cache_size:
            self._docs.popitem(last=False)
        version = doc.get("version")
        if isinstance(version, int):
            self._see_version(entry.key, version)
        for slot in self._slots.get(entry.key, ()):
            slot.latest = doc
            slot.changed.set()

    def note(self, doc: JSONObject) -> None:
        """Record a snapshot this gateway just produced (read-your-writes for lists before the
        projector's write arrives).  Ignored by the file when it already has that version."""
        run_id = doc.get("run_id")
        if not isinstance(run_id, str):
            return
        version = doc.get("version")
        if isinstance(version, int):
            self._see_version(run_id, version)
        self._queue(Change(run_id, dict(doc), 0))

    def _see_version(self, run_id: str, version: int) -> None:
        if version >= self._versions.get(run_id, 0):
            self._versions[run_id] = version
        self._versions.move_to_end(run_id)
        if len(self._versions) > VERSION_CACHE_SIZE:
            self._versions.popitem(last=False)

    # -- reading (async: on worker threads) -----------------------------------------------------

    async def list_page(
        self,
        *,
        limit: int,
        filters: dict[str, str] | None = None,
        updated_after: float | None = None,
        before: SortKey | None = None,
        updated_before: float | None = None,
        run_id_prefix: str | None = None,
        error_contains: str | None = None,
    ) -> Page:
        """Up to ``limit`` summaries, newest first by (updated_at, run_id); ``next_cursor`` only
        when more match.  ``filters``: exact values of :data:`pyoco_es.readmodel.EXACT` keys."""
        q = Query(
            limit=limit,
            exact={k: v for k, v in (filters or {}).items() if v is not None},
            updated_after=updated_after,
            updated_before=updated_before,
            before=before,
            run_id_prefix=run_id_prefix,
            error_contains=error_contains,
        )
        items, keys, more = await self._read(self.store_or_fail().page, q)
        return Page(items, encode_cursor(keys[-1]) if more and keys else None, keys)

    async def changed(self, revision: int, *, filters: dict[str, str] | None = None) -> list[tuple[int, JSONObject]]:
        """(revision, summary) of the runs whose KV revision is above ``revision``, oldest first."""
        q = Query(exact={k: v for k, v in (filters or {}).items() if v is not None})
        return await self._read(self.store_or_fail().changed_since, revision, q)

    async def count(self, *, filters: dict[str, str] | None = None) -> int:
        return await self._read(self.store_or_fail().count, Query(exact=dict(filters or {})))

    async def status_counts(self) -> dict[str, int]:
        return await self._read(self.store_or_fail().counts)

    async def figures(self, start: float, end: float) -> tuple[dict[str, int], dict[str, int], int]:
        return await self._read(self.store_or_fail().figures, start, end)

    async def summary(self, run_id: str) -> JSONObject | None:
        return await self._read(self.store_or_fail().get, run_id)

    # -- reading (sync: compatible with the in-memory index's interface; a primary-key or
    # -- one-page read on the Trio thread, without waiting for queued writes) -------------------

    def page(
        self,
        *,
        limit: int,
        filters: dict[str, str] | None = None,
        updated_after: float | None = None,
        before: SortKey | None = None,
    ) -> Page:
        """The file as it is, read on the calling thread (units fed with :meth:`open_offline`); a
        handler uses :meth:`list_page`, which first waits for the writes queued before it."""
        q = Query(limit=limit, exact={k: v for k, v in (filters or {}).items() if v is not None}, updated_after=updated_after, before=before)
        items, keys, more = self.store_or_fail().page(q)
        return Page(items, encode_cursor(keys[-1]) if more and keys else None, keys)

    def get(self, run_id: str) -> JSONObject | None:
        """The run's summary, including changes queued for the file but not in it yet (a submit
        just answered must be found by the next one: idempotency keys, read-your-writes)."""
        for change in reversed([*self._writing, *self._pending]):
            if change.run_id == run_id:
                return summarize(change.doc) if change.doc is not None else None
        return self.store_or_fail().get(run_id)

    def counts(self) -> dict[str, int]:
        return self.store_or_fail().counts()

    def summaries(self, filters: dict[str, str] | None = None) -> Iterator[JSONObject]:
        """Every run's summary, newest first, read a page of 1,000 at a time (each page a short
        read on the calling thread; prefer :meth:`list_page` from a handler)."""
        before: SortKey | None = None
        while True:
            page = self.page(limit=1000, filters=filters, before=before)
            yield from page.items
            if page.next_cursor is None or not page.keys:
                return
            before = page.keys[-1]

    def changed_since(self, revision: int, *, filters: dict[str, str] | None = None) -> list[tuple[int, JSONObject]]:
        return self.store_or_fail().changed_since(revision, Query(exact={k: v for k, v in (filters or {}).items() if v is not None}))

    def __len__(self) -> int:
        return self._runs

    def doc_of(self, run_id: str) -> JSONObject | None:
        """The full snapshot last delivered for ``run_id`` if it is still cached and is at least
        the newest version this gateway knows of (else None: read it from KV)."""
        doc = self._docs.get(run_id)
        if doc is None:
            return None
        version = doc.get("version")
        return doc if isinstance(version, int) and version >= self.version_of(run_id) else None

    def version_of(self, run_id: str) -> int:
        """The newest version of the run this gateway has seen recently (0 when unknown)."""
        return self._versions.get(run_id, 0)

    def change_event(self) -> trio.Event:
        """An event that fires once the next change is in the file (take it *before* reading, so
        a change made while the caller was busy is never missed)."""
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
            runs=self._runs,
            ready=self.ready.is_set(),
            watching=self.watching,
            revision=self.revision,
            run_subscribers=sum(len(s) for s in self._slots.values()),
            restarts=self.restarts,
            stalls=self.stalls,
        )
