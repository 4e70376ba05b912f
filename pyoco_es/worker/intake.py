"""The worker's intake: pulling work items, holding them (in-progress acks) and settling them.

One pull loop per tag long-polls that tag's shared durable consumer when the worker has room (no
busy polling; every tag asks for its share of the free room, so no tag starves another).  Each
item fetched is handed to ``process`` in ``handler_nursery`` and held until it is settled: acked
(batched, off every run's critical path), NAKed or TERMed.  Held items get in-progress acks so
JetStream does not redeliver a long run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from ..config import Settings
from ..core.errors import PyocoError
from ..nats.client import Delivered, NatsClient, PullSubscription

log = logging.getLogger(__name__)

ACK_COALESCE: Final = 0.005
FETCH_GATHER: Final = 0.002
MAX_FETCH_BATCH: Final = 64


class Intake:
    """Room accounting plus the ack, NAK, TERM and in-progress traffic of fetched items."""

    def __init__(
        self, nats: NatsClient, settings: Settings, *, tags: Sequence[str], concurrency: int, poll_timeout: float
    ) -> None:
        self.nats = nats
        self.settings = settings
        self.tags = tuple(tags)
        self.concurrency = concurrency
        self.poll_timeout = poll_timeout
        self.held: set[Delivered] = set()  # fetched, not yet acked/naked: in-progress targets
        self.pending = 0  # accepted items not finished (waiting for a child or running)
        self.draining = False
        self.accepted = 0  # items ever accepted
        self.limit: int | None = None  # accept no more than this many (pyoco-worker --run-once: 1)
        self._room = trio.Event()
        self._ack_send, self._ack_recv = trio.open_memory_channel[Delivered](math.inf)

    def _notify_room(self) -> None:
        self._room.set()
        self._room = trio.Event()

    def finished(self, msg: Delivered) -> None:
        """An accepted item is done with (settled or not): its room is free again."""
        self.pending -= 1
        self.held.discard(msg)
        self._notify_room()

    async def wait_idle(self) -> None:
        """Wait until no accepted item is left."""
        while self.pending:
            await self._room.wait()

    def stop_pulling(self) -> None:
        """Fetch nothing more; the pull loops end within one poll."""
        self.draining = True
        self._notify_room()

    async def run_pulls(
        self,
        tag: str,
        psub: PullSubscription,
        process: Callable[[Delivered, str], Awaitable[None]],
        *,
        handler_nursery: trio.Nursery,
    ) -> None:
        """Fetch ``tag``'s items while there is room, starting ``process`` for each in
        ``handler_nursery``; return once draining."""
        while not self.draining and (self.limit is None or self.accepted < self.limit):
            room = self.concurrency - self.pending
            if room <= 0:
                await self._room.wait()
                continue
            if self.pending and room < self.concurrency / 4:
                # Busy: let a little more room free up so one fetch brings several items
                # (a fetch per freed slot would cost a bridge crossing per run).
                with trio.move_on_after(FETCH_GATHER):
                    while self.concurrency - self.pending < self.concurrency / 4 and self.pending:
                        await self._room.wait()
                room = self.concurrency - self.pending
            batch = max(1, min(MAX_FETCH_BATCH, math.ceil(room / len(self.tags))))
            try:
                msgs = await psub.fetch(batch, self.poll_timeout)
            except PyocoError as exc:
                log.warning("fetch on tag %s failed: %s", tag, exc)
                await trio.sleep(min(1.0, self.poll_timeout))
                continue
            for msg in msgs:
                if self.draining or (self.limit is not None and self.accepted >= self.limit):
                    await self.nak(msg, 0)
                    continue
                self.accepted += 1
                self.pending += 1
                self.held.add(msg)
                handler_nursery.start_soon(process, msg, tag)

    # -- settling -------------------------------------------------------------------------------

    def ack(self, msg: Delivered) -> None:
        self.held.discard(msg)
        self._ack_send.send_nowait(msg)

    async def nak(self, msg: Delivered, delay: float | None) -> None:
        self.held.discard(msg)
        try:
            await self.nats.nak(msg, delay if delay else None)
        except PyocoError as exc:
            log.warning("nak failed (the item is redelivered after ack_wait): %s", exc)

    async def term(self, msg: Delivered) -> None:
        self.held.discard(msg)
        try:
            await self.nats.term(msg)
        except PyocoError as exc:
            log.warning("term failed: %s", exc)

    def close_acks(self) -> None:
        """No more acks: :meth:`run_acks` flushes what is queued, then returns."""
        self._ack_send.close()

    async def run_acks(self) -> None:
        async for first in self._ack_recv:
            # Acks are not on any run's critical path: wait a moment so they go out in batches.
            await trio.sleep(ACK_COALESCE)
            batch = [first]
            while True:
                try:
                    batch.append(self._ack_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await self.nats.ack_many(batch)
            except PyocoError as exc:
                log.warning("ack of %d item(s) failed (they are redelivered and found obsolete): %s", len(batch), exc)

    async def run_progress(self) -> None:
        """In-progress acks for every held item, so JetStream does not redeliver long runs."""
        interval = self.settings.ack_progress_interval
        if interval <= 0:
            return
        interval = min(interval, max(0.05, self.settings.consumer_ack_wait / 2))
        while True:
            await trio.sleep(interval)
            msgs = list(self.held)
            if msgs:
                try:
                    await self.nats.in_progress_many(msgs)
                except PyocoError as exc:
                    log.warning("in-progress ack failed: %s", exc)


__all__ = ["Intake"]
