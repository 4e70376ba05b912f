"""The reaper: no run stays RUNNING or CANCELLING forever.

It watches the runs bucket (keeping only active runs) and the workers registry, and judges
leases only by what it observed itself, on its own monotonic clock: never by comparing its clock
with times a worker stamped (issue 11: a worker 20 s behind had every run failed as lost; 60 s
ahead, a dead one was noticed after 74 s).  Each attempt gets a full lease from the moment the
reaper first sees it (so a restarted reaper does not condemn everything it has not watched yet),
and a worker is alive while the reaper sees its registry record *change* (a new KV revision).
An attempt is lost when, at least one lease after the reaper first saw it,

* its worker's record has not changed for a lease (missing, frozen, cut off), or
* the worker's record keeps changing but has not listed the attempt for a lease (the worker
  restarted, or forgot the run), or says ``STOPPED_GRACEFUL`` without it.

While the reaper itself cannot see (a watch is down, NATS does not answer a round trip, or its
own loop stalled), it judges nothing, and afterwards every worker and attempt gets a fresh full
lease: a NATS blip that stops heartbeats from being written never condemns a healthy worker.  A lost RUNNING attempt is
retried (bounded by ``max_attempts``) or failed with reason ``worker_lost``; a lost CANCELLING run
is cancelled (``forced``).  A CANCELLING run whose worker is alive but never ends it is
force-cancelled after the grace period plus two leases, counted from when the reaper saw the run
CANCELLING.  Decisions go through :class:`RunStore`, so two reapers never double-count: the
loser's re-decision is a no-op.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..config import Settings
from ..core import decide
from ..core.errors import PyocoError
from ..core.events import Producer
from ..core.model import RunStatus
from ..nats import subjects
from ..nats.client import NatsClient
from ..service import RunStore
from ..watch import BucketFollower
from .deadline import Deadlines

log = logging.getLogger(__name__)

ACTIVE = (RunStatus.RUNNING, RunStatus.CANCELLING)  # RunStatus is a str: the KV docs compare equal
STOPPED = "STOPPED_GRACEFUL"
PULSE_KEY = "_reaper_pulse"  # never written: reading it is a cheap round trip


@attrs.frozen
class ActiveRun:
    run_id: str
    status: str
    attempt: int
    worker_id: str | None
    lease: float


@attrs.frozen
class Sight:
    """What the reaper observed about one attempt, on its own monotonic clock."""

    attempt_seen: float  # first saw the attempt active
    worker_changed: float | None  # last saw the worker's record change (None: never saw a record)
    unlisted_since: float | None  # since when the worker's changing record has not listed the attempt


def listed(worker: dict[str, Any], run: ActiveRun) -> bool:
    """The worker's record lists ``run``'s attempt (``runs`` maps run id to its highest attempt
    held by that worker)."""
    runs = worker.get("runs")
    return isinstance(runs, dict) and runs.get(run.run_id) == run.attempt


def lost_reason(run: ActiveRun, worker: dict[str, Any] | None, sight: Sight, now: float) -> str | None:
    """Why ``run``'s attempt is lost, or None while its worker still holds it (pure; all times
    are the reaper's monotonic clock)."""
    if now - sight.attempt_seen < run.lease:
        return None
    silent = now - max(sight.attempt_seen, sight.worker_changed or sight.attempt_seen)
    if silent >= run.lease:
        if worker is None:
            return f"worker {run.worker_id} has no registry record (seen by the reaper for {silent:.1f}s)"
        return f"worker {run.worker_id} sent no heartbeat for {silent:.1f}s (lease {run.lease:g}s)"
    if worker is None:
        return None
    if worker.get("state") == STOPPED and not listed(worker, run):
        return f"worker {run.worker_id} stopped without finishing the run"
    if sight.unlisted_since is not None and now - sight.unlisted_since >= run.lease:
        return f"worker {run.worker_id} has not listed this attempt for {now - sight.unlisted_since:.1f}s"
    return None


