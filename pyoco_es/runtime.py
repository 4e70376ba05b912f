"""Shared start-up plumbing for the long-running commands: logging, NATS (embedded or given),
signals.  The components themselves are plain ``task_status`` functions."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .config import Settings
from .core.errors import PyocoError
from .nats.client import NatsClient, open_nats
from .nats.embedded import EmbeddedNats, running_server_url, set_parent_death_signal
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
        async with open_nats(url, name=name) as nats:
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


CLI_ENTRY = "from pyoco_es.cli.main import main; main()"


@asynccontextmanager
async def open_child_service(
    args: list[str], *, ready_marker: str, name: str, stop_timeout: float = 40.0, start_timeout: float = 30.0
) -> AsyncIterator[trio.Process]:
    """Run ``pyoco-es ARGS`` as a child process that dies with us, for as long as the block runs.

    Its stderr is forwarded to ours; the block is entered once a stderr line contains
    ``ready_marker``.  On exit the child gets SIGTERM (a worker drains its runs), then SIGKILL
    after ``stop_timeout``.  If the child exits on its own meanwhile, the block is cancelled and
    :class:`ChildServiceDied` is raised.
    """
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", CLI_ENTRY, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=set_parent_death_signal,
        start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop children in order
    )
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
    if died:
        raise ChildServiceDied(f"{name} exited unexpectedly with code {died[0]}; see its log lines above")


class ChildServiceDied(PyocoError):
    """A service ``pyoco-server up`` started as a child process exited on its own."""
