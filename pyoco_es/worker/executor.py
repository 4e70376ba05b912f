"""The run process's task threads: pyoco's engine reuses one thread pool across runs.

Imported by the child process only (no trio, no NATS): :func:`install_shared_executor` patches
``concurrent.futures`` for calls from ``pyoco.core.engine`` only.
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Callable
from typing import Any


class _RunExecutor:
    """What pyoco's engine gets instead of a new ``ThreadPoolExecutor`` per run: the same API on
    a pool shared by the child's (sequential) runs.  Leaving the ``with`` block waits for this
    run's futures, as ``shutdown(wait=True)`` would; no threads are started or joined per run.

    Submitted tasks are held until the engine waits for them (:meth:`release`): a lone task
    with nothing else of the run in flight and no ``timeout_sec`` then runs right in the
    engine's thread, which saves two thread hand-offs per task of a sequential flow (most of a
    trivial task's cost); several at once, or one beside a running task, go to the pool.
    """

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._pool = pool
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._held: list[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:  # noqa: ANN401
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._futures.add(future)
        self._held.append((future, fn, args, kwargs))
        return future

    def release(self) -> None:
        """Start the held tasks (called when the engine is about to wait for its futures)."""
        held, self._held = self._held, []
        held = [h for h in held if h[0].set_running_or_notify_cancel()]  # skip cancelled ones
        if not held:
            return
        starting = {h[0] for h in held}
        busy = any(f.running() for f in self._futures - starting)
        if len(held) == 1 and not busy and not getattr(held[0][2][0] if held[0][2] else None, "timeout_sec", None):
            future, fn, args, kwargs = held[0]
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - what a pool thread would record
                future.set_exception(exc)
            return
        for future, fn, args, kwargs in held:
            self._pool.submit(_run_into, future, fn, args, kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            for future in self._futures:
                future.cancel()
        self.release()
        if wait:
            concurrent.futures.wait(self._futures)

    def __enter__(self) -> _RunExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)


def _run_into(future: concurrent.futures.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001
        future.set_exception(exc)


_current: list[_RunExecutor] = []  # the engine's executor of the run in progress (one at a time)


def install_shared_executor(max_workers: int = 8) -> None:
    """Make pyoco's engine reuse task threads across runs (it creates a ThreadPoolExecutor per
    run, and starting/joining its threads was about a third of a trivial run's cost), and start
    its held tasks when it waits (see :class:`_RunExecutor`).

    Only calls made from ``pyoco.core.engine`` are redirected; any other code in the child
    (user tasks) still gets a real, private ``ThreadPoolExecutor`` and the real ``wait``.
    """
    real = concurrent.futures.ThreadPoolExecutor
    real_wait = concurrent.futures.wait
    shared = real(max_workers=max_workers, thread_name_prefix="pyoco-task")

    class EngineAwareThreadPoolExecutor(real):  # type: ignore[misc, valid-type]
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            if sys._getframe(1).f_globals.get("__name__") == "pyoco.core.engine":
                executor = _RunExecutor(shared)
                _current[:] = [executor]
                return executor
            return super().__new__(cls)

    def engine_aware_wait(fs: Any, timeout: float | None = None, return_when: str = concurrent.futures.ALL_COMPLETED) -> Any:  # noqa: ANN401
        if _current and sys._getframe(1).f_globals.get("__name__") == "pyoco.core.engine":
            _current[0].release()
        return real_wait(fs, timeout=timeout, return_when=return_when)

    concurrent.futures.ThreadPoolExecutor = EngineAwareThreadPoolExecutor  # type: ignore[misc]
    concurrent.futures.wait = engine_aware_wait  # type: ignore[assignment]


__all__ = ["install_shared_executor"]