class Reaper:
    def __init__(
        self,
        nats: NatsClient,
        settings: Settings,
        *,
        conductor_id: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = RunStore(nats, clock=clock)
        self.settings = settings
        self.clock = clock  # only for the timestamps of the events it appends
        self.monotonic = monotonic  # every judgement
        self.producer = Producer(kind="conductor", id=conductor_id)
        self.active: dict[str, ActiveRun] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.worker_rev: dict[str, int] = {}
        self.worker_changed: dict[str, float] = {}
        self.attempt_seen: dict[tuple[str, int], float] = {}
        self.unlisted_since: dict[tuple[str, int], float] = {}
        self.cancelling_seen: dict[str, float] = {}
        self.lost_total = 0
        self.forced_total = 0
        self.deadlines = Deadlines()  # runs with a timeout_sec (issue 16), PENDING ones too

    def _forget_run(self, run_id: str) -> None:
        run = self.active.pop(run_id, None)
        self.cancelling_seen.pop(run_id, None)
        if run is not None:
            self.attempt_seen.pop((run_id, run.attempt), None)
            self.unlisted_since.pop((run_id, run.attempt), None)

    def _note_listing(self, run: ActiveRun, now: float) -> None:
        worker = self.workers.get(run.worker_id or "")
        key = (run.run_id, run.attempt)
        if worker is not None and listed(worker, run):
            self.unlisted_since.pop(key, None)
        else:
            self.unlisted_since.setdefault(key, now)

    def on_run(self, key: str, value: bytes | None) -> None:
        try:
            doc = json.loads(value) if value else None
        except ValueError:
            doc = None  # undecodable: not ours to judge (the projector records it)
        self.deadlines.note(key, doc if isinstance(doc, dict) else None)
        if not isinstance(doc, dict) or doc.get("status") not in ACTIVE:
            self._forget_run(key)
            return
        try:
            run = ActiveRun(
                run_id=key,
                status=str(doc["status"]),
                attempt=int(doc.get("attempt") or 1),
                worker_id=doc.get("worker_id") if isinstance(doc.get("worker_id"), str) else None,
                lease=float(doc.get("lease_seconds") or self.settings.run_lease_seconds),
            )
        except (TypeError, ValueError):
            self._forget_run(key)
            return
        old = self.active.get(key)
        if old is not None and old.attempt != run.attempt:
            self._forget_run(key)
        now = self.monotonic()
        self.active[key] = run
        if (key, run.attempt) not in self.attempt_seen:
            self.attempt_seen[(key, run.attempt)] = now
            self._note_listing(run, now)
        if run.status == RunStatus.CANCELLING:
            self.cancelling_seen.setdefault(key, now)

    def on_worker(self, key: str, value: bytes | None, revision: int = 0) -> None:
        now = self.monotonic()
        if revision and self.worker_rev.get(key) == revision:
            return  # the same record again (a restarted watch): no sign of life
        self.worker_rev[key] = revision
        self.worker_changed[key] = now
        doc = None
        if value:
            try:
                doc = json.loads(value)
            except ValueError:
                doc = None
        if isinstance(doc, dict):
            self.workers[key] = doc
        else:
            self.workers.pop(key, None)
        for run in self.active.values():
            if run.worker_id == key:
                self._note_listing(run, now)

    def forget_worker(self, key: str) -> None:
        self.workers.pop(key, None)
        self.worker_rev.pop(key, None)

    def rebase(self) -> None:
        """After a time the reaper could not see (a watch was down, its loop stalled): give every
        worker and attempt a full lease from now rather than judge what it did not observe."""
        now = self.monotonic()
        for table in (self.worker_changed, self.attempt_seen, self.unlisted_since, self.cancelling_seen):
            for key in table:
                table[key] = now  # type: ignore[index]

    def sight(self, run: ActiveRun, now: float) -> Sight:
        key = (run.run_id, run.attempt)
        return Sight(
            attempt_seen=self.attempt_seen.setdefault(key, now),
            worker_changed=self.worker_changed.get(run.worker_id or ""),
            unlisted_since=self.unlisted_since.get(key),
        )

    async def sweep(self) -> int:
        """Judge every active run once; returns how many decisions were appended."""
        now = self.monotonic()
        acted = await self.deadlines.sweep(self.store, self.producer, self.clock) if self.deadlines.due else 0
        for run in list(self.active.values()):
            reason = lost_reason(run, self.workers.get(run.worker_id or ""), self.sight(run, now), now)
            try:
                if reason is not None:
                    log.warning("run %s attempt %d: %s", run.run_id, run.attempt, reason, extra={"run_id": run.run_id})
                    out = await self.store.execute(
                        run.run_id,
                        lambda s, r=run, why=reason: decide.mark_worker_lost(
                            s, run_id=r.run_id, attempt=r.attempt, detected_by=f"{self.producer.kind}:{self.producer.id}",
                            now=self.clock(), detail=why,
                        ),
                        producer=self.producer,
                    )
                    if out.appended:
                        self.lost_total += 1
                        acted += 1
                        self._forget_run(run.run_id)
                elif (
                    run.status == RunStatus.CANCELLING
                    and now - self.cancelling_seen.setdefault(run.run_id, now) > self.settings.cancel_grace_period + 2 * run.lease
                ):
                    out = await self.store.execute(
                        run.run_id, lambda s, r=run: decide.force_cancel(s, run_id=r.run_id, now=self.clock()), producer=self.producer
                    )
                    if out.appended:
                        self.forced_total += 1
                        acted += 1
                        self._forget_run(run.run_id)
            except PyocoError as exc:
                log.warning("reaper could not judge run %s: %s", run.run_id, exc, extra={"run_id": run.run_id})
        return acted


async def run_reaper(
    nats: NatsClient,
    settings: Settings,
    *,
    conductor_id: str = "conductor",
    interval: float | None = None,
    task_status: trio.TaskStatus[Reaper] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sweep until cancelled.  Both buckets are followed with :class:`BucketFollower`, so the
    watches survive a NATS restart (nats-py's own watcher does not)."""
    reaper = Reaper(nats, settings, conductor_id=conductor_id)
    tick = interval if interval is not None else max(0.1, min(1.0, settings.run_lease_seconds / 4))
    # A loop that wakes up much later than asked was not looking (frozen, starved): rebase.
    stall = max(2 * tick, settings.run_lease_seconds / 2)

    def forget_runs(present: set[str]) -> None:
        for key in set(reaper.active) - present:
            reaper._forget_run(key)
        for key in set(reaper.deadlines.due) - present:
            reaper.deadlines.note(key, None)

    def forget_workers(present: set[str]) -> None:
        for key in set(reaper.workers) - present:
            reaper.forget_worker(key)

    runs = BucketFollower(nats, subjects.RUNS_BUCKET, lambda e: reaper.on_run(e.key, e.value), forget_runs)
    workers = BucketFollower(nats, subjects.WORKERS_BUCKET, lambda e: reaper.on_worker(e.key, e.value, e.revision), forget_workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(runs.run)
        await nursery.start(workers.run)
        await runs.ready.wait()
        await workers.ready.wait()
        task_status.started(reaper)
        seen_restarts = (runs.restarts, workers.restarts)
        last_sight = trio.current_time()
        while True:
            if runs.watching and workers.watching and await _pulse(nats):
                if trio.current_time() - last_sight > stall or (runs.restarts, workers.restarts) != seen_restarts:
                    # NATS was frozen or away, a watch restarted, or this loop stalled: what
                    # happened meanwhile was not observed, so nobody is judged on it.
                    log.info("reaper regained sight of the registry: every lease starts afresh")
                    reaper.rebase()
                    seen_restarts = (runs.restarts, workers.restarts)
                else:
                    await reaper.sweep()
                last_sight = trio.current_time()
            await trio.sleep(tick)


async def _pulse(nats: NatsClient) -> bool:
    """One request to the server: is what the watches deliver current right now?  (A KV read of
    a key nobody writes, bounded by the client's own request timeout: cancelling a flush from
    outside leaves nats-py's PONG bookkeeping broken.)"""
    try:
        await nats.kv_get(subjects.WORKERS_BUCKET, PULSE_KEY)
    except PyocoError:
        return False
    return True
