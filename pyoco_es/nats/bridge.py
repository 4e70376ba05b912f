"""A stdlib asyncio event loop in a side thread, driven from Trio.

Each :meth:`AsyncioThread.call` is one crossing (~80 µs measured): callers batch work on the
asyncio side (gather N publishes, ack N messages) and cross once per batch.  Streams of values
from asyncio (subscriptions, KV watches) reach Trio through memory channels fed with
``TrioToken.run_sync_soon``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")


def _quiet_handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """Tasks whose Trio caller was cancelled may still end with an error nobody awaits (e.g. the
    connection closing under them at shutdown); that is expected, so only debug-log it."""
    exc = context.get("exception")
    if "never retrieved" in str(context.get("message", "")):
        logging.getLogger(__name__).debug("asyncio task ended after its caller left: %r", exc)
        return
    loop.default_exception_handler(context)


class AsyncioThread:
    """Owns one asyncio loop running in a daemon thread until :meth:`stop`."""

    def __init__(self, name: str = "pyoco-nats") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(_quiet_handler)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run ``fn(*args)`` on the asyncio loop and wait for it from Trio.

        Cancelling the Trio caller cancels the asyncio task; the caller then sees
        ``trio.Cancelled``.  (A cancelled publish may still have been sent: callers always set
        a ``Nats-Msg-Id`` so a retry deduplicates.)
        """
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        raise_cancel: list[Callable[[], object]] = []

        def done(fut: concurrent.futures.Future[T]) -> None:
            def wake() -> None:
                if fut.cancelled() and raise_cancel:
                    trio.lowlevel.reschedule(task, outcome.capture(raise_cancel[0]))
                else:
                    trio.lowlevel.reschedule(task, outcome.capture(fut.result))

            try:
                token.run_sync_soon(wake)
            except trio.RunFinishedError:  # pragma: no cover - the Trio run is gone
                pass

        cfut = asyncio.run_coroutine_threadsafe(fn(*args), self.loop)  # type: ignore[arg-type]
        cfut.add_done_callback(done)

        def abort(rc: Callable[[], object]) -> trio.lowlevel.Abort:
            raise_cancel.append(rc)
            self.loop.call_soon_threadsafe(cfut.cancel)
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Schedule a plain callback on the asyncio loop (fire and forget, thread-safe)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        if self.loop.is_closed():
            return

        async def _shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(_shutdown(), self.loop).result(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
