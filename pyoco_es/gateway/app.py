"""``create_app``: the Quart-Trio application and the one place errors become responses.

The app speaks pyoco-server's HTTP API (contract §1).  Every error a route raises is a
:class:`~pyoco_es.core.errors.PyocoError` whose ``http_status`` picks the status; the body is
always ``{"detail": ...}`` and never a traceback.  NATS trouble is a 503 with a hint, and no
route answers 2xx for a write before the event's PubAck arrived.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..config import Settings
from ..core.errors import InfraError, OutcomeUnknown, PayloadTooLarge, PyocoError, ValidationError
from ..core.events import Producer
from ..nats.client import NatsClient
from ..service import RunStore
from .guard import allowed_origins, check_host, check_request, cors_headers
from .index import RunIndex, WorkerIndex
from .metrics import HttpMetrics
from .params import RequestInvalid

log = logging.getLogger(__name__)

STATIC_DIR: Final = Path(__file__).with_name("static")
JSON_BODY_MAX: Final = 1024 * 1024  # POST /runs bodies; NATS max_payload bounds the event anyway
MULTIPART_SLACK: Final = 64 * 1024  # form fields and multipart boundaries around the YAML file

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode


def json_response(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_dumps(doc), status=status, headers=headers, content_type="application/json")


@attrs.define(eq=False, kw_only=True)
class Gateway:
    """What the routes share: NATS, the run store and index, settings and a few counters."""

    nats: NatsClient
    settings: Settings
    index: RunIndex
    workers: WorkerIndex
    store: RunStore
    producer: Producer
    clock: Callable[[], float] = time.time
    heartbeat_interval: float = 5.0
    static_dir: Path = STATIC_DIR
    sse_streams: int = 0
    http: HttpMetrics = attrs.Factory(HttpMetrics)
    parse_limiter: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(1))  # YAML parses in a thread
    allowed_origins: frozenset[str] = frozenset()  # PYOCO_HTTP_ALLOWED_ORIGINS, normalised (see .guard)
    allowed_hosts: frozenset[str] | None = None  # Host names served; None: any (set by run_gateway on a loopback bind)

    def require_nats(self) -> None:
        """Fail fast (503) instead of waiting for a publish timeout while NATS is down."""
        if not self.nats.is_connected:
            raise InfraError(f"not connected to NATS at {self.nats.url} (reconnecting)")

    async def await_nats(self) -> None:
        """For writes: hold the request while NATS reconnects (a restart, a short freeze), up to
        ``PYOCO_NATS_UNAVAILABLE_WAIT_SEC``, then 503 (nothing was sent)."""
        if self.nats.is_connected:
            return
        if not await self.nats.wait_connected(self.settings.nats_unavailable_wait):
            raise InfraError(
                f"not connected to NATS at {self.nats.url} (still reconnecting after {self.settings.nats_unavailable_wait:g}s)"
            )

    def unavailable_answer(self, exc: InfraError) -> dict[str, Any]:
        """The body of a 503: pyoco-server's ``detail`` plus whether the request took effect."""
        if isinstance(exc, OutcomeUnknown):
            doc: dict[str, Any] = {
                "detail": (
                    f"nats unavailable: {exc.message}. The outcome is UNKNOWN: the request may have been applied. "
                    "Retrying with the same Idempotency-Key is safe (it returns the same run, never a second one); "
                    "a cancel may be retried as is."
                ),
                "outcome": "unknown",
                "retry_safe_with_idempotency_key": True,
            }
            if exc.run_id:
                doc["run_id"] = exc.run_id
            return doc
        return {
            "detail": (
                f"nats unavailable: {exc.message}. This request was not applied; retry later "
                f"(with the same Idempotency-Key for submits). Check the NATS server at {self.nats.url}."
            ),
            "outcome": "not_applied",
            "retry_safe_with_idempotency_key": True,
        }

    def unavailable_detail(self, exc: InfraError) -> str:
        return str(self.unavailable_answer(exc)["detail"])


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
) -> QuartTrio:
    """Build the gateway app.

    Args:
        index, workers: the run index (``GET /runs``, the SSE streams) and the worker registry
            index (``GET /workers``, ``/metrics``).  When omitted, they are created and started
            with the app (``before_serving``); ``run_gateway`` passes its own, loaded before the
            port opens.
        heartbeat_interval: seconds of silence before an SSE heartbeat (default
            ``settings.sse_heartbeat_interval``).

    Raises:
        ValidationError: the settings ask for something the gateway cannot do (API-key auth).
    """
    if settings.http_auth_mode not in ("", "none"):
        # Fail closed: serving unauthenticated while the operator asked for API keys would be
        # worse than not starting.
        raise ValidationError(
            f"PYOCO_HTTP_AUTH_MODE={settings.http_auth_mode!r} is not supported by the pyoco-es gateway yet; "
            "unset it (auth off, pyoco-server's default) or put an authenticating proxy in front"
        )
    app = QuartTrio(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max(JSON_BODY_MAX, settings.workflow_yaml_max_bytes + MULTIPART_SLACK)
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    own_index, own_workers = index is None, workers is None
    gw = Gateway(
        nats=nats,
        settings=settings,
        index=index if index is not None else RunIndex(nats, check_interval=settings.gateway_watch_check_interval),
        workers=workers if workers is not None else WorkerIndex(nats, check_interval=settings.gateway_watch_check_interval),
        store=RunStore(nats, clock=clock),
        producer=Producer(kind="gateway", id=gateway_id or f"{socket.gethostname()}-{os.getpid()}"),
        clock=clock,
        heartbeat_interval=heartbeat_interval if heartbeat_interval is not None else settings.sse_heartbeat_interval,
        static_dir=static_dir or STATIC_DIR,
        allowed_origins=allowed_origins(settings.http_allowed_origins),
    )
    app.extensions["pyoco"] = gw

    @app.before_serving
    async def _start_indexes() -> None:
        if own_index:
            await app.nursery.start(gw.index.run)
        if own_workers:
            await app.nursery.start(gw.workers.run)

    @app.before_request
    async def _start_timer() -> None:
        g.pyoco_started = time.perf_counter()
        rule = request.url_rule.rule if request.url_rule is not None else None
        check_host(request.headers.get("Host"), gw.allowed_hosts)
        check_request(request.method, rule, request.headers.get, gw.allowed_origins)

    @app.after_request
    async def _finish(response: Response) -> Response:
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

    @app.errorhandler(PyocoError)
    async def _pyoco_error(exc: PyocoError) -> Response:
        status, doc, headers = error_answer(gw, exc, _method(), _path())
        return json_response(doc, status, headers)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code == 413:
            detail = f"request body too large (limit {app.config['MAX_CONTENT_LENGTH']} bytes)"
            return json_response({"detail": detail}, 413, {"Connection": "close"})
        elif code == 404:
            detail = "Not Found"
        elif code == 405:
            detail = "Method Not Allowed"
        else:
            detail = exc.description or exc.name
        return json_response({"detail": detail}, code)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        if isinstance(exc, BaseExceptionGroup):
            inner = _unwrap(exc)
            if isinstance(inner, PyocoError):
                return await _pyoco_error(inner)
        log.exception("%s %s: unexpected error", _method(), _path())
        return json_response({"detail": f"internal error ({type(exc).__name__}); see the gateway log"}, 500)

    from .routes import register_routes

    register_routes(app, gw)
    return app


def error_answer(gw: Gateway, exc: PyocoError, method: str, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of the answer to a request that failed with ``exc``."""
    if isinstance(exc, RequestInvalid):
        return exc.http_status, {"detail": exc.detail}, {}
    if isinstance(exc, PayloadTooLarge):
        # The client may still be sending: close the connection after the answer, so it
        # stops (instead of both sides waiting on a body nobody reads).
        return 413, {"detail": exc.message}, {"Connection": "close"}
    if isinstance(exc, InfraError):
        log.warning("%s %s: %s", method, path, exc.message)
        return 503, gw.unavailable_answer(exc), {"Retry-After": "1"}
    if exc.http_status >= 500:
        log.error("%s %s failed: %s", method, path, exc.message)
    return exc.http_status, {"detail": exc.message}, {}


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _method() -> str:
    try:
        return request.method
    except RuntimeError:  # pragma: no cover - outside a request
        return "-"


def _path() -> str:
    try:
        return request.path
    except RuntimeError:  # pragma: no cover
        return "-"


def gateway_of(app: Any) -> Gateway:
    return app.extensions["pyoco"]  # type: ignore[no-any-return]


__all__ = ["Gateway", "create_app", "error_answer", "gateway_of", "json_response"]
