"""The run state machine, as one table.

Theory of operation
-------------------
Rule 1: everything that decides whether an event may follow a status lives in ``TRANSITIONS``.
Rule 2: the table knows nothing about who appends the event; fencing by attempt is checked by the
fold (stored history) and the decisions (before anything is appended).

A run starts when ``run.submitted`` is folded onto nothing.  A worker's ``run.claimed`` makes it
RUNNING; task events keep it there.  A cancel request moves RUNNING to CANCELLING (a PENDING run is
cancelled at once with reason ``not_started``).  A lost or released attempt returns a RUNNING run to
PENDING for the next attempt.  COMPLETED, FAILED and CANCELLED are terminal: nothing follows them.
"""

from __future__ import annotations

from typing import Final

from .model import RunStatus

P, R, C = RunStatus.PENDING, RunStatus.RUNNING, RunStatus.CANCELLING
DONE, FAIL, CXL = RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED

_TASK_EVENTS = ("task.started", "task.completed", "task.failed")

TRANSITIONS: Final[dict[RunStatus | None, dict[str, RunStatus]]] = {
    None: {"run.submitted": P},
    P: {
        "run.claimed": R,
        "run.cancelled": CXL,  # cancelled before any worker took it (reason not_started)
        "run.failed": FAIL,  # gave up: attempts exhausted
    },
    R: {
        **{t: R for t in _TASK_EVENTS},
        "run.cancel_requested": C,
        "run.completed": DONE,
        "run.failed": FAIL,
        "run.cancelled": CXL,
        "run.worker_lost": P,
        "run.released": P,
    },
    C: {
        **{t: C for t in _TASK_EVENTS},
        "run.completed": DONE,
        "run.failed": FAIL,
        "run.cancelled": CXL,
    },
    DONE: {},
    FAIL: {},
    CXL: {},
}


def next_status(status: RunStatus | None, event_type: str) -> RunStatus | None:
    """The status after ``event_type``, or None when the table forbids it."""
    return TRANSITIONS[status].get(event_type)
