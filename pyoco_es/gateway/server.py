"""``run_gateway``: the app served by Hypercorn's Trio worker, as a ``task_status`` function."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ..config import Settings
from ..nats.client import NatsClient
from .app import create_app, gateway_of
from .auth import AuthLayer, KeyRing
from .fastpath import FastPath
from .guard import allowed_hosts
from .index import WorkerIndex
from .runindex import RunIndex

log = logging.getLogger(__name__)


async def run_gateway(
    nats: NatsClient,
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until cancelled.

    The run and worker indexes are loaded from KV before the port opens; ``task_status.started((host, port))``
    reports the bound address (``port=0`` picks a free one).  Cancellation stops the server and
    every open SSE stream.
    """
    async with trio.open_nursery() as nursery:
        check = settings.gateway_watch_check_interval
        index = await nursery.start(RunIndex(nats, path=settings.gateway_read_model(port), check_interval=check).run)
        workers = await nursery.start(WorkerIndex(nats, check_interval=check).run)
        keys = None
        if settings.http_auth_mode == "api_key":
            keys = await nursery.start(KeyRing(nats, bucket=settings.auth_kv_bucket, pepper=settings.auth_pepper, check_interval=check).run)
        app = create_app(nats, settings, index=index, workers=workers, keys=keys)
        gw = gateway_of(app)
        gw.allowed_hosts = allowed_hosts(settings.http_allowed_hosts, gw.allowed_origins, bind_host=host)
        config = Config()
        config.bind = [f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("pyoco_es.gateway.hypercorn")
        config.graceful_timeout = 1.0
        config.keep_alive_timeout = 75.0
        asgi: Any = FastPath(app, gw)
        if keys is not None:
            asgi = AuthLayer(
                asgi, app.url_map, keys,
                header=settings.api_key_header, public_metrics=settings.http_metrics_public,
                free_failures=settings.http_auth_free_failures, observe=gw.http.observe,
                allowed_origins=gw.allowed_origins,
            )
        binds = await nursery.start(lambda task_status: serve(asgi, config, task_status=task_status))  # type: ignore[arg-type]
        url = urlsplit(binds[0])
        bound = (url.hostname or host, url.port or port)
        log.info("gateway listening on http://%s:%s/", *bound)
        task_status.started(bound)
