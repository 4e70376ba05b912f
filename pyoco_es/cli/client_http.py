"""pyoco-client's HTTP side: one httpx client, error translation, and the resumable SSE watch.

The client talks HTTP only (like pyoco-server's).  Every httpx failure is turned into a
:class:`~pyoco_es.cli.client_errors.CliError` here, so commands never see an httpx exception.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import httpx
import trio

from .client_errors import ERR_HTTP, CliError, input_error

log = logging.getLogger(__name__)

TERMINAL_STATUSES: Final = frozenset({"COMPLETED", "FAILED", "CANCELLED"})

# Plain requests: a generous read timeout (pyoco-server's 5 s default is too tight, §10.25).
REQUEST_TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)
# SSE: no frame (not even a heartbeat) for this long means the connection is dead: reconnect.
SSE_READ_TIMEOUT: Final = 45.0
# Server-side watch window limits (contract §1.6: timeout_sec is 1..600, default 60).
SERVER_WATCH_MAX_SEC: Final = 600
SERVER_WATCH_DEFAULT_SEC: Final = 60
# After a dropped connection, keep trying to reconnect for this long before giving up.
RECONNECT_GIVE_UP_SEC: Final = 120.0
RECONNECT_BACKOFF: Final = (0.1, 0.2, 0.5, 1.0, 2.0)
# A window that ends this close to its deadline ended by the deadline.
WINDOW_GRACE_SEC: Final = 1.0
_BODY_LIMIT: Final = 2000


@attrs.frozen
class ClientSettings:
    """The global flags: where the gateway is and how to authenticate."""

    server: str
    api_key: str | None = None
    api_key_header: str = "X-API-Key"
    command_path: str = "pyoco-client"


def describe_body(response: httpx.Response) -> str:
    """An error body made readable: ``detail`` strings as is, 422 lists as ``loc: msg`` items."""
    text = response.text.strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:_BODY_LIMIT]
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc") or ())
                msg = str(item.get("msg") or item)
                parts.append(f"{loc}: {msg}" if loc else msg)
            else:
                parts.append(str(item))
        return "; ".join(parts)[:_BODY_LIMIT]
    return text[:_BODY_LIMIT]


def _status_hint(status: int, settings: ClientSettings, path: str = "") -> str:
    cmd = settings.command_path
    if path.startswith("/wheels") and status in (404, 409, 507):
        return {
            404: f"no such wheel: `{cmd} wheels` lists them",
            409: "the package already has this version or a newer one: bump the version in the wheel",
            507: "the wheel store is full: delete old versions (wheel-delete) or ask to raise PYOCO_WHEEL_MAX_BYTES",
        }[status]
    if status == 401:
        return f"the server requires an API key: pass --api-key (sent as {settings.api_key_header}) or set PYOCO_API_KEY"
    if status == 403:
        return "the API key was refused (malformed, unknown or revoked): check --api-key or PYOCO_API_KEY"
    if status == 404:
        return f"check the id; `{cmd} list` shows recent runs"
    if status in (413, 422, 400):
        return f"check the request parameters and files; `{cmd} --help`"
    if status == 503:
        return "the gateway cannot reach NATS: check that nats-server (or `pyoco-server up`) is running"
    return "check the server logs and the request parameters"


def http_error(response: httpx.Response, settings: ClientSettings) -> CliError:
    """``ERR-PYOCO-HTTP: request failed`` for a non-2xx answer."""
    req = response.request
    reason = f"HTTP {response.status_code} {req.method} {req.url.path}"
    body = describe_body(response)
    if body:
        reason = f"{reason}: {body}"
    hint = _status_hint(response.status_code, settings, req.url.path)
    if response.status_code == 404 and req.url.path.startswith("/dlq/"):
        hint = f"check the id; `{settings.command_path} dlq list` shows the dead letters"
    return CliError(ERR_HTTP, "request failed", reason=reason, hint=hint)


def connection_error(exc: Exception, settings: ClientSettings) -> CliError:
    """``ERR-PYOCO-HTTP: connection error`` naming the URL, suggesting how to start a server."""
    detail = str(exc) or type(exc).__name__
    return CliError(
        ERR_HTTP,
        "connection error",
        reason=f"cannot reach the server at {settings.server} ({detail})",
        hint="start one with `pyoco-server up`, or point --server (or PYOCO_SERVER_URL) at a running gateway",
    )


@attrs.define
class Api:
    """A thin async wrapper of the gateway's HTTP API; every failure is a CliError."""

    settings: ClientSettings
    http: httpx.AsyncClient

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        json_body: Any = None,
        files: Any = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request; raise CliError on a transport error or a non-2xx status."""
        try:
            response = await self.http.request(
                method, path, params=params, json=json_body, files=files, data=data, headers=headers
            )
        except httpx.TransportError as exc:
            raise connection_error(exc, self.settings) from exc
        if response.status_code >= 400:
            raise http_error(response, self.settings)
        return response

    async def get_json(self, path: str, **kwargs: Any) -> Any:
        response = await self.request("GET", path, **kwargs)
        return decode_json(response, self.settings)

    async def post_json(self, path: str, **kwargs: Any) -> Any:
        response = await self.request("POST", path, **kwargs)
        return decode_json(response, self.settings)


def decode_json(response: httpx.Response, settings: ClientSettings) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise CliError(
            ERR_HTTP,
            "unexpected response",
            reason=f"{response.request.method} {response.request.url.path} did not return JSON: {response.text[:200]!r}",
            hint=f"is {settings.server} a pyoco gateway?",
        ) from exc


@asynccontextmanager
async def open_api(settings: ClientSettings) -> AsyncIterator[Api]:
    """An :class:`Api` for the duration of one command."""
    headers = {"User-Agent": "pyoco-client (pyoco-es)"}
    if settings.api_key:
        headers[settings.api_key_header] = settings.api_key
    bad_url = input_error(
        f"--server must be an http(s) URL (got {settings.server!r})",
        hint="pyoco-client --server http://127.0.0.1:8000 list  (or set PYOCO_SERVER_URL)",
    )
    try:
        url = httpx.URL(settings.server)
    except (httpx.InvalidURL, ValueError) as exc:
        raise bad_url from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise bad_url
    async with httpx.AsyncClient(base_url=settings.server.rstrip("/"), headers=headers, timeout=REQUEST_TIMEOUT) as http:
        yield Api(settings, http)


# -- Server-Sent Events -------------------------------------------------------------------------


@attrs.frozen
class SseEvent:
    """One SSE frame: ``event:`` name, ``id:`` (if any) and the decoded ``data:`` JSON."""

    event: str
    data: Any
    id: str | None = None

    @property
    def seq(self) -> int | None:
        """The ``id:`` as an integer (the run's event seq in pyoco-es), or None."""
        try:
            return int(self.id) if self.id is not None else None
        except ValueError:
            return None

    @property
    def snapshot(self) -> dict[str, Any] | None:
        snap = self.data.get("snapshot") if isinstance(self.data, dict) else None
        return snap if isinstance(snap, dict) else None

    @property
    def status(self) -> str | None:
        snap = self.snapshot
        status = snap.get("status") if snap else None
        if status is None and isinstance(self.data, dict):
            status = self.data.get("status")
        return str(status) if status is not None else None

    def to_json(self) -> dict[str, Any]:
        """pyoco-server's watch line shape, ``{"event", "data"}``, plus ``id`` when there is one."""
        out: dict[str, Any] = {"event": self.event}
        if self.id is not None:
            out["id"] = self.id
        out["data"] = self.data
        return out


@attrs.define
class SseParser:
    """Sans-io SSE framing (WHATWG rules for the fields we use): feed lines, get events."""

    _event: str = ""
    _id: str | None = None
    _data: list[str] = attrs.Factory(list)

    def feed(self, line: str) -> SseEvent | None:
        """Consume one line (without its newline); return an event at each blank line."""
        if line == "":
            if not self._data:
                self._event, self._id = "", None
                return None
            raw = "\n".join(self._data)
            try:
                data: Any = json.loads(raw)
            except ValueError:
                data = {"raw": raw}
            event = SseEvent(event=self._event or "message", data=data, id=self._id)
            # Unlike a browser's lastEventId, an id belongs to its own frame only: heartbeats
            # (no id) must not look like a repeat of the last snapshot.
            self._event, self._data, self._id = "", [], None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


@attrs.frozen
class WatchOptions:
    """What to watch and for how long.

    ``timeout_sec`` None means the server's default window (60 s) unless ``until_terminal``,
    in which case the watch lasts until the run ends, however many windows that takes.
    """

    run_id: str
    records: bool = False
    since: float | None = None
    timeout_sec: float | None = None
    until_terminal: bool = False


@attrs.define
class WatchResult:
    """How a watch ended: the last status seen and whether the run reached a terminal one."""

    status: str | None = None
    terminal: bool = False
    timed_out: bool = False
    reconnects: int = 0


# Answers a restarting gateway may give for a moment; retried after a drop, fatal at first.
RETRYABLE_STATUSES: Final = frozenset({502, 503, 504})


class _Unavailable(Exception):
    """The watch endpoint answered 502/503/504."""

    def __init__(self, error: CliError) -> None:
        super().__init__(error.reason or error.message)
        self.error = error


def _give_up(exc: Exception, settings: ClientSettings) -> CliError:
    return exc.error if isinstance(exc, _Unavailable) else connection_error(exc, settings)


def _is_transient(exc: Exception) -> bool:
    return isinstance(exc, (httpx.TransportError, httpx.StreamError, _Unavailable))


@attrs.define
class _Follower:
    """The state of one resumable watch across its connections."""

    api: Api
    options: WatchOptions
    send: trio.MemorySendChannel[SseEvent]
    result: WatchResult
    last_seq: int | None = None
    names_at_last_seq: set[str] = attrs.Factory(set)
    last_snapshot_key: str | None = None
    since: float | None = None

    def request(self, remaining: float) -> tuple[list[tuple[str, Any]], dict[str, str]]:
        params: list[tuple[str, Any]] = []
        if self.options.records:
            params.append(("include", "records"))
        if self.since is not None and self.last_seq is None:
            params.append(("since", self.since))
        params.append(("timeout_sec", max(1, math.ceil(min(SERVER_WATCH_MAX_SEC, remaining)))))
        headers = {"Accept": "text/event-stream"}
        if self.last_seq is not None:
            headers["Last-Event-ID"] = str(self.last_seq)
        return params, headers

    def is_repeat(self, event: SseEvent) -> bool:
        """Already delivered?  By ``id:`` when the server sends ids, else by snapshot content."""
        seq = event.seq
        if seq is not None:
            # Several frames may share an id (pyoco-es's final ``end`` frame repeats the last
            # snapshot's): a frame is new if its id is newer, or same id and a new event name.
            if self.last_seq is not None and (seq < self.last_seq or (seq == self.last_seq and event.event in self.names_at_last_seq)):
                return True
            if seq != self.last_seq:
                self.names_at_last_seq = set()
            self.last_seq = seq
            self.names_at_last_seq.add(event.event)
            return False
        snap = event.snapshot
        if snap is None:
            return False
        key = json.dumps(snap, sort_keys=True)
        if key == self.last_snapshot_key:
            return True
        self.last_snapshot_key = key
        if isinstance(snap.get("updated_at"), (int, float)):
            self.since = float(snap["updated_at"])  # resume point for servers without ids
        return False

    async def stream_once(self, remaining: float, on_connected: Any) -> bool:
        """One connection: deliver new events until the server closes.  False: receiver gone."""
        params, headers = self.request(remaining)
        timeout = httpx.Timeout(REQUEST_TIMEOUT.connect, read=SSE_READ_TIMEOUT)
        path = f"/runs/{self.options.run_id}/watch"
        async with self.api.http.stream("GET", path, params=params, headers=headers, timeout=timeout) as response:
            if response.status_code >= 400:
                await response.aread()
                error = http_error(response, self.api.settings)
                if response.status_code in RETRYABLE_STATUSES:
                    raise _Unavailable(error)
                raise error
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                await response.aread()
                raise CliError(
                    ERR_HTTP,
                    "unexpected response",
                    reason=f"GET {path} answered {response.headers.get('content-type') or 'no content type'}, not an event stream",
                    hint=f"is {self.api.settings.server} a pyoco gateway?",
                )
            on_connected()
            parser = SseParser()
            async for line in response.aiter_lines():
                event = parser.feed(line.rstrip("\r"))
                if event is None or self.is_repeat(event):
                    continue
                if event.status is not None:
                    self.result.status = event.status
                    self.result.terminal = event.status in TERMINAL_STATUSES
                try:
                    await self.send.send(event)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return False
        return True


async def follow_run(
    api: Api,
    options: WatchOptions,
    send: trio.MemorySendChannel[SseEvent],
    result: WatchResult,
    *,
    on_reconnect: Callable[[bool], None] | None = None,
) -> None:
    """Stream a run's SSE events into ``send``, resuming after a dropped connection.

    Resumes with ``Last-Event-ID`` (pyoco-es sends the run's event seq as ``id:``) and drops
    any frame whose id is not newer than the last one delivered, so nothing is printed twice.
    Against a server without ids (pyoco-server) it resumes with ``since`` instead.

    Returns when the run reached a terminal status and the server closed the stream, when the
    watch window ran out (``result.timed_out``), or when the receiver closed.
    ``on_reconnect(True)`` is called when a connection drops, ``on_reconnect(False)`` when it
    is back.

    Raises:
        CliError: the first connection failed (unreachable server, 404…), or the server stayed
            unreachable for RECONNECT_GIVE_UP_SEC after a drop.
    """
    clock = trio.current_time
    window = options.timeout_sec
    if window is None and not options.until_terminal:
        window = SERVER_WATCH_DEFAULT_SEC
    deadline = math.inf if window is None else clock() + window
    follower = _Follower(api, options, send, result, since=options.since)
    connected_once = False
    outage_started: float | None = None
    failures = 0

    def on_connected() -> None:
        nonlocal connected_once, outage_started, failures
        if outage_started is not None and on_reconnect is not None:
            on_reconnect(False)
        connected_once, outage_started, failures = True, None, 0

    async with send:
        while True:
            remaining = deadline - clock()
            if remaining <= 0:
                result.timed_out = not result.terminal
                return
            window_started = clock()
            try:
                # The server ends the window itself; this backstop covers one that does not.
                with trio.move_on_at(deadline + WINDOW_GRACE_SEC):
                    if not await follower.stream_once(remaining, on_connected):
                        return
            except CliError:
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                if not connected_once:
                    raise _give_up(exc, api.settings) from exc
                if outage_started is None:
                    outage_started = clock()
                    if on_reconnect is not None:
                        on_reconnect(True)
                elif clock() - outage_started > RECONNECT_GIVE_UP_SEC:
                    raise _give_up(exc, api.settings) from exc
                log.debug("watch connection dropped (%s); reconnecting", exc)
                await trio.sleep(RECONNECT_BACKOFF[min(failures, len(RECONNECT_BACKOFF) - 1)])
                failures += 1
                result.reconnects += 1
                continue
            # The server closed the stream cleanly.
            if result.terminal:
                return
            if window is not None and clock() >= deadline - WINDOW_GRACE_SEC:
                result.timed_out = True
                return
            if clock() - window_started < 0.05:
                await trio.sleep(0.2)  # closed at once without a terminal status: don't spin
            result.reconnects += 1
