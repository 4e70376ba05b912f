"""The reaper: no run stays RUNNING or CANCELLING forever.

It watches the runs bucket (keeping only active runs) and the workers registry.  An attempt is
lost when, one lease after its claim, its worker's registry record is missing, stopped, older
than the lease, or no longer lists the run.  A lost RUNNING attempt is retried (bounded by
``max_attempts``) or failed with reason ``worker_lost``; a lost CANCELLING run is cancelled
(``forced``).  A CANCELLING run whose worker is alive but never ends it is force-cancelled after
the grace period plus two leases.  Decisions go through :class:`RunStore`, so two reapers never
double-count: the loser's re-decision is a no-op.
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
from ..nats import subjects
from ..nats.client import NatsClient
from ..service import RunStore
from ..watch import BucketFollower

log = logging.getLogger(__name__)

ACTIVE = ("RUNNING", "CANCELLING")


@attrs.frozen
class ActiveRun:
    run_id: str
    status: str
    attempt: int
    worker_id: str | None
    claimed_at: float
    lease: float
    cancel_requested_at: float | None


def lost_reason(run: ActiveRun, worker: dict[str, Any] | None, now: float) -> str | None:
    """Why ``run``'s attempt is lost, or None while its worker still holds it (pure)."""
    if now - run.claimed_at < run.lease:
        return None
    if worker is None:
        return f"worker {run.worker_id} has no registry record"
    if worker.get("state") == "STOPPED_GRACEFUL":
        return f"worker {run.worker_id} stopped without finishing the run"
    beat = worker.get("last_heartbeat_at") or worker.get("heartbeat_at") or 0.0
    if now - float(beat) > run.lease:
        return f"worker {run.worker_id} missed heartbeats for {now - float(beat):.1f}s (lease {run.lease:g}s)"
    runs = worker.get("runs")
    if isinstance(runs, dict) and float(beat) > run.claimed_at + 1.0 and runs.get(run.run_id) != run.attempt:
        return f"worker {run.worker_id} no longer runs this attempt"
    return None


class Reaper:
    def __init__(self, nats: NatsClient, settings: Settings, *, conductor_id: str, clock: Callable[[], float] = time.time) -> None:
        self.store = RunStore(nats, clock=clock)
        self.settings = settings
        self.clock = clock
        self.producer = Producer(kind="conductor", id=conductor_id)
        self.active: dict[str, ActiveRun] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.lost_total = 0
        self.forced_total = 0

    def on_run(self, key: str, value: bytes | None) -> None:
        if not value:
            self.active.pop(key, None)
            return
        try:
            doc = json.loads(value)
        except ValueError:
            return
        if doc.get("status") not in ACTIVE:
            self.active.pop(key, None)
            return
        self.active[key] = ActiveRun(
            run_id=key,
            status=doc["status"],
            attempt=int(doc.get("attempt") or 1),
            worker_id=doc.get("worker_id"),
            claimed_at=float(doc.get("claimed_at") or doc.get("start_time") or doc.get("updated_at") or 0.0),
            lease=float(doc.get("lease_seconds") or self.settings.run_lease_seconds),
            cancel_requested_at=doc.get("cancel_requested_at"),
        )

    def on_worker(self, key: str, value: bytes | None) -> None:
        if not value:
            self.workers.pop(key, None)
            return
        try:
            self.workers[key] = json.loads(value)
        except ValueError:
            pass

    async def sweep(self) -> int:
        """Judge every active run once; returns how many decisions were appended."""
        now = self.clock()
        acted = 0
        for run in list(self.active.values()):
            reason = lost_reason(run, self.workers.get(run.worker_id or ""), now)
            try:
                if reason is not None:
                    log.warning("run %s attempt %d: %s", run.run_id, run.attempt, reason, extra={"run_id": run.run_id})
                    out = await self.store.execute(
                        run.run_id,
                        lambda s, r=run: decide.mark_worker_lost(
                            s, run_id=r.run_id, attempt=r.attempt, detected_by=f"{self.producer.kind}:{self.producer.id}", now=self.clock()
                        ),
                        producer=self.producer,
                    )
                    if out.appended:
                        self.lost_total += 1
                        acted += 1
                        self.active.pop(run.run_id, None)
                elif (
                    run.status == "CANCELLING"
                    and run.cancel_requested_at is not None
                    and now - float(run.cancel_requested_at) > self.settings.cancel_grace_period + 2 * run.lease
                ):
                    out = await self.store.execute(
                        run.run_id, lambda s, r=run: decide.force_cancel(s, run_id=r.run_id, now=self.clock()), producer=self.producer
                    )
                    if out.appended:
                        self.forced_total += 1
                        acted += 1
                        self.active.pop(run.run_id, None)
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

    def forget_runs(present: set[str]) -> None:
        for key in set(reaper.active) - present:
            del reaper.active[key]

    def forget_workers(present: set[str]) -> None:
        for key in set(reaper.workers) - present:
            del reaper.workers[key]

    runs = BucketFollower(nats, subjects.RUNS_BUCKET, lambda e: reaper.on_run(e.key, e.value), forget_runs)
    workers = BucketFollower(nats, subjects.WORKERS_BUCKET, lambda e: reaper.on_worker(e.key, e.value), forget_workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(runs.run)
        await nursery.start(workers.run)
        await runs.ready.wait()
        await workers.ready.wait()
        task_status.started(reaper)
        while True:
            if runs.watching and workers.watching:
                await reaper.sweep()
            await trio.sleep(tick)
