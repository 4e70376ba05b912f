"""``open_stack``: embedded NATS + conductor + gateway (+ optional worker) in one Trio program."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from ..config import Settings
from ..nats.client import NatsClient, open_nats
from ..nats.embedded import EmbeddedNats
from ..nats.resources import ensure_resources


@attrs.frozen
class Stack:
    url: str  # the gateway's base URL, e.g. http://127.0.0.1:40123
    nats_url: str
    nats: NatsClient
    settings: Settings
    server: EmbeddedNats
    nursery: trio.Nursery
    worker_stop: trio.Event | None


@asynccontextmanager
async def open_stack(
    tmp_path: Path,
    *,
    settings: Settings | None = None,
    gateway: bool = True,
    conductor: bool = True,
    worker: bool = False,
    worker_id: str = "w1",
    worker_tags: Sequence[str] = ("default",),
    concurrency: int = 4,
    allowed_modules: Sequence[str] = ("examples",),
    flow_resolver: Callable[[str], Any] | None = None,
) -> AsyncIterator[Stack]:
    """Start the parts asked for on a private nats-server; everything stops on exit."""
    settings = settings or Settings()
    server = EmbeddedNats(data_dir=tmp_path / "stack-nats")
    server.start()
    try:
        async with open_nats(server.url, name="stack", unavailable_wait=settings.nats_unavailable_wait) as nats:
            await ensure_resources(nats)
            async with trio.open_nursery() as nursery:
                url = ""
                if conductor:
                    from ..conductor.service import run_conductor

                    await nursery.start(run_conductor, nats, settings)
                if gateway:
                    from ..gateway.server import run_gateway

                    host, port = await nursery.start(lambda task_status: run_gateway(nats, settings, host="127.0.0.1", port=0, task_status=task_status))
                    url = f"http://{host}:{port}"
                stop: trio.Event | None = None
                if worker:
                    from ..worker.supervisor import run_worker

                    stop = trio.Event()
                    await nursery.start(
                        lambda task_status: run_worker(
                            nats,
                            settings,
                            worker_id=worker_id,
                            tags=list(worker_tags),
                            concurrency=concurrency,
                            flow_resolver=flow_resolver,
                            allowed_modules=list(allowed_modules),
                            stop=stop,
                            task_status=task_status,
                        )
                    )
                yield Stack(url, server.url, nats, settings, server, nursery, stop)
                nursery.cancel_scope.cancel()
    finally:
        server.stop()
