"""Shared start-up plumbing for the long-running commands: logging, NATS (embedded or given),
signals.  The components themselves are plain ``task_status`` functions."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from . import logs
from .lifeline import PARENT_FD_ENV
from .config import Settings
from .core.errors import PyocoError
from .nats.client import NatsClient, open_nats
from .nats.embedded import EmbeddedNats, running_server_url
from .nats.resources import ResourceConfig, ensure_resources

log = logging.getLogger(__name__)


def configure_logging(settings: Settings, level: str | None = None, *, service: str, stdout_is_output: bool = False) -> None:
    """Logs in ``settings.log_format`` (PYOCO_LOG_FORMAT), at ``level`` (the ``--log-level`` the
    user typed), else ``settings.log_level`` (PYOCO_LOG_LEVEL), else warning; JSON on stdout and
    text on stderr unless PYOCO_LOG_STREAM says otherwise, and always on stderr for a command
    whose stdout is its output (``stdout_is_output``)."""
    logs.configure(
        level or settings.log_level or "warning",
        service=service,
        fmt=settings.log_format,
        utc=settings.log_utc,
        include_traceback=settings.log_include_traceback,
        to="stderr" if stdout_is_output else settings.log_stream,
    )


def resource_config(settings: Settings) -> ResourceConfig:
    """The streams' and buckets' shape that ``settings`` asks for."""
    return ResourceConfig.from_settings(settings)


@asynccontextmanager
async def open_system_nats(
    settings: Settings, *, name: str, announce: bool = False, attach: bool = False
) -> AsyncIterator[NatsClient]:
    """Connect to ``settings.nats_url``, or start the embedded server under ``settings.data_dir``.

    With ``attach`` (commands that only read or repair: ``events``, ``replay``), the server a
    running ``up`` keeps on that data dir is used instead of starting a second one on its store.
    The streams and buckets are created or updated before the client is handed out.

    Raises:
        DataDirInUse: another process holds the data dir (and ``attach`` is off, or its server
            never became reachable).
    """
    server: EmbeddedNats | None = None
    url = settings.nats_url
    if not url and attach:
        url = await trio.to_thread.run_sync(running_server_url, Path(settings.data_dir) / "nats")
    if not url:
        server = EmbeddedNats(
            data_dir=Path(settings.data_dir) / "nats",
            sync=settings.nats_sync,
            host=settings.nats_listen_host,
            port=settings.nats_client_port,
            http_port=settings.nats_http_port,
        )
        url = server.start()
        if announce:
            logs.announce(f"embedded NATS at {url} (data {server.data_dir}, sync {settings.nats_sync})")
    try:
        async with open_nats(url, name=name, unavailable_wait=settings.nats_unavailable_wait) as nats:
            await ensure_resources(nats, resource_config(settings))
            yield nats
    finally:
        if server is not None:
            server.stop()


async def wait_for_stop_signal(stop: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Set ``stop`` on the first SIGINT/SIGTERM; a second one raises KeyboardInterrupt."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if stop.is_set():
                raise KeyboardInterrupt
            log.warning("received %s: shutting down (again to force)", signal.Signals(signum).name)
            stop.set()


async def serve_until_stopped(settings: Settings, *, name: str, start: Callable[[NatsClient, trio.Nursery], Awaitable[str]]) -> None:
    """Run one service (``pyoco-es gateway``, ``pyoco-es conductor``) until SIGINT/SIGTERM.

    Opens the system's NATS as ``name``, watches for the stop signal, calls ``start(nats,
    nursery)`` (it starts the service in ``nursery`` and returns the line to announce), then
    cancels the service on the first signal.

    Raises:
        ExceptionGroup: whatever the service or NATS raised (``PyocoError`` for a known failure).
    """
    stop = trio.Event()
    async with open_system_nats(settings, name=name, announce=True) as nats:
        async with trio.open_nursery() as nursery:
            await nursery.start(wait_for_stop_signal, stop)
            logs.announce(await start(nats, nursery))
            await stop.wait()
            nursery.cancel_scope.cancel()


CLI_ENTRY = "from pyoco_es.lifeline import exit_with_parent; exit_with_parent(); from pyoco_es.cli.main import main; main()"


@attrs.frozen
class RestartBackoff:
    """How long a supervisor waits before restarting a child that exited on its own.

    The first restart waits ``first`` seconds; each further quick death doubles the wait, up to
    ``longest``; a child that lived ``healthy_after`` seconds or more starts the count again.
    """

    first: float = 1.0
    longest: float = 30.0
    healthy_after: float = 60.0

    def next_delay(self, previous: float | None, *, lived: float) -> float:
        """The wait before the next restart, given the last wait (None: no restart yet) and how
        long the child that just died had lived."""
        if previous is None or lived >= self.healthy_after:
            return self.first
        return min(previous * 2, self.longest)


async def run_child_service(
    args: list[str],
    *,
    ready_marker: str,
    name: str,
    stop_timeout: float = 40.0,
    start_timeout: float = 30.0,
    backoff: RestartBackoff = RestartBackoff(),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run ``pyoco-es ARGS`` as a child process that dies with us, and keep it running.

    Started (``task_status``) once the child's stderr shows ``ready_marker``; its stderr is
    forwarded to ours.  Each child exits at once if we die, even by SIGKILL
    (:func:`~pyoco_es.lifeline.exit_with_parent`).  A child that exits on its own (a crash, a SIGKILL) is logged and
    restarted after :class:`RestartBackoff`'s wait.  When cancelled, the child gets SIGTERM (a
    worker drains its runs), then SIGKILL after ``stop_timeout``.

    Raises:
        ChildServiceDied: the first child exited, or did not show ``ready_marker`` within
            ``start_timeout``, before it was ever ready (a start-up error is not retried).
    """
    started = False
    delay: float | None = None

    def on_ready(proc: trio.Process) -> None:
        nonlocal started
        if started:
            log.warning("%s restarted (pid %s)", name, proc.pid)
        else:
            started = True
            task_status.started()

    while True:
        born = trio.current_time()
        code = await _run_child_once(
            args, ready_marker=ready_marker, name=name, stop_timeout=stop_timeout, start_timeout=start_timeout, on_ready=on_ready
        )
        if not started:
            raise ChildServiceDied(f"{name} exited unexpectedly with code {code}; see its log lines above")
        delay = backoff.next_delay(delay, lived=trio.current_time() - born)
        log.warning("%s exited unexpectedly with code %s; restarting it in %.0f s", name, code, delay)
        await trio.sleep(delay)


