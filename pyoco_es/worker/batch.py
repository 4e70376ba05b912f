"""Coalescing of concurrent NATS requests: one bridge crossing per batch (reads, appends)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import attrs
import trio

from ..core.errors import PyocoError

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


__all__ = ["Batcher"]
