"""The worker actor: one nursery that owns the pull loops, the registry heartbeat, the batched
acks and in-progress acks, a warm pool of child processes, and one task per run.

Life of a work item (``pyoco.work.<tag>``, ``Nats-Msg-Id = run_id:attempt``):

1. A tag's pull loop long-polls its shared durable consumer when the worker has room (no busy
   polling; every tag asks for its share of the free room, so no tag starves another).
2. The run task decodes the job (invalid → DLQ ``invalid_job`` + TERM), takes a warm child and
   sends it *prepare* (parse/validate YAML, import the allowed callables, build the pyoco Flow;
   cached per sha256 in the child) while it reads the run's events (or takes the run's position
   from the job).  The task names go into ``run.claimed``.  When the child has built this
   document before and the job carries the run's position, nothing is sent yet: step 3 sends
   *prepare* and *go* together.
3. It puts the run into the heartbeat's ``runs`` map and appends ``run.claimed`` fenced by the
   run's last sequence: a StaleAttempt / RunNotFound means the item is obsolete (acked).  The
   claim's hook writes *go* (with a held-back *prepare*) to the child's pipe from the NATS thread
   the moment the claim is stored, so the run starts without waiting for a hop back to Trio.
4. If the flow could not be prepared: ``run.failed`` (``flow_not_found`` + DLQ, or
   ``build_error``).  Otherwise the child runs it; its trace events are appended in batches
   (whatever arrived while the previous append was in flight, plus a 2 ms coalescing window),
   fenced by attempt.  A task that started and ended within one batch is recorded by its ending
   event alone (it carries ``started_at``).  A StaleAttempt means another worker owns the run
   now: the child is killed, nothing more is appended, and the item is TERMed (not acked as
   done).  The same happens as soon as the run's events show the attempt was taken from us
   (``run.worker_lost`` after we were frozen or cut off past the lease), even while the task
   appends nothing.  Attempts are keyed by (run, attempt) throughout, so a stale one never
   touches the live one's heartbeat entry.
5. Cancel: a run older than ``CANCEL_WATCH_DELAY`` (0.1 s) subscribes to its event subject
   (filtered to ``run.cancel_requested`` on the asyncio side) and reads its events once to catch
   an earlier request; a younger run learns of a cancel from its next append, which conflicts and
   re-reads.  The child is asked to cancel cooperatively; after ``cancel_grace_period`` it is
   killed and ``run.cancelled(forced)`` is appended.  A run never stays CANCELLING.
6. The work item is ACKed only after the terminal event is durable (acks are batched).  A NATS
   failure before the claim NAKs with a delay; after it, appends are retried for a while, then the
   item is NAKed and the child killed (the reaper takes over if the worker is really cut off).

Reads before a claim and every append go through batchers: requests from all runs that arrive
while one batch is in flight share the next bridge crossing (``read_runs`` / ``append_many``).

Poison, not crash: a work item that is not a job, or whose processing fails in a way nothing
foresaw, is TERMed + dead-lettered and the run it names FAILED (``invalid_job``); a child that
writes anything but protocol frames is killed and its run FAILED at once.  The worker serves on.

A child that dies on its own mid-run (a poison task, OOM kill) ends the attempt: with attempts left
the run is released (``run.released``, the dispatcher enqueues the next attempt, possibly on
another worker); on the last attempt it fails with ``error="child process died with signal N"``.
So a run that kills its process every time ends FAILED after ``max_attempts``, without a hot loop.

Graceful stop (``stop`` set): stop fetching, NAK what is queued but not claimed, let running runs
finish within ``worker_drain_timeout``, then release the rest (``run.released``), write
``STOPPED_GRACEFUL`` and return.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import attrs
import outcome
import trio

from ..config import Settings
from ..core import decide
from ..core.codec import decode_envelope, dumps
from ..core.codec import loads as strict_loads
from ..core.errors import (
    ConcurrencyConflict,
    CorruptStreamError,
    DomainError,
    InfraError,
    PayloadTooLarge,
    PyocoError,
    RunNotFound,
    StaleAttempt,
)
from ..core.events import Envelope, Event, Producer, RunFailed, TaskCompleted, TaskFailed, TaskStarted
from ..core.fold import apply, fold
from ..core.model import RunSnapshot, RunStatus
from ..nats import subjects
from ..nats.client import Delivered, NatsClient, OnStored, PullSubscription
from ..service import Outcome, RunStore, new_event_id
from .pool import ChildDied, ChildPool, ChildProcess, ChildProtocolError
from .trust import check_allowed_modules, check_env_names

log = logging.getLogger(__name__)

NAK_DELAY: Final = 2.0
CANCEL_WATCH_DELAY: Final = 0.1  # runs younger than this are not watched for cancels yet (_watch_cancel)
ACK_COALESCE: Final = 0.005
FETCH_GATHER: Final = 0.002
COALESCE_WINDOW: Final = 0.002  # how long task events may wait to be appended together
MAX_FETCH_BATCH: Final = 64
APPEND_RETRIES: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
STATE_RUNNING: Final = "RUNNING"
STATE_IDLE: Final = "IDLE"
STATE_STOPPED: Final = "STOPPED_GRACEFUL"
LOST: Final = "LOST"  # final_status of an attempt that was fenced (another attempt owns the run)
HEARTBEAT_RETRY: Final = 1.0  # after a failed heartbeat write
# Run events that were not appended by the attempt itself and mean it is over (lost, re-claimed,
# ended by the conductor); the cancel watch forwards every ``run.*`` event (the pattern matches
# the envelope's compact JSON) and stops the child at once on these.
RUN_EVENT_MARK: Final = b'"type":"run.'


def _offset_clock(offset: float) -> Callable[[], float]:
    """The wall clock, shifted by ``offset`` seconds (``PYOCO_WORKER_CLOCK_OFFSET_SEC``: tests
    simulate a worker whose clock is wrong; nothing may judge liveness from these stamps)."""
    if not offset:
        return time.time
    return lambda: time.time() + offset


class InvalidJob(ValueError):
    """A work item that is not a job.  ``run_id``/``attempt`` are set when they could be read, so
    the run it names can be failed rather than left PENDING."""

    def __init__(self, message: str, *, run_id: str | None = None, attempt: int | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.attempt = attempt


@attrs.frozen(kw_only=True)
class Job:
    """A decoded work item (contract §2.9 plus ``attempt``)."""

    run_id: str
    attempt: int
    flow_name: str
    tag: str
    tags: tuple[str, ...]
    params: dict[str, Any]
    tenant_id: str | None = None
    api_key_id: str | None = None
    workflow_yaml: str | None = None
    workflow_yaml_sha256: str | None = None
    workflow_yaml_bytes: int | None = None
    schedule_id: str | None = None
    submitted_at: float = 0.0
    max_attempts: int | None = None
    # The run's position when the dispatcher enqueued this attempt (optional): with it the claim
    # needs no read first (a stale position just makes the claim conflict and re-read).
    run_seq: int | None = None
    run_stream_seq: int | None = None

    def pending_snapshot(self) -> RunSnapshot | None:
        """The PENDING snapshot the dispatcher saw, rebuilt from the job, or None without
        ``run_seq``/``run_stream_seq``.  Good enough to decide the claim and fold what follows."""
        if not self.run_seq or not self.run_stream_seq:
            return None
        return RunSnapshot(
            run_id=self.run_id,
            flow_name=self.flow_name,
            tag=self.tag,
            tags=self.tags,
            params=self.params,
            status=RunStatus.PENDING,
            submitted_at=self.submitted_at,
            updated_at=self.submitted_at,
            version=self.run_seq,
            last_stream_seq=self.run_stream_seq,
            max_attempts=self.max_attempts or 1,
            attempt=self.attempt,
            tenant_id=self.tenant_id,
            api_key_id=self.api_key_id,
            workflow_yaml_sha256=self.workflow_yaml_sha256,
            workflow_yaml_bytes=self.workflow_yaml_bytes,
            schedule_id=self.schedule_id,
        )

    @classmethod
    def decode(cls, data: bytes) -> Job:
        try:
            doc = strict_loads(data)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise InvalidJob(f"payload is not JSON: {str(exc)[:200]}") from None
        if not isinstance(doc, dict):
            raise InvalidJob("payload is not a JSON object")
        run_id = doc.get("run_id")
        if not isinstance(run_id, str) or not subjects.is_token(run_id):
            raise InvalidJob("run_id missing or not a subject token")
        attempt = doc.get("attempt", 1)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise InvalidJob("attempt must be a positive integer", run_id=run_id)
        flow_name = doc.get("flow_name")
        if not isinstance(flow_name, str):
            raise InvalidJob("flow_name missing", run_id=run_id, attempt=attempt)
        params = doc.get("params") or {}
        if not isinstance(params, dict):
            raise InvalidJob("params must be an object", run_id=run_id, attempt=attempt)
        yaml_text = doc.get("workflow_yaml")
        if yaml_text is not None and not isinstance(yaml_text, str):
            raise InvalidJob("workflow_yaml must be a string", run_id=run_id, attempt=attempt)
        tag = doc.get("tag") or "default"
        tags = doc.get("tags") or [tag]
        return cls(
            run_id=run_id,
            attempt=attempt,
            flow_name=flow_name,
            tag=str(tag),
            tags=tuple(str(t) for t in tags) if isinstance(tags, list) else (str(tag),),
            params=params,
            tenant_id=doc.get("tenant_id") if isinstance(doc.get("tenant_id"), str) else None,
            api_key_id=doc.get("api_key_id") if isinstance(doc.get("api_key_id"), str) else None,
            workflow_yaml=yaml_text,
            workflow_yaml_sha256=doc.get("workflow_yaml_sha256") if isinstance(doc.get("workflow_yaml_sha256"), str) else None,
            workflow_yaml_bytes=_opt_int(doc.get("workflow_yaml_bytes")),
            schedule_id=doc.get("schedule_id") if isinstance(doc.get("schedule_id"), str) else None,
            submitted_at=float(doc["submitted_at"]) if isinstance(doc.get("submitted_at"), (int, float)) else 0.0,
            max_attempts=_opt_int(doc.get("max_attempts")),
            run_seq=_opt_int(doc.get("run_seq")),
            run_stream_seq=_opt_int(doc.get("run_stream_seq")),
        )


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def normalize_tags(tags: Sequence[str], default_tag: str) -> tuple[str, ...]:
    """Strip, drop empties, default to ``[default_tag]``; a tag must be one subject token.

    Raises:
        ValueError: a tag contains ``.`` or other characters outside ``[A-Za-z0-9_-]``.
    """
    out: list[str] = []
    for raw in tags:
        for part in str(raw).split(","):
            tag = part.strip()
            if not tag:
                continue
            if not subjects.is_token(tag):
                raise ValueError(f"invalid tag {tag!r}: tags may only contain letters, digits, '_' and '-'")
            if tag not in out:
                out.append(tag)
    return tuple(out) or (default_tag,)


def consumer_config(tag: str, settings: Settings) -> dict[str, Any]:
    return {
        "filter_subject": subjects.work_subject(tag, settings.work_subject_prefix),
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": settings.consumer_ack_wait,
        "max_deliver": settings.consumer_max_deliver,
        "max_ack_pending": settings.consumer_max_ack_pending,
    }


def resolver_spec(flow_resolver: Callable[..., Any] | str | None) -> str | None:
    """The resolver as an import spec the child processes can load.

    Raises:
        ValueError: a callable that cannot be imported by name (lambda, closure, ``__main__``).
    """
    if flow_resolver is None or isinstance(flow_resolver, str):
        return flow_resolver
    module = getattr(flow_resolver, "__module__", None)
    qualname = getattr(flow_resolver, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise ValueError(
            "flow_resolver must be importable by name (module:function) because runs execute in child "
            f"processes; got {flow_resolver!r}"
        )
    return f"{module}:{qualname}"


@attrs.define(eq=False)
class _Active:
    job: Job
    msg: Delivered
    started_at: float  # time.time(), for the registry
    inbox: trio.MemorySendChannel[tuple[str, Any]]
    driver: _RunDriver | None = None
    claimed_at: float = 0.0  # trio clock


I = TypeVar("I")
R = TypeVar("R")


@attrs.define(eq=False)
class _Slot(Generic[R]):
    done: trio.Event = attrs.field(factory=trio.Event)
    value: Any = None


class _Batcher(Generic[I, R]):
    """Coalesces concurrent requests into one call (one bridge crossing) per batch.

    Requests that arrive while a batch is in flight form the next batch, so batches grow with
    load and a lone request goes out at once.
    """

    def __init__(self, fn: Callable[[list[I]], Awaitable[Sequence[R | PyocoError]]]) -> None:
        self._fn = fn
        self._items: list[tuple[I, _Slot[R]]] = []
        self._wake = trio.Event()

    async def submit(self, item: I) -> R:
        slot: _Slot[R] = _Slot()
        self._items.append((item, slot))
        self._wake.set()
        await slot.done.wait()
        if isinstance(slot.value, BaseException):
            raise slot.value
        return slot.value  # type: ignore[no-any-return]

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._items = self._items, []
            if not batch:
                continue
            try:
                results: Sequence[Any] = await self._fn([item for item, _ in batch])
            except PyocoError as exc:
                results = [exc] * len(batch)
            for (_, slot), result in zip(batch, results, strict=True):
                slot.value = result
                slot.done.set()


class _LostRun(Exception):
    """Our attempt is no longer current (StaleAttempt on append)."""


class WorkerActor:
    def __init__(
        self,
        nats: NatsClient,
        settings: Settings,
        *,
        worker_id: str,
        tags: Sequence[str],
        concurrency: int,
        flow_resolver: str | None,
        allowed_modules: Sequence[str],
        poll_timeout: float,
        drain_timeout: float,
        scratch_root: Path,
    ) -> None:
        self.nats = nats
        self.settings = settings
        self.worker_id = worker_id
        self.tags = tuple(tags)
        self.concurrency = concurrency
        self.poll_timeout = poll_timeout
        self.drain_timeout = drain_timeout
        self.instance_id = uuid.uuid4().hex
        self.store = RunStore(nats, clock=_offset_clock(settings.worker_clock_offset))
        self.pool = ChildPool(
            size=concurrency,
            scratch_root=scratch_root,
            allowed_modules=allowed_modules,
            flow_resolver=flow_resolver,
            max_output_bytes=settings.max_output_bytes,
            expose_env=settings.worker_expose_env,
        )
        self.held: set[Delivered] = set()  # fetched, not yet acked/naked: in-progress targets
        # Keyed by (run, attempt): a stale attempt still winding down (its worker was frozen past
        # its lease) must never touch the live attempt's entries (issue 11).
        self.active: dict[tuple[str, int], _Active] = {}  # claimed attempts
        self.runs: dict[tuple[str, int], int] = {}  # attempts for the heartbeat (set before the claim)
        self.clock = _offset_clock(settings.worker_clock_offset)  # wall clock for stamps (tests skew it)
        self.pending = 0  # accepted items not finished (waiting for a child or running)
        self.draining = False
        self._room = trio.Event()
        self._ack_send, self._ack_recv = trio.open_memory_channel[Delivered](math.inf)
        self._registry_rev: int | None = None
        self._hidden = False
        self._wheel_sync: dict[str, Any] | None = None
        self._last_run: dict[str, Any] = {}
        self.completed = 0
        self._became_active = trio.Event()
        self._beat_soon = trio.Event()  # set when the first run is taken: heartbeat now, not at the idle pace
        self._yaml_tasks: dict[str, list[str]] = {}  # sha256 -> task names a child reported
        self._reader: _Batcher[str, list[Envelope]] = _Batcher(nats.read_runs)
        self._appender: _Batcher[tuple[str, Sequence[Envelope], int, OnStored | None], list[int]] = _Batcher(nats.append_many)

    @property
    def producer_kind(self) -> str:
        return "worker"

    def _producer(self, attempt: int) -> Producer:
        return Producer(kind="worker", id=self.worker_id, attempt=attempt)

    def _notify_room(self) -> None:
        self._room.set()
        self._room = trio.Event()

    # -- pull loops -----------------------------------------------------------------------------

    async def pull_loop(self, tag: str, psub: PullSubscription, nursery: trio.Nursery) -> None:
        while not self.draining:
            room = self.concurrency - self.pending
            if room <= 0:
                await self._room.wait()
                continue
            if self.pending and room < self.concurrency / 4:
                # Busy: let a little more room free up so one fetch brings several items
                # (a fetch per freed slot would cost a bridge crossing per run).
                with trio.move_on_after(FETCH_GATHER):
                    while self.concurrency - self.pending < self.concurrency / 4 and self.pending:
                        await self._room.wait()
                room = self.concurrency - self.pending
            batch = max(1, min(MAX_FETCH_BATCH, math.ceil(room / len(self.tags))))
            try:
                msgs = await psub.fetch(batch, self.poll_timeout)
            except PyocoError as exc:
                log.warning("fetch on tag %s failed: %s", tag, exc)
                await trio.sleep(min(1.0, self.poll_timeout))
                continue
            for msg in msgs:
                if self.draining:
                    await self._nak(msg, 0)
                    continue
                self.pending += 1
                self.held.add(msg)
                nursery.start_soon(self._process, msg, tag)

    # -- acks -----------------------------------------------------------------------------------

    def _ack(self, msg: Delivered) -> None:
        self.held.discard(msg)
        self._ack_send.send_nowait(msg)

    async def _nak(self, msg: Delivered, delay: float | None) -> None:
        self.held.discard(msg)
        try:
            await self.nats.nak(msg, delay if delay else None)
        except PyocoError as exc:
            log.warning("nak failed (the item is redelivered after ack_wait): %s", exc)

    async def _term(self, msg: Delivered) -> None:
        self.held.discard(msg)
        try:
            await self.nats.term(msg)
        except PyocoError as exc:
            log.warning("term failed: %s", exc)

    async def ack_loop(self) -> None:
        async for first in self._ack_recv:
            # Acks are not on any run's critical path: wait a moment so they go out in batches.
            await trio.sleep(ACK_COALESCE)
            batch = [first]
            while True:
                try:
                    batch.append(self._ack_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await self.nats.ack_many(batch)
            except PyocoError as exc:
                log.warning("ack of %d item(s) failed (they are redelivered and found obsolete): %s", len(batch), exc)

    async def progress_loop(self) -> None:
        interval = self.settings.ack_progress_interval
        if interval <= 0:
            return
        interval = min(interval, max(0.05, self.settings.consumer_ack_wait / 2))
        while True:
            await trio.sleep(interval)
            msgs = list(self.held)
            if msgs:
                try:
                    await self.nats.in_progress_many(msgs)
                except PyocoError as exc:
                    log.warning("in-progress ack failed: %s", exc)

    async def cancel_watch_loop(self, nursery: trio.Nursery) -> None:
        """Start a cancel watch for each run once it is ``CANCEL_WATCH_DELAY`` old (one loop for
        the worker instead of a sleeping task per run)."""
        while True:
            if not self.active:
                await self._became_active.wait()  # no periodic wake-ups while idle
            await trio.sleep(CANCEL_WATCH_DELAY / 2)
            now = trio.current_time()
            for active in list(self.active.values()):
                driver = active.driver
                if driver is None or driver.watched or not driver.running:
                    continue
                if now - active.claimed_at >= CANCEL_WATCH_DELAY:
                    driver.watched = True
                    nursery.start_soon(driver.watch_cancel)

    # -- registry -------------------------------------------------------------------------------

    def heartbeat_runs(self) -> dict[str, int]:
        """``runs`` of the registry record: run id -> the highest attempt this worker holds (a
        stale lower attempt never hides the live one)."""
        out: dict[str, int] = {}
        for run_id, attempt in self.runs:
            out[run_id] = max(attempt, out.get(run_id, 0))
        return out

    def _registry_doc(self, state: str, now: float) -> dict[str, Any]:
        runs = self.heartbeat_runs()
        run_ids = sorted(runs)
        doc: dict[str, Any] = {
            "worker_id": self.worker_id,
            "instance_id": self.instance_id,
            "state": state,
            "hidden": self._hidden,
            "tags": list(self.tags),
            "last_seen_at": now,
            "last_heartbeat_at": now,
            "heartbeat_at": now,
            "updated_at": now,
            "current_run_id": run_ids[0] if run_ids else None,
            "current_run_ids": run_ids,
            "runs": runs,
            "last_run_id": self._last_run.get("run_id"),
            "last_run_status": self._last_run.get("status"),
            "last_run_started_at": self._last_run.get("started_at"),
            "last_run_finished_at": self._last_run.get("finished_at"),
            "stopped_at": now if state == STATE_STOPPED else None,
            "stop_reason": "graceful_shutdown" if state == STATE_STOPPED else None,
            "wheel_sync": self._wheel_sync
            or {
                "enabled": False,
                "last_result": "disabled",
                "last_attempt_at": None,
                "last_success_at": None,
                "last_synced_at": None,
                "last_error": None,
                "selected_count": 0,
                "updated_count": 0,
                "removed_count": 0,
                "skipped_incompatible_count": 0,
                "selected_wheels": [],
                "updated_wheels": [],
                "removed_wheels": [],
                "skipped_incompatible": [],
                "installed_wheels": [],
            },
            "concurrency": self.concurrency,
            "completed_runs": self.completed,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
        }
        return doc

    async def _reread_registry(self) -> None:
        entry = await self.nats.kv_get(subjects.WORKERS_BUCKET, self.worker_id)
        if entry is None or not entry.value:
            self._registry_rev = 0
            return
        self._registry_rev = entry.revision
        try:
            old = json.loads(entry.value)
        except ValueError:
            return
        if isinstance(old, dict):
            self._hidden = bool(old.get("hidden", False))
            if isinstance(old.get("wheel_sync"), dict):
                self._wheel_sync = old["wheel_sync"]

    async def write_registry(self, state: str | None = None) -> None:
        """Write the registry record with compare-and-swap, keeping a concurrent ``hidden`` PATCH."""
        state = state or (STATE_RUNNING if self.runs else STATE_IDLE)
        for _ in range(5):
            if self._registry_rev is None:
                await self._reread_registry()
            value = dumps(self._registry_doc(state, self.clock()))
            try:
                self._registry_rev = await self.nats.kv_update(
                    subjects.WORKERS_BUCKET, self.worker_id, value, last=self._registry_rev or 0
                )
                return
            except ConcurrencyConflict:
                self._registry_rev = None  # someone else wrote (a hidden PATCH): re-read, merge
        log.warning("registry write for %s kept conflicting; will retry at the next heartbeat", self.worker_id)

    def heartbeat_interval(self) -> float:
        base = self.settings.worker_heartbeat_interval
        if self.runs:
            return max(0.1, min(base, self.settings.run_lease_seconds / 3))
        return base

    async def heartbeat_loop(self) -> None:
        last = trio.current_time()
        failed = False
        while True:
            interval = self.heartbeat_interval()
            if failed:
                # A NATS blip: try again soon rather than a whole interval later, so the
                # reaper sees the record change again as soon as NATS is back.
                interval = min(interval, HEARTBEAT_RETRY)
            due = last + interval
            if trio.current_time() < due:
                with trio.move_on_at(due):
                    await self._beat_soon.wait()  # a first run: the running interval may be due already
                self._beat_soon = trio.Event()
                continue
            last = trio.current_time()
            try:
                await self.write_registry()
                failed = False
            except PyocoError as exc:
                log.warning("heartbeat failed: %s", exc)
                failed = True

    # -- one run --------------------------------------------------------------------------------

    async def _process(self, msg: Delivered, tag: str) -> None:
        job: Job | None = None
        try:
            try:
                job = Job.decode(msg.data)
            except InvalidJob as exc:
                await self._invalid_job(msg, str(exc), run_id=exc.run_id, attempt=exc.attempt)
                return
            child = await self.pool.acquire()
            try:
                if self.draining:
                    await self._nak(msg, 0)
                    return
                await self._execute(job, msg, child)
            except Exception:
                child.kill()  # in an unknown state: never hand it to the next run
                raise
            finally:
                await self.pool.release(child)
        except ChildProtocolError as exc:
            # Garbage while preparing (user code the child imported writes to the pipe): it
            # would do the same on every redelivery.
            await self._invalid_job(msg, str(exc), run_id=job.run_id if job else None, attempt=job.attempt if job else None)
        except ChildDied as exc:
            log.warning("could not start a child process: %s", exc)
            await self._nak(msg, NAK_DELAY)
        except Exception as exc:  # noqa: BLE001 - poison, not crash (DESIGN "Decisions")
            # Whatever this item carried made processing it fail in a way nothing above
            # foresaw (a value that cannot be encoded, a malformed frame ...).  Redelivering it
            # would fail the same way on every worker, so: TERM + DLQ + the run FAILED, and
            # this worker goes on serving.
            log.exception("poison work item on %s", msg.subject)
            await self._invalid_job(
                msg,
                f"poison work item: {type(exc).__name__}: {str(exc)[:500]}",
                run_id=job.run_id if job else None,
                attempt=job.attempt if job else None,
            )
        finally:
            self.pending -= 1
            self.held.discard(msg)
            self._notify_room()

    async def _invalid_job(self, msg: Delivered, error: str, *, run_id: str | None = None, attempt: int | None = None) -> None:
        """TERM + DLQ a work item that cannot be processed; fail the run it names (if that run is
        still waiting for this attempt, or ours), so it does not stay PENDING or RUNNING."""
        log.error("invalid job on %s: %s", msg.subject, error)
        tag = msg.subject.rsplit(".", 1)[-1]
        body = {
            "reason": "invalid_job",
            "error": error,
            "timestamp": self.clock(),
            "subject": msg.subject,
            "worker_id": self.worker_id,
            "num_delivered": msg.num_delivered,
            "payload": msg.data[:4096].decode("utf-8", errors="replace"),
        }
        await self._dlq(tag, body)
        await self._term(msg)
        if run_id is not None:
            await self._fail_unrunnable(run_id, attempt or 1, error)

    async def _fail_unrunnable(self, run_id: str, attempt: int, error: str) -> None:
        def make(s: RunSnapshot | None) -> list[Event]:
            if s is None or s.attempt != attempt:
                return []
            now = self.clock()
            failed = RunFailed(attempt=attempt, ended_at=now, reason="invalid_job", error=error)
            if s.status is RunStatus.PENDING:
                return [*decide.claim_run(s, run_id=run_id, attempt=attempt, worker_id=self.worker_id,
                                          lease_seconds=self.settings.run_lease_seconds, instance_id=self.instance_id), failed]
            if s.status in (RunStatus.RUNNING, RunStatus.CANCELLING) and s.worker_id == self.worker_id:
                return [failed]
            return []

        try:
            await self.store.execute(run_id, make, producer=self._producer(attempt))
        except PyocoError as exc:
            log.warning("run %s: could not record its invalid work item (%s)", run_id, exc, extra={"run_id": run_id})

    async def _dlq(self, tag: str, body: dict[str, Any]) -> None:
        try:
            await self.nats.publish(subjects.dlq_subject(tag), dumps(body))
        except PyocoError as exc:
            log.warning("DLQ publish failed (best effort): %s", exc)

    def _dlq_run(self, job: Job, reason: str, error: str) -> dict[str, Any]:
        return {
            "reason": reason,
            "error": error,
            "timestamp": self.clock(),
            "run_id": job.run_id,
            "flow_name": job.flow_name,
            "tag": job.tag,
            "tags": list(job.tags),
            "tenant_id": job.tenant_id,
            "api_key_id": job.api_key_id,
            "worker_id": self.worker_id,
            "attempt": job.attempt,
        }

    @staticmethod
    def _prepare_command(job: Job, child: ChildProcess) -> dict[str, Any]:
        cmd: dict[str, Any] = {"op": "prepare", "run_id": job.run_id, "flow_name": job.flow_name, "params": job.params}
        if job.workflow_yaml is not None:
            sha = job.workflow_yaml_sha256
            cmd["sha256"] = sha
            if not sha or sha not in child.known_docs:
                cmd["yaml"] = job.workflow_yaml
        return cmd

    async def _prepare_reply(self, job: Job, child: ChildProcess) -> dict[str, Any]:
        reply = await child.receive()
        sha = job.workflow_yaml_sha256 if job.workflow_yaml is not None else None
        if reply.get("ev") == "prepared" and sha:
            child.known_docs.add(sha)
            if len(self._yaml_tasks) >= 1024:
                self._yaml_tasks.clear()
            self._yaml_tasks[sha] = list(reply.get("tasks") or [])
        return reply

    async def _load(self, run_id: str) -> RunSnapshot | None:
        return fold(None, await self._reader.submit(run_id))

    async def execute(
        self,
        run_id: str,
        make: Callable[[RunSnapshot | None], Sequence[Event]],
        *,
        attempt: int,
        hint: RunSnapshot | None,
        on_stored: OnStored | None = None,
    ) -> Outcome:
        """``RunStore.execute`` with the append batched across runs (one crossing per batch).

        Decides against ``hint``; on a concurrency conflict (usually a cancel request) the run is
        re-read and the same decision is made again through ``RunStore``.

        Raises:
            DomainError: from ``make`` (StaleAttempt: the attempt is not ours any more).
            InfraError: NATS failed.
        """
        producer = self._producer(attempt)
        if hint is None:
            return await self.store.execute(run_id, make, producer=producer)
        events = make(hint)
        if not events:
            return Outcome(hint, ())
        envs = decide.stamp(hint, events, run_id=run_id, producer=producer, now=self.clock(), new_id=new_event_id)
        try:
            seqs = await self._appender.submit((run_id, envs, hint.last_stream_seq, on_stored))
        except ConcurrencyConflict:
            # Re-read the whole run (not from the hint's position, which may be the dispatcher's
            # and is what just proved wrong), then decide again.
            fresh = await self._load(run_id)
            return await self.store.execute(run_id, make, producer=producer, hint=fresh)
        snap: RunSnapshot | None = hint
        stored = []
        for env, seq in zip(envs, seqs, strict=True):
            env = attrs.evolve(env, stream_seq=seq)
            stored.append(env)
            snap = apply(snap, env)
        return Outcome(snap, tuple(stored))

    async def _execute(self, job: Job, msg: Delivered, child: ChildProcess) -> None:
        run_id, attempt = job.run_id, job.attempt
        sha = job.workflow_yaml_sha256 if job.workflow_yaml is not None else None
        known = self._yaml_tasks.get(sha) if sha else None
        pending = job.pending_snapshot()
        if known is not None and sha in child.known_docs and pending is not None:
            # The common case: a document this child has built before, and the run's position
            # is in the job.  Claim straight away; the claim's hook sends prepare and go together
            # (one write, one wake-up of the child) the moment the claim is stored.
            await self._claim_guarded(job, msg, child, None, pending, known, deferred=self._prepare_command(job, child))
            return
        # The child prepares the flow while we read the run: the command goes out first, the
        # reply is read after the run's events came back.
        await child.send(self._prepare_command(job, child))
        try:
            snap = pending or await self._load(run_id)
        except InfraError as exc:
            log.warning("run %s: NATS error before the claim (%s); NAK", run_id, exc)
            await self._prepare_reply(job, child)  # keep the pipe in step
            await self._abort(child, run_id)
            await self._nak(msg, NAK_DELAY)
            return
        except CorruptStreamError as exc:
            log.error("run %s cannot be read (%s); dropping its work item", run_id, exc)
            await self._prepare_reply(job, child)
            await self._abort(child, run_id)
            self._ack(msg)
            return
        obsolete = snap is None or snap.status is not RunStatus.PENDING or snap.attempt != attempt
        if known is not None and not obsolete:
            # The task names of this document are known: claim while the child prepares, and
            # read its reply after the claim.
            prep: dict[str, Any] | None = None
        else:
            prep = await self._prepare_reply(job, child)
            known = prep.get("tasks", []) if prep.get("ev") == "prepared" else []
        if obsolete:
            await self._abort(child, run_id)
            self._ack(msg)  # obsolete: cancelled, claimed, or a later attempt is current
            return
        assert snap is not None
        await self._claim_guarded(job, msg, child, prep, snap, known, deferred=None)

    async def _claim_guarded(
        self,
        job: Job,
        msg: Delivered,
        child: ChildProcess,
        prep: dict[str, Any] | None,
        snap: RunSnapshot,
        tasks: list[str],
        *,
        deferred: dict[str, Any] | None,
    ) -> None:
        key = (job.run_id, job.attempt)
        if not self.runs:
            self._beat_soon.set()  # the idle interval may be longer than the run's lease
        self.runs[key] = self.runs.get(key, 0) + 1  # before the claim: the reaper trusts our heartbeat
        try:
            inbox = trio.open_memory_channel[tuple[str, Any]](math.inf)
            await self._claim_and_run(job, msg, child, prep, snap, tasks, inbox, deferred)
        finally:
            self.runs[key] -= 1  # a redelivered copy of the same item may be in flight too
            if not self.runs[key]:
                del self.runs[key]
                self.active.pop(key, None)

    async def _unprepare(self, job: Job, child: ChildProcess, prep: dict[str, Any] | None, deferred: dict[str, Any] | None) -> None:
        """After a failed claim: forget the child's prepared run (nothing to do if the prepare
        was never sent)."""
        if deferred is not None:
            return
        if prep is None:
            await self._prepare_reply(job, child)
        await self._abort(child, job.run_id)

    async def _abort(self, child: ChildProcess, run_id: str) -> None:
        try:
            await child.send({"op": "abort", "run_id": run_id})
        except ChildDied:
            pass

    async def _claim_and_run(
        self,
        job: Job,
        msg: Delivered,
        child: ChildProcess,
        prep: dict[str, Any] | None,
        snap: RunSnapshot,
        tasks: list[str],
        inbox: tuple[trio.MemorySendChannel[tuple[str, Any]], trio.MemoryReceiveChannel[tuple[str, Any]]],
        deferred: dict[str, Any] | None,
    ) -> None:
        """Claim, then run.  ``prep`` is the child's prepare reply if already read; ``deferred``
        is a prepare command not sent yet (the claim's hook sends it with the go)."""
        run_id, attempt = job.run_id, job.attempt
        go_sent: list[bool] = []
        go = {"op": "go", "run_id": run_id}

        def go_now(seqs: list[int]) -> None:
            # On the NATS thread, the moment the claim is stored: start the child without
            # waiting for a hop back to Trio (it drops the go if its prepare failed).
            if child.send_from_any_thread(*([deferred, go] if deferred is not None else [go])):
                go_sent.append(True)

        try:
            claimed = await self.execute(
                run_id,
                lambda s: decide.claim_run(
                    s,
                    run_id=run_id,
                    attempt=attempt,
                    worker_id=self.worker_id,
                    lease_seconds=self.settings.run_lease_seconds,
                    tasks=tasks,
                    instance_id=self.instance_id,
                ),
                attempt=attempt,
                hint=snap,
                on_stored=go_now,
            )
        except (StaleAttempt, RunNotFound):
            await self._unprepare(job, child, prep, deferred)
            self._ack(msg)
            return
        except InfraError as exc:
            log.warning("run %s: claim failed (%s); NAK", run_id, exc)
            await self._unprepare(job, child, prep, deferred)
            await self._nak(msg, NAK_DELAY)
            return
        except PayloadTooLarge as exc:  # a size, never an outage: retrying cannot help
            log.error("run %s: its claim cannot be stored (%s); dropping the work item", run_id, exc)
            await self._unprepare(job, child, prep, deferred)
            await self._term(msg)
            return
        died: ChildDied | None = None
        try:
            if deferred is not None and not go_sent:
                await child.send(deferred)  # the hook could not write it: send it now (go follows)
            if prep is None:
                prep = await self._prepare_reply(job, child)
        except ChildDied as exc:
            died, prep = exc, {"ev": "prepared", "tasks": tasks}
        active = _Active(job=job, msg=msg, started_at=self.clock(), inbox=inbox[0], claimed_at=trio.current_time())
        runner = _RunDriver(self, job, child, claimed.snapshot, active, inbox, go_sent=bool(go_sent))
        active.driver = runner
        self.active[(run_id, attempt)] = active
        if len(self.active) == 1:
            self._became_active.set()
            self._became_active = trio.Event()
        if died is not None:
            await runner.end_with_dead_child(died)
        elif prep.get("ev") != "prepared":
            reason = str(prep.get("reason") or "build_error")
            error = str(prep.get("error") or "the flow could not be built")
            await runner.finish_without_running(reason, error)
        else:
            await runner.run()
        self._record_last(run_id, runner.final_status, active.started_at)
        if runner.nak:
            await self._nak(msg, NAK_DELAY)
        elif runner.final_status == LOST:
            await self._term(msg)  # fenced: this attempt was not done by us; never ack it as done
        else:
            self._ack(msg)
        if runner.dlq is not None:
            await self._dlq(job.tag, runner.dlq)

    def _record_last(self, run_id: str, status: str | None, started_at: float) -> None:
        self.completed += 1
        self._last_run = {"run_id": run_id, "status": status, "started_at": started_at, "finished_at": self.clock()}

    # -- drain ----------------------------------------------------------------------------------

    async def drain(self) -> None:
        self.draining = True
        self._notify_room()
        with trio.move_on_after(self.drain_timeout):
            while self.pending:
                await self._room.wait()
        if self.pending:
            log.warning("drain timeout: releasing %d run(s)", len(self.active))
            for active in list(self.active.values()):
                try:
                    active.inbox.send_nowait(("release", None))
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    pass
            with trio.move_on_after(max(5.0, self.settings.cancel_grace_period)):
                while self.pending:
                    await self._room.wait()


def _add_task_event(pending: list[Event], event: Event) -> None:
    """Queue a task event; a task that started and ended within one batch is recorded by its
    ending alone (``task.completed`` / ``task.failed`` carry ``started_at``), which saves an
    event, an append and a projection for every fast task.  A task still running when a batch
    goes out keeps its ``task.started``."""
    if isinstance(event, (TaskCompleted, TaskFailed)):
        for i in range(len(pending) - 1, -1, -1):
            prior = pending[i]
            if isinstance(prior, TaskStarted) and prior.task == event.task:
                del pending[i]
                break
    pending.append(event)


class _RunDriver:
    """Drives one claimed attempt: child frames → batched appends, cancel, terminal event."""

    def __init__(
        self,
        actor: WorkerActor,
        job: Job,
        child: ChildProcess,
        snap: RunSnapshot | None,
        active: _Active,
        inbox: tuple[trio.MemorySendChannel[tuple[str, Any]], trio.MemoryReceiveChannel[tuple[str, Any]]],
        *,
        go_sent: bool = False,
    ) -> None:
        self.actor = actor
        self.inbox = inbox
        self.go_sent = go_sent  # the claim's hook already started the child
        self.job = job
        self.child = child
        self.hint = snap
        self.active = active
        self.nak = False
        self.dlq: dict[str, Any] | None = None
        self.final_status: str | None = None
        self.cancel_sent = False
        self.cancel_deadline = math.inf
        self.claim_seq = snap.version if snap is not None else 0
        self.running = False
        self.watched = False
        self.watch_scope = trio.CancelScope()

    @property
    def run_id(self) -> str:
        return self.job.run_id

    @property
    def attempt(self) -> int:
        return self.job.attempt

    async def _append(self, make: Callable[[RunSnapshot | None], list[Event]]) -> None:
        """Append via RunStore (re-decides on conflicts); retry NATS failures for a while.

        Raises:
            _LostRun: the attempt is not ours any more.
            InfraError: NATS stayed unavailable.
        """
        delays = list(APPEND_RETRIES)
        while True:
            try:
                out = await self.actor.execute(self.run_id, make, attempt=self.attempt, hint=self.hint)
            except (StaleAttempt, RunNotFound) as exc:
                raise _LostRun(str(exc)) from exc
            except InfraError:
                if not delays:
                    raise
                await trio.sleep(delays.pop(0))
                self.hint = None  # re-read: the failed append may have been stored
                continue
            self.hint = out.snapshot
            return

    def _owner(self, s: RunSnapshot | None) -> RunSnapshot:
        return decide.check_owner(s, run_id=self.run_id, attempt=self.attempt, worker_id=self.actor.worker_id)

    async def _finish(self, outcome: str, *, reason: str | None = None, error: str | None = None, pending: list[Event] | None = None) -> None:
        extra = list(pending or [])

        def make(s: RunSnapshot | None) -> list[Event]:
            self._owner(s)
            return extra + decide.finish_run(
                s,
                run_id=self.run_id,
                attempt=self.attempt,
                worker_id=self.actor.worker_id,
                outcome=outcome,
                now=self.actor.clock(),
                error=error,
                reason=reason,
            )

        await self._append(make)
        self.final_status = self.hint.status.value if self.hint is not None else outcome

    async def end_with_dead_child(self, exc: ChildDied) -> None:
        try:
            await self._child_died(exc, [])
        except _LostRun:
            self.final_status = LOST
            return
        except InfraError:
            self.nak = True

    async def finish_without_running(self, reason: str, error: str) -> None:
        try:
            await self._finish("FAILED", reason=reason, error=error)
        except _LostRun:
            self.final_status = LOST
            return
        except InfraError:
            self.nak = True
            return
        if reason == "flow_not_found":
            self.dlq = self.actor._dlq_run(self.job, "flow_not_found", error)

    async def run(self) -> None:
        send, recv = self.inbox
        self.running = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump_child, send.clone())
            # Captured, not raised, inside the nursery: strict exception groups would wrap it.
            result = await outcome.acapture(self._drive, recv)
            nursery.cancel_scope.cancel()
        self.running = False
        self.watch_scope.cancel()
        try:
            result.unwrap()
        except _LostRun as exc:
            log.warning("run %s: attempt %d lost (%s); stopping it", self.run_id, self.attempt, exc)
            self.child.kill()
            self.final_status = LOST
        except InfraError as exc:
            log.error("run %s: NATS unavailable while running (%s); NAK and kill the child", self.run_id, exc)
            self.child.kill()
            self.nak = True
        except PayloadTooLarge as exc:  # an event that cannot be stored even shrunk: fail the run, once
            log.error("run %s: an event cannot be stored (%s); failing the run", self.run_id, exc)
            self.child.kill()
            try:
                await self._finish("FAILED", reason="error", error=f"an event of this run could not be stored: {exc.message}"[:4000])
            except _LostRun:
                return
            except PyocoError:
                self.nak = True

    async def _pump_child(self, send: trio.MemorySendChannel[tuple[str, Any]]) -> None:
        async with send:
            try:
                while True:
                    frame = await self.child.receive()
                    await send.send(("frame", frame))
                    if frame.get("ev") == "done":
                        return
            except ChildDied as exc:
                await send.send(("died", exc))

    async def watch_cancel(self) -> None:
        """Watch the run's subject for ``run.cancel_requested``.

        Most runs end within milliseconds, and a subscription costs several bridge crossings, so
        the actor starts this watch only once the run is ``CANCEL_WATCH_DELAY`` old.  The subscription
        forwards only cancel requests (filtered on the asyncio side).  Once it is live, the run's
        events are read once, so a cancel that came earlier is not missed.  (A cancel that
        reaches a run before that is also seen by its next append, which conflicts and re-reads.)
        """
        with self.watch_scope:
            nats = self.actor.nats
            subject = subjects.run_events_subject(self.run_id)
            async with nats.subscribe(subject, contains=RUN_EVENT_MARK) as events:
                try:
                    history = await self.actor._reader.submit(self.run_id)
                except PyocoError as exc:
                    log.warning("run %s: cannot read its events: %s", self.run_id, exc)
                    history = []
                for env in history:
                    if env.seq > self.claim_seq:
                        self._on_run_event(env)
                async for _subject, data in events:
                    try:
                        env = decode_envelope(data)
                    except CorruptStreamError:
                        continue
                    self._on_run_event(env)

    def _on_run_event(self, env: Envelope) -> None:
        if env.type == "run.cancel_requested":
            self._post(("cancel", env))
        elif env.type.startswith("run.") and not (
            env.producer.kind == "worker" and env.producer.id == self.actor.worker_id and env.producer.attempt == self.attempt
        ):
            # Someone else ended or took over our attempt (the reaper declared it lost while we
            # were frozen or cut off): stop the child now, not at its next append.
            self._post(("fenced", env))

    def _post(self, item: tuple[str, Any]) -> None:
        try:
            self.inbox[0].send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _request_cancel(self) -> None:
        if self.cancel_sent:
            return
        self.cancel_sent = True
        self.cancel_deadline = trio.current_time() + self.actor.settings.cancel_grace_period
        try:
            await self.child.send({"op": "cancel", "run_id": self.run_id})
        except ChildDied:
            pass  # the pump reports the death

    @staticmethod
    def _task_event(frame: dict[str, Any], attempt: int) -> Event | None:
        ev = frame.get("ev")
        if ev == "task.started":
            return TaskStarted(attempt=attempt, task=frame["task"], started_at=frame["started_at"])
        if ev == "task.completed":
            return TaskCompleted(
                attempt=attempt,
                task=frame["task"],
                started_at=frame.get("started_at"),
                ended_at=frame["ended_at"],
                duration_ms=frame.get("duration_ms"),
                inputs=frame.get("inputs") or {},
                output=frame.get("output"),
                truncated=bool(frame.get("truncated")),
            )
        if ev == "task.failed":
            return TaskFailed(
                attempt=attempt,
                task=frame["task"],
                started_at=frame.get("started_at"),
                ended_at=frame["ended_at"],
                duration_ms=frame.get("duration_ms"),
                inputs=frame.get("inputs") or {},
                error=str(frame.get("error") or "failed"),
                traceback=frame.get("traceback"),
            )
        return None

    async def _drive(self, recv: trio.MemoryReceiveChannel[tuple[str, Any]]) -> None:
        if not self.go_sent:
            try:
                await self.child.send({"op": "go", "run_id": self.run_id})
            except ChildDied:
                pass  # the pump reports the death
        pending: list[Event] = []
        while True:
            items: list[tuple[str, Any]] = []
            if not pending:
                with trio.move_on_at(self.cancel_deadline):
                    try:
                        items.append(await recv.receive())
                    except trio.EndOfChannel:
                        items.append(("died", ChildDied(self.child.proc.poll())))
                # Coalesce: a fast flow's remaining events (and its end) arrive within a moment,
                # and one append of all of them beats one per event.
                if items and items[-1][0] == "frame" and items[-1][1].get("ev") != "done":
                    with trio.move_on_after(COALESCE_WINDOW):
                        while True:
                            try:
                                item = await recv.receive()
                            except trio.EndOfChannel:
                                break
                            items.append(item)
                            if item[0] != "frame" or item[1].get("ev") == "done":
                                break
            while True:
                try:
                    items.append(recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            done: dict[str, Any] | None = None
            for kind, value in items:
                if kind == "frame":
                    if value.get("ev") == "done":
                        done = value
                    else:
                        try:
                            event = self._task_event(value, self.attempt)
                        except (KeyError, TypeError, ValueError) as exc:
                            self.child.kill()
                            problem = f"malformed {str(value.get('ev'))[:40]!r} frame ({type(exc).__name__}: {str(exc)[:200]})"
                            await self._child_died(ChildProtocolError(self.child.proc.poll(), problem), pending)
                            return
                        if event is not None:
                            _add_task_event(pending, event)
                elif kind == "cancel":
                    await self._request_cancel()
                elif kind == "release":
                    await self._release(pending, "worker stopping: drain timeout")
                    return
                elif kind == "died":
                    await self._child_died(value, pending)
                    return
                elif kind == "fenced":
                    self.child.kill()
                    raise _LostRun(f"{value.type} (seq {value.seq}) by {value.producer.kind} {value.producer.id}")
            if done is not None:
                await self._done(done, pending)
                return
            if trio.current_time() >= self.cancel_deadline:
                # The task ignored the cooperative cancel: kill the child, end the run.
                self.child.kill()
                await self._finish("CANCELLED", reason="forced", pending=pending)
                return
            if pending:
                batch, pending = pending, []

                def make(s: RunSnapshot | None, batch: list[Event] = batch) -> list[Event]:
                    self._owner(s)
                    return list(batch)

                await self._append(make)
                if self.hint is not None and self.hint.status is RunStatus.CANCELLING:
                    await self._request_cancel()  # learned from a conflict re-read

    async def _done(self, frame: dict[str, Any], pending: list[Event]) -> None:
        outcome = str(frame.get("outcome") or "FAILED")
        error = frame.get("error")
        if outcome == "CANCELLED":
            await self._finish("CANCELLED", reason="requested", pending=pending)
        elif outcome == "FAILED":
            await self._finish("FAILED", reason="error", error=str(error or "run failed"), pending=pending)
            if self.actor.settings.dlq_publish_execution_error:
                self.dlq = self.actor._dlq_run(self.job, "execution_error", str(error or "run failed"))
        else:
            await self._finish("COMPLETED", pending=pending)

    async def _release(self, pending: list[Event], reason: str) -> None:
        self.child.kill()
        extra = list(pending)

        def make(s: RunSnapshot | None) -> list[Event]:
            self._owner(s)
            return extra + decide.release_run(
                s, run_id=self.run_id, attempt=self.attempt, worker_id=self.actor.worker_id, reason=reason, now=self.actor.clock()
            )

        await self._append(make)
        self.final_status = self.hint.status.value if self.hint is not None else "RELEASED"

    async def _child_died(self, exc: ChildDied, pending: list[Event]) -> None:
        """The child died on its own: release for another attempt, or fail on the last one."""
        error = str(exc)
        if self.cancel_sent:
            await self._finish("CANCELLED", reason="forced", pending=pending)
            return
        if isinstance(exc, ChildProtocolError):
            log.error("run %s attempt %d: %s", self.run_id, self.attempt, error)
            await self._finish("FAILED", reason="error", error=error, pending=pending)
            return
        max_attempts = self.hint.max_attempts if self.hint is not None else 1
        if decide.attempts_left(self.hint, self.attempt):
            log.warning("run %s attempt %d: %s; releasing it for another attempt", self.run_id, self.attempt, error)
            await self._release(pending, f"{error} (attempt {self.attempt} of {max_attempts})")
        else:
            await self._finish(
                "FAILED",
                reason="error",
                error=f"{error} (attempt {self.attempt} of {max_attempts}; giving up)",
                pending=pending,
            )


async def run_worker(
    nats: NatsClient,
    settings: Settings,
    *,
    worker_id: str,
    tags: Sequence[str],
    concurrency: int = 4,
    flow_resolver: Callable[..., Any] | str | None = None,
    allowed_modules: Sequence[str] = (),
    stop: trio.Event | None = None,
    poll_timeout: float | None = None,
    task_status: trio.TaskStatus[WorkerActor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one worker actor until ``stop`` is set, then drain gracefully and return.

    Args:
        worker_id: the registry key and ``run.claimed``'s worker; must be a subject token.
        tags: the tags to serve (OR semantics; CSV entries are split); default ``[default_tag]``.
        concurrency: runs in flight at once (= warm child processes).
        flow_resolver: ``module:function`` / ``path.py:function`` or an importable function that
            maps a flow name to a pyoco ``Flow`` (raising KeyError for unknown names).  It is
            called in the child processes, never in the worker.
        allowed_modules: module prefixes YAML ``callable:`` entries may import (``*``: any);
            merged with ``settings.allowed_modules``.
        stop: set it to drain and return (``None``: run until cancelled).
        poll_timeout: long-poll duration of a fetch (default ``settings.worker_poll_timeout``).

    ``task_status.started(actor)`` fires once the consumers are bound and polling.

    Raises:
        ValueError: bad tags, worker id, resolver, or an allowed module that can never be allowed.
        InfraError: NATS is unavailable at start-up.
    """
    if not subjects.is_token(worker_id):
        raise ValueError(f"invalid worker id {worker_id!r}: letters, digits, '_' and '-' only")
    tag_list = normalize_tags(tags, settings.default_tag)
    spec = resolver_spec(flow_resolver)
    allowed = check_allowed_modules([*settings.allowed_modules, *allowed_modules])
    check_env_names(settings.worker_expose_env)
    scratch_root = Path(tempfile.mkdtemp(prefix=f"pyoco-worker-{worker_id}-"))
    actor = WorkerActor(
        nats,
        settings,
        worker_id=worker_id,
        tags=tag_list,
        concurrency=max(1, concurrency),
        flow_resolver=spec,
        allowed_modules=allowed,
        poll_timeout=poll_timeout if poll_timeout is not None else settings.worker_poll_timeout,
        drain_timeout=settings.worker_drain_timeout,
        scratch_root=scratch_root,
    )
    for tag in tag_list:
        await nats.ensure_pull_consumer(subjects.WORK_STREAM, subjects.work_durable(tag), consumer_config(tag, settings))
    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(actor.pool.warm)
            await actor.write_registry(STATE_IDLE)
            async with trio.open_nursery() as service:
                service.start_soon(actor.heartbeat_loop)
                service.start_soon(actor.progress_loop)
                service.start_soon(actor._reader.run)
                service.start_soon(actor._appender.run)
                async with trio.open_nursery() as acks:
                    acks.start_soon(actor.ack_loop)
                    async with trio.open_nursery() as runs:
                        runs.start_soon(actor.cancel_watch_loop, runs)
                        async with _bound(nats, tag_list, settings) as psubs:
                            async with trio.open_nursery() as pulls:
                                for tag, psub in psubs:
                                    pulls.start_soon(actor.pull_loop, tag, psub, runs)
                                task_status.started(actor)
                                if stop is None:
                                    await trio.sleep_forever()
                                else:
                                    await stop.wait()
                                await actor.drain()
                                # the pull loops end on their own (within one poll), so no pull
                                # request is left lingering on the server to capture an item
                        runs.cancel_scope.cancel()  # only what outlived the drain and the release
                    actor._ack_send.close()  # the ack loop flushes what is left, then ends
                service.cancel_scope.cancel()
            with trio.move_on_after(5), trio.CancelScope(shield=True):
                try:
                    await actor.write_registry(STATE_STOPPED)
                except PyocoError as exc:
                    log.warning("could not write STOPPED_GRACEFUL: %s", exc)
            outer.cancel_scope.cancel()
    finally:
        await actor.pool.aclose()
        shutil.rmtree(scratch_root, ignore_errors=True)


class _bound:
    """Bind one pull subscription per tag (an async context manager over several)."""

    def __init__(self, nats: NatsClient, tags: Sequence[str], settings: Settings) -> None:
        self.nats = nats
        self.tags = tags
        self.settings = settings
        self._stack: Any = None

    async def __aenter__(self) -> list[tuple[str, PullSubscription]]:
        from contextlib import AsyncExitStack

        self._stack = AsyncExitStack()
        out = []
        for tag in self.tags:
            psub = await self._stack.enter_async_context(
                self.nats.pull_subscription(
                    subjects.WORK_STREAM, subjects.work_durable(tag), recreate=consumer_config(tag, self.settings)
                )
            )
            out.append((tag, psub))
        return out

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)


__all__ = ["Job", "WorkerActor", "normalize_tags", "run_worker"]
