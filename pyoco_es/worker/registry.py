"""The worker's registry record (KV ``pyoco_workers``) and its heartbeat.

The record (:class:`~pyoco_es.core.work.WorkerRecord`) says which attempts this worker holds;
the reaper keeps their leases alive while the record keeps changing.  Writes are compare-and-swap
on the KV revision, re-reading on a conflict so a concurrent ``hidden`` PATCH from a gateway is
kept rather than overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio

from ..config import Settings
from ..core.codec import dumps
from ..core.errors import ConcurrencyConflict, PyocoError
from ..core.work import WORKER_IDLE, WORKER_RUNNING, LastRun, WorkerRecord
from ..nats import subjects
from ..nats.client import NatsClient

log = logging.getLogger(__name__)

HEARTBEAT_RETRY: Final = 1.0  # after a failed heartbeat write
CAS_ATTEMPTS: Final = 5  # conflicting writes in a row before waiting for the next heartbeat


class Registry:
    """This worker's record: the attempts it holds, the run it finished last, the CAS writes.

    Attempts are keyed by (run, attempt) and counted: a redelivered copy of an item may be in
    flight next to the first, and a stale attempt never hides the live one.
    """

    def __init__(
        self,
        nats: NatsClient,
        settings: Settings,
        *,
        worker_id: str,
        instance_id: str,
        tags: Sequence[str],
        concurrency: int,
        clock: Callable[[], float],
    ) -> None:
        self.nats = nats
        self.settings = settings
        self.worker_id = worker_id
        self.instance_id = instance_id
        self.tags = tuple(tags)
        self.concurrency = concurrency
        self.clock = clock
        self.runs: dict[tuple[str, int], int] = {}  # attempts for the heartbeat (set before the claim)
        self.completed = 0
        # Called with each finished run id (pyoco_es.backend.PyocoNatsWorker.run_once); must not block.
        self.on_finished: Callable[[str], object] | None = None
        self._last_run: LastRun | None = None
        self._revision: int | None = None
        self._hidden = False
        self._wheel_sync: dict[str, Any] | None = None
        self._wheel_sync_owned = False  # set by the wheel sync: never taken from the stored record
        self.log_lines_dropped: Callable[[], int] = lambda: 0  # task output lines dropped (worker/logship.py)
        self._beat_soon = trio.Event()  # set when the first run is taken: beat now, not at the idle pace

    # -- what the record says -------------------------------------------------------------------

    def hold(self, key: tuple[str, int]) -> None:
        """Count an attempt in ``runs`` (before its claim: the reaper trusts our heartbeat)."""
        if not self.runs:
            self._beat_soon.set()  # the idle interval may be longer than the run's lease
        self.runs[key] = self.runs.get(key, 0) + 1

    def unhold(self, key: tuple[str, int]) -> bool:
        """Uncount an attempt; True when no copy of it is held any more."""
        self.runs[key] -= 1
        if self.runs[key]:
            return False
        del self.runs[key]
        return True

    def record_finished(self, run_id: str, status: str | None, started_at: float) -> None:
        self.completed += 1
        self._last_run = LastRun(run_id=run_id, status=status, started_at=started_at, finished_at=self.clock())
        if self.on_finished is not None:
            self.on_finished(run_id)

    def set_wheel_sync(self, state: dict[str, Any]) -> None:
        """The ``wheel_sync`` object the next write carries (worker/wheels.py)."""
        self._wheel_sync = state
        self._wheel_sync_owned = True

    def heartbeat_runs(self) -> dict[str, int]:
        """``runs`` of the registry record: run id -> the highest attempt this worker holds (a
        stale lower attempt never hides the live one)."""
        out: dict[str, int] = {}
        for run_id, attempt in self.runs:
            out[run_id] = max(attempt, out.get(run_id, 0))
        return out

    def record(self, state: str, now: float) -> WorkerRecord:
        return WorkerRecord(
            worker_id=self.worker_id,
            instance_id=self.instance_id,
            state=state,
            hidden=self._hidden,
            tags=self.tags,
            now=now,
            runs=self.heartbeat_runs(),
            last_run=self._last_run,
            wheel_sync=self._wheel_sync,
            concurrency=self.concurrency,
            completed_runs=self.completed,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            log_lines_dropped=self.log_lines_dropped(),
        )

    # -- writing it -----------------------------------------------------------------------------

    async def _reread(self) -> None:
        entry = await self.nats.kv_get(subjects.WORKERS_BUCKET, self.worker_id)
        if entry is None or not entry.value:
            self._revision = 0
            return
        self._revision = entry.revision
        try:
            old = json.loads(entry.value)
        except ValueError:
            return
        if isinstance(old, dict):
            self._hidden = bool(old.get("hidden", False))
            if isinstance(old.get("wheel_sync"), dict) and not self._wheel_sync_owned:
                self._wheel_sync = old["wheel_sync"]

    async def write(self, state: str | None = None) -> None:
        """Write the record with compare-and-swap, keeping a concurrent ``hidden`` PATCH.

        Raises:
            InfraError: NATS failed (the heartbeat retries soon).
        """
        state = state or (WORKER_RUNNING if self.runs else WORKER_IDLE)
        for _ in range(CAS_ATTEMPTS):
            if self._revision is None:
                await self._reread()
            value = dumps(self.record(state, self.clock()).to_json())
            try:
                self._revision = await self.nats.kv_update(
                    subjects.WORKERS_BUCKET, self.worker_id, value, last=self._revision or 0
                )
                return
            except ConcurrencyConflict:
                self._revision = None  # someone else wrote (a hidden PATCH): re-read, merge
        log.warning("registry write for %s kept conflicting; will retry at the next heartbeat", self.worker_id)

    def heartbeat_interval(self) -> float:
        base = self.settings.worker_heartbeat_interval
        if self.runs:
            return max(0.1, min(base, self.settings.run_lease_seconds / 3))
        return base

    async def run_heartbeat(self) -> None:
        """Write the record every interval (faster while holding runs, soon after a failure)."""
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
                await self.write()
                failed = False
            except PyocoError as exc:
                log.warning("heartbeat failed: %s", exc)
                failed = True


__all__ = ["Registry"]
