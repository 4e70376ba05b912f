"""The NATS adapter's connection: one nats-py connection and its JetStream context, driven
from Trio through the asyncio bridge, with the error translation every port shares (the ports
themselves are in event_log.py, kv.py and work.py; :class:`~.client.NatsClient` joins them)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import nats
import nats.errors
import nats.js.errors
import trio

from ..core.codec import dumps
from ..core.errors import EventLogUnavailable, InfraError, PayloadTooLarge, PyocoError, WritesRefused
from ..ports import PubAck
from . import subjects
from .bridge import AsyncioThread

log = logging.getLogger(__name__)

T = TypeVar("T")

WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})
MESSAGE_TOO_LARGE: Final = frozenset({10054})  # "message size exceeds maximum allowed"
# JetStream refusing to store: insufficient resources (10023), memory / storage resources
# exceeded (10028 / 10047), the store failed or is full (10077: "maximum bytes exceeded", a
# broken message block).  A refusal, never an outage and never "too large": nothing was stored.
NO_ROOM: Final = frozenset({10023, 10028, 10047, 10077})
DEFAULT_MAX_MSG_SIZE: Final = 4 * 1024 * 1024  # the streams' max_msg_size (see resources.py)
HEADER_HEADROOM: Final = 2048  # headers (Nats-Msg-Id, expected seqs) count toward max_payload
WRITE_FAILURE_MEMORY: Final = 60.0  # seconds a refused write keeps /ready "not ready"
CLOSE_WAIT: Final = 2.0  # seconds close() waits for the server (a frozen one never answers)
# What the NATS client raises when the server did not answer; translated to EventLogUnavailable
# (core.errors.TRANSIENT_ERRORS), never caught as the root error.
NATS_TRANSIENT_ERRORS: Final = (
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    ConnectionError,
    OSError,
)


def _translate(exc: BaseException, what: str) -> PyocoError:
    if isinstance(exc, PyocoError):
        return exc
    if isinstance(exc, nats.errors.MaxPayloadError):
        # The message is too large for the server: a property of the request, never an outage.
        return PayloadTooLarge(f"{what}: message above the NATS server's max_payload")
    if isinstance(exc, JetStreamAckError):
        return exc.translate(what)
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return EventLogUnavailable(f"{what}: no JetStream stream answered (are the resources created?)")
    if isinstance(exc, NATS_TRANSIENT_ERRORS):
        return EventLogUnavailable(f"{what}: NATS unavailable ({type(exc).__name__})")
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code in MESSAGE_TOO_LARGE:
            return PayloadTooLarge(f"{what}: JetStream error {exc.err_code}: {exc.description}")
        if exc.err_code in NO_ROOM:
            return WritesRefused(f"{what}: JetStream refused the write ({exc.err_code}: {exc.description})")
        return InfraError(f"{what}: JetStream error {exc.err_code}: {exc.description}")
    if isinstance(exc, nats.errors.Error):
        return InfraError(f"{what}: {type(exc).__name__}: {exc}")
    return InfraError(f"{what}: {type(exc).__name__}: {exc}")


async def _guard(what: str, fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """Await ``fn(*args)`` translating NATS errors.  Takes the function, not a coroutine, so a
    task cancelled before it starts leaves no never-awaited coroutine behind."""
    try:
        return await fn(*args)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # translated into the pyoco error tree, on the asyncio side
        raise _translate(exc, what) from exc


class JetStreamAckError(Exception):
    """A JetStream publish was refused (``err_code`` as the server sent it)."""

    def __init__(self, err_code: int, description: str) -> None:
        super().__init__(f"JetStream error {err_code}: {description}")
        self.err_code = err_code
        self.description = description

    def translate(self, what: str) -> PyocoError:
        """The pyoco error this refusal is (wrong-last-sequence is the caller's to handle)."""
        if self.err_code in MESSAGE_TOO_LARGE:
            return PayloadTooLarge(f"{what}: {self} (the message is above the stream's max_msg_size)")
        if self.err_code in NO_ROOM:
            return WritesRefused(f"{what}: JetStream refused the write ({self})")
        return InfraError(f"{what}: {self}")


class _FastPublisher:
    """JetStream publish with acks multiplexed on one wildcard inbox.

    nats-py's ``js.publish`` pays for ``nc.request`` and ``asyncio.wait_for`` per message; this
    path is ~1.6x faster pipelined (27k vs 16.8k acked appends/s measured here).  Timeouts are
    applied per batch by the caller (``asyncio.timeout``).
    """

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._prefix = ""
        self._futures: dict[str, asyncio.Future[Any]] = {}
        self._counter = 0
        self._lock = asyncio.Lock()

    async def _start(self) -> None:
        async with self._lock:
            if self._prefix:
                return
            prefix = self._nc.new_inbox()
            futures = self._futures

            async def on_ack(msg: Any) -> None:
                fut = futures.pop(msg.subject, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

            await self._nc.subscribe(prefix + ".*", cb=on_ack)
            self._prefix = prefix

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> int:
        """Publish and wait for the PubAck; returns the stream seq (see :meth:`publish_ack`)."""
        return (await self.publish_ack(subject, data, headers))[0]

    async def publish_ack(self, subject: str, data: bytes, headers: dict[str, str] | None) -> tuple[int, bool]:
        """Publish and wait for the PubAck; returns (stream seq, duplicate).

        Raises:
            JetStreamAckError: the stream refused it (e.g. 10071 wrong last sequence).
            EventLogUnavailable: no stream listens on ``subject``.
        """
        reply, fut = await self.send(subject, data, headers)
        try:
            msg = await fut
        finally:
            self._futures.pop(reply, None)
        return self.outcome(subject, msg)

    async def send(self, subject: str, data: bytes, headers: dict[str, str] | None) -> tuple[str, asyncio.Future[Any]]:
        """Publish; returns the reply subject and the future its PubAck message completes (the
        caller reads it with :meth:`outcome` and drops the reply from ``_futures`` if it gives up)."""
        if not self._prefix:
            await self._start()
        self._counter += 1
        reply = f"{self._prefix}.{self._counter}"
        fut = asyncio.get_running_loop().create_future()
        self._futures[reply] = fut
        try:
            await self._nc.publish(subject, data, reply=reply, headers=headers)
        except BaseException:
            self._futures.pop(reply, None)
            raise
        return reply, fut

    @staticmethod
    def outcome(subject: str, msg: Any) -> tuple[int, bool]:  # noqa: ANN401 - a nats-py Msg
        """(stream seq, duplicate) of a PubAck message (see :meth:`publish_ack` for the errors)."""
        raw = msg.data
        if not raw:
            status = (msg.headers or {}).get("Status")
            raise EventLogUnavailable(f"no JetStream stream answered on {subject} (status {status})")
        doc = json.loads(raw)
        err = doc.get("error")
        if err is not None:
            raise JetStreamAckError(int(err.get("err_code", 0)), str(err.get("description", "")))
        return int(doc["seq"]), bool(doc.get("duplicate"))


def _send_or_drop(send: trio.MemorySendChannel[Any], item: object) -> None:
    try:
        send.send_nowait(item)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass


class NatsConnection:
    """One NATS connection plus its JetStream context, usable from Trio."""

    def __init__(self, thread: AsyncioThread, nc: Any, *, url: str, op_timeout: float, unavailable_wait: float = 10.0) -> None:
        self._thread = thread
        self._nc = nc
        self._js = nc.jetstream(timeout=op_timeout)
        self._pub = _FastPublisher(nc)
        self._soon: set[asyncio.Task[Any]] = set()  # publish_unacked_soon tasks (kept referenced)
        self._unacked: list[tuple[str, bytes, str]] = []  # publish_unacked_soon's queue
        self.url = url
        self.op_timeout = op_timeout
        # How long an append rides out NATS being away (frozen, restarting) before it gives up.
        self.unavailable_wait = unavailable_wait
        self.stream_max_msg_size = DEFAULT_MAX_MSG_SIZE  # ensure_resources sets the real one
        # (monotonic time, reason) of the last write JetStream refused for lack of room; cleared
        # by the next stored write.  Read by the gateway's /ready.
        self.write_refused: tuple[float, str] | None = None
        self.writes_outcome_unknown = 0  # appends that ended with an unknown outcome (metric)

    # -- plumbing -------------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        async def run() -> T:
            return await _guard(what, fn, *args)

        try:
            return await self._thread.call(run)
        except asyncio.CancelledError as exc:  # the loop is shutting down under us
            raise EventLogUnavailable(f"{what}: NATS client is closing") from exc
        except RuntimeError as exc:  # the loop is already closed: a watch unwinding after its client
            if not self._thread.loop.is_closed():
                raise
            raise EventLogUnavailable(f"{what}: NATS client is closed") from exc

    @property
    def is_connected(self) -> bool:
        return bool(self._nc.is_connected)

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts (its INFO ``max_payload``), for size checks
        before an append, so an oversized request is a 413 rather than a failed publish."""
        return int(getattr(self._nc, "max_payload", 0) or 1024 * 1024)

    @property
    def max_message_bytes(self) -> int:
        """The largest event or snapshot pyoco-es writes: the server's max_payload or the
        streams' max_msg_size, whichever is smaller, minus room for the headers."""
        return min(self.max_payload, self.stream_max_msg_size) - HEADER_HEADROOM

    def recent_write_refusal(self, within: float = WRITE_FAILURE_MEMORY) -> str | None:
        """Why JetStream refused the last write, if it did within ``within`` seconds and no
        write was stored since (the disk or the account limits are full)."""
        refused = self.write_refused
        if refused is None or time.monotonic() - refused[0] > within:
            return None
        return refused[1]

    def _note_write(self, refused: str | None) -> None:
        if refused is not None:
            self.write_refused = (time.monotonic(), refused)
        elif self.write_refused is not None:
            self.write_refused = None

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the connection (a reconnect in progress)."""
        if self.is_connected:
            return True

        async def go() -> bool:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not self._nc.is_connected and loop.time() < deadline:
                if self._nc.is_closed:
                    return False
                await asyncio.sleep(0.02)
            return bool(self._nc.is_connected)

        return await self._call("wait for NATS", go)

    async def account_info(self) -> dict[str, Any]:
        """JetStream's account info (``$JS.API.INFO``) as the server sent it."""
        return await self.jetstream_api("INFO")

    async def jetstream_api(self, endpoint: str, body: bytes = b"") -> dict[str, Any]:
        """One JetStream API request (``$JS.API.<endpoint>``, e.g. ``STREAM.INFO.PYOCO_EVENTS``),
        the answer as the server sent it (an ``error`` member included)."""

        async def go() -> dict[str, Any]:
            msg = await self._nc.request(f"$JS.API.{endpoint}", body, timeout=self.op_timeout)
            doc = json.loads(msg.data)
            if not isinstance(doc, dict):
                raise InfraError(f"JetStream API {endpoint}: the answer is not an object")
            return doc

        return await self._call(f"JetStream API {endpoint}", go)

    @property
    def js(self) -> Any:
        """The raw JetStream context, for this package's own modules only."""
        return self._js

    @property
    def nc(self) -> Any:
        """The raw NATS connection, for this package's own modules only."""
        return self._nc

    async def run(self, what: str, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run an asyncio coroutine function against this client (package-internal)."""
        return await self._call(what, fn, *args)

    async def _read_subject(
        self, subject: str, after: int, batch: int = 256, once: bool = False, stream: str = subjects.EVENTS_STREAM,
        names: list[str] | None = None,
    ) -> list[tuple[int, bytes]]:
        """Messages on ``subject`` after ``after`` by batched direct gets (``names``, if given,
        gets each one's subject)."""
        out: list[tuple[int, bytes]] = []
        start = after + 1
        api_subject = subjects.direct_get_subject(stream)
        while True:
            inbox = self._nc.new_inbox()
            sub = await self._nc.subscribe(inbox)
            got = 0
            try:
                req = dumps({"seq": start, "next_by_subj": subject, "batch": batch})
                await self._nc.publish(api_subject, req, reply=inbox)
                while True:
                    msg = await sub.next_msg(timeout=self.op_timeout)
                    hdrs = msg.headers or {}
                    status = hdrs.get("Status")
                    if status is not None:
                        if status in ("404", "204"):
                            break
                        raise InfraError(f"direct get on {subject}: status {status} {hdrs.get('Description', '')}")
                    seq = int(hdrs["Nats-Sequence"])
                    out.append((seq, msg.data))
                    if names is not None:
                        names.append(hdrs.get("Nats-Subject", ""))
                    got += 1
                    start = seq + 1
                    if hdrs.get("Nats-Num-Pending") == "0":
                        break
            finally:
                await sub.unsubscribe()
            if got < batch or once:
                return out

    async def _read_subject_from_leader(self, subject: str, after: int, stream: str = subjects.EVENTS_STREAM) -> list[tuple[int, bytes]]:
        """What :meth:`_read_subject` reads, asked of the stream's leader one message at a time
        (``$JS.API.STREAM.MSG.GET``).  A direct get may be answered by any replica of an R3
        stream, one still catching up included; the leader has every acknowledged message."""
        out: list[tuple[int, bytes]] = []
        start = after + 1
        while True:
            req = dumps({"seq": start, "next_by_subj": subject})
            msg = await self._nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", req, timeout=self.op_timeout)
            doc = json.loads(msg.data)
            err = doc.get("error")
            if err is not None:
                if err.get("err_code") == 10037:  # no message found: the end
                    return out
                raise InfraError(f"message get on {subject}: JetStream error {err.get('err_code')}: {err.get('description')}")
            m = doc["message"]
            seq = int(m["seq"])
            out.append((seq, base64.b64decode(m.get("data") or "")))
            start = seq + 1

    async def _publish_one(
        self, subject: str, data: bytes, msg_id: str | None, headers: dict[str, str] | None = None
    ) -> PubAck:  # on the asyncio side
        h = dict(headers or {})
        if msg_id:
            h["Nats-Msg-Id"] = msg_id
        try:
            seq, duplicate = await self._pub.publish_ack(subject, data, h or None)
        except JetStreamAckError as exc:
            error = exc.translate(f"publish to {subject}")
            if isinstance(error, WritesRefused):
                self._note_write(error.message)
            raise error from exc
        self._note_write(None)
        return PubAck(seq=seq, duplicate=duplicate)

    async def _gather(self, what: str, fn: Callable[..., Awaitable[T]], items: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``fn(*item)`` for every item, pipelined (on the asyncio side): per-item result or
        PyocoError; anything else is a bug and propagates."""
        res = await asyncio.gather(*(_guard(what, fn, *it) for it in items), return_exceptions=True)
        for r in res:
            if isinstance(r, BaseException) and not isinstance(r, PyocoError):
                raise r
        return list(res)

    # -- core pub/sub ---------------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self, subject: str, *, contains: bytes | None = None
    ) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, bytes]]]:
        """A core NATS subscription (sees JetStream publishes on the subject too).

        With ``contains``, only messages whose payload contains those bytes are forwarded; the
        rest are dropped on the asyncio side and never cost a crossing (the worker watches a long
        run's events this way for ``run.cancel_requested`` only).
        """
        sub = await self._call("subscribe", self._nc.subscribe, subject)

        async def produce(emit: Callable[[object], None]) -> None:
            async for msg in sub.messages:
                if contains is None or contains in msg.data:
                    emit((msg.subject, msg.data))

        async with self._forward(produce, cleanup=sub.unsubscribe) as channel:
            yield channel

    async def answers(self, timeout: float) -> bool:
        """Whether the server answers a request within ``timeout`` seconds.  A request, never a
        flush: a flush cut short (by its timeout or a cancel) leaves its PONG waiter in nats-py's
        queue, and the late PONG then fails nats-py's read loop, which drops the connection (a
        worker's graceful stop then could not write STOPPED_GRACEFUL, seen in a CI run)."""
        if not self.is_connected:
            return False

        async def ask() -> None:
            await self._nc.request("$JS.API.INFO", b"", timeout=timeout)

        try:
            await self._call("ping", ask)
        except PyocoError:
            return False
        return True

    @asynccontextmanager
    async def _forward(
        self, produce: Callable[[Callable[[object], None]], Awaitable[None]], *, cleanup: Callable[[], Awaitable[Any]]
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
        send, receive = trio.open_memory_channel[Any](math.inf)
        token = trio.lowlevel.current_trio_token()
        lock = threading.Lock()
        pending: list[object] = []

        def deliver() -> None:  # on the Trio thread: everything emitted since the last wake-up
            with lock:
                items = pending[:]
                pending.clear()
            for item in items:
                _send_or_drop(send, item)

        def emit(item: object) -> None:  # on the asyncio thread: one Trio wake-up per burst
            with lock:
                pending.append(item)
                if len(pending) > 1:
                    return
            try:
                token.run_sync_soon(deliver)
            except trio.RunFinishedError:  # pragma: no cover
                pass

        async def runner() -> None:
            try:
                await produce(emit)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the stream broke: tell the Trio side by closing
                log.warning("NATS stream ended: %s", exc)
            finally:
                try:
                    token.run_sync_soon(deliver)
                    token.run_sync_soon(send.close)
                except trio.RunFinishedError:  # pragma: no cover
                    pass

        task_holder: list[asyncio.Task[None]] = []

        async def begin() -> None:
            task_holder.append(asyncio.get_running_loop().create_task(runner()))

        await self._call("stream", begin)
        try:
            yield receive
        finally:

            async def end() -> None:
                task_holder[0].cancel()
                try:
                    await cleanup()
                except Exception:  # noqa: BLE001 - best effort on close
                    pass

            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    try:
                        await self._call("stream close", end)
                    except PyocoError:
                        pass

    async def stream_info(self, stream: str) -> dict[str, int]:
        async def go() -> dict[str, int]:
            info = await self._js.stream_info(stream)
            return {"messages": info.state.messages, "last_seq": info.state.last_seq, "first_seq": info.state.first_seq}

        return await self._call("stream info", go)

    async def subject_counts(self, stream: str, subject_filter: str) -> dict[str, int]:
        """Messages per subject in ``stream`` (e.g. the work queue depth per tag)."""

        async def go() -> dict[str, int]:
            info = await self._js.stream_info(stream, subjects_filter=subject_filter)
            return dict(info.state.subjects or {})

        return await self._call("stream subjects", go)

    async def close(self) -> None:
        async def go() -> None:
            try:
                await self._nc.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

        # Shielded (a cancelled owner still closes), but bounded: a frozen server never answers.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_WAIT):
            try:
                await self._thread.call(go)
            except BaseException:  # noqa: BLE001 - the loop may already be gone
                pass
