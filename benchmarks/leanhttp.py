"""A minimal HTTP/1.1 keep-alive client for the benchmarks (trio sockets, no framework).

The benchmarks share two cores with the systems they measure, and httpx spent ~4 ms of CPU per
run (one submit, one poll) in the benchmark process, more than some servers' own work.  This
client costs a small fraction of that, so the numbers measure the servers.  It speaks just what
the benchmarks need: GET and POST with a body, ``Content-Length`` or chunked responses, one
request at a time per connection, a pool of connections shared by concurrent tasks.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import trio


class HTTPError(Exception):
    pass


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def raise_for_status(self) -> None:
        if self.status >= 400:
            raise HTTPError(f"HTTP {self.status}: {self.body[:300]!r}")


class _Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise HTTPError("connection closed by the server")
        self.buf += data

    async def _line_block(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            await self._fill()

    async def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def _chunked(self) -> bytes:
        body = bytearray()
        while True:
            while (end := self.buf.find(b"\r\n")) < 0:
                await self._fill()
            size = int(bytes(self.buf[:end]).split(b";")[0], 16)
            del self.buf[: end + 2]
            chunk = await self._exactly(size + 2)
            if size == 0:
                return bytes(body)
            body += chunk[:-2]

    async def request(self, raw: bytes) -> Response:
        await self.stream.send_all(raw)
        head = (await self._line_block()).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:
            body = b""
        return Response(status, headers, body)


class Client:
    """``async with Client(url) as c: r = await c.get("/runs/x")``."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.hostport = f"{self.host}:{self.port}".encode()
        self._idle: list[_Conn] = []
        self._all: list[_Conn] = []

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self._all:
            await conn.stream.aclose()

    async def _send(self, raw: bytes) -> Response:
        # A pooled connection the server closed while idle (uvicorn drops keep-alive connections
        # after 5 s) fails before any response byte: retry that once on a new connection.
        for reused in ([True] if self._idle else []) + [False]:
            conn = self._idle.pop() if reused else _Conn(await trio.open_tcp_stream(self.host, self.port))
            if not reused:
                self._all.append(conn)
            try:
                resp = await conn.request(raw)
            except (HTTPError, trio.BrokenResourceError, OSError):
                self._all.remove(conn)
                await trio.aclose_forcefully(conn.stream)
                if reused and not conn.buf:
                    continue
                raise
            if resp.headers.get("connection", "").lower() == "close":
                self._all.remove(conn)
                await conn.stream.aclose()
            else:
                self._idle.append(conn)
            return resp
        raise AssertionError("unreachable")

    extra_headers = b""  # e.g. b"X-API-Key: ...\r\n", sent with every request (bench_auth.py)

    async def get(self, path: str) -> Response:
        return await self._send(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + self.hostport + b"\r\n" + self.extra_headers + b"\r\n")

    async def post(self, path: str, body: bytes, content_type: bytes) -> Response:
        return await self._send(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + self.hostport
            + b"\r\n" + self.extra_headers + b"Content-Type: " + content_type
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, bytes]:
    """(body, content type) of a multipart/form-data request."""
    boundary = uuid.uuid4().hex.encode()
    parts = []
    for name, value in fields.items():
        parts.append(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value.encode() + b"\r\n")
    for name, (filename, data) in files.items():
        parts.append(
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"; filename="'
            + filename.encode() + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n"
        )
    return b"".join(parts) + b"--" + boundary + b"--\r\n", b"multipart/form-data; boundary=" + boundary
