"""The logs resource: a run's task output, read from ``PYOCO_LOGS`` (:mod:`pyoco_es.nats.logs`).

``GET /runs/{id}/logs`` pages through the lines (``after`` a position, ``limit`` lines, filters
``task`` and ``stream``; the answer's ``next`` is the ``after`` of the next page and ``more``
says whether there is one).  ``GET /runs/{id}/logs/stream`` is the live tail as SSE: ``logs``
frames (id: the position of the frame's last line, so ``Last-Event-ID`` resumes with no
duplicate and no gap), heartbeats, and ``end`` once the run has ended and its subject has been
read to the end (the worker stores an attempt's lines before its terminal event).  A drop marker
("N lines dropped") passes every filter.  Both routes are tenant-scoped like every run route.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Final

import attrs
import trio
from quart import Blueprint, Response, request

from ..core.events import JSONObject
from ..nats import subjects
from ..nats.client import NatsClient
from ..nats.logs import DROPPED, POSITION_BASE, STREAMS, decode_chunk, read_chunks
from . import sse
from .answer import json_response, sse_response
from .context import check_tenant, current_gateway, last_event_id
from .runindex import RunIndex
from .params import invalid, query_int, query_str
from .snapshot import read_existing, read_snapshot
from .streams import TERMINAL, Pace

blueprint = Blueprint("logs", __name__)

LIMIT_DEFAULT: Final = 1000
LIMIT_MAX: Final = 5000
POSITION_MAX: Final = 2**62
READ_CHUNKS: Final = 64  # chunks per NATS read
SCAN_CHUNKS: Final = 1024  # chunks one request scans at most (then more=true)
TASK_MAX: Final = 256


@attrs.frozen(kw_only=True)
class LogFilter:
    task: str | None = None
    stream: str | None = None

    def matches(self, line: JSONObject) -> bool:
        if line.get("stream") == DROPPED:
            return True  # a marker concerns every reader
        return (self.task is None or line.get("task") == self.task) and (self.stream is None or line.get("stream") == self.stream)


@attrs.frozen(kw_only=True)
class LogPage:
    lines: list[JSONObject]
    next: int  # the ``after`` of the next page (the last position read)
    more: bool


async def read_page(nats: NatsClient, run_id: str, *, after: int, limit: int, filt: LogFilter) -> LogPage:
    """Lines of ``run_id`` after position ``after`` matching ``filt``, at most ``limit``.

    Raises:
        InfraError: NATS did not answer.
    """
    cursor = max(0, after // POSITION_BASE - 1) if after else 0  # the chunk holding ``after`` is read again
    lines: list[JSONObject] = []
    last = after
    scanned = 0
    while scanned < SCAN_CHUNKS:
        chunks = await read_chunks(nats, run_id, after_seq=cursor, limit=READ_CHUNKS)
        for seq, data in chunks:
            cursor = seq
            scanned += 1
            for line in decode_chunk(seq, data):
                if line["pos"] <= after:
                    continue
                last = line["pos"]
                if filt.matches(line):
                    lines.append(line)
                    if len(lines) >= limit:
                        return LogPage(lines=lines, next=last, more=True)
        if len(chunks) < READ_CHUNKS:
            return LogPage(lines=lines, next=last, more=False)
    return LogPage(lines=lines, next=last, more=True)


@trio.as_safe_channel
async def open_log_stream(
    nats: NatsClient,
    index: RunIndex,
    run_id: str,
    *,
    after: int,
    filt: LogFilter,
    status: Callable[[], Awaitable[str | None]],
    pace: Pace,
) -> AsyncGenerator[bytes, None]:
    """The frames of ``GET /runs/{id}/logs/stream`` (see the module docstring).

    Args:
        after: the position the client already has (``Last-Event-ID``; 0: from the start).
        status: reads the run's current status.
    """
    slot = index.subscribe(run_id)
    try:
        async with nats.subscribe(subjects.run_logs_subject(run_id)) as stored:
            deadline = trio.current_time() + pace.timeout
            last_frame = trio.current_time()
            first = True
            while True:
                now_status = await status()  # before the read: lines stored before the end are in it
                page = await read_page(nats, run_id, after=after, limit=LIMIT_MAX, filt=filt)
                after = page.next
                if page.lines or first:
                    yield sse.frame("logs", {"run_id": run_id, "lines": page.lines}, id=after, retry_ms=1000 if first else None)
                    first, last_frame = False, trio.current_time()
                if page.more:
                    continue
                if now_status in TERMINAL:
                    yield sse.frame("end", {"run_id": run_id, "status": now_status, "next": after})
                    return
                now = trio.current_time()
                if now >= deadline:
                    return
                await _wait_any(stored, slot.changed, min(deadline, last_frame + pace.heartbeat) - now)
                if slot.changed.is_set():
                    slot.take()
                _drain(stored)
                now = trio.current_time()
                if now >= last_frame + pace.heartbeat and now < deadline:
                    yield sse.frame("heartbeat", {"run_id": run_id, "ts": pace.clock()})
                    last_frame = now
    finally:
        index.unsubscribe(slot)


async def _wait_any(stored: trio.MemoryReceiveChannel[Any], changed: trio.Event, timeout: float) -> None:
    """Until a chunk is stored, the run changes, or ``timeout`` passes."""

    async def receive(scope: trio.CancelScope) -> None:
        try:
            await stored.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            await trio.sleep_forever()  # the subscription ended: the other waits (and the timeout) remain
        scope.cancel()

    async def run_changed(scope: trio.CancelScope) -> None:
        await changed.wait()
        scope.cancel()

    with trio.move_on_after(max(0.0, timeout)):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive, nursery.cancel_scope)
            nursery.start_soon(run_changed, nursery.cancel_scope)


def _drain(stored: trio.MemoryReceiveChannel[Any]) -> None:
    while True:
        try:
            stored.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return


def _filter() -> LogFilter:
    args = request.args
    stream = query_str(args, "stream")
    if stream is not None and stream not in STREAMS:
        raise invalid("enum", ("query", "stream"), f"stream must be one of {', '.join(STREAMS)}", stream)
    return LogFilter(task=query_str(args, "task", max_len=TASK_MAX), stream=stream)


@blueprint.get("/runs/<run_id>/logs")
async def get_logs(run_id: str) -> Response:
    gw = current_gateway()
    filt = _filter()
    after = query_int(request.args, "after", default=0, lo=0, hi=POSITION_MAX)
    limit = query_int(request.args, "limit", default=LIMIT_DEFAULT, lo=1, hi=LIMIT_MAX)
    check_tenant(await read_existing(gw, run_id), run_id)
    page = await read_page(gw.nats, run_id, after=after, limit=limit, filt=filt)
    return json_response({"run_id": run_id, "lines": page.lines, "next": page.next, "more": page.more})


@blueprint.get("/runs/<run_id>/logs/stream")
async def stream_logs(run_id: str) -> Response:
    gw = current_gateway()
    filt = _filter()
    timeout = query_int(request.args, "timeout_sec", default=600, lo=1, hi=3600)
    after = last_event_id()
    if after is None:
        after = query_int(request.args, "after", default=0, lo=0, hi=POSITION_MAX)
    check_tenant(await read_existing(gw, run_id), run_id)

    async def status() -> str | None:
        doc = await read_snapshot(gw, run_id)
        value = doc.get("status") if doc is not None else None
        return value if isinstance(value, str) else None

    pace = Pace(timeout=timeout, heartbeat=gw.heartbeat_interval, clock=gw.clock)
    return sse_response(gw, open_log_stream(gw.nats, gw.index, run_id, after=after, filt=filt, status=status, pace=pace))
