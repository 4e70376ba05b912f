"""The SSE streams: ``GET /runs/stream`` (every change in the run list) and
``GET /runs/{id}/watch`` (one run's snapshots until it ends), both fed by the run index.

Each stream is a unit over the :class:`~.runindex.RunIndex` that knows nothing of HTTP:
:func:`open_run_list_stream` and :func:`open_run_stream` are ``@trio.as_safe_channel``
generators of SSE frames, so a test reads their frames from a channel, and the handlers below
only parse the query and hand the channel to :func:`~.answer.sse_response`.  Frames carry
integer ids (the KV revision, or the run's version), so a client resumes with
``Last-Event-ID``; a heartbeat frame follows any silence of ``Pace.heartbeat`` seconds, and the
stream ends at ``Pace.timeout``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Final

import attrs
import trio
from quart import Blueprint, Response, request

from ..core.errors import RunNotFound
from ..core.events import JSONObject
from ..core.model import TERMINAL_STATUSES
from . import sse
from .answer import sse_response
from .context import check_tenant, current_gateway, includes, last_event_id, tenant_filter
from .index import RunSlot
from .runindex import RunIndex
from .params import query_float, query_int, query_str
from .snapshot import filter_snapshot, read_snapshot, valid_run_id

TERMINAL: Final = frozenset(s.value for s in TERMINAL_STATUSES)

blueprint = Blueprint("streams", __name__)


@attrs.frozen(kw_only=True)
class Pace:
    """How long a stream lasts and when it speaks while nothing changes.

    Attributes:
        timeout: seconds (Trio's clock) after which the stream ends.
        heartbeat: seconds of silence before a heartbeat frame.
        clock: the wall clock stamped into frames (``ts``).
    """

    timeout: float
    heartbeat: float
    clock: Callable[[], float]


@trio.as_safe_channel
async def open_run_list_stream(
    index: RunIndex, *, filters: dict[str, str], after: int | None, pace: Pace
) -> AsyncGenerator[bytes, None]:
    """The frames of ``GET /runs/stream``: ``ready`` (or ``reset`` for an id from the future), then
    a ``run`` frame per changed run matching ``filters`` (id: its KV revision), oldest first.

    Args:
        after: the revision the client already has (``Last-Event-ID``); None: start from now.
    """
    deadline = trio.current_time() + pace.timeout
    sent = after if after is not None else index.revision
    # A tenant (API keys on) counts only its own runs; others' are not to be known.
    await index.synced()  # the runs it has received are in the file (and in its count)
    runs = await index.count(filters={"tenant_id": filters["tenant_id"]}) if "tenant_id" in filters else len(index)
    if after is None:
        yield sse.frame("ready", {"revision": sent, "runs": runs}, id=sent, retry_ms=1000)
    elif after > index.revision:
        # An id from the future: the bucket was rebuilt (revisions restart) or this
        # gateway lags the one that sent it.  Tell the client to reload its list.
        sent = index.revision
        yield sse.frame("reset", {"revision": sent, "runs": runs}, id=sent, retry_ms=1000)
    last_frame = trio.current_time()
    while True:
        changed = index.change_event()
        now_rev = index.revision
        for rev, summary in await index.changed(sent, filters=filters):
            yield sse.frame("run", summary, id=rev)
            last_frame = trio.current_time()
        sent = max(sent, now_rev)
        now = trio.current_time()
        if now >= deadline:
            return
        await _wait_event(changed, min(deadline, last_frame + pace.heartbeat) - now)
        now = trio.current_time()
        if not changed.is_set() and now >= last_frame + pace.heartbeat and now < deadline:
            yield sse.frame("heartbeat", {"revision": sent, "ts": pace.clock()})
            last_frame = now


@trio.as_safe_channel
async def open_run_stream(
    index: RunIndex,
    run_id: str,
    first: JSONObject,
    *,
    read: Callable[[str], Awaitable[JSONObject | None]],
    includes: set[str],
    since: float | None,
    last_id: int | None,
    pace: Pace,
) -> AsyncGenerator[bytes, None]:
    """The frames of ``GET /runs/{id}/watch``: a ``snapshot`` per new version (id: the version),
    then ``end`` once the run is terminal.

    Args:
        first: the snapshot read before the stream opened; ``read`` re-reads the run when the
            index already knows a newer version.
        since: skip snapshots last updated before this wall-clock time.
        last_id: the version the client already has (``Last-Event-ID``).
    """
    # Subscribed inside the generator, so its finally always unsubscribes (a body that never
    # starts leaves nothing behind).  A change that reached the index between the caller's read
    # and this subscription is caught by comparing versions.
    slot = index.subscribe(run_id)
    try:
        pending: JSONObject | None = first
        if index.version_of(run_id) > _version(first):
            pending = await read(run_id) or first
        deadline = trio.current_time() + pace.timeout
        sent = last_id or 0
        last_frame = trio.current_time()
        while True:
            if pending is not None:
                version = _version(pending)
                if version > sent:
                    updated = pending.get("updated_at")
                    if since is None or not isinstance(updated, (int, float)) or updated >= since:
                        data = {"run_id": run_id, "snapshot": filter_snapshot(pending, includes), "ts": pace.clock()}
                        yield sse.frame("snapshot", data, id=version, retry_ms=1000 if sent == (last_id or 0) else None)
                        last_frame = trio.current_time()
                    sent = version
                if version >= sent and pending.get("status") in TERMINAL:
                    yield sse.frame(
                        "end",
                        {"run_id": run_id, "status": pending.get("status"), "version": sent, "ts": pace.clock()},
                        id=sent,
                    )
                    return
                pending = None
            now = trio.current_time()
            if now >= deadline:
                return
            pending = await _wait_slot(slot, min(deadline, last_frame + pace.heartbeat) - now)
            now = trio.current_time()
            if pending is None and now >= last_frame + pace.heartbeat and now < deadline:
                yield sse.frame("heartbeat", {"run_id": run_id, "ts": pace.clock()})
                last_frame = now
    finally:
        index.unsubscribe(slot)


# -- the HTTP handlers ---------------------------------------------------------------------------


@blueprint.get("/runs/stream")
async def stream_runs() -> Response:
    gw = current_gateway()
    args = request.args
    filters = {
        k: v
        for k, v in {
            "status": query_str(args, "status"),
            "flow_name": query_str(args, "flow"),
            "tag": query_str(args, "tag"),
            **tenant_filter(),
        }.items()
        if v
    }
    timeout = query_int(args, "timeout_sec", default=600, lo=1, hi=3600)
    after = last_event_id()
    if after is None and "after" in args:
        after = query_int(args, "after", default=0, lo=0, hi=2**62)
    await gw.wait_index_ready()
    pace = Pace(timeout=timeout, heartbeat=gw.heartbeat_interval, clock=gw.clock)
    return sse_response(gw, open_run_list_stream(gw.index, filters=filters, after=after, pace=pace))


@blueprint.get("/runs/<run_id>/watch")
async def watch_run(run_id: str) -> Response:
    gw = current_gateway()
    if not valid_run_id(run_id):
        raise RunNotFound(run_id)
    wanted = includes()
    since = query_float(request.args, "since")
    timeout = query_int(request.args, "timeout_sec", default=60, lo=1, hi=600)
    last_id = last_event_id()
    gw.require_nats()
    first = await read_snapshot(gw, run_id)
    if first is None:
        raise RunNotFound(run_id)
    check_tenant(first, run_id)
    pace = Pace(timeout=timeout, heartbeat=gw.heartbeat_interval, clock=gw.clock)

    async def read(rid: str) -> JSONObject | None:
        return await read_snapshot(gw, rid)

    stream = open_run_stream(gw.index, run_id, first, read=read, includes=wanted, since=since, last_id=last_id, pace=pace)
    return sse_response(gw, stream)


def _version(doc: JSONObject) -> int:
    version = doc.get("version")
    return version if isinstance(version, int) else 0


async def _wait_slot(slot: RunSlot, timeout: float) -> JSONObject | None:
    with trio.move_on_after(max(0.0, timeout)):
        await slot.changed.wait()
    return slot.take() if slot.changed.is_set() else None


async def _wait_event(event: trio.Event, timeout: float) -> None:
    with trio.move_on_after(max(0.0, timeout)):
        await event.wait()
