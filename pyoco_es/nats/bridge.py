"""A stdlib asyncio event loop in a side thread, driven from Trio.

Each :meth:`AsyncioThread.call` is one crossing (~80 µs measured): callers batch work on the
asyncio side (gather N publishes, ack N messages) and cross once per batch.  Streams of values
from asyncio (subscriptions, KV watches) reach Trio through memory channels fed with
``TrioToken.run_sync_soon``.
"""

from __future__ import annotations

import asyncio
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


class _Call:
    """One Trio → asyncio call in flight."""

    __slots__ = ("fn", "args", "task", "atask", "result", "raise_cancel")

    def __init__(self, fn: Callable[..., Awaitable[object]], args: tuple[object, ...], task: trio.lowlevel.Task) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.atask: asyncio.Task[object] | None = None
        self.result: outcome.Outcome[object] | None = None  # None: cancelled
        self.raise_cancel: Callable[[], object] | None = None


class AsyncioThread:
    """Owns one asyncio loop running in a daemon thread until :meth:`stop`.

    Crossings are coalesced in both directions: calls made while a batch is waiting to start
    ride along with it (one wake-up of the asyncio loop), and results that finish together are
    handed back with one ``run_sync_soon`` (one wake-up of Trio).  Under load this turns N
    thread wake-ups into one.
    """

    def __init__(self, name: str = "pyoco-nats") -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._outbox: list[_Call] = []
        self._outbox_scheduled = False
        self._inbox: list[_Call] = []
        self._inbox_scheduled = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(_quiet_handler)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    @trio.lowlevel.enable_ki_protection
    async def call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run ``fn(*args)`` on the asyncio loop and wait for it from Trio.

        Cancelling the Trio caller cancels the asyncio task; the caller then sees
        ``trio.Cancelled``.  (A cancelled publish may still have been sent: callers always set
        a ``Nats-Msg-Id`` so a retry deduplicates.)

        KI-protected: a Ctrl-C between queueing the call and waiting for it would leave a call
        whose answer later reschedules a task that has moved on (a TrioInternalError, seen on
        Ctrl-C during ``pyoco-es replay``); protected, the KeyboardInterrupt arrives through
        the wait's abort like a cancel.
        """
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        c = _Call(fn, args, trio.lowlevel.current_task())  # type: ignore[arg-type]
        with self._lock:
            self._outbox.append(c)
            wake = not self._outbox_scheduled
            self._outbox_scheduled = True
        if wake:
            self.loop.call_soon_threadsafe(self._start_calls)

        def abort(rc: Callable[[], object]) -> trio.lowlevel.Abort:
            c.raise_cancel = rc
            self.loop.call_soon_threadsafe(self._cancel_call, c)
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    # -- on the asyncio thread ------------------------------------------------------------------

    def _start_calls(self) -> None:
        with self._lock:
            calls, self._outbox = self._outbox, []
            self._outbox_scheduled = False
        for c in calls:
            c.atask = self.loop.create_task(c.fn(*c.args))  # type: ignore[arg-type]
            c.atask.add_done_callback(lambda t, c=c: self._finished(c, t))

    def _cancel_call(self, c: _Call) -> None:
        # _start_calls was scheduled before this (FIFO), so the task exists.
        if c.atask is not None and not c.atask.done():
            c.atask.cancel()

    def _finished(self, c: _Call, atask: asyncio.Task[object]) -> None:
        if atask.cancelled():
            c.result = None if c.raise_cancel is not None else outcome.Error(asyncio.CancelledError())
        else:
            exc = atask.exception()
            c.result = outcome.Error(exc) if exc is not None else outcome.Value(atask.result())
        with self._lock:
            self._inbox.append(c)
            wake = not self._inbox_scheduled
            self._inbox_scheduled = True
        if wake and self._token is not None:
            try:
                self._token.run_sync_soon(self._deliver)
            except trio.RunFinishedError:  # pragma: no cover - the Trio run is gone
                pass

    # -- on the Trio thread ---------------------------------------------------------------------

    def _deliver(self) -> None:
        with self._lock:
            done, self._inbox = self._inbox, []
            self._inbox_scheduled = False
        for c in done:
            if c.result is None:
                assert c.raise_cancel is not None
                trio.lowlevel.reschedule(c.task, outcome.capture(c.raise_cancel))
            else:
                trio.lowlevel.reschedule(c.task, c.result)


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
