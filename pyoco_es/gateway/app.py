"""``create_app``: the Quart-Trio application, thin: the shared :class:`~.context.Gateway`, the
request hooks, the error handlers (:mod:`.answer`) and one blueprint per resource.

The app speaks pyoco-server's HTTP API (contract §1).  Every error a handler raises is a
:class:`~pyoco_es.core.errors.PyocoError` whose ``http_status`` picks the status; the body is
always ``{"detail": ...}`` and never a traceback.  NATS trouble is a 503 with a hint, and no
handler answers 2xx for a write before the event's PubAck arrived.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..config import Settings
from ..core.errors import PyocoError, ValidationError
from ..core.events import Producer
from ..nats.client import NatsClient
from ..service import RunStore
from . import apidocs, bulk, dashboard, dlq, events, identity, logs, runs, status, streams, wheels, workers
from .answer import on_http_error, on_pyoco_error, on_unexpected
from .context import JSON_BODY_MAX, MULTIPART_SLACK, STATIC_DIR, Gateway, current_gateway, gateway_of
from .auth import KeyRing
from .guard import allowed_origins, check_host, check_request, cors_headers
from .index import WorkerIndex
from .runindex import RunIndex

BLUEPRINTS = (status.blueprint, dashboard.blueprint, bulk.blueprint, runs.blueprint, streams.blueprint, events.blueprint, workers.blueprint,
              identity.blueprint, apidocs.blueprint, logs.blueprint, dlq.blueprint,
              wheels.blueprint)


def create_app(
    nats: NatsClient,
    settings: Settings,
    *,
    index: RunIndex | None = None,
    workers: WorkerIndex | None = None,
    clock: Callable[[], float] = time.time,
    gateway_id: str | None = None,
    heartbeat_interval: float | None = None,
    static_dir: Path | None = None,
    keys: KeyRing | None = None,
) -> QuartTrio:
    """Build the gateway app.

    Args:
        index, workers: the run index (``GET /runs``, the SSE streams) and the worker registry
            index (``GET /workers``, ``/metrics``).  When omitted, they are created and started
            with the app (``before_serving``); ``run_gateway`` passes its own, loaded before the
            port opens.
        heartbeat_interval: seconds of silence before an SSE heartbeat (default
            ``settings.sse_heartbeat_interval``).
        keys: the API key ring; required with ``PYOCO_HTTP_AUTH_MODE=api_key``, whose checks
            are made by the ASGI layer ``run_gateway`` puts in front (:mod:`.auth`) and again,
            for anything that reaches the app without it, by :func:`.identity.require_key`.

    Raises:
        ValidationError: the settings ask for something the gateway cannot do (an unknown auth
            mode, or api_key without a key ring).
    """
    check_auth_mode(settings, keys)
    app = QuartTrio(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max(JSON_BODY_MAX, settings.workflow_yaml_max_bytes + MULTIPART_SLACK)
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    wheels.allow_uploads(app, settings)  # POST /wheels takes bodies up to PYOCO_WHEEL_MAX_BYTES
    own_index, own_workers = index is None, workers is None
    gw = Gateway(
        nats=nats,
        settings=settings,
        index=index if index is not None else RunIndex(nats, path=settings.read_model_path, check_interval=settings.gateway_watch_check_interval),
        workers=workers if workers is not None else WorkerIndex(nats, check_interval=settings.gateway_watch_check_interval),
        store=RunStore(nats, clock=clock),
        producer=Producer(kind="gateway", id=gateway_id or f"{socket.gethostname()}-{os.getpid()}"),
        clock=clock,
        heartbeat_interval=heartbeat_interval if heartbeat_interval is not None else settings.sse_heartbeat_interval,
        static_dir=static_dir or STATIC_DIR,
        allowed_origins=allowed_origins(settings.http_allowed_origins),
        keys=keys,
    )
    app.extensions["pyoco"] = gw

    @app.before_serving
    async def _start_indexes() -> None:
        if own_index:
            await app.nursery.start(gw.index.run)
        if own_workers:
            await app.nursery.start(gw.workers.run)

    app.before_request(_check_request)
    app.before_request(identity.require_key)  # behind the ASGI layer (.auth), not instead of it
    app.after_request(_finish)
    app.register_error_handler(PyocoError, on_pyoco_error)
    app.register_error_handler(HTTPException, on_http_error)
    app.register_error_handler(Exception, on_unexpected)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    return app


def check_auth_mode(settings: Settings, keys: KeyRing | None) -> None:
    # Fail closed: serving unauthenticated while the operator asked for API keys would be worse
    # than not starting.
    if settings.http_auth_mode in ("", "none"):
        return
    if settings.http_auth_mode != "api_key":
        raise ValidationError(f"PYOCO_HTTP_AUTH_MODE={settings.http_auth_mode!r} is not a mode: use none or api_key")
    if keys is None:
        raise ValidationError("PYOCO_HTTP_AUTH_MODE=api_key needs the key ring: serve the app with run_gateway")


async def _check_request() -> None:
    gw = current_gateway()
    g.pyoco_started = time.perf_counter()
    rule = request.url_rule.rule if request.url_rule is not None else None
    check_host(request.headers.get("Host"), gw.allowed_hosts)
    check_request(request.method, rule, request.headers.get, gw.allowed_origins)


async def _finish(response: Response) -> Response:
    gw = current_gateway()
    # An answer given before the request body arrived (a 4xx/503 raised early, a cancel that
    # ignores its body) must close the connection: the rest of the body would otherwise be
    # read as the next request, or both sides would wait on it.
    complete = getattr(request.body, "_complete", None)
    if request.method in ("POST", "PUT", "PATCH") and complete is not None and not complete.is_set():
        response.headers["Connection"] = "close"
    if gw.allowed_origins:
        response.headers.update(cors_headers(request.headers.get("Origin"), gw.allowed_origins, preflight=request.method == "OPTIONS"))
    started = getattr(g, "pyoco_started", None)
    if started is not None:
        route = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        gw.http.observe(request.method, route, response.status_code, time.perf_counter() - started)
    return response


__all__ = ["Gateway", "create_app", "gateway_of"]
