"""Decisions: a command plus the current snapshot gives the events to append, or a domain error.

All validation happens here, before anything is appended.  The shells re-decide on a
concurrency conflict (re-read the run, call the same function again); they never blind-retry.
Time and ids are passed in, so decisions are pure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import IllegalTransition, RunAlreadyExists, RunNotFound, StaleAttempt
from .events import (
    Envelope,
    Event,
    Producer,
    RunCancelled,
    RunCancelRequested,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunReleased,
    RunSubmitted,
    RunWorkerLost,
)
from .model import RunSnapshot, RunStatus


def submit_run(existing: RunSnapshot | None, event: RunSubmitted, *, run_id: str) -> list[Event]:
    """Start a run; an existing run with the same request fingerprint is an idempotent retry.

    Raises:
        RunAlreadyExists: when ``run_id`` already has events (``same_request`` says whether the
            stored request matches, so the gateway can answer with the existing run).
    """
    if existing is not None:
        same = event.request_sha256 is not None and existing.request_sha256 == event.request_sha256
        raise RunAlreadyExists(run_id, same_request=same)
    return [event]


def claim_run(
    snap: RunSnapshot | None,
    *,
    run_id: str,
    attempt: int,
    worker_id: str,
    lease_seconds: float,
    tasks: Sequence[str] = (),
    instance_id: str | None = None,
    wheels: Sequence[dict[str, str]] = (),
) -> list[Event]:
    """Take ownership of ``attempt``: only a PENDING run whose current attempt it is.

    Raises:
        RunNotFound: the run has no events.
        StaleAttempt: the run is not PENDING at this attempt (already claimed, cancelled, a later
            attempt is current...).  The work item is obsolete; ack it and move on.
    """
    if snap is None:
        raise RunNotFound(run_id)
    if snap.status is not RunStatus.PENDING or snap.attempt != attempt:
        raise StaleAttempt(run_id, attempt, snap.attempt, snap.status.value)
    return [
        RunClaimed(
            worker_id=worker_id,
            attempt=attempt,
            lease_seconds=lease_seconds,
            tasks=tuple(tasks),
            instance_id=instance_id,
            wheels=tuple(wheels),
        )
    ]


def check_owner(snap: RunSnapshot | None, *, run_id: str, attempt: int, worker_id: str) -> RunSnapshot:
    """The fencing check for every event a worker appends while it runs an attempt.

    Raises:
        RunNotFound: the run has no events.
        StaleAttempt: the run is not RUNNING/CANCELLING under this worker and attempt.
    """
    if snap is None:
        raise RunNotFound(run_id)
    if (
        snap.status not in (RunStatus.RUNNING, RunStatus.CANCELLING)
        or snap.attempt != attempt
        or snap.worker_id != worker_id
    ):
        raise StaleAttempt(run_id, attempt, snap.attempt, snap.status.value)
    return snap


def worker_event(
    snap: RunSnapshot | None, event: Event, *, run_id: str, attempt: int, worker_id: str
) -> list[Event]:
    """Append a task event or a run ending on behalf of the owning worker (fenced)."""
    check_owner(snap, run_id=run_id, attempt=attempt, worker_id=worker_id)
    return [event]


def finish_run(
    snap: RunSnapshot | None,
    *,
    run_id: str,
    attempt: int,
    worker_id: str,
    outcome: RunStatus | str,
    now: float,
    error: str | None = None,
    reason: str | None = None,
) -> list[Event]:
    """The terminal event for an attempt the worker owns.

    ``outcome`` is the engine's result: COMPLETED, FAILED or CANCELLED.  A run that ended while a
    cancel was pending is CANCELLED (reason requested) unless every task finished first.
    """
    snap = check_owner(snap, run_id=run_id, attempt=attempt, worker_id=worker_id)
    if outcome == RunStatus.COMPLETED:
        return [RunCompleted(attempt=attempt, ended_at=now)]
    if outcome == RunStatus.CANCELLED:
        return [RunCancelled(attempt=attempt, ended_at=now, reason=reason or "requested")]
    if outcome == RunStatus.FAILED:
        return [RunFailed(attempt=attempt, ended_at=now, reason=reason or "error", error=error or "failed")]
    raise IllegalTransition(f"unknown outcome {outcome!r}")


def request_cancel(
    snap: RunSnapshot | None, *, run_id: str, now: float, by: str | None = None, reason: str | None = None
) -> list[Event]:
    """Cancel a run: PENDING ends at once (not_started); RUNNING asks the worker; others: no-op.

    Raises:
        RunNotFound: the run has no events.
    """
    if snap is None:
        raise RunNotFound(run_id)
    if snap.status is RunStatus.PENDING:
        return [RunCancelled(ended_at=now, reason="not_started", by=by)]
    if snap.status is RunStatus.RUNNING:
        return [RunCancelRequested(requested_at=now, by=by, reason=reason)]
    return []


def force_cancel(snap: RunSnapshot | None, *, run_id: str, now: float) -> list[Event]:
    """End a CANCELLING run whose grace period is over (the worker is gone or its task ignores
    the cancel)."""
    if snap is None:
        raise RunNotFound(run_id)
    if snap.status is not RunStatus.CANCELLING:
        return []
    return [RunCancelled(attempt=snap.attempt, ended_at=now, reason="forced")]


def expire_run(snap: RunSnapshot | None, *, run_id: str, now: float) -> list[Event]:
    """The conductor's verdict on a run whose deadline (``timeout_sec`` after submission) passed:
    PENDING or RUNNING ends FAILED with reason ``timeout``; CANCELLING ends CANCELLED (``forced``:
    a timeout during a cancel is a cancel).  A run that ended, has no deadline or is not due yet:
    nothing, so a re-decision after a conflict never appends a second ending.

    Raises:
        RunNotFound: the run has no events.
    """
    if snap is None:
        raise RunNotFound(run_id)
    if snap.terminal or snap.deadline_at is None or now < snap.deadline_at:
        return []
    if snap.status is RunStatus.CANCELLING:
        return [RunCancelled(attempt=snap.attempt, ended_at=now, reason="forced", by="deadline")]
    return [
        RunFailed(
            attempt=snap.attempt,
            ended_at=now,
            reason="timeout",
            error=f"the run's deadline passed (timeout_sec={snap.timeout_sec:g}s after submission)",
        )
    ]


def attempts_left(snap: RunSnapshot | None, attempt: int) -> bool:
    """Whether a run whose ``attempt`` ended without a verdict (its worker was lost, its child
    process died) gets another attempt; an unknown run (None) has none.  The one rule for both:
    :func:`mark_worker_lost` here, the worker's dead child in the shell."""
    return snap is not None and attempt < snap.max_attempts


