"""The projector: a durable pull consumer over every run event, folded into KV snapshots.

Per fetched batch: decode, group by run, fold onto the cached snapshot (the projector is
normally the only writer, so snapshots and KV revisions are cached), write each touched
snapshot once with compare-and-swap (the checkpoint ``version``/``last_stream_seq`` lives inside
the snapshot, so re-applying an event is a no-op), publish the work items the batch calls for,
then ack.  Under load, writes are coalesced across fetches (at most ``max_delay`` seconds or
``max_events``), which keeps KV writes per run near one; when idle every fetch is flushed at
once, so a watcher sees a change within milliseconds.

Several projectors may share the consumer: events of one run can then arrive out of order at
different projectors.  A gap is filled by reading the run's events from the stream; a CAS
conflict means someone else wrote, so the projector re-reads and folds again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio

from ..core.codec import bound_snapshot_doc, decode_envelope, decode_snapshot, dumps, encode_snapshot
from ..core import decide
from ..core.errors import ConcurrencyConflict, CorruptStreamError, InfraError, PayloadTooLarge, PyocoError
from ..core.events import Envelope, Producer, RunReleased, RunSubmitted, RunWorkerLost
from ..core.fold import SequenceGap, apply, fold
from ..core.model import RunSnapshot, RunStatus
from ..core.work import WorkItem
from ..nats import subjects
from ..nats.client import Delivered, NatsClient
from ..service import RunStore

log = logging.getLogger(__name__)

REQUEUE_EVENTS: Final = (RunSubmitted.TYPE, RunWorkerLost.TYPE, RunReleased.TYPE)
DISPATCHER: Final = Producer(kind="conductor", id="dispatcher")  # who fails a run whose item cannot be published


@attrs.frozen
class ProjectorStatistics:
    events_projected: int
    kv_writes: int
    kv_conflicts: int
    work_items_published: int
    corrupt_events: int
    runs_cached: int
    poisoned_runs: int
    pending_runs: int


@attrs.define
class _Cached:
    snapshot: RunSnapshot | None
    revision: int  # KV revision of the stored value (0: no value)
    blocked: str | None = None  # why this run cannot be projected any further


def projector_consumer_config(ack_wait: float = 10.0) -> dict[str, Any]:
    return {
        "filter_subject": subjects.RUN_EVENTS_WILDCARD,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": ack_wait,
        "max_ack_pending": -1,
        "max_deliver": -1,
    }


class Projector:
    """Folds fetched events into snapshots and writes them; also dispatches work items."""

    def __init__(
        self,
        nats: NatsClient,
        *,
        work_prefix: str = subjects.WORK_PREFIX,
        max_snapshot_bytes: int = 262144,
        cache_size: int = 100_000,
        bucket: str = subjects.RUNS_BUCKET,
        on_corrupt: Callable[[str, str], None] | None = None,
    ) -> None:
        self.nats = nats
        self.work_prefix = work_prefix
        self.max_snapshot_bytes = max_snapshot_bytes
        self.bucket = bucket
        self.cache_size = cache_size
        self.on_corrupt = on_corrupt
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._dirty: dict[str, _Cached] = {}
        self._to_dispatch: dict[str, tuple[int, RunSubmitted | None]] = {}
        self._unacked: list[Delivered] = []
        self._pending_corrupt: dict[str, str] = {}
        self._events = self._writes = self._conflicts = self._published = self._corrupt = 0
        # PENDING runs this projector has seen, for the reconcile: run -> (tag, attempt, since),
        # ``since`` on the monotonic clock when the run became PENDING at that attempt.
        self.pending_runs: dict[str, tuple[str, int, float]] = {}
        self.poisoned: dict[str, str] = {}  # runs this projector could not write, and why

    def statistics(self) -> ProjectorStatistics:
        return ProjectorStatistics(
            events_projected=self._events,
            kv_writes=self._writes,
            kv_conflicts=self._conflicts,
            work_items_published=self._published,
            corrupt_events=self._corrupt,
            runs_cached=len(self._cache),
            poisoned_runs=len(self.poisoned),
            pending_runs=len(self.pending_runs),
        )

    def _track_pending(self, run_id: str, snap: RunSnapshot | None) -> None:
        if snap is not None and snap.status is RunStatus.PENDING:
            known = self.pending_runs.get(run_id)
            if known is None or known[1] != snap.attempt:
                self.pending_runs[run_id] = (snap.tag, snap.attempt, time.monotonic())
        else:
            self.pending_runs.pop(run_id, None)

    @property
    def pending(self) -> int:
        return len(self._unacked)

    # -- folding ----------------------------------------------------------------------------

    async def absorb(self, msgs: list[Delivered]) -> None:
        """Fold a fetched batch into the (dirty) cache; nothing is written or acked yet."""
        by_run: dict[str, list[Envelope]] = {}
        for m in msgs:
            run_id = subjects.run_id_from_subject(m.subject)
            try:
                env = decode_envelope(m.data, stream_seq=m.stream_seq)
                if env.run_id != run_id:
                    raise CorruptStreamError(
                        f"event {env.event_id} names run {env.run_id} but is on subject {m.subject}",
                        run_id=run_id,
                    )
            except CorruptStreamError as exc:
                by_run.setdefault(run_id, [])
                self._mark_corrupt_later(run_id, exc)
                continue
            by_run.setdefault(run_id, []).append(env)
        self._unacked.extend(msgs)
        missing = []
        for run_id, envs in by_run.items():
            if run_id in self._cache:
                continue
            if envs and envs[0].seq == 1:
                # A new run: nothing can be stored yet (if another projector raced us, the CAS
                # write fails and the conflict path re-reads), so skip the KV read.
                self._remember(run_id, _Cached(None, 0))
            else:
                missing.append(run_id)
        if missing:
            await self._load(missing)
        for run_id, envs in by_run.items():
            try:
                await self._fold_run(run_id, envs)
            except InfraError:
                raise
            except Exception as exc:  # noqa: BLE001 - poison: one run's failure must not stall the rest
                log.exception("run %s cannot be folded; marking it not projectable", run_id, extra={"run_id": run_id})
                cached = self._cache[run_id]
                self._block(run_id, cached, cached.snapshot, f"projector error: {type(exc).__name__}: {exc}")

    def _mark_corrupt_later(self, run_id: str, exc: CorruptStreamError) -> None:
        self._pending_corrupt[run_id] = str(exc)

    def reset(self) -> None:
        """Forget everything not yet written and acked (after a NATS failure mid-batch): the
        unacked events are redelivered and folded again from the stored snapshots."""
        self._cache.clear()
        self._dirty.clear()
        self._to_dispatch.clear()
        self._unacked.clear()
        self._pending_corrupt.clear()

    async def _load(self, run_ids: list[str]) -> None:
        entries = await self.nats.kv_get_many(self.bucket, run_ids)
        for run_id, entry in zip(run_ids, entries, strict=True):
            cached = _Cached(None, 0)
            if entry is not None and entry.value:
                cached.revision = entry.revision
                try:
                    doc = json.loads(entry.value)
                    if doc.get("projection_error"):
                        cached.blocked = str(doc["projection_error"])
                    cached.snapshot = decode_snapshot(entry.value) if doc.get("status") in RunStatus.__members__ else None
                except (ValueError, KeyError, TypeError):
                    cached.snapshot = None
            self._remember(run_id, cached)

    def _remember(self, run_id: str, cached: _Cached) -> None:
        self._cache[run_id] = cached
        self._cache.move_to_end(run_id)
        while len(self._cache) > self.cache_size:
            old, c = self._cache.popitem(last=False)
            if old in self._dirty:  # never evict unwritten work
                self._cache[old] = c
                break

    async def _fold_run(self, run_id: str, envs: list[Envelope]) -> None:
        cached = self._cache[run_id]
        corrupt = self._pending_corrupt.pop(run_id, None)
        if cached.blocked:
            self._corrupt += len(envs)
            log.error("run %s is not projectable (%s); %d more event(s) not applied", run_id, cached.blocked, len(envs), extra={"run_id": run_id})
            return
        snap = cached.snapshot
        try:
            for env in envs:
                try:
                    new = apply(snap, env)
                except SequenceGap:
                    new = await self._catch_up(run_id, snap, upto=env.stream_seq or 0, need=env.seq - 1)
                    new = apply(new, env)
                if new is not snap:
                    self._events += 1
                    if env.type in REQUEUE_EVENTS and new is not None:
                        event = env.event if isinstance(env.event, RunSubmitted) else None
                        if event is not None and event.fast_dispatch:
                            # The submitter published attempt 1 itself; a lost hand-off is the
                            # reconcile's (no second publish of every fresh item).
                            self._to_dispatch.pop(run_id, None)
                        else:
                            self._to_dispatch[run_id] = (new.attempt, event)
                snap = new
            if corrupt:
                raise CorruptStreamError(corrupt, run_id=run_id)
        except CorruptStreamError as exc:
            self._block(run_id, cached, snap, str(exc))
            return
        if snap is not cached.snapshot:
            cached.snapshot = snap
            self._dirty[run_id] = cached
        self._track_pending(run_id, snap)

    async def _catch_up(self, run_id: str, snap: RunSnapshot | None, *, upto: int, need: int) -> RunSnapshot | None:
        """Fill a gap from the stream (events that went to another projector): the events before
        stream seq ``upto``, which must bring the run to version ``need`` at least.

        A direct read of an R3 stream may come from a replica still catching up and miss the
        newest events (found by the cluster fault suite: the run was marked not projectable and
        stayed RUNNING in the read model); such a short read is asked again of the leader, and
        only a gap the leader confirms is corruption.
        """
        after = snap.last_stream_seq if snap is not None else 0
        for from_leader in (False, True):
            events = await self.nats.read_run(run_id, after_stream_seq=after, from_leader=from_leader)
            caught = fold(snap, [e for e in events if e.stream_seq is not None and e.stream_seq < upto])
            if (caught.version if caught is not None else 0) >= need:
                break
        return caught

    def _block(self, run_id: str, cached: _Cached, snap: RunSnapshot | None, reason: str) -> None:
        self._corrupt += 1
        log.error("corrupt event for run %s: %s; the run is marked as not projectable", run_id, reason, extra={"run_id": run_id})
        if self.on_corrupt is not None:
            self.on_corrupt(run_id, reason)
        cached.blocked = reason
        cached.snapshot = snap
        self._dirty[run_id] = cached

    # -- writing ----------------------------------------------------------------------------

    @property
    def snapshot_limit(self) -> int:
        """Snapshots stay under this: the configured maximum, and always under NATS's limit."""
        limit = self.nats.max_message_bytes
        return min(self.max_snapshot_bytes, limit) if self.max_snapshot_bytes > 0 else limit

    def _encode(self, run_id: str, cached: _Cached) -> bytes:
        limit = self.snapshot_limit
        if cached.blocked:
            doc: dict[str, Any] = cached.snapshot.to_json() if cached.snapshot is not None else {"run_id": run_id, "status": "UNKNOWN"}
            doc["projection_error"] = cached.blocked[:4096]
            raw = dumps(doc)
            return raw if len(raw) <= limit else bound_snapshot_doc(doc, limit)
        assert cached.snapshot is not None
        return encode_snapshot(cached.snapshot, max_bytes=limit)

    def _poison(self, run_id: str, reason: str) -> None:
        """A run whose snapshot or work item cannot be written: recorded (statistics, the log,
        ``projection_error`` on a minimal snapshot), and the projector goes on with the others."""
        self.poisoned[run_id] = reason
        log.error("run %s cannot be written (%s); skipping it, the others go on", run_id, reason, extra={"run_id": run_id})
        cached = self._cache.get(run_id) or _Cached(None, 0)
        cached.blocked = reason
        if self.on_corrupt is not None:
            self.on_corrupt(run_id, reason)

    async def flush(self) -> None:
        """Write dirty snapshots (CAS) and publish due work items in one crossing, then ack
        everything absorbed (in the same crossing when nothing conflicted)."""
        publishes = await self._dispatch_items()
        too_large: list[tuple[str, int, str]] = []
        acks, self._unacked = self._unacked, []
        acked = False
        while self._dirty or publishes:
            run_ids = list(self._dirty)
            items = [(r, self._encode(r, self._dirty[r]), self._dirty[r].revision) for r in run_ids]
            kv_res, pub_res = await self.nats.store_then_ack(self.bucket, items, publishes, acks)
            for (_subject, body, msg_id), r in zip(publishes, pub_res, strict=True):
                if isinstance(r, InfraError):
                    self._unacked = acks
                    raise r
                if isinstance(r, PayloadTooLarge):  # poison: that run fails, naming the limit
                    run_id, _, attempt = (msg_id or "").partition(":")
                    too_large.append((run_id, int(attempt or 1), f"work item of {len(body)} bytes not published: {r.message}"))
                elif isinstance(r, PyocoError):  # that run only
                    self._poison((msg_id or "").split(":", 1)[0], f"work item not published: {r.message}")
            self._published += len(publishes)
            publishes = []
            conflicts: list[str] = []
            for run_id, res in zip(run_ids, kv_res, strict=True):
                cached = self._dirty[run_id]
                if isinstance(res, ConcurrencyConflict):
                    conflicts.append(run_id)
                elif isinstance(res, InfraError):
                    self._unacked = acks
                    raise res
                elif isinstance(res, PyocoError):
                    if run_id in self.poisoned:
                        del self._dirty[run_id]  # even its minimal snapshot failed: leave it
                    else:
                        self._poison(run_id, f"snapshot not written: {res.message}")  # stays dirty, as a stub
                else:
                    cached.revision = res
                    self._writes += 1
                    del self._dirty[run_id]
            # The commit acked only when every write and publish succeeded.
            acked = not any(isinstance(r, PyocoError) for r in (*kv_res, *pub_res))
            if conflicts:
                self._conflicts += len(conflicts)
                await self._refresh(conflicts)
        if acks and not acked:
            await self.nats.ack_many(acks)
        for run_id, attempt, error in too_large:
            await self._fail_undispatchable(run_id, attempt, error)

    async def _fail_undispatchable(self, run_id: str, attempt: int, error: str) -> None:
        """Append ``run.failed(work_item_too_large)`` for a run whose item the stream refused."""
        log.error("run %s: %s; failing it", run_id, error, extra={"run_id": run_id})
        store = RunStore(self.nats)
        try:
            await store.execute(
                run_id,
                lambda s: decide.fail_undispatchable(s, run_id=run_id, attempt=attempt, now=time.time(), error=error),
                producer=DISPATCHER,
            )
        except InfraError:
            raise
        except PyocoError as exc:
            self._poison(run_id, f"{error}; and the run could not be failed: {exc.message}")

    async def _refresh(self, run_ids: list[str]) -> None:
        """Someone else wrote these runs: re-read, fold the stream on top, mark dirty if ours is newer."""
        entries = await self.nats.kv_get_many(self.bucket, run_ids)
        for run_id, entry in zip(run_ids, entries, strict=True):
            mine = self._dirty.pop(run_id)
            theirs: RunSnapshot | None = None
            revision = 0
            if entry is not None and entry.value:
                revision = entry.revision
                try:
                    theirs = decode_snapshot(entry.value)
                except (ValueError, KeyError, TypeError):
                    theirs = None
            cached = _Cached(theirs, revision, mine.blocked)
            if mine.snapshot is not None and (theirs is None or theirs.version < mine.snapshot.version):
                # Theirs is older: fold the stream from their position (covers ours and more).
                try:
                    cached.snapshot = await self._catch_up(run_id, theirs, upto=1 << 62, need=mine.snapshot.version)
                except CorruptStreamError as exc:
                    cached.blocked = str(exc)
                self._dirty[run_id] = cached
            self._remember(run_id, cached)

    async def _dispatch_items(self) -> list[tuple[str, bytes, str | None]]:
        """Work items for runs whose batch made a new attempt due and that are still PENDING at it."""
        items: list[tuple[str, bytes, str | None]] = []
        for run_id, (attempt, submitted) in list(self._to_dispatch.items()):
            cached = self._cache.get(run_id)
            snap = cached.snapshot if cached else None
            if snap is None or snap.status is not RunStatus.PENDING or snap.attempt != attempt:
                continue
            if submitted is None:
                first = await self.nats.read_run(run_id)
                if not first or not isinstance(first[0].event, RunSubmitted):
                    continue
                submitted = first[0].event
            items.append(
                (
                    subjects.work_subject(snap.tag, self.work_prefix),
                    WorkItem.for_attempt(
                        submitted, run_id=run_id, attempt=attempt, run_version=snap.version, run_last_stream_seq=snap.last_stream_seq
                    ).to_json(),
                    subjects.work_msg_id(run_id, attempt),
                )
            )
        self._to_dispatch.clear()
        return items


