"""The run state machine, as one table.

Theory of operation
-------------------
Rule 1: everything that decides whether an event may follow a status lives in ``TRANSITIONS``,
keyed by event class (as h11's ``EVENT_TRIGGERED_TRANSITIONS``); wire tags stay in the codec.
Rule 2: the table knows nothing about who appends the event; fencing by attempt is checked by the
fold (stored history) and the decisions (before anything is appended).

A run starts when ``run.submitted`` is folded onto nothing.  A worker's ``run.claimed`` makes it
RUNNING; task events keep it there.  A cancel request moves RUNNING to CANCELLING (a PENDING run is
cancelled at once with reason ``not_started``).  A lost or released attempt returns a RUNNING run to
PENDING for the next attempt.  COMPLETED, FAILED and CANCELLED are terminal: nothing follows them.
"""

from __future__ import annotations

from typing import Final

from .events import (
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
from .model import RunStatus

P, R, C = RunStatus.PENDING, RunStatus.RUNNING, RunStatus.CANCELLING
DONE, FAIL, CXL = RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED

_TASK_EVENTS: Final[tuple[type[Event], ...]] = (TaskStarted, TaskCompleted, TaskFailed, TaskRetryScheduled)

TRANSITIONS: Final[dict[RunStatus | None, dict[type[Event], RunStatus]]] = {
    None: {RunSubmitted: P},
    P: {
        RunClaimed: R,
        RunCancelled: CXL,  # cancelled before any worker took it (reason not_started)
        RunFailed: FAIL,  # gave up: attempts exhausted
    },
    R: {
        **{t: R for t in _TASK_EVENTS},
        RunCancelRequested: C,
        RunCompleted: DONE,
        RunFailed: FAIL,
        RunCancelled: CXL,
        RunWorkerLost: P,
        RunReleased: P,
    },
    C: {
        **{t: C for t in _TASK_EVENTS},
        RunCompleted: DONE,
        RunFailed: FAIL,
        RunCancelled: CXL,
    },
    DONE: {},
    FAIL: {},
    CXL: {},
}


def next_status(status: RunStatus | None, event_type: type[Event]) -> RunStatus | None:
    """The status after an event of class ``event_type``, or None when the table forbids it."""
    return TRANSITIONS[status].get(event_type)
