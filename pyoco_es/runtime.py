"""Shared start-up plumbing for the long-running commands: logging, NATS (embedded or given),
signals.  The components themselves are plain ``task_status`` functions."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .config import Settings
from .nats.client import NatsClient, open_nats
from .nats.embedded import EmbeddedNats
from .nats.resources import ResourceConfig, ensure_resources

log = logging.getLogger(__name__)


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@asynccontextmanager
async def open_system_nats(settings: Settings, *, name: str, announce: bool = False) -> AsyncIterator[NatsClient]:
    """Connect to ``settings.nats_url``, or start the embedded server under ``settings.data_dir``.

    The streams and buckets are created or updated before the client is handed out.
    """
    server: EmbeddedNats | None = None
    url = settings.nats_url
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