async def run_projector(
    nats: NatsClient,
    *,
    work_prefix: str = subjects.WORK_PREFIX,
    max_snapshot_bytes: int = 262144,
    batch: int = 1024,
    max_delay: float = 0.15,
    max_events: int = 16384,
    projector: Projector | None = None,
    ack_wait: float = 10.0,
    heal: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[Projector] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Project forever.  Errors reading or writing NATS are retried with backoff; a corrupt
    event, or a run that cannot be written, only blocks its own run.  ``heal`` (recreate
    deleted streams and buckets) is called before retrying after an error."""
    proj = projector or Projector(nats, work_prefix=work_prefix, max_snapshot_bytes=max_snapshot_bytes)
    # ack_wait bounds how long events held by a projector that died stay invisible to the others.
    await nats.ensure_pull_consumer(subjects.EVENTS_STREAM, subjects.PROJECTOR_DURABLE, projector_consumer_config(ack_wait))
    config = projector_consumer_config(ack_wait)
    async with nats.pull_subscription(subjects.EVENTS_STREAM, subjects.PROJECTOR_DURABLE, recreate=config) as sub:
        task_status.started(proj)
        backoff = 0.1
        first_unflushed: float | None = None
        while True:
            try:
                timeout = 1.0 if not proj.pending else max(0.001, max_delay - (time.monotonic() - (first_unflushed or 0)))
                msgs = await sub.fetch(batch, timeout=timeout)
                if msgs:
                    if first_unflushed is None:
                        first_unflushed = time.monotonic()
                    await proj.absorb(msgs)
                caught_up = len(msgs) < batch or (msgs and msgs[-1].num_pending == 0)
                overdue = first_unflushed is not None and time.monotonic() - first_unflushed >= max_delay
                if proj.pending and (caught_up or overdue or proj.pending >= max_events):
                    with trio.CancelScope(shield=True):
                        await proj.flush()
                    first_unflushed = None
                backoff = 0.1
            except PyocoError as exc:
                log.warning("projector: %s; retrying in %.1fs", exc, backoff)
                proj.reset()
                first_unflushed = None
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if heal is not None:
                    try:
                        await heal()
                    except PyocoError as heal_exc:
                        log.warning("projector: cannot check the streams and buckets: %s", heal_exc)
