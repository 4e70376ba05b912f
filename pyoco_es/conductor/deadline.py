"""Run deadlines, enforced by the conductor from the events (issue 16).

A run submitted with ``timeout_sec`` carries it on ``run.submitted``; its snapshot says
``deadline_at`` (``submitted_at + timeout_sec``, a wall-clock instant: the deadline a user asked
for).  The reaper feeds every snapshot it sees to :class:`Deadlines`, which remembers the runs
that have one and are not over; once the conductor's clock passes a deadline plus
:data:`DEADLINE_SLACK` (the worker, which stops the run at the deadline itself, normally ends it
first with its task events), :func:`pyoco_es.core.decide.expire_run` ends the run: FAILED
``timeout``, or CANCELLED when a cancel was under way.  So the deadline holds when the run waits
for a worker, or its worker was SIGKILLed, frozen or cut off.  The decision goes through
:class:`RunStore`: it races the worker's own ending and exactly one of them is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

from ..core import decide
from ..core.errors import PyocoError
from ..core.events import Producer
from ..service import RunStore

log = logging.getLogger(__name__)

DEADLINE_SLACK: Final = 0.5  # seconds the worker gets to end a run at its deadline itself
OVER: Final = frozenset({"COMPLETED", "FAILED", "CANCELLED"})


class Deadlines:
    """Runs with a deadline that are not over (run id -> ``deadline_at``)."""

    def __init__(self) -> None:
        self.due: dict[str, float] = {}
        self.expired_total = 0

    def note(self, run_id: str, doc: dict[str, Any] | None) -> None:
        """A run's snapshot as the reaper saw it (None: deleted or undecodable)."""
        deadline = doc.get("deadline_at") if doc is not None else None
        if isinstance(deadline, (int, float)) and not isinstance(deadline, bool) and doc.get("status") not in OVER:  # type: ignore[union-attr]
            self.due[run_id] = float(deadline)
        elif self.due:
            self.due.pop(run_id, None)

    async def sweep(self, store: RunStore, producer: Producer, clock: Callable[[], float]) -> int:
        """End every run past its deadline; returns how many endings were appended."""
        now = clock()
        acted = 0
        for run_id, deadline in list(self.due.items()):
            if now < deadline + DEADLINE_SLACK:
                continue
            try:
                out = await store.execute(run_id, lambda s, r=run_id: decide.expire_run(s, run_id=r, now=clock()), producer=producer)
            except PyocoError as exc:
                log.warning("could not end run %s at its deadline: %s", run_id, exc, extra={"run_id": run_id})
                continue
            self.due.pop(run_id, None)
            if out.appended:
                self.expired_total += 1
                acted += 1
                log.info("run %s: its deadline passed; ended", run_id, extra={"run_id": run_id})
        return acted


__all__ = ["DEADLINE_SLACK", "Deadlines"]