async def _run_child_once(
    args: list[str],
    *,
    ready_marker: str,
    name: str,
    stop_timeout: float,
    start_timeout: float,
    on_ready: Callable[[trio.Process], None],
) -> int:
    """Run one child until it exits on its own, and return its exit code.

    ``on_ready`` is called once its stderr shows ``ready_marker``; one that does not within
    ``start_timeout`` is killed (its code is returned).  When cancelled, the child gets SIGTERM,
    then SIGKILL after ``stop_timeout``.
    """
    watch_r, watch_w = os.pipe()  # both non-inheritable: only the child gets watch_r (pass_fds)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", CLI_ENTRY, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(watch_r,),
            # the child logs to stderr, which is read here (its ready marker) and forwarded to our
            # own log stream
            env={**os.environ, PARENT_FD_ENV: str(watch_r), "PYOCO_LOG_STREAM": "stderr"},
            start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop children in order
        )
    except BaseException:
        os.close(watch_w)
        raise
    finally:
        os.close(watch_r)
    ready = trio.Event()
    settled = trio.Event()  # ready, or exited before it

    async def forward() -> None:
        assert proc.stderr is not None
        buf = b""
        async for chunk in proc.stderr:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace")
                if ready_marker in text:
                    ready.set()
                    settled.set()
                print(logs.child_line(name, text), file=logs.stream(), flush=True)

    async def watch() -> None:
        await proc.wait()
        settled.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            nursery.start_soon(watch)
            try:
                with trio.move_on_after(start_timeout):
                    await settled.wait()
                if ready.is_set() and proc.returncode is None:
                    on_ready(proc)
                elif proc.returncode is None:
                    log.warning("%s did not become ready within %.0f s: killing it", name, start_timeout)
                    proc.kill()
                code = await proc.wait()
            finally:
                with trio.CancelScope(shield=True):
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                        with trio.move_on_after(stop_timeout):
                            await proc.wait()
                        if proc.returncode is None:
                            proc.kill()
                            await proc.wait()
                nursery.cancel_scope.cancel()  # its run processes may still hold the stderr pipe
    finally:
        if proc.returncode is None:
            proc.kill()
        os.close(watch_w)
    return code


class ChildServiceDied(PyocoError):
    """A service ``pyoco-server up`` started as a child process exited before it was ever ready."""
