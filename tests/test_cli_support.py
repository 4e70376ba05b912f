"""A tiny canned HTTP server (raw ASGI on Hypercorn, loopback port 0) for pyoco-client tests.

Routes answer with fixed JSON, text or scripted SSE streams, and every request is recorded,
so tests check what the real CLI sends and prints without mocking any of its classes.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve


class DropConnection(Exception):
    """Raised by a stream script: the server aborts the connection mid-body."""


@attrs.frozen
class Seen:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes

    def arg(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)


@attrs.frozen
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Reply:
        return cls(status, json.dumps(value).encode(), "application/json")

    @classmethod
    def text(cls, value: str, status: int = 200) -> Reply:
        return cls(status, value.encode(), "text/plain; version=0.0.4")


SendChunk = Callable[[bytes], Awaitable[None]]
Stream = Callable[[SendChunk], Awaitable[None]]
Handler = Callable[[Seen], Awaitable["Reply | Stream"]]


def frame(event: str, data: Any, id: int | None = None) -> bytes:
    """One SSE frame as the gateway writes it."""
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def snap_frame(run_id: str, status: str, seq: int | None, **extra: Any) -> bytes:
    snapshot = {"run_id": run_id, "status": status, "updated_at": 1700000000.0 + (seq or 0), **extra}
    return frame("snapshot", {"run_id": run_id, "snapshot": snapshot, "ts": 1700000000.0 + (seq or 0)}, seq)


@attrs.define(eq=False)
class CannedServer:
    routes: dict[tuple[str, str], Handler] = attrs.Factory(dict)
    seen: list[Seen] = attrs.Factory(list)
    url: str = ""

    def reply(self, method: str, path: str, reply: Reply) -> None:
        async def handler(_: Seen) -> Reply:
            return reply

        self.routes[(method, path)] = handler

    def json(self, method: str, path: str, value: Any, status: int = 200) -> None:
        self.reply(method, path, Reply.json(value, status))

    def on(self, method: str, path: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.routes[(method, path)] = handler
            return handler

        return register

    def requests(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path == path]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        from urllib.parse import parse_qsl

        seen = Seen(
            method=scope["method"],
            path=scope["path"],
            query=parse_qsl(scope["query_string"].decode(), keep_blank_values=True),
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=body,
        )
        self.seen.append(seen)
        handler = self.routes.get((seen.method, seen.path))
        result: Reply | Stream = Reply.json({"detail": "Not Found"}, 404) if handler is None else await handler(seen)
        if isinstance(result, Reply):
            await send(
                {
                    "type": "http.response.start",
                    "status": result.status,
                    "headers": [(b"content-type", result.content_type.encode())],
                }
            )
            await send({"type": "http.response.body", "body": result.body})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )

        async def chunk(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await result(chunk)
        await send({"type": "http.response.body", "body": b""})


async def start_canned(nursery: trio.Nursery, server: CannedServer) -> CannedServer:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    binds = await nursery.start(serve, server, config)
    server.url = binds[0]
    return server


def sse(*frames: bytes, drop: bool = False, hold: trio.Event | None = None) -> Handler:
    """A handler streaming ``frames``, then closing cleanly, dropping, or holding open."""

    async def handler(_: Seen) -> Stream:
        async def stream(send_chunk: SendChunk) -> None:
            for data in frames:
                await send_chunk(data)
            if hold is not None:
                await hold.wait()
            if drop:
                raise DropConnection()

        return stream

    return handler
