"""The worker actor: a work item in, a claimed attempt out (decode → child prepare → claim),
handed to a :class:`~.attempt.RunDriver`, then settled (ack, NAK or TERM).

Its parts live next door: :mod:`.intake` (pull loops, acks, in-progress acks), :mod:`.registry`
(the record and its heartbeat), :mod:`.attempt` (driving a claimed attempt to its end),
:mod:`.batch` (batched reads and appends), :mod:`.pool` (warm child processes) and
:mod:`.supervisor` (``run_worker``: who starts what, and the stop order).

Life of a work item (``pyoco.work.<tag>``, ``Nats-Msg-Id = run_id:attempt``):

1. A tag's pull loop long-polls its shared durable consumer when the worker has room (no busy
   polling; every tag asks for its share of the free room, so no tag starves another).
2. The run task decodes the item (:class:`~pyoco_es.core.work.WorkItem`; invalid → DLQ ``invalid_job`` + TERM), takes a warm child and
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
``STOPPED_GRACEFUL`` and return.  What follows the drain (the releases, the last acks, the
registry write) shares one budget, :data:`~.stopping.HANDBACK_WAIT`: with NATS gone or frozen the worker
still exits, logging what it could not hand back (nothing is lost: an unreleased run is re-delivered
when its lease expires, an unsent ack's item is redelivered and found obsolete).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import trio

from ..logs import INVALID_JOB, NATS_UNAVAILABLE, ids as log_ids, untrusted
from ..config import Settings
from ..core import decide
from ..core.codec import dumps
from ..core.errors import CorruptStreamError, InfraError, PayloadTooLarge, PyocoError, RunNotFound, StaleAttempt
from ..core.events import Envelope, Event, Producer, RunFailed
from ..core.model import RunSnapshot, RunStatus
from ..core.work import InvalidWorkItem, WorkItem
from ..nats import subjects
from ..nats.client import Delivered, NatsClient, OnStored
from ..service import Outcome, RunStore
from .attempt import CANCEL_WATCH_DELAY, LOST, ActiveAttempt, RunDriver
from .batch import BatchedRunStore
from .intake import Intake
from .logship import LogShipper
from .pool import ChildDied, ChildPool, ChildProcess, ChildProtocolError
from .protocol import Abort, Go, Prepare
from .registry import Registry
from .stopping import HANDBACK_WAIT, wait_drained
from .wheels import WheelSync

log = logging.getLogger(__name__)

NAK_DELAY: Final = 2.0


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
        clock: Callable[[], float],
    ) -> None:
        self.nats = nats
        self.settings = settings
        self.worker_id = worker_id
        self.tags = tuple(tags)
        self.drain_timeout = drain_timeout
        self.handback_by = math.inf  # the hand-back's deadline (Trio time), set when the drain ends
        self.instance_id = uuid.uuid4().hex
        self.clock = clock  # wall clock for stamps; nothing judges liveness from it (tests skew it)
        self.store = RunStore(nats, clock=clock)
        self.pool = ChildPool(
            size=concurrency,
            scratch_root=scratch_root,
            allowed_modules=allowed_modules,
            flow_resolver=flow_resolver,
            max_output_bytes=settings.max_output_bytes,
            expose_env=settings.worker_expose_env,
        )
        # Keyed by (run, attempt): a stale attempt still winding down (its worker was frozen past
        # its lease) must never touch the live attempt's entries (issue 11).
        self.active: dict[tuple[str, int], ActiveAttempt] = {}  # claimed attempts
        self.registry = Registry(
            nats, settings, worker_id=worker_id, instance_id=self.instance_id, tags=self.tags, concurrency=concurrency, clock=self.clock
        )
        self.intake = Intake(nats, settings, tags=self.tags, concurrency=concurrency, poll_timeout=poll_timeout)
        self.wheels = (
            WheelSync(nats, settings, tags=self.tags, pool=self.pool, registry=self.registry, clock=clock) if settings.wheel_sync_enabled else None
        )
        self._became_active = trio.Event()
        self._yaml_tasks: dict[str, list[str]] = {}  # sha256 -> task names a child reported
        self.batched = BatchedRunStore(nats, self.store, clock=clock)
        self.logship = LogShipper(nats, settings)  # task output → PYOCO_LOGS (worker/logship.py)
        self.registry.log_lines_dropped = lambda: self.logship.dropped_total

    @property
    def completed(self) -> int:
        """Attempts this worker has finished (whatever their outcome)."""
        return self.registry.completed

    @property
    def producer_kind(self) -> str:
        return "worker"

    def _producer(self, attempt: int) -> Producer:
        return Producer(kind="worker", id=self.worker_id, attempt=attempt)

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

    # -- one run --------------------------------------------------------------------------------

    async def process(self, msg: Delivered, tag: str) -> None:
        job: WorkItem | None = None
        try:
            try:
                job = WorkItem.from_json(msg.data)
            except InvalidWorkItem as exc:
                await self._invalid_job(msg, str(exc), run_id=exc.run_id, attempt=exc.attempt)
                return
            child = await self.pool.acquire()
            try:
                if self.intake.draining:
                    await self.intake.nak(msg, 0)
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
            await self.intake.nak(msg, NAK_DELAY)
        except Exception as exc:  # noqa: BLE001 - poison, not crash (DESIGN "Decisions")
            # Whatever this item carried made processing it fail in a way nothing above
            # foresaw (a value that cannot be encoded, a malformed frame ...).  Redelivering it
            # would fail the same way on every worker, so: TERM + DLQ + the run FAILED, and
            # this worker goes on serving.
            log.exception("poison work item on %s", msg.subject, extra=log_ids(INVALID_JOB))
            await self._invalid_job(
                msg,
                f"poison work item: {type(exc).__name__}: {str(exc)[:500]}",
                run_id=job.run_id if job else None,
                attempt=job.attempt if job else None,
            )
        finally:
            self.intake.finished(msg)

    async def _invalid_job(self, msg: Delivered, error: str, *, run_id: str | None = None, attempt: int | None = None) -> None:
        """TERM + DLQ a work item that cannot be processed; fail the run it names (if that run is
        still waiting for this attempt, or ours), so it does not stay PENDING or RUNNING."""
        log.error("invalid job on %s: %s", msg.subject, untrusted(error), extra=log_ids(INVALID_JOB, run_id=run_id))
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
        await self.intake.term(msg)
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

    async def _prepare_reply(self, job: WorkItem, child: ChildProcess) -> dict[str, Any]:
        reply = await child.receive()
        sha = job.workflow_yaml_sha256 if job.workflow_yaml is not None else None
        if reply.get("ev") == "prepared" and sha:
            child.known_docs.add(sha)
            if len(self._yaml_tasks) >= 1024:
                self._yaml_tasks.clear()
            self._yaml_tasks[sha] = list(reply.get("tasks") or [])
        return reply

    async def _load(self, run_id: str) -> RunSnapshot | None:
        snap = await self.batched.load(run_id)
        if snap is None:  # a work item names it, so it exists: on a cluster a replica may lag
            snap = await self.batched.store.load(run_id, from_leader=True)
        return snap

    async def read_events(self, run_id: str) -> list[Envelope]:
        """The run's events, read in a batch with other runs' reads (one bridge crossing).

        Raises:
            PyocoError: NATS failed or the stream is corrupt.
        """
        return await self.batched.read_events(run_id)

    async def execute(
        self,
        run_id: str,
        make: Callable[[RunSnapshot | None], Sequence[Event]],
        *,
        attempt: int,
        hint: RunSnapshot | None,
        on_stored: OnStored | None = None,
    ) -> Outcome:
        """:meth:`BatchedRunStore.execute` as this worker's ``attempt``."""
        return await self.batched.execute(run_id, make, producer=self._producer(attempt), hint=hint, on_stored=on_stored)

    async def _execute(self, job: WorkItem, msg: Delivered, child: ChildProcess) -> None:
        run_id, attempt = job.run_id, job.attempt
        sha = job.workflow_yaml_sha256 if job.workflow_yaml is not None else None
        known = self._yaml_tasks.get(sha) if sha else None
        pending = job.pending_snapshot()
        if known is not None and sha in child.known_docs and pending is not None:
            # The common case: a document this child has built before, and the run's position
            # is in the job.  Claim straight away; the claim's hook sends prepare and go together
            # (one write, one wake-up of the child) the moment the claim is stored.
            await self._claim_guarded(job, msg, child, None, pending, known, deferred=Prepare.for_item(job, known_docs=child.known_docs))
            return
        # The child prepares the flow while we read the run: the command goes out first, the
        # reply is read after the run's events came back.
        await child.send(Prepare.for_item(job, known_docs=child.known_docs))
        try:
            snap = pending or await self._load(run_id)
        except InfraError as exc:
            log.warning("run %s: NATS error before the claim (%s); NAK", run_id, exc, extra=log_ids(NATS_UNAVAILABLE, run_id=run_id))
            await self._prepare_reply(job, child)  # keep the pipe in step
            await self._abort(child, run_id)
            await self.intake.nak(msg, NAK_DELAY)
            return
        except CorruptStreamError as exc:
            log.error("run %s cannot be read (%s); dropping its work item", run_id, exc)
            await self._prepare_reply(job, child)
            await self._abort(child, run_id)
            self.intake.ack(msg)
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
            self.intake.ack(msg)  # obsolete: cancelled, claimed, or a later attempt is current
            return
        assert snap is not None
        await self._claim_guarded(job, msg, child, prep, snap, known, deferred=None)

    async def _claim_guarded(
        self,
        job: WorkItem,
        msg: Delivered,
        child: ChildProcess,
        prep: dict[str, Any] | None,
        snap: RunSnapshot,
        tasks: list[str],
        *,
        deferred: Prepare | None,
    ) -> None:
        key = (job.run_id, job.attempt)
        self.registry.hold(key)  # before the claim: the reaper trusts our heartbeat
        try:
            inbox = trio.open_memory_channel[tuple[str, Any]](math.inf)
            await self._claim_and_run(job, msg, child, prep, snap, tasks, inbox, deferred)
        finally:
            if self.registry.unhold(key):  # a redelivered copy of the same item may be in flight too
                self.active.pop(key, None)

    async def _unprepare(self, job: WorkItem, child: ChildProcess, prep: dict[str, Any] | None, deferred: Prepare | None) -> None:
        """After a failed claim: forget the child's prepared run (nothing to do if the prepare
        was never sent)."""
        if deferred is not None:
            return
        if prep is None:
            await self._prepare_reply(job, child)
        await self._abort(child, job.run_id)

    async def _abort(self, child: ChildProcess, run_id: str) -> None:
        try:
            await child.send(Abort(run_id))
        except ChildDied:
            pass

    async def _claim_and_run(
        self,
        job: WorkItem,
        msg: Delivered,
        child: ChildProcess,
        prep: dict[str, Any] | None,
        snap: RunSnapshot,
        tasks: list[str],
        inbox: tuple[trio.MemorySendChannel[tuple[str, Any]], trio.MemoryReceiveChannel[tuple[str, Any]]],
        deferred: Prepare | None,
    ) -> None:
        """Claim, then run.  ``prep`` is the child's prepare reply if already read; ``deferred``
        is a prepare command not sent yet (the claim's hook sends it with the go)."""
        run_id, attempt = job.run_id, job.attempt
        go_sent: list[bool] = []
        go = Go(run_id)

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
                    wheels=child.code.wheels,
                ),
                attempt=attempt,
                hint=snap,
                on_stored=go_now,
            )
        except (StaleAttempt, RunNotFound):
            await self._unprepare(job, child, prep, deferred)
            self.intake.ack(msg)
            return
        except InfraError as exc:
            log.warning("run %s: claim failed (%s); NAK", run_id, exc)
            await self._unprepare(job, child, prep, deferred)
            await self.intake.nak(msg, NAK_DELAY)
            return
        except PayloadTooLarge as exc:  # a size, never an outage: retrying cannot help
            log.error("run %s: its claim cannot be stored (%s); dropping the work item", run_id, exc)
            await self._unprepare(job, child, prep, deferred)
            await self.intake.term(msg)
            return
        died: ChildDied | None = None
        try:
            if deferred is not None and not go_sent:
                await child.send(deferred)  # the hook could not write it: send it now (go follows)
            if prep is None:
                prep = await self._prepare_reply(job, child)
        except ChildDied as exc:
            died, prep = exc, {"ev": "prepared", "tasks": tasks}
        active = ActiveAttempt(job=job, msg=msg, started_at=self.clock(), inbox=inbox[0], claimed_at=trio.current_time())
        runner = RunDriver(self, job, child, claimed.snapshot, active, inbox, go_sent=bool(go_sent))
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
        self.registry.record_finished(run_id, runner.final_status, active.started_at)
        if runner.nak:
            await self.intake.nak(msg, NAK_DELAY)
        elif runner.final_status == LOST:
            await self.intake.term(msg)  # fenced: this attempt was not done by us; never ack it as done
        else:
            self.intake.ack(msg)
        if runner.dlq is not None:
            await self._dlq(job.tag, runner.dlq)

    # -- drain ----------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop pulling, let what was accepted finish within ``drain_timeout``, then release the
        attempts still running and wait (a bounded time) for them to settle."""
        self.intake.stop_pulling()
        await wait_drained(self.intake, self.nats, self.drain_timeout, lambda: len(self.active), worker_id=self.worker_id)
        self.handback_by = trio.current_time() + HANDBACK_WAIT
        if self.intake.pending:
            log.warning("drain timeout: releasing %d run(s)", len(self.active))
            for active in list(self.active.values()):
                try:
                    active.inbox.send_nowait(("release", None))
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    pass
            with trio.move_on_at(self.handback_by):
                await self.intake.wait_idle()
            for run_id, attempt in list(self.active):
                log.warning(
                    "run %s attempt %d: could not hand it back (run.released not confirmed within %g s: NATS unreachable?); "
                    "its run process is stopped and the run is re-delivered when its lease expires (%g s)",
                    run_id, attempt, HANDBACK_WAIT, self.settings.run_lease_seconds,
                    extra=log_ids(NATS_UNAVAILABLE, run_id=run_id, worker_id=self.worker_id),
                )  # fmt: skip


__all__ = ["WorkerActor"]
