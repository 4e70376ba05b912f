"""Shared start-up plumbing for the long-running commands: logging, NATS (embedded or given),
signals.  The components themselves are plain ``task_status`` functions."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .config import Settings
from .core.errors import PyocoError
from .nats.client import NatsClient, open_nats
from .nats.embedded import EmbeddedNats, running_server_url
from .nats.resources import ResourceConfig, ensure_resources

log = logging.getLogger(__name__)


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
        server = EmbeddedNats(data_dir=Path(settings.data_dir) / "nats", sync=settings.nats_sync)
        url = server.start()
        if announce:
            print(f"embedded NATS at {url} (data {server.data_dir}, sync {settings.nats_sync})", file=sys.stderr)
    try:
        async with open_nats(url, name=name, unavailable_wait=settings.nats_unavailable_wait) as nats:
            await ensure_resources(
                nats,
                ResourceConfig(replicas=settings.nats_replicas, work_prefix=settings.work_subject_prefix),
            )
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


PARENT_FD_ENV = "PYOCO_ES_PARENT_FD"
EXIT_PARENT_GONE = 70
CLI_ENTRY = "from pyoco_es.runtime import exit_with_parent; exit_with_parent(); from pyoco_es.cli.main import main; main()"


def exit_with_parent() -> None:
    """In a child started by :func:`open_child_service`: exit at once when the parent dies.

    The parent holds the write end of a pipe whose read end we inherit (fd in
    ``PYOCO_ES_PARENT_FD``); nobody ever writes, so the read returns EOF exactly when the last
    holder of the write end is gone: the parent exited or was SIGKILLed.  Unlike
    ``PR_SET_PDEATHSIG`` this does not depend on which of the parent's threads forked us (issue 11).
    A lost parent means the embedded NATS is gone too, so there is nothing to drain: the process
    ends with code 70, and its run processes end because their command pipes close.
    """
    raw = os.environ.pop(PARENT_FD_ENV, None)
    if not raw:
        return
    try:
        fd = int(raw)
        os.set_inheritable(fd, False)  # our own children must not keep it
    except (ValueError, OSError):
        return

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        try:
            os.write(2, b"parent process is gone: exiting now\n")
        finally:
            os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="pyoco-es-parent-watch", daemon=True).start()


@asynccontextmanager
async def open_child_service(
    args: list[str], *, ready_marker: str, name: str, stop_timeout: float = 40.0, start_timeout: float = 30.0
) -> AsyncIterator[trio.Process]:
    """Run ``pyoco-es ARGS`` as a child process that dies with us, for as long as the block runs.

    Its stderr is forwarded to ours; the block is entered once a stderr line contains
    ``ready_marker``.  The child exits at once if we die, even by SIGKILL (:func:`exit_with_parent`).
    On exit the child gets SIGTERM (a worker drains its runs), then SIGKILL after ``stop_timeout``.  If the child exits on its own meanwhile, the block is cancelled and
    :class:`ChildServiceDied` is raised.
    """
    watch_r, watch_w = os.pipe()  # both non-inheritable: only the child gets watch_r (pass_fds)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", CLI_ENTRY, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(watch_r,),
            env={**os.environ, PARENT_FD_ENV: str(watch_r)},
            start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop children in order
        )
    except BaseException:
        os.close(watch_w)
        raise
    finally:
        os.close(watch_r)
    ready = trio.Event()
    stopping = False
    died: list[int] = []

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
                print(f"[{name}] {text}", file=sys.stderr, flush=True)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)

            async def watch() -> None:
                code = await proc.wait()
                if not stopping:
                    died.append(code)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            with trio.fail_after(start_timeout):
                await ready.wait()
            try:
                yield proc
            finally:
                stopping = True
                with trio.CancelScope(shield=True):
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                        with trio.move_on_after(stop_timeout):
                            await proc.wait()
                        if proc.returncode is None:
                            proc.kill()
                            await proc.wait()
                nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        os.close(watch_w)
    if died:
        raise ChildServiceDied(f"{name} exited unexpectedly with code {died[0]}; see its log lines above")


class ChildServiceDied(PyocoError):
    """A service ``pyoco-server up`` started as a child process exited on its own."""
