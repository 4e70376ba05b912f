"""How the gateway answers: JSON bodies, SSE bodies, and the one place errors become responses.

Every error a handler raises is a :class:`~pyoco_es.core.errors.PyocoError` whose
``http_status`` picks the status; the body is always ``{"detail": ...}`` and never a traceback.
NATS trouble is a 503 with a hint.  The fast path words its errors with :func:`error_answer` too.
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import trio
from quart import Response, current_app, request
from quart.wrappers.response import ResponseBody
from werkzeug.exceptions import HTTPException

from ..core.codec import dumps
from ..logs import INVALID_INPUT, NATS_UNAVAILABLE, RUN_NOT_FOUND, TOO_LARGE, WORKERS_QUERY_INVALID, WORKER_NOT_FOUND, ids as log_ids
from ..core.errors import InfraError, OutcomeUnknown, PayloadTooLarge, PyocoError, RunNotFound
from .context import Gateway, current_gateway
from . import sse
from .params import RequestInvalid

log = logging.getLogger(__name__)

def json_response(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(doc), status=status, headers=headers, content_type="application/json")


def sse_response(gw: Gateway, stream: AbstractAsyncContextManager[trio.abc.ReceiveChannel[bytes]]) -> Response:
    """A 200 ``text/event-stream`` whose body is the frames of ``stream`` (an ``open_*_stream``
    of :mod:`.streams`), counted in ``gw.sse_streams`` while it is open."""
    response = Response(_SSEBody(gw, stream), status=200, headers=sse.SSE_HEADERS)
    response.timeout = None  # streams end on their own deadline (timeout_sec)
    return response


class _SSEBody(ResponseBody):
    """Quart enters a body with ``async with`` in the task that sends it, so the stream's
    nursery (``@trio.as_safe_channel``) opens and closes in that task, never across a yield."""

    def __init__(self, gw: Gateway, stream: AbstractAsyncContextManager[trio.abc.ReceiveChannel[bytes]]) -> None:
        self._gw = gw
        self._stream = stream

    async def __aenter__(self) -> trio.abc.ReceiveChannel[bytes]:
        self._gw.sse_streams += 1
        try:
            return await self._stream.__aenter__()
        except BaseException:
            self._gw.sse_streams -= 1
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        try:
            return await self._stream.__aexit__(exc_type, exc, tb)
        finally:
            self._gw.sse_streams -= 1


def error_answer(gw: Gateway, exc: PyocoError, method: str, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of the answer to a request that failed with ``exc``."""
    if exc.http_status < 500 and log.isEnabledFor(logging.INFO):
        log.info("%s %s: %d %s", method, path, exc.http_status, exc.message[:500], extra=_refusal_ids(exc, path))
    if isinstance(exc, RequestInvalid):
        return exc.http_status, {"detail": exc.detail}, {}
    if isinstance(exc, PayloadTooLarge):
        # The client may still be sending: close the connection after the answer, so it
        # stops (instead of both sides waiting on a body nobody reads).
        return 413, {"detail": exc.message}, {"Connection": "close"}
    if isinstance(exc, InfraError):
        log.warning("%s %s: %s", method, path, exc.message, extra=log_ids(NATS_UNAVAILABLE))
        return 503, unavailable_answer(exc, gw.nats.url), {"Retry-After": "1"}
    if exc.http_status >= 500:
        log.error("%s %s failed: %s", method, path, exc.message)
    return exc.http_status, {"detail": exc.message}, {}


def _refusal_ids(exc: PyocoError, path: str) -> dict[str, Any]:
    """pyoco-server's ``err_id``/``msg_id`` for a refused request, by what was refused."""
    if isinstance(exc, RunNotFound):
        return log_ids(RUN_NOT_FOUND)
    if isinstance(exc, PayloadTooLarge):
        return log_ids(TOO_LARGE)
    if path.startswith("/workers"):
        return log_ids(WORKER_NOT_FOUND if exc.http_status == 404 else WORKERS_QUERY_INVALID)
    return log_ids(INVALID_INPUT)


def unavailable_answer(exc: InfraError, nats_url: str) -> dict[str, Any]:
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
            f"(with the same Idempotency-Key for submits). Check the NATS server at {nats_url}."
        ),
        "outcome": "not_applied",
        "retry_safe_with_idempotency_key": True,
    }


# -- Quart's error handlers (registered by create_app) -----------------------------------------


async def on_pyoco_error(exc: PyocoError) -> Response:
    status, doc, headers = error_answer(current_gateway(), exc, _method(), _path())
    return json_response(doc, status, headers)


async def on_http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    if code == 413:
        detail = f"request body too large (limit {current_app.config['MAX_CONTENT_LENGTH']} bytes)"
        return json_response({"detail": detail}, 413, {"Connection": "close"})
    elif code == 404:
        detail = "Not Found"
    elif code == 405:
        detail = "Method Not Allowed"
    else:
        detail = exc.description or exc.name
    return json_response({"detail": detail}, code)


async def on_unexpected(exc: Exception) -> Response:
    if isinstance(exc, BaseExceptionGroup):
        inner = _unwrap(exc)
        if isinstance(inner, PyocoError):
            return await on_pyoco_error(inner)
    log.exception("%s %s: unexpected error", _method(), _path())
    return json_response({"detail": f"internal error ({type(exc).__name__}); see the gateway log"}, 500)


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
