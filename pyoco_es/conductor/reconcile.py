"""The reconcile: work items are derived state, so missing ones are derived again.

A PENDING run needs a work item for its current attempt in ``PYOCO_WORK``.  One can go missing:
the work stream was purged or deleted, a publish was lost between the append and it (the
gateway's fast path is fire-and-forget), an item was dropped.  Every ``interval`` seconds (and
once at start) the reconcile:

1. recreates deleted streams and buckets (:func:`ensure_resources`, a few info requests);
2. takes the runs known to be PENDING for at least ``min_age`` seconds: from the projector
   (which sees every run it folds), plus, at start, every PENDING snapshot in ``pyoco_runs``
   (the only full read, once; it never scans the event history);
3. reads the items waiting on those runs' tags, and for a run without one reads the run's events
   (the truth, not a snapshot) and, if it is still PENDING at that attempt, publishes its item.

It cannot double-dispatch: the item's ``Nats-Msg-Id`` is ``<run_id>:<attempt>`` (JetStream drops a
copy within its duplicate window; after a purge inside the window the id is taken, so the item
goes out as ``<run_id>:<attempt>:r<n>``), and a worker claims an attempt with an expected-sequence
append, so a second item for the same attempt finds the run claimed and is dropped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..core.errors import CorruptStreamError, PyocoError
from ..core.events import RunSubmitted
from ..core.fold import fold
from ..core.model import RunStatus
from ..core.work import WorkItem
from ..nats import subjects
from ..nats.client import NatsClient
from .projector import Projector

log = logging.getLogger(__name__)


@attrs.frozen
class ReconcileStatistics:
    sweeps: int
    republished: int
    last_error: str | None


class Reconciler:
    def __init__(
        self,
        nats: NatsClient,
        projector: Projector,
        *,
        work_prefix: str = subjects.WORK_PREFIX,
        min_age: float = 2.0,
        heal: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.nats = nats
        self.projector = projector
        self.work_prefix = work_prefix
        self.min_age = min_age
        self.heal = heal
        self.found_at_start: dict[str, tuple[str, int, float]] = {}
        self._rounds: dict[str, int] = {}  # run:attempt -> re-publishes whose id was taken
        self.sweeps = 0
        self.republished = 0
        self.last_error: str | None = None

    def statistics(self) -> ReconcileStatistics:
        return ReconcileStatistics(sweeps=self.sweeps, republished=self.republished, last_error=self.last_error)

    async def load_pending(self) -> int:
        """Once at start: the PENDING runs in the runs bucket (runs this projector never saw)."""
        since = time.monotonic() - self.min_age
        # One pass over the bucket's values (was a key listing, then a get per run).
        async with self.nats.kv_batches(subjects.RUNS_BUCKET) as batches:
            async for entries in batches:
                for entry in entries:
                    self.found_at_start.pop(entry.key, None)  # a later revision of a key decides
                    if not entry.value:
                        continue
                    try:
                        doc = json.loads(entry.value)
                        if doc.get("status") == RunStatus.PENDING.value:
                            self.found_at_start[entry.key] = (str(doc["tag"]), int(doc.get("attempt") or 1), since)
                    except (ValueError, KeyError, TypeError):
                        continue
        return len(self.found_at_start)

    def _candidates(self) -> dict[str, tuple[str, int]]:
        now = time.monotonic()
        out: dict[str, tuple[str, int]] = {}
        for source in (self.found_at_start, self.projector.pending_runs):
            for run_id, (tag, attempt, since) in list(source.items()):
                if now - since >= self.min_age:
                    out[run_id] = (tag, attempt)
        return out

    async def sweep(self) -> int:
        """One pass; returns how many work items were published again."""
        self.sweeps += 1
        if self.heal is not None:
            await self.heal()
        candidates = self._candidates()
        if not candidates:
            return 0
        live: set[tuple[str, int]] = set()
        for tag in sorted({tag for tag, _ in candidates.values()}):
            live.update(await self.nats.work_items(subjects.work_subject(tag, self.work_prefix)))
        missing = [r for r, (_tag, attempt) in candidates.items() if (r, attempt) not in live]
        for run_id in set(candidates) - set(missing):
            self.found_at_start.pop(run_id, None)  # it has its item; the projector follows it from here
        if not missing:
            return 0
        publishes: list[tuple[str, bytes, str | None, dict[str, str] | None]] = []
        ids: list[str] = []
        for run_id, events in zip(missing, await self.nats.read_runs(missing), strict=True):
            if isinstance(events, PyocoError):
                log.warning("reconcile: cannot read run %s: %s", run_id, events, extra={"run_id": run_id})
                continue
            try:
                snap = fold(None, events)
            except CorruptStreamError:
                continue  # the projector has it as not projectable
            if snap is None or snap.status is not RunStatus.PENDING or not isinstance(events[0].event, RunSubmitted):
                # Moved on (its later events went to another conductor's projector): forget it.
                self.found_at_start.pop(run_id, None)
                self.projector.pending_runs.pop(run_id, None)
                continue
            key = subjects.work_msg_id(run_id, snap.attempt)
            rounds = self._rounds.get(key, 0)
            publishes.append(
                (
                    subjects.work_subject(snap.tag, self.work_prefix),
                    WorkItem.for_attempt(events[0].event, run_id=run_id, attempt=snap.attempt, run_version=snap.version, run_last_stream_seq=snap.last_stream_seq).to_json(),
                    key if not rounds else f"{key}:r{rounds}",
                    None,
                )
            )
            ids.append(key)
        done = 0
        for key, res in zip(ids, await self.nats.publish_many(publishes), strict=True):
            if isinstance(res, PyocoError):
                log.warning("reconcile: cannot publish the work item %s: %s", key, res)
            elif res.duplicate:
                # The id is inside the duplicate window but the item is gone (a purge): the
                # next sweep sends it under a fresh id.
                self._rounds[key] = self._rounds.get(key, 0) + 1
            else:
                done += 1
                log.warning("reconcile: run %s had no work item; published it again", key.split(":", 1)[0])
        self.republished += done
        if len(self._rounds) > 100_000:
            self._rounds.clear()
        return done


async def run_reconciler(
    reconciler: Reconciler,
    *,
    interval: float,
    task_status: trio.TaskStatus[Reconciler] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reconcile once at start (after loading the PENDING runs) and then every ``interval``
    seconds, until cancelled.  NATS errors are logged and the next pass tries again."""
    started = False
    loaded = False
    while True:
        try:
            if not loaded:
                await reconciler.load_pending()
                loaded = True
            await reconciler.sweep()
            reconciler.last_error = None
        except PyocoError as exc:
            reconciler.last_error = exc.message
            log.warning("reconcile: %s; trying again in %gs", exc.message, interval)
        if not started:
            task_status.started(reconciler)
            started = True
        await trio.sleep(interval)
