"""An ASGI layer in front of Quart for the request every client repeats: ``GET /runs/{id}``.

Polling a run is most of a gateway's traffic (pyoco-client ``--wait``, dashboards, scripts).
When the run's latest snapshot is in the gateway's cache (which the KV watch keeps current) the
answer needs no I/O, and Quart's request machinery (context, routing, hooks, a Response object,
three ASGI sends) cost more CPU than the answer itself.  This layer answers exactly that case
with the same body and status the Quart route gives, and the same request metrics; anything
else (a query string, an unknown or uncached run, other routes, errors) goes to Quart untouched.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from .app import Gateway, _dumps
from .routes import enrich, filter_snapshot, valid_run_id

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]

_RUN_ROUTE = "/runs/<run_id>"
_RESERVED = frozenset({"stream"})  # literal routes under /runs/ (GET /runs/stream)


class FastPath:
    def __init__(self, app: ASGIApp, gw: Gateway) -> None:
        self.app = app
        self.gw = gw
        self.served = 0  # answers given here (the rest went to Quart)

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("query_string"):
            path: str = scope["path"]
            if path.startswith("/runs/"):
                run_id = path[6:]
                if run_id not in _RESERVED and valid_run_id(run_id) and self.gw.nats.is_connected:
                    doc = self.gw.index.doc_of(run_id)
                    if doc is not None:
                        await self._answer(doc, send)
                        return
        await self.app(scope, receive, send)

    async def _answer(self, doc: dict[str, Any], send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        started = time.perf_counter()
        body = _dumps(await enrich(self.gw, filter_snapshot(doc, set()))).encode()
        self.served += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        self.gw.http.observe("GET", _RUN_ROUTE, 200, time.perf_counter() - started)


__all__ = ["FastPath"]
