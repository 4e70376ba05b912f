"""An ASGI layer in front of Quart for the two requests every run makes.

Each run is one ``POST /runs/yaml`` (or ``POST /runs``) and then polls of ``GET /runs/{id}``
(pyoco-client ``--wait``, dashboards, scripts).  For those, Quart's request machinery (request
context, routing, hooks, a Response object, three ASGI sends) cost more CPU than the work.  This
layer answers them directly with the same logic, body, status, headers and request metrics as the
Quart routes (the shared functions live in :mod:`.submit` and :mod:`.snapshot`):

- ``GET /runs/{id}`` without a query string, when the run's latest snapshot is in the watch
  cache (no I/O at all);
- ``POST /runs`` and ``POST /runs/yaml`` with a declared length and a small body.  Anything unusual about the
  request (a parse or validation error, a large document, NATS down) is handed to Quart with the
  body replayed *before* anything is appended, so Quart produces the error answer; once the
  append has been tried, the answer (an error included) is given here, never twice.

Requests with an ``Origin`` header (browsers, cross-origin) and everything else go to Quart untouched.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..core.codec import dumps
from ..core.errors import PyocoError
from ..core.events import JSONObject, RunSubmitted
from .answer import error_answer
from .auth import principal_of
from .context import Gateway
from .guard import check_host, check_request
from .params import idempotency_key, json_loads
from .snapshot import enrich, filter_snapshot, valid_run_id
from .submit import INLINE_PARSE_BYTES, check_yaml_length, named_event, submit_event, yaml_document, yaml_event, yaml_form

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]
Build = Callable[[bytes, dict[str, str]], tuple[RunSubmitted, JSONObject]]  # the event of a request body

_RUN_ROUTE = "/runs/<run_id>"
_YAML_ROUTE = "/runs/yaml"
_NAMED_ROUTE = "/runs"
_RESERVED = frozenset({"stream", "yaml"})  # literal routes under /runs/


class FastPath:
    def __init__(self, app: ASGIApp, gw: Gateway) -> None:
        self.app = app
        self.gw = gw
        self.served = 0  # answers given here (the rest went to Quart)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        # With keys on, only a request the AuthLayer verified is answered here; anything else goes
        # to Quart, whose own key check (.identity.require_key) refuses it.
        keyed = self.gw.keys is None or principal_of(scope) is not None
        # A browser's cross-origin request (an Origin header) goes to Quart: its answer carries the
        # CORS headers of a listed origin, or the refusal of another.
        if keyed and scope["type"] == "http" and not scope.get("query_string") and not _has_origin(scope):
            method, path = scope["method"], scope["path"]
            if method == "GET" and path.startswith("/runs/"):
                run_id = path[6:]
                if self._host_ok(scope) and run_id not in _RESERVED and valid_run_id(run_id) and self.gw.nats.is_connected:
                    doc = self.gw.index.doc_of(run_id)
                    who = principal_of(scope)
                    if doc is not None and (who is None or doc.get("tenant_id") == who.tenant_id):  # else Quart: 404
                        started = time.perf_counter()
                        body = await enrich(self.gw, filter_snapshot(doc, set()))
                        await self._answer(send, 200, body, {}, ("GET", _RUN_ROUTE), started)
                        return
            elif method == "POST" and path == _YAML_ROUTE:
                await self._submit(scope, receive, send, _YAML_ROUTE, self._yaml)
                return
            elif method == "POST" and path == _NAMED_ROUTE:
                await self._submit(scope, receive, send, _NAMED_ROUTE, self._named)
                return
        await self.app(scope, receive, send)

    def _host_ok(self, scope: dict[str, Any]) -> bool:
        if self.gw.allowed_hosts is None:
            return True
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"host"), None)
        try:
            check_host(host, self.gw.allowed_hosts)
        except PyocoError:
            return False  # Quart words the refusal
        return True

    def _yaml(self, body: bytes, headers: dict[str, str]) -> tuple[RunSubmitted, JSONObject]:
        name, tag, data, timeout = yaml_form(self.gw, body, headers.get("content-type"))
        if len(data) > INLINE_PARSE_BYTES:
            raise LookupError("large documents are parsed off the event loop by the Quart route")
        return yaml_event(self.gw, name, tag, yaml_document(self.gw, data), timeout)

    def _named(self, body: bytes, headers: dict[str, str]) -> tuple[RunSubmitted, JSONObject]:
        return named_event(self.gw, json_loads(body))

    async def _submit(self, scope: dict[str, Any], receive: Receive, send: Send, route: str, build: Build) -> None:
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body, ended = b"", False
        try:
            # The same request checks as Quart's before_request; a refusal is worded by Quart.
            check_host(headers.get("host"), self.gw.allowed_hosts)
            check_request("POST", route, headers.get, self.gw.allowed_origins)
            length = int(headers["content-length"])
            if not self.gw.nats.is_connected or length > INLINE_PARSE_BYTES * 4:
                raise LookupError("not for the fast path")
            if route == _YAML_ROUTE:
                check_yaml_length(self.gw, length)
            body, ended, complete = await _read_body(receive, length)
            if not complete:
                raise LookupError("body did not arrive as declared")
            key = idempotency_key(headers.get("idempotency-key"))
            event, fingerprint = build(body, headers)
        except (LookupError, ValueError, PyocoError):
            # Nothing was appended: let Quart handle the request (and word any error).
            await self.app(scope, _replay(body, ended, receive), send)
            return
        try:
            doc, extra = await submit_event(self.gw, event, fingerprint, key, principal_of(scope))
            status = 200
        except PyocoError as exc:
            status, doc, extra = error_answer(self.gw, exc, "POST", route)
        await self._answer(send, status, doc, extra, ("POST", route), started)

    async def _answer(self, send: Send, status: int, doc: object, extra: dict[str, str], route: tuple[str, str], started: float) -> None:
        body = dumps(doc)
        self.served += 1
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.gw.http.observe(route[0], route[1], status, time.perf_counter() - started)


def _has_origin(scope: dict[str, Any]) -> bool:
    return any(k.lower() == b"origin" for k, _ in scope["headers"])


async def _read_body(receive: Receive, length: int) -> tuple[bytes, bool, bool]:
    """Read the request body: (what arrived, whether the body ended, whether it is complete:
    ended normally with exactly ``length`` bytes)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b"".join(chunks), True, False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True, size == length
        if size > length:
            return b"".join(chunks), False, False


def _replay(body: bytes, ended: bool, receive: Receive) -> Receive:
    """``receive`` that first hands out the part of the body already read."""
    pending = [body] if body or ended else []

    async def replayed() -> dict[str, Any]:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": not ended}
        return await receive()

    return replayed


__all__ = ["FastPath"]
