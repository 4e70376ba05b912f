"""Task retries and timeouts inside the run process (issue 16).

pyoco's own retries sleep a fixed 0.1 s and leave no trace, and its ``timeout_sec`` waits for the
task thread anyway (``../shared/reference/pyoco-library-notes.md`` §7).  So for a task whose
policy (:mod:`pyoco_es.flows.policy`) asks for either, the run process takes both over for the
length of one run (:func:`guarded`): pyoco sees ``retries=0`` and no timeout, and the task's
function is wrapped so that

* each failed try but the last sends a ``task.retry_scheduled`` frame (try number, error, reason,
  delay) and waits the backoff delay; a cancel ends the wait (and the retries) at once;
* each try of a task with ``timeout_sec`` sends a ``task.try`` frame first (the worker keeps the
  deadline, see :mod:`pyoco_es.worker.timeouts`), and when the timeout passes the task's thread
  gets a :class:`TaskTimeout` raised into it (``PyThreadState_SetAsyncExc``).  Python code (a busy
  loop, a loop of short sleeps) stops there and the try fails with reason ``timeout``: retries
  apply.  A thread blocked in C (one long ``sleep``, a socket read) cannot be interrupted: the
  worker kills the whole run process a moment later and the attempt ends FAILED ``timeout``.

Tasks without retries or a timeout are left untouched (no cost for them).  Runs one at a time per
process, so the wrapping is undone after each run (named flows may reuse their Task objects).
Imports no trio and no NATS.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from pyoco.core.models import Flow

from ..flows.policy import TaskPolicy, policy_of
from .capture import set_try
from .describe import describe_error

ERROR_MAX = 4000  # characters of a failed try's error in its frame


class Sender(Protocol):
    def send(self, msg: dict[str, Any]) -> None: ...


class TaskTimeout(TimeoutError):
    """A try of a task ran past its ``timeout_sec`` (the worker maps it to reason ``timeout``)."""


class RetriesStopped(RuntimeError):
    """A cancel arrived while a task waited for its next try: the retries end with the run."""


class _Interrupted(BaseException):
    """Raised into a task's thread at its deadline; a BaseException, so ``except Exception``
    in the task does not swallow it.  Converted to :class:`TaskTimeout` by the wrapper."""


class Prepared:
    """A built run waiting for its ``go`` (or running): its flow, params and cancel state."""

    def __init__(self, run_id: str, flow: Flow, params: dict[str, Any]) -> None:
        self.run_id = run_id
        self.flow = flow
        self.params = params
        self.cancelled = threading.Event()  # wakes a retry delay at once
        self.run_ctx: Any = None
        self.policies: dict[str, TaskPolicy] = {t.name: p for t in flow.tasks if (p := policy_of(t)) is not None}
        self.retries_stopped = False  # a cancel ended a task's retries: the run is cancelled
        self.timed_out = False  # a task failed on its timeout: the run fails with reason timeout
        self.interrupted = False  # an exception was raised into a task thread (see verdict)

    @property
    def cancel_requested(self) -> bool:
        return self.cancelled.is_set()

    @cancel_requested.setter
    def cancel_requested(self, value: bool) -> None:
        if value:
            self.cancelled.set()

    def verdict(self, done: dict[str, Any]) -> dict[str, Any]:
        """The run's ``done`` frame, corrected for what the wrappers saw: a run whose retries a
        cancel stopped is CANCELLED (pyoco saw a failing task), a task timeout gives ``reason``.
        A process that had an exception raised into one of its threads asks to be replaced
        (``recycle``): it may have landed inside library code holding a lock or half-way through
        an update, and the next run deserves a clean process."""
        if self.interrupted:
            done["recycle"] = True
        if done.get("outcome") == "FAILED":
            if self.retries_stopped:
                done.update(outcome="CANCELLED", error=None, traceback=None)
            elif self.timed_out:
                done["reason"] = "timeout"
        return done


@contextmanager
def guarded(p: Prepared, channel: Sender) -> Iterator[None]:
    """For one run: tasks with a policy get the wrapper, pyoco's own retries and timeout off."""
    if not p.policies:
        yield
        return
    saved = []
    for task in p.flow.tasks:
        policy = p.policies.get(task.name)
        if policy is not None:
            saved.append((task, task.func, task.retries, task.timeout_sec))
            task.func = _tried(task.func, task.name, policy, p, channel)
            task.retries, task.timeout_sec = 0, None
    try:
        yield
    finally:
        for task, func, retries, timeout in saved:
            task.func, task.retries, task.timeout_sec = func, retries, timeout


