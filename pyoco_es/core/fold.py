"""Fold events into run snapshots.

``apply`` is pure and total on every legal history: no clock, no randomness, no logging.  It
returns the snapshot unchanged for an event it has already applied (``seq <= version``), so a
redelivered event is a no-op.  A gap, a foreign run id, a stale attempt or an illegal transition
raises :class:`CorruptStreamError` (the shell marks that run as not projectable).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import singledispatch

import attrs

from .errors import CorruptStreamError
from .events import (
    Envelope,
    Event,
    RunCancelled,
    RunCancelRequested,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunReleased,
    RunSubmitted,
    RunWorkerLost,
    TaskCompleted,
    TaskFailed,
    TaskRetryScheduled,
    TaskStarted,
)
from .model import RunSnapshot, RunStatus, TaskRecord, TaskState
from .transitions import next_status


class SequenceGap(CorruptStreamError):
    """The next event's ``seq`` is beyond ``version + 1``.

    On a stream this is corruption; a conductor that received events out of order (several
    conductors share one consumer) reads the missing events from the stream and folds again.
    """

    def __init__(self, run_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"run {run_id}: expected event seq {expected}, got {actual}", run_id=run_id, seq=actual
        )
        self.expected = expected
        self.actual = actual


def apply(snapshot: RunSnapshot | None, env: Envelope) -> RunSnapshot:
    """Return the snapshot after ``env``.

    Raises:
        SequenceGap: when ``env.seq`` skips ahead of ``snapshot.version + 1``.
        CorruptStreamError: for any other event that cannot follow the snapshot.
    """
    version = 0 if snapshot is None else snapshot.version
    if env.seq <= version:
        return snapshot  # type: ignore[return-value]  # version > 0 implies a snapshot
    if env.seq != version + 1:
        raise SequenceGap(env.run_id, version + 1, env.seq)
    if snapshot is not None and env.run_id != snapshot.run_id:
        raise CorruptStreamError(
            f"event {env.event_id} of run {env.run_id} folded onto run {snapshot.run_id}",
            run_id=snapshot.run_id,
            seq=env.seq,
        )
    status = None if snapshot is None else snapshot.status
    event = env.event
    new_status = next_status(status, type(event))
    if new_status is None:
        raise CorruptStreamError(
            f"run {env.run_id}: {env.type} cannot follow status {status.value if status else 'none'}"
            f" (event seq {env.seq})",
            run_id=env.run_id,
            seq=env.seq,
        )
    if snapshot is None:
        assert isinstance(event, RunSubmitted)  # the table only allows run.submitted first
        return _submitted(env, event)
    _check_attempt(snapshot, env, event)
    changes = _mutate(event, snapshot, env.occurred_at)
    return snapshot.replace(
        status=new_status,
        version=env.seq,
        last_stream_seq=env.stream_seq or 0,
        updated_at=env.occurred_at,
        **changes,
    )


def fold(snapshot: RunSnapshot | None, envelopes: Iterable[Envelope]) -> RunSnapshot | None:
    """Apply ``envelopes`` in order (see :func:`apply`)."""
    for env in envelopes:
        snapshot = apply(snapshot, env)
    return snapshot


def _submitted(env: Envelope, e: RunSubmitted) -> RunSnapshot:
    return submitted_snapshot(env.run_id, e, version=env.seq, last_stream_seq=env.stream_seq or 0, updated_at=env.occurred_at)


def submitted_snapshot(
    run_id: str, e: RunSubmitted, *, version: int, last_stream_seq: int, updated_at: float, attempt: int = 1
) -> RunSnapshot:
    """The PENDING snapshot of a submitted run, the one place it is built: the fold's first
    step, and (issue 12, with the typed work item) what a worker rebuilds from a work item that
    carries the run's position, ``attempt`` and the position then being the work item's."""
    return RunSnapshot(
        run_id=run_id,
        flow_name=e.flow_name,
        tag=e.tag,
        tags=e.tags,
        params=e.params,
        status=RunStatus.PENDING,
        submitted_at=e.submitted_at,
        updated_at=updated_at,
        version=version,
        last_stream_seq=last_stream_seq,
        max_attempts=e.max_attempts,
        attempt=attempt,
        tenant_id=e.tenant_id,
        api_key_id=e.api_key_id,
        workflow_yaml_sha256=e.workflow_yaml_sha256,
        workflow_yaml_bytes=e.workflow_yaml_bytes,
        schedule_id=e.schedule_id,
        idempotency_key=e.idempotency_key,
        request_sha256=e.request_sha256,
        timeout_sec=e.timeout_sec,
        deadline_at=e.submitted_at + e.timeout_sec if e.timeout_sec is not None else None,
    )


def _check_attempt(snap: RunSnapshot, env: Envelope, event: Event) -> None:
    attempt = getattr(event, "attempt", None)
    if attempt is not None and attempt != snap.attempt:
        raise CorruptStreamError(
            f"run {env.run_id}: {env.type} for attempt {attempt} while attempt {snap.attempt} is current",
            run_id=env.run_id,
            seq=env.seq,
        )


def _task(snap: RunSnapshot, name: str) -> TaskRecord:
    return snap.tasks.get(name) or TaskRecord()


def _with_task(snap: RunSnapshot, name: str, rec: TaskRecord) -> dict[str, TaskRecord]:
    tasks = dict(snap.tasks)
    tasks[name] = rec
    return tasks


@singledispatch
def _mutate(event: Event, snap: RunSnapshot, at: float) -> dict[str, object]:
    """The snapshot fields ``event`` changes (one rule per event class; ``at`` is its time)."""
    raise CorruptStreamError(  # pragma: no cover - the table rejects unknown types first
        f"no fold rule for {event.TYPE}", run_id=snap.run_id
    )


@_mutate.register
def _claimed(event: RunClaimed, snap: RunSnapshot, at: float) -> dict[str, object]:
    return {
        "worker_id": event.worker_id,
        "lease_seconds": event.lease_seconds,
        "start_time": snap.start_time if snap.start_time is not None else at,
        "claimed_at": at,
        "tasks": {name: TaskRecord() for name in event.tasks},
        "error": None,
        "wheels": event.wheels,
    }


@_mutate.register
def _task_started(event: TaskStarted, snap: RunSnapshot, at: float) -> dict[str, object]:
    # A new execution of the task (a loop runs it again): its first try.
    rec = attrs.evolve(_task(snap, event.task), state=TaskState.RUNNING, started_at=event.started_at, tries=1)
    return {"tasks": _with_task(snap, event.task, rec)}


@_mutate.register
def _task_retry_scheduled(event: TaskRetryScheduled, snap: RunSnapshot, at: float) -> dict[str, object]:
    # Still running (waiting for its next try); the failed try's error shows until a try succeeds.
    prior = _task(snap, event.task)
    rec = attrs.evolve(
        prior,
        state=TaskState.RUNNING,
        started_at=prior.started_at if prior.started_at is not None else event.failed_at,
        tries=event.try_number + 1,
        error=event.error,
        failure_reason=event.reason,
    )
    return {"tasks": _with_task(snap, event.task, rec)}


@_mutate.register
def _task_completed(event: TaskCompleted, snap: RunSnapshot, at: float) -> dict[str, object]:
    return {"tasks": _with_task(snap, event.task, _ended_task(snap, event, TaskState.SUCCEEDED, output=event.output, output_truncated=event.truncated))}


@_mutate.register
def _task_failed(event: TaskFailed, snap: RunSnapshot, at: float) -> dict[str, object]:
    ended = _ended_task(snap, event, TaskState.FAILED, error=event.error, traceback=event.traceback, failure_reason=event.reason)
    return {"tasks": _with_task(snap, event.task, ended)}


def _ended_task(snap: RunSnapshot, event: TaskCompleted | TaskFailed, state: TaskState, **outcome: object) -> TaskRecord:
    """The record of a task that ended: its start (from the event, else from its TaskStarted),
    end, duration and inputs, plus the ``outcome`` fields of ``state``."""
    prior = _task(snap, event.task)
    started_at = event.started_at if event.started_at is not None else prior.started_at
    return TaskRecord(  # a success clears the error a failed try left (pyoco keeps it)
        state=state,
        # Retried: the count its retry events left; else one try (its task.started may have been
        # merged into this event, and an earlier loop iteration's count does not carry over).
        tries=prior.tries if prior.state is TaskState.RUNNING and prior.tries else 1,
        started_at=started_at,
        ended_at=event.ended_at,
        duration_ms=event.duration_ms,
        inputs=event.inputs,
        **outcome,  # type: ignore[arg-type]
    )


@_mutate.register
def _cancel_requested(event: RunCancelRequested, snap: RunSnapshot, at: float) -> dict[str, object]:
    return {
        "cancel_requested_at": event.requested_at,
        "cancel_requested_by": event.by,
    }


@_mutate.register
def _completed(event: RunCompleted, snap: RunSnapshot, at: float) -> dict[str, object]:
    return {"end_time": event.ended_at, "error": None}


@_mutate.register
def _failed(event: RunFailed, snap: RunSnapshot, at: float) -> dict[str, object]:
    # A task still RUNNING when its run failed was interrupted (its process died, or the
    # worker was lost on the last attempt): it did not succeed, so it is FAILED.
    tasks = {
        name: (
            attrs.evolve(rec, state=TaskState.FAILED, error=rec.error or f"interrupted: {event.reason}")
            if rec.state is TaskState.RUNNING
            else rec
        )
        for name, rec in snap.tasks.items()
    }
    return {"end_time": event.ended_at, "error": event.error, "failure_reason": event.reason, "tasks": tasks}


@_mutate.register
def _cancelled(event: RunCancelled, snap: RunSnapshot, at: float) -> dict[str, object]:
    tasks = {
        name: (
            attrs.evolve(rec, state=TaskState.CANCELLED)
            if rec.state in (TaskState.PENDING, TaskState.RUNNING)
            else rec
        )
        for name, rec in snap.tasks.items()
    }
    changes: dict[str, object] = {
        "end_time": event.ended_at,
        "cancel_reason": event.reason,
        "tasks": tasks,
    }
    if snap.cancel_requested_at is None:
        changes["cancel_requested_at"] = at
        changes["cancel_requested_by"] = event.by
    return changes


@_mutate.register(RunWorkerLost)
@_mutate.register(RunReleased)
def _attempt_ended(event: RunWorkerLost | RunReleased, snap: RunSnapshot, at: float) -> dict[str, object]:
    return {"attempt": snap.attempt + 1, "worker_id": None}
