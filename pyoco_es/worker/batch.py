"""Coalescing of concurrent NATS requests: one bridge crossing per batch (reads, appends).

:class:`BatchedRunStore` wraps :class:`~pyoco_es.service.RunStore`'s decide-append loop (it does
not fork it): the common case, deciding against a known position, goes out in a batch with other
runs' appends; a conflict falls back to ``RunStore.execute`` after a batched re-read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import attrs
import trio

from ..core import decide
from ..core.errors import ConcurrencyConflict, PyocoError
from ..core.events import Envelope, Event, Producer
from ..core.fold import apply, fold
from ..core.model import RunSnapshot
from ..nats.client import NatsClient, OnStored
from ..service import Outcome, RunStore, new_event_id

I = TypeVar("I")
R = TypeVar("R")


@attrs.define(eq=False)
class _Slot(Generic[R]):
    done: trio.Event = attrs.field(factory=trio.Event)
    value: Any = None


class Batcher(Generic[I, R]):
    """Coalesces concurrent requests into one call (one bridge crossing) per batch.

    Requests that arrive while a batch is in flight form the next batch, so batches grow with
    load and a lone request goes out at once.
    """

    def __init__(self, fn: Callable[[list[I]], Awaitable[Sequence[R | PyocoError]]]) -> None:
        self._fn = fn
        self._items: list[tuple[I, _Slot[R]]] = []
        self._wake = trio.Event()

    async def submit(self, item: I) -> R:
        slot: _Slot[R] = _Slot()
        self._items.append((item, slot))
        self._wake.set()
        await slot.done.wait()
        if isinstance(slot.value, BaseException):
            raise slot.value
        return slot.value  # type: ignore[no-any-return]

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._items = self._items, []
            if not batch:
                continue
            try:
                results: Sequence[Any] = await self._fn([item for item, _ in batch])
            except PyocoError as exc:
                results = [exc] * len(batch)
            for (_, slot), result in zip(batch, results, strict=True):
                slot.value = result
                slot.done.set()


class BatchedRunStore:
    """Reads and appends of every attempt, batched across runs; decisions as in ``RunStore``."""

    def __init__(self, nats: NatsClient, store: RunStore, *, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self._reader: Batcher[str, list[Envelope]] = Batcher(nats.read_runs)
        self._appender: Batcher[tuple[str, Sequence[Envelope], int, OnStored | None], list[int]] = Batcher(nats.append_many)

    async def run(self) -> None:
        """Serve the batched reads and appends (until cancelled)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader.run)
            nursery.start_soon(self._appender.run)

    async def read_events(self, run_id: str) -> list[Envelope]:
        """Raises:
            PyocoError: NATS failed or the stream is corrupt.
        """
        return await self._reader.submit(run_id)

    async def load(self, run_id: str) -> RunSnapshot | None:
        return fold(None, await self.read_events(run_id))

    async def execute(
        self,
        run_id: str,
        make: Callable[[RunSnapshot | None], Sequence[Event]],
        *,
        producer: Producer,
        hint: RunSnapshot | None,
        on_stored: OnStored | None = None,
    ) -> Outcome:
        """``RunStore.execute`` with the append batched across runs (one crossing per batch).

        Decides against ``hint``; on a concurrency conflict (usually a cancel request) the run is
        re-read and the same decision is made again through ``RunStore``.

        Raises:
            DomainError: from ``make`` (StaleAttempt: the attempt is not ours any more).
            InfraError: NATS failed.
        """
        if hint is None:
            return await self.store.execute(run_id, make, producer=producer)
        events = make(hint)
        if not events:
            return Outcome(hint, ())
        envs = decide.stamp(hint, events, run_id=run_id, producer=producer, now=self.clock(), new_id=new_event_id)
        try:
            seqs = await self._appender.submit((run_id, envs, hint.last_stream_seq, on_stored))
        except ConcurrencyConflict:
            # Re-read the whole run (not from the hint's position, which may be the dispatcher's
            # and is what just proved wrong), then decide again.
            fresh = await self.load(run_id)
            return await self.store.execute(run_id, make, producer=producer, hint=fresh)
        snap: RunSnapshot | None = hint
        stored = []
        for env, seq in zip(envs, seqs, strict=True):
            env = attrs.evolve(env, stream_seq=seq)
            stored.append(env)
            snap = apply(snap, env)
        return Outcome(snap, tuple(stored))


__all__ = ["BatchedRunStore", "Batcher"]
