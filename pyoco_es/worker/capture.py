"""Live task output in the run process: what tasks print, write to their file descriptors or log,
captured while they run and sent to the worker in small ``log`` frames.

Imported by the child process only (no trio, no NATS).  :func:`install_capture` (called once
at the child's start) sets up three ways in, all ending in one bounded queue of lines:

- **File descriptors.** fd 1 and 2 are ``dup2``'d onto pipes read by a thread, so output of C
  extensions and of subprocesses a task starts (``subprocess.run(["echo", ...])``) is caught.
  Such a line belongs to the task running when it is read (the most recently started one when
  several run at once); a task's end first drains the pipes (after ``fflush`` of C stdio), so
  what it printed is attributed to it.
- **``sys.stdout`` / ``sys.stderr``.** Replaced by streams that know which task the writing
  thread runs, so concurrent tasks' ``print()`` lines are told apart exactly.
- **``logging``.** A handler on the root logger (set to INFO when nobody configured it) tags
  records with the task of the logging thread (stream ``log``).

Each line is ``[task, try, stream, time, text]`` (task None: output of the run outside any task;
``try`` is 1 unless the task's code set another with :func:`set_try`).  Lines are sent only
while a run executes (pyoco's ``Engine.run`` is wrapped: the run's lines are all sent before
the child answers ``done``, so they are never mixed up with the next run's); output outside a
run goes to the child's original stdout/stderr as before.

Never slow a task: writers only append to the queue (a lock, no I/O).  A sender thread sends
what is queued at once when it was idle, then at most every ``FLUSH_INTERVAL`` (batching a
flood into frames of up to ``FRAME_LINES`` lines).  A full queue (the worker is not reading
fast enough) drops lines and counts them; the count goes with the next frame (``dropped``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TextIO

FLUSH_INTERVAL: Final = 0.05  # seconds between frames while lines keep coming
FRAME_LINES: Final = 500  # lines per frame at most
FRAME_CHARS: Final = 256 * 1024  # text per frame at most (roughly)
QUEUE_LINES: Final = 20000  # lines waiting for the sender at most; more are dropped (counted)
LINE_MAX: Final = 16384  # characters kept of one line (the rest is cut, with a note)

Line = list[Any]  # [task, try, stream, ts, text]


def _cut(text: str) -> str:
    if len(text) <= LINE_MAX:
        return text
    return f"{text[:LINE_MAX]}...[line cut: {len(text)} characters]"


class Capture:
    """The run process's output queue, the per-thread task tags and the sender.

    Args:
        send: writes one frame to the worker (the child's channel; may block while the pipe is
            full, which only the sender thread waits for).
    """

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._queue: deque[Line] = deque()
        self._dropped = 0
        self.active = False
        self.running: dict[int, tuple[str, int]] = {}  # thread id -> (task, try), in start order
        self._partial: dict[tuple[int, str], str] = {}  # (thread, stream) -> an unfinished line
        self._wake = threading.Event()
        self._send_lock = threading.Lock()  # frames leave in queue order
        self._fd_lock = threading.Lock()
        self._fd_partial: dict[int, bytes] = {}
        self._pipes: dict[int, tuple[str, int]] = {}  # read fd -> (stream, original fd)
        self._fflush: Callable[[], int] | None = None

    # -- tagging --------------------------------------------------------------------------------

    def task_started(self, name: str) -> None:
        with self._lock:
            self.running[threading.get_ident()] = (name, 1)

    def set_try(self, try_no: int) -> None:
        ident = threading.get_ident()
        with self._lock:
            current = self.running.get(ident)
            if current is not None:
                self.running[ident] = (current[0], int(try_no))

    def task_ended(self) -> None:
        """The calling thread's task returned or raised: what it wrote is its own."""
        self._flush_c_stdio()
        self.drain_fds()
        ident = threading.get_ident()
        self._flush_partials(ident)
        with self._lock:
            self.running.pop(ident, None)

    def owner(self) -> tuple[str | None, int]:
        """Who output read from the fds belongs to: the latest task still running."""
        with self._lock:
            if not self.running:
                return None, 1
            return next(reversed(self.running.values()))

    # -- lines ----------------------------------------------------------------------------------

    def add(self, task: str | None, try_no: int, stream: str, lines: list[str]) -> None:
        now = time.time()
        with self._lock:
            room = QUEUE_LINES - len(self._queue)
            if room < len(lines):
                self._dropped += len(lines) - max(0, room)
                lines = lines[: max(0, room)]
            for text in lines:
                self._queue.append([task, try_no, stream, now, _cut(text)])
        if not self._wake.is_set():
            self._wake.set()

    def write_text(self, stream: str, data: str) -> bool:
        """A ``sys.stdout``/``sys.stderr`` write; False when the writing thread runs no task."""
        ident = threading.get_ident()
        tag = self.running.get(ident)
        if tag is None or not self.active:
            return False
        key = (ident, stream)
        if data == "\n":  # print()'s second write: the line is complete
            self.add(tag[0], tag[1], stream, [self._partial.pop(key, "")])
            return True
        if "\n" not in data:
            buf = self._partial.get(key, "") + data
            if len(buf) > LINE_MAX:
                self.add(tag[0], tag[1], stream, [buf])
                buf = ""
            self._partial[key] = buf
            return True
        *lines, rest = (self._partial.pop(key, "") + data).split("\n")
        if rest:
            self._partial[key] = rest
        self.add(tag[0], tag[1], stream, lines)
        return True

    def _flush_partials(self, ident: int | None = None) -> None:
        for key in [k for k in self._partial if ident is None or k[0] == ident]:
            text = self._partial.pop(key, "")
            tag = self.running.get(key[0], (None, 1))
            if text:
                self.add(tag[0], tag[1], key[1], [text])

    # -- file descriptors -----------------------------------------------------------------------

    def capture_fds(self) -> None:
        """Point fd 1 and 2 at pipes read by a thread (the originals are kept for pass-through)."""
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            original = os.dup(fd)
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.dup2(w, fd)
            os.close(w)
            self._pipes[r] = (stream, original)
        with contextlib.suppress(OSError, ValueError):
            libc = ctypes.CDLL(None)
            c_stdout = ctypes.c_void_p.in_dll(libc, "stdout")  # C stdio's stdout (stderr is unbuffered)
            fflush = libc.fflush
            fflush.argtypes = [ctypes.c_void_p]
            self._fflush = lambda: fflush(c_stdout)
        threading.Thread(target=self._read_fds, name="pyoco-es-fds", daemon=True).start()

    def original_fd(self, stream: str) -> int:
        for name, original in self._pipes.values():
            if name == stream:
                return original
        return 1 if stream == "stdout" else 2

    def _read_fds(self) -> None:
        fds = list(self._pipes)
        while True:
            try:
                select.select(fds, [], [])
                self.drain_fds()
            except Exception:  # noqa: BLE001 - the reader must outlive anything; the pipes must never fill
                time.sleep(0.01)

    def drain_fds(self) -> None:
        """Read what the pipes hold now (non-blocking) and queue it, or pass it through when no
        run executes."""
        with self._fd_lock:
            # One poll for both pipes: most task ends find nothing there (cheaper than a read each).
            ready = select.select(list(self._pipes), [], [], 0)[0] if self._pipes else []
            for fd in ready:
                stream, original = self._pipes[fd]
                chunks = []
                while True:
                    try:
                        data = os.read(fd, 65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    if not data:
                        break
                    chunks.append(data)
                if chunks:
                    self._fd_data(fd, stream, original, b"".join(chunks))

    def _fd_data(self, fd: int, stream: str, original: int, data: bytes) -> None:
        if not self.active:
            data = self._fd_partial.pop(fd, b"") + data
            with contextlib.suppress(OSError):
                os.write(original, data)
            return
        *lines, rest = (self._fd_partial.pop(fd, b"") + data).split(b"\n")
        if len(rest) > LINE_MAX:
            lines.append(rest)
            rest = b""
        if rest:
            self._fd_partial[fd] = rest
        if lines:
            task, try_no = self.owner()
            self.add(task, try_no, stream, [line.decode("utf-8", "replace") for line in lines])

    def _flush_c_stdio(self) -> None:
        if self._fflush is not None:
            with contextlib.suppress(Exception):
                self._fflush()

    # -- runs and sending -----------------------------------------------------------------------

    def begin_run(self) -> None:
        with self._lock:
            self._queue.clear()
            self._dropped = 0
            self.active = True

    def end_run(self) -> None:
        """Send every line of the run (before the child answers ``done``), then stop capturing."""
        try:
            self._flush_c_stdio()
            self.drain_fds()
            self._flush_partials()
            with self._fd_lock:
                leftovers = [(fd, self._fd_partial.pop(fd)) for fd in list(self._fd_partial)]
            for fd, rest in leftovers:
                self.add(*self.owner(), self._pipes[fd][0], [rest.decode("utf-8", "replace")])
        finally:
            self.flush(last=True)

    def flush(self, *, last: bool = False) -> None:
        """Send what is queued, in frames of at most ``FRAME_LINES`` lines; ``last``: the run's
        final flush, after which nothing of the run is sent (no frame may follow ``done``)."""
        with self._send_lock:
            try:
                while self.active:
                    with self._lock:
                        batch: list[Line] = []
                        chars = 0
                        while self._queue and len(batch) < FRAME_LINES and chars < FRAME_CHARS:
                            line = self._queue.popleft()
                            chars += len(line[4]) + 32
                            batch.append(line)
                        dropped, self._dropped = self._dropped, 0
                    if not batch and not dropped:
                        return
                    try:
                        self._send({"ev": "log", "lines": batch, "dropped": dropped})
                    except (OSError, ValueError):
                        return  # the worker is gone (the child exits on its own) or a line will not encode
            finally:
                if last:
                    with self._lock:
                        self.active = False
                        self.running.clear()
                        self._queue.clear()

    def run_sender(self) -> None:
        """The sender thread: wake on the first line after a quiet spell, send, then let lines
        gather for ``FLUSH_INTERVAL`` before the next frame."""
        while True:
            self._wake.wait()
            self._wake.clear()
            if self.active:
                self.flush()
                time.sleep(FLUSH_INTERVAL)


class TaskStream:
    """``sys.stdout``/``sys.stderr`` while the child lives: a task thread's writes become lines
    of that task; any other write goes to the real stream (whose fd is captured anyway)."""

    def __init__(self, capture: Capture, stream: str, real: TextIO) -> None:
        self._capture = capture
        self._stream = stream
        self._real = real

    def write(self, data: str) -> int:
        if not self._capture.write_text(self._stream, data):
            return self._real.write(data)
        return len(data)

    def writelines(self, lines: Any) -> None:  # noqa: ANN401 - any iterable of str
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._real.flush()

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - encoding, fileno, buffer, isatty...
        return getattr(self._real, name)


class CaptureHandler(logging.Handler):
    """``logging`` records of a running task become its ``log`` lines."""

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self._capture = capture
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            tag = self._capture.running.get(threading.get_ident())
            if self._capture.active:
                task, try_no = tag if tag is not None else (None, 1)
                self._capture.add(task, try_no, "log", text.split("\n"))
            elif record.levelno >= logging.WARNING:  # outside runs: what Python's last resort would print
                os.write(self._capture.original_fd("stderr"), (text + "\n").encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - logging must never fail the task
            self.handleError(record)


class _Tagging:
    """pyoco's trace backend, wrapped: task start/end tag the task's thread."""

    def __init__(self, inner: Any, capture: Capture) -> None:  # noqa: ANN401 - a TraceBackend
        self._inner = inner
        self._capture = capture

    def on_node_start(self, node_name: str) -> None:
        self._capture.task_started(node_name)
        self._inner.on_node_start(node_name)

    def on_node_end(self, node_name: str, duration_ms: float) -> None:
        self._capture.task_ended()
        self._inner.on_node_end(node_name, duration_ms)

    def on_node_error(self, node_name: str, error: Exception) -> None:
        self._capture.task_ended()
        self._inner.on_node_error(node_name, error)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        return getattr(self._inner, name)


_installed: list[Capture] = []


def set_try(try_no: int) -> None:
    """Tag the calling task thread's next lines with this try number (for code that retries a
    task inside the run process; the default is 1)."""
    if _installed:
        _installed[0].set_try(try_no)


def install_capture(send: Callable[[dict[str, Any]], None]) -> Capture:
    """Capture task output in this process from now on (see the module docstring)."""
    from pyoco.core.engine import Engine

    capture = Capture(send)
    capture.capture_fds()
    sys.stdout = TaskStream(capture, "stdout", sys.stdout)  # type: ignore[assignment]
    sys.stderr = TaskStream(capture, "stderr", sys.stderr)  # type: ignore[assignment]
    root = logging.getLogger()
    if not root.handlers and root.level == logging.WARNING:
        root.setLevel(logging.INFO)  # nobody configured logging here: a task's info lines count
    root.addHandler(CaptureHandler(capture))
    threading.Thread(target=capture.run_sender, name="pyoco-es-logs", daemon=True).start()
    real_run = Engine.run

    def run(engine: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        engine.trace = _Tagging(engine.trace, capture)
        capture.begin_run()
        try:
            return real_run(engine, *args, **kwargs)
        finally:
            capture.end_run()

    Engine.run = run  # type: ignore[method-assign]
    _installed[:] = [capture]
    return capture


__all__ = ["Capture", "install_capture", "set_try"]