def mark_worker_lost(
    snap: RunSnapshot | None, *, run_id: str, attempt: int, detected_by: str, now: float, detail: str | None = None
) -> list[Event]:
    """The reaper's verdict on an attempt whose worker stopped heartbeating.

    Always one event, so a decision is never half-appended:
    RUNNING with attempts left: ``run.worker_lost`` (the run goes back to PENDING for the next
    attempt); RUNNING on its last attempt: ``run.failed(worker_lost)``; CANCELLING:
    ``run.cancelled(forced)``.  Anything else (a newer attempt, an ending that raced us): nothing.
    """
    if snap is None:
        raise RunNotFound(run_id)
    if snap.attempt != attempt or snap.status not in (RunStatus.RUNNING, RunStatus.CANCELLING):
        return []
    if snap.status is RunStatus.CANCELLING:
        return [RunCancelled(attempt=attempt, ended_at=now, reason="forced", by=detected_by)]
    if attempts_left(snap, attempt):
        return [RunWorkerLost(attempt=attempt, worker_id=snap.worker_id, detected_by=detected_by)]
    return [
        RunFailed(
            attempt=attempt,
            ended_at=now,
            reason="worker_lost",  # the error does not repeat it (issue 11: "worker_lost: worker_lost: ...")
            error=f"worker {snap.worker_id} was lost during attempt {attempt} of {snap.max_attempts}"
            f"{f' ({detail})' if detail else ''}; giving up",
        )
    ]


def fail_undispatchable(snap: RunSnapshot | None, *, run_id: str, attempt: int, now: float, error: str) -> list[Event]:
    """A PENDING run whose work item cannot be published (too large for the work stream) is
    poison: it fails with ``reason="work_item_too_large"`` rather than waiting forever.  A run that
    moved on (claimed, cancelled, a later attempt) is left alone: nothing."""
    if snap is None:
        raise RunNotFound(run_id)
    if snap.status is not RunStatus.PENDING or snap.attempt != attempt:
        return []
    return [RunFailed(attempt=attempt, ended_at=now, reason="work_item_too_large", error=error)]


def release_run(
    snap: RunSnapshot | None, *, run_id: str, attempt: int, worker_id: str, reason: str, now: float
) -> list[Event]:
    """A draining worker gives its attempt back (a CANCELLING run is cancelled instead)."""
    snap = check_owner(snap, run_id=run_id, attempt=attempt, worker_id=worker_id)
    if snap.status is RunStatus.CANCELLING:
        return [RunCancelled(attempt=attempt, ended_at=now, reason="forced")]
    return [RunReleased(attempt=attempt, worker_id=worker_id, reason=reason)]


def stamp(
    snap: RunSnapshot | None,
    events: Sequence[Event],
    *,
    run_id: str,
    producer: Producer,
    now: float,
    new_id: Callable[[], str],
    causation_id: str | None = None,
    correlation_id: str | None = None,
) -> list[Envelope]:
    """Wrap decided events into envelopes numbered after ``snap.version``."""
    base = 0 if snap is None else snap.version
    return [
        Envelope(
            event_id=new_id(),
            run_id=run_id,
            seq=base + i,
            occurred_at=now,
            producer=producer,
            event=event,
            causation_id=causation_id,
            correlation_id=correlation_id,
        )
        for i, event in enumerate(events, start=1)
    ]
