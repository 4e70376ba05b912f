"""The deadlines one attempt is held to, on the worker's Trio clock (issue 16).

* **Task tries.**  The run process announces each try of a task that has ``timeout_sec``
  (``task.try`` frame) and interrupts it itself when the timeout passes
  (:mod:`pyoco_es.worker.retry`).  A task blocked in C code cannot be interrupted, so the worker
  keeps the same deadline plus :data:`HARD_STOP_GRACE`: past it (no frame said the try ended) the
  run process is killed and the attempt ends FAILED with reason ``timeout``.
* **The run.**  ``timeout_sec`` at submit: the run ends FAILED ``timeout`` at
  ``submitted_at + timeout_sec``.  The worker asks the run process to stop at that moment (the
  cancel path) and kills it :data:`RUN_STOP_GRACE` later; the conductor enforces the same deadline
  from the events, so it holds when the worker is gone (``conductor/reaper.py``).

Pure bookkeeping: the driver (:mod:`pyoco_es.worker.attempt`) asks what is due and acts.
"""

from __future__ import annotations

import math
from typing import Any, Final

import attrs

from ..core.events import TaskFailed

HARD_STOP_GRACE: Final = 0.5  # after a task's timeout, before its run process is killed
RUN_STOP_GRACE: Final = 0.5  # after the run's deadline, before its run process is killed


@attrs.frozen
class Try:
    task: str
    number: int
    timeout_sec: float
    kill_at: float  # trio clock


@attrs.define
class AttemptTimeouts:
    """What is due when, for one attempt.  ``run_deadline`` is on the Trio clock (inf: none)."""

    run_deadline: float = math.inf
    run_timeout_sec: float | None = None
    tries: dict[str, Try] = attrs.field(factory=dict)
    expired: bool = False  # the run's deadline passed and the run process was asked to stop

    @classmethod
    def for_job(cls, deadline_at: float | None, timeout_sec: float | None, *, wall_now: float, trio_now: float) -> AttemptTimeouts:
        """The run's deadline (a wall-clock instant from its submission) moved to the Trio clock."""
        if deadline_at is None:
            return cls()
        return cls(run_deadline=trio_now + (deadline_at - wall_now), run_timeout_sec=timeout_sec)

    def note(self, frame: dict[str, Any], now: float) -> None:
        """Track a child frame: a timed try starts, or a task's try ends."""
        ev = frame.get("ev")
        if ev == "task.try":
            timeout = float(frame["timeout_sec"])
            task = str(frame["task"])
            self.tries[task] = Try(task, int(frame.get("try_number") or 1), timeout, now + timeout + HARD_STOP_GRACE)
        elif self.tries and ev in ("task.retry_scheduled", "task.completed", "task.failed"):
            self.tries.pop(str(frame.get("task")), None)

    def next_at(self) -> float:
        """The next moment something may be due (inf: nothing)."""
        due = math.inf if self.expired else self.run_deadline
        for t in self.tries.values():
            due = min(due, t.kill_at)
        return due

    def overdue_try(self, now: float) -> Try | None:
        for t in self.tries.values():
            if now >= t.kill_at:
                return t
        return None

    def run_due(self, now: float) -> bool:
        """The run's deadline just passed (true once)."""
        if self.expired or now < self.run_deadline:
            return False
        self.expired = True
        return True

    @property
    def run_error(self) -> str:
        return f"the run's deadline passed (timeout_sec={self.run_timeout_sec:g}s after submission); its run process was stopped"


def timed_out_task(t: Try, *, attempt: int, now: float) -> TaskFailed:
    """The ``task.failed`` of a try that did not return by its deadline (its process was killed)."""
    return TaskFailed(
        attempt=attempt,
        task=t.task,
        ended_at=now,
        error=f"TaskTimeout: task '{t.task}' exceeded its timeout of {t.timeout_sec:g}s (try {t.number}) and did not stop: its run process was killed",
        reason="timeout",
    )


__all__ = ["HARD_STOP_GRACE", "RUN_STOP_GRACE", "AttemptTimeouts", "Try", "timed_out_task"]
