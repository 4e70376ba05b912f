"""One claimed attempt, driven to its end: child frames → batched appends, cancel, terminal event.

A :class:`RunDriver` is made by the actor once the claim is stored.  It pumps the child's frames
into its inbox (one nursery per attempt), appends task events in batches fenced by the attempt,
asks the child to cancel when a cancel request arrives (and kills it after the grace period), and
ends the run: ``run.completed`` / ``run.failed`` / ``run.cancelled``, or ``run.released`` when the
child died with attempts left or the worker stops.  It reaches the worker only through
:class:`AttemptHost`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import attrs
import outcome
import trio

from ..config import Settings
from ..logs import CANCEL_TIMED_OUT, EXECUTION_ERROR, FLOW_NOT_FOUND, NATS_UNAVAILABLE, ids as log_ids, untrusted
from ..core import decide
from ..core.codec import decode_envelope
from ..core.errors import CorruptStreamError, InfraError, PayloadTooLarge, PyocoError, RunNotFound, StaleAttempt
from ..core.events import Envelope, Event, TaskCompleted, TaskFailed, TaskRetryScheduled, TaskStarted
from ..core.model import RunSnapshot, RunStatus
from ..core.work import WorkItem
from ..nats import subjects
from ..nats.client import Delivered, NatsClient, OnStored
from ..service import Outcome
from .logship import LogShipper
from .pool import ChildDied, ChildProcess, ChildProtocolError
from .protocol import Cancel, Go
from .timeouts import RUN_STOP_GRACE, AttemptTimeouts, timed_out_task

log = logging.getLogger(__name__)

CANCEL_WATCH_DELAY: Final = 0.1  # runs younger than this are not watched for cancels yet (watch_cancel)
COALESCE_WINDOW: Final = 0.002  # how long task events may wait to be appended together
APPEND_RETRIES: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
LOST: Final = "LOST"  # final_status of an attempt that was fenced (another attempt owns the run)
# Run events that were not appended by the attempt itself and mean it is over (lost, re-claimed,
# ended by the conductor); the cancel watch forwards every ``run.*`` event (the pattern matches
# the envelope's compact JSON) and stops the child at once on these.
RUN_EVENT_MARK: Final = b'"type":"run.'


class AttemptHost(Protocol):
    """What a driver needs from its worker: identity, settings, clock, batched reads and appends."""

    worker_id: str
    settings: Settings
    nats: NatsClient
    clock: Callable[[], float]
    logship: LogShipper

    async def read_events(self, run_id: str) -> list[Envelope]: ...

    async def execute(
        self,
        run_id: str,
        make: Callable[[RunSnapshot | None], Sequence[Event]],
        *,
        attempt: int,
        hint: RunSnapshot | None,
        on_stored: OnStored | None = None,
    ) -> Outcome: ...


@attrs.define(eq=False)
class ActiveAttempt:
    job: WorkItem
    msg: Delivered
    started_at: float  # the worker's (injected) wall clock, for the registry
    inbox: trio.MemorySendChannel[tuple[str, Any]]
    driver: RunDriver | None = None
    claimed_at: float = 0.0  # trio clock


class LostRun(Exception):
    """Our attempt is no longer current (StaleAttempt on append)."""


def dead_letter(job: WorkItem, reason: str, error: str, *, worker_id: str, now: float) -> dict[str, Any]:
    """The DLQ body for a run that ended badly (``flow_not_found``, ``execution_error``)."""
    return {
        "reason": reason,
        "error": error,
        "timestamp": now,
        "run_id": job.run_id,
        "flow_name": job.flow_name,
        "tag": job.tag,
        "tags": list(job.tags),
        "tenant_id": job.tenant_id,
        "api_key_id": job.api_key_id,
        "worker_id": worker_id,
        "attempt": job.attempt,
    }


def add_task_event(pending: list[Event], event: Event) -> None:
    """Queue a task event; a task that started and ended within one batch is recorded by its
    ending alone (``task.completed`` / ``task.failed`` carry ``started_at``), which saves an
    event, an append and a projection for every fast task.  A task still running when a batch
    goes out keeps its ``task.started``, and so does a task that was retried (its
    ``task.retry_scheduled`` events stand between the two)."""
    if isinstance(event, (TaskCompleted, TaskFailed)):
        for i in range(len(pending) - 1, -1, -1):
            prior = pending[i]
            if getattr(prior, "task", None) != event.task:
                continue
            if isinstance(prior, TaskStarted):
                del pending[i]
            break
    pending.append(event)


def task_event(frame: dict[str, Any], attempt: int) -> Event | None:
    """The event a child's task frame stands for (None: a frame that is not one, e.g. ``task.try``).

    Raises:
        KeyError, TypeError, ValueError: a malformed frame.
    """
    ev = frame.get("ev")
    if ev == "task.started":
        return TaskStarted(attempt=attempt, task=frame["task"], started_at=frame["started_at"])
    if ev == "task.retry_scheduled":
        return TaskRetryScheduled(
            attempt=attempt,
            task=frame["task"],
            try_number=frame["try_number"],
            max_tries=frame["max_tries"],
            error=str(frame["error"]),
            reason=str(frame.get("reason") or "error"),
            delay_sec=frame["delay_sec"],
            failed_at=frame["failed_at"],
        )
    if ev not in ("task.completed", "task.failed"):
        return None
    ended: dict[str, Any] = {
        "attempt": attempt,
        "task": frame["task"],
        "started_at": frame.get("started_at"),
        "ended_at": frame["ended_at"],
        "duration_ms": frame.get("duration_ms"),
        "inputs": frame.get("inputs") or {},
    }
    if ev == "task.completed":
        return TaskCompleted(**ended, output=frame.get("output"), truncated=bool(frame.get("truncated")))
    reason = frame.get("reason")  # "timeout": the task's own timeout (retry.TaskTimeout)
    return TaskFailed(**ended, error=str(frame.get("error") or "failed"), traceback=frame.get("traceback"), reason=str(reason) if reason else None)


class RunDriver:
    """Drives one claimed attempt: child frames → batched appends, cancel, terminal event."""

    def __init__(
        self,
        actor: AttemptHost,
        job: WorkItem,
        child: ChildProcess,
        snap: RunSnapshot | None,
        active: ActiveAttempt,
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
        self.user_cancelled = False  # the cancel came from a request (not from the run's deadline)
        self.cancel_deadline = math.inf
        self.timeouts = AttemptTimeouts.for_job(job.deadline_at, job.timeout_sec, wall_now=actor.clock(), trio_now=trio.current_time())
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
            LostRun: the attempt is not ours any more.
            InfraError: NATS stayed unavailable.
        """
        delays = list(APPEND_RETRIES)
        while True:
            try:
                out = await self.actor.execute(self.run_id, make, attempt=self.attempt, hint=self.hint)
            except (StaleAttempt, RunNotFound) as exc:
                raise LostRun(str(exc)) from exc
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
        await self.actor.logship.flushed(self.run_id, self.attempt)  # a reader who sees the end has every line

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
        except LostRun:
            self.final_status = LOST
            return
        except InfraError:
            self.nak = True

    async def finish_without_running(self, reason: str, error: str) -> None:
        try:
            await self._finish("FAILED", reason=reason, error=error)
        except LostRun:
            self.final_status = LOST
            return
        except InfraError:
            self.nak = True
            return
        if reason == "flow_not_found":
            log.warning("run %s: flow not found: %s", self.run_id, untrusted(error), extra=log_ids(FLOW_NOT_FOUND, **self._log_context()))
            self.dlq = dead_letter(self.job, "flow_not_found", error, worker_id=self.actor.worker_id, now=self.actor.clock())

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
        except LostRun as exc:
            log.warning("run %s: attempt %d lost (%s); stopping it", self.run_id, self.attempt, exc)
            self.child.kill()
            self.final_status = LOST
        except InfraError as exc:
            log.error("run %s: NATS unavailable while running (%s); NAK and kill the child", self.run_id, exc,
                      extra=log_ids(NATS_UNAVAILABLE, run_id=self.run_id))
            self.child.kill()
            self.nak = True
        except PayloadTooLarge as exc:  # an event that cannot be stored even shrunk: fail the run, once
            log.error("run %s: an event cannot be stored (%s); failing the run", self.run_id, exc)
            self.child.kill()
            try:
                await self._finish("FAILED", reason="error", error=f"an event of this run could not be stored: {exc.message}"[:4000])
            except LostRun:
                return
            except PyocoError:
                self.nak = True

    async def _pump_child(self, send: trio.MemorySendChannel[tuple[str, Any]]) -> None:
        async with send:
            try:
                while True:
                    frame = await self.child.receive()
                    if frame.get("ev") == "log":  # task output: shipped on its own (worker/logship.py)
                        self.actor.logship.offer(self.run_id, self.attempt, frame)
                        continue
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
                    history = await self.actor.read_events(self.run_id)
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
                    if self._fences(env) and not await self._stored(env):
                        continue
                    self._on_run_event(env)

    def _fences(self, env: Envelope) -> bool:
        """A run event by someone else: it ended or took over our attempt (the reaper declared
        it lost while we were frozen or cut off)."""
        return env.type.startswith("run.") and env.type != "run.cancel_requested" and not (
            env.producer.kind == "worker" and env.producer.id == self.actor.worker_id and env.producer.attempt == self.attempt
        )

    async def _stored(self, env: Envelope) -> bool:
        """Whether ``env`` is a stored event after our claim.  A subscription also delivers
        publishes JetStream refused (a stale writer's append with a wrong last sequence, e.g. the
        killed worker's redelivered item claimed again): those are not facts and must never stop
        a live attempt.  Checked against the stream, which costs a read only for such events."""
        if env.seq <= self.claim_seq:
            return False
        try:
            history = await self.actor.read_events(self.run_id)
        except PyocoError as exc:
            log.warning("run %s: cannot check a fencing event: %s", self.run_id, exc)
            return False  # our next append finds out (StaleAttempt)
        return any(e.event_id == env.event_id for e in history)

    def _on_run_event(self, env: Envelope) -> None:
        if env.type == "run.cancel_requested":
            self._post(("cancel", env))
        elif self._fences(env):
            # Stop the child now, not at its next append.
            self._post(("fenced", env))

    def _post(self, item: tuple[str, Any]) -> None:
        try:
            self.inbox[0].send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _request_cancel(self, *, user: bool = True) -> None:
        self.user_cancelled = self.user_cancelled or user
        if self.cancel_sent:
            return
        self.cancel_sent = True
        self.cancel_deadline = trio.current_time() + self.actor.settings.cancel_grace_period
        try:
            await self.child.send(Cancel(self.run_id))
        except ChildDied:
            pass  # the pump reports the death

    async def _finish_stopped(self, reason: str, pending: list[Event]) -> None:
        """End a run whose process was asked to stop: CANCELLED, or FAILED ``timeout`` when only
        the run's deadline asked (a cancel request wins: a timeout during a cancel is a cancel)."""
        if self.timeouts.expired and not self.user_cancelled:
            await self._finish("FAILED", reason="timeout", error=self.timeouts.run_error, pending=pending)
        else:
            await self._finish("CANCELLED", reason=reason, pending=pending)

    async def _enforce_timeouts(self, pending: list[Event]) -> bool:
        """A task try past its deadline: kill the run process, end the attempt (True).  The run's
        deadline: ask the process to stop, with a short grace before the kill."""
        now = trio.current_time()
        late = self.timeouts.overdue_try(now)
        if late is not None:
            self.child.kill()
            pending.append(timed_out_task(late, attempt=self.attempt, now=self.actor.clock()))
            if self.cancel_sent:
                await self._finish_stopped("forced", pending)
            else:
                await self._finish("FAILED", reason="timeout", error=pending[-1].error, pending=pending)  # type: ignore[attr-defined]
            return True
        if self.timeouts.run_due(now):
            await self._request_cancel(user=False)
            self.cancel_deadline = min(self.cancel_deadline, now + RUN_STOP_GRACE)
        return False

    async def _drive(self, recv: trio.MemoryReceiveChannel[tuple[str, Any]]) -> None:
        if not self.go_sent:
            try:
                await self.child.send(Go(self.run_id))
            except ChildDied:
                pass  # the pump reports the death
        pending: list[Event] = []
        while True:
            items: list[tuple[str, Any]] = []
            if not pending:
                with trio.move_on_at(min(self.cancel_deadline, self.timeouts.next_at())):
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
                            self.timeouts.note(value, trio.current_time())
                            event = task_event(value, self.attempt)
                        except (KeyError, TypeError, ValueError) as exc:
                            self.child.kill()
                            problem = f"malformed {str(value.get('ev'))[:40]!r} frame ({type(exc).__name__}: {str(exc)[:200]})"
                            await self._child_died(ChildProtocolError(self.child.proc.poll(), problem), pending)
                            return
                        if event is not None:
                            add_task_event(pending, event)
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
                    raise LostRun(f"{value.type} (seq {value.seq}) by {value.producer.kind} {value.producer.id}")
            if done is not None:
                await self._done(done, pending)
                return
            if await self._enforce_timeouts(pending):
                return
            if trio.current_time() >= self.cancel_deadline:
                # The task ignored the cooperative cancel: kill the child, end the run.
                log.warning("run %s: the cancel did not end it within the grace period; killing its process",
                            self.run_id, extra=log_ids(CANCEL_TIMED_OUT, **self._log_context()))
                self.child.kill()
                await self._finish_stopped("forced", pending)
                return
            if pending:
                batch, pending = pending, []

                def make(s: RunSnapshot | None, batch: list[Event] = batch) -> list[Event]:
                    self._owner(s)
                    return list(batch)

                await self._append(make)
                if self.hint is not None and self.hint.status is RunStatus.CANCELLING:
                    await self._request_cancel()  # learned from a conflict re-read

    def _log_context(self) -> dict[str, Any]:
        """pyoco-server's context fields for this attempt's log lines."""
        return {"run_id": self.run_id, "flow_name": self.job.flow_name, "tag": self.job.tag, "worker_id": self.actor.worker_id}

    async def _done(self, frame: dict[str, Any], pending: list[Event]) -> None:
        outcome = str(frame.get("outcome") or "FAILED")
        error = frame.get("error")
        if frame.get("recycle"):  # a timeout was raised into a task thread: retire that process
            self.child.healthy = False
        if outcome == "CANCELLED":
            await self._finish_stopped("requested", pending)
        elif outcome == "FAILED":
            log.info("run %s: execution error: %s", self.run_id, untrusted(error or "run failed"),
                     extra=log_ids(EXECUTION_ERROR, **self._log_context()))
            reason = "timeout" if frame.get("reason") == "timeout" or (self.timeouts.expired and not self.user_cancelled) else "error"
            await self._finish("FAILED", reason=reason, error=str(error or "run failed"), pending=pending)
            if self.actor.settings.dlq_publish_execution_error:
                self.dlq = dead_letter(self.job, "execution_error", str(error or "run failed"), worker_id=self.actor.worker_id, now=self.actor.clock())
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
            await self._finish_stopped("forced", pending)
            return
        if isinstance(exc, ChildProtocolError):
            log.error("run %s attempt %d: %s", self.run_id, self.attempt, untrusted(error))
            await self._finish("FAILED", reason="error", error=error, pending=pending)
            return
        max_attempts = self.hint.max_attempts if self.hint is not None else 1
        if decide.attempts_left(self.hint, self.attempt):
            log.warning("run %s attempt %d: %s; releasing it for another attempt", self.run_id, self.attempt, untrusted(error))
            await self._release(pending, f"{error} (attempt {self.attempt} of {max_attempts})")
        else:
            await self._finish(
                "FAILED",
                reason="error",
                error=f"{error} (attempt {self.attempt} of {max_attempts}; giving up)",
                pending=pending,
            )


__all__ = ["LOST", "ActiveAttempt", "AttemptHost", "LostRun", "RunDriver", "add_task_event", "dead_letter"]
