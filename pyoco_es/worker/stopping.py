"""How long a stopping worker waits, also when NATS is gone or frozen (operator guide,
"Guarantees"): the drain (``worker_drain_timeout``), cut short once NATS has not answered for
:data:`DRAIN_WITHOUT_NATS` s, then one hand-back wait (:data:`HANDBACK_WAIT`) shared by the
releases, the last acks and ``STOPPED_GRACEFUL``.  What could not be handed back is logged; an
unreleased run is re-delivered when its lease expires."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from ..logs import NATS_UNAVAILABLE, ids as log_ids
from ..nats.client import NatsClient
from .intake import Intake

log = logging.getLogger(__name__)

# Seconds a stopping worker gives, after its drain, to hand back what it holds (run.released, the
# last acks, STOPPED_GRACEFUL) before it exits regardless: NATS may be gone or frozen.
HANDBACK_WAIT: Final = 3.0
# A stopping worker stops waiting for its runs (the drain) once NATS has not answered for this
# long (a cluster's failover reconnects well within it); it pings every NATS_CHECK seconds.
DRAIN_WITHOUT_NATS: Final = 2.0
NATS_CHECK: Final = 0.25


async def wait_drained(intake: Intake, nats: NatsClient, drain_timeout: float, running: Callable[[], int], *, worker_id: str) -> None:
    """Until every item ``intake`` accepted has ended, at most ``drain_timeout``; but once NATS has
    not answered (disconnected, or a ping unanswered: a frozen server) for
    :data:`DRAIN_WITHOUT_NATS` s, no longer: what the runs do cannot be recorded while it is away,
    and the stop would wait out the whole drain for nothing."""
    with trio.move_on_after(drain_timeout):
        async with trio.open_nursery() as nursery:

            async def idle() -> None:
                await intake.wait_idle()
                nursery.cancel_scope.cancel()

            nursery.start_soon(idle)
            answered = trio.current_time()
            while trio.current_time() - answered < DRAIN_WITHOUT_NATS:
                if await nats_answers(nats):
                    answered = trio.current_time()
                await trio.sleep(NATS_CHECK)
            log.warning("stopping: NATS has not answered for %g s: not waiting out the drain for %d run(s)",
                        DRAIN_WITHOUT_NATS, running(), extra=log_ids(NATS_UNAVAILABLE, worker_id=worker_id))  # fmt: skip
            nursery.cancel_scope.cancel()


async def nats_answers(nats: NatsClient) -> bool:
    """Connected, and a request is answered within :data:`NATS_CHECK` × 4 s."""
    return await nats.answers(NATS_CHECK * 4)


__all__ = ["DRAIN_WITHOUT_NATS", "HANDBACK_WAIT", "NATS_CHECK", "nats_answers", "wait_drained"]