def _tried(func: Callable[..., Any], name: str, policy: TaskPolicy, p: Prepared, channel: Sender) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps inspect.signature: pyoco's argument injection still works
    def tried(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        n = 1
        while True:
            try:
                return _one_try(func, args, kwargs, name, n, policy, p, channel)
            except Exception as exc:
                if n >= policy.max_tries:
                    p.timed_out = p.timed_out or isinstance(exc, TaskTimeout)
                    raise
                if p.cancelled.is_set():
                    p.retries_stopped = True
                    raise RetriesStopped(f"cancelled before try {n + 1} of {policy.max_tries}: {describe_error(exc)}") from exc
                delay = policy.delay(n)
                channel.send(
                    {
                        "ev": "task.retry_scheduled",
                        "run_id": p.run_id,
                        "task": name,
                        "try_number": n,
                        "max_tries": policy.max_tries,
                        "error": describe_error(exc)[:ERROR_MAX],
                        "reason": "timeout" if isinstance(exc, TaskTimeout) else "error",
                        "delay_sec": delay,
                        "failed_at": time.time(),
                    }
                )
                if p.cancelled.wait(delay):
                    p.retries_stopped = True
                    raise RetriesStopped(f"cancelled before try {n + 1} of {policy.max_tries}: {describe_error(exc)}") from exc
                n += 1

    return tried


def _one_try(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str, n: int, policy: TaskPolicy, p: Prepared, channel: Sender
) -> Any:  # noqa: ANN401
    timeout = policy.timeout_sec
    set_try(n)  # this try's output lines carry its number (worker/capture.py)
    if timeout is None:
        return func(*args, **kwargs)
    channel.send({"ev": "task.try", "run_id": p.run_id, "task": name, "try_number": n, "timeout_sec": timeout})
    alarm = _Alarm(threading.get_ident())
    timer = threading.Timer(timeout, alarm.ring)
    timer.daemon = True
    timer.start()
    message = f"task '{name}' exceeded its timeout of {timeout:g}s (try {n} of {policy.max_tries})"
    try:
        try:
            result = func(*args, **kwargs)
        finally:
            timer.cancel()
            alarm.disarm()
            p.interrupted = p.interrupted or alarm.rang
    except _Interrupted:
        alarm.disarm()  # it rings once: nothing can be raised into this thread after this
        p.interrupted = True
        raise TaskTimeout(message) from None
    if alarm.rang:  # the task caught the interrupt and returned late: still a timeout
        raise TaskTimeout(message)
    return result


class _Alarm:
    """Raises :class:`_Interrupted` into one thread, at most once, and only while it still runs
    the try (``disarm`` under the same lock marks the try over and clears an undelivered one)."""

    def __init__(self, thread_id: int) -> None:
        self.thread_id = thread_id
        self.lock = threading.Lock()
        self.done = False
        self.rang = False

    def ring(self) -> None:
        with self.lock:
            if not self.done and not self.rang:
                self.rang = True
                _set_async_exc(self.thread_id, _Interrupted)

    def disarm(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
            if self.rang:
                _set_async_exc(self.thread_id, None)


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None)


__all__ = ["Prepared", "RetriesStopped", "TaskTimeout", "guarded"]
