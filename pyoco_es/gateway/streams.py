"""The SSE streams: ``GET /runs/stream`` (every change in the run list) and
``GET /runs/{id}/watch`` (one run's snapshots until it ends), both fed by the run index.

Frames carry integer ids (the KV revision, or the run's version), so a client resumes with
``Last-Event-ID``; a heartbeat frame follows any silence of ``heartbeat_interval`` seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import trio
from quart import Blueprint, Response, request

from ..core.errors import RunNotFound
from ..core.events import JSONObject
from ..core.model import TERMINAL_STATUSES
from . import sse
from .context import current_gateway, includes, last_event_id
from .params import query_float, query_int, query_str
from .snapshot import filter_snapshot, read_snapshot, valid_run_id

TERMINAL: Final = frozenset(s.value for s in TERMINAL_STATUSES)

blueprint = Blueprint("streams", __name__)


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
        }.items()
        if v
    }
    timeout = query_int(args, "timeout_sec", default=600, lo=1, hi=3600)
    after = last_event_id()
    if after is None and "after" in args:
        after = query_int(args, "after", default=0, lo=0, hi=2**62)
    await gw.wait_index_ready()

    async def stream() -> AsyncIterator[bytes]:
        gw.sse_streams += 1
        try:
            deadline = trio.current_time() + timeout
            sent = after if after is not None else gw.index.revision
            if after is None:
                yield sse.frame("ready", {"revision": sent, "runs": len(gw.index)}, id=sent, retry_ms=1000)
            elif after > gw.index.revision:
                # An id from the future: the bucket was rebuilt (revisions restart) or this
                # gateway lags the one that sent it.  Tell the client to reload its list.
                sent = gw.index.revision
                yield sse.frame("reset", {"revision": sent, "runs": len(gw.index)}, id=sent, retry_ms=1000)
            last_frame = trio.current_time()
            while True:
                changed = gw.index.change_event()
                now_rev = gw.index.revision
                for rev, summary in gw.index.changed_since(sent, filters=filters):
                    yield sse.frame("run", summary, id=rev)
                    last_frame = trio.current_time()
                sent = max(sent, now_rev)
                now = trio.current_time()
                if now >= deadline:
                    return
                await _wait_event(changed, min(deadline, last_frame + gw.heartbeat_interval) - now)
                now = trio.current_time()
                if not changed.is_set() and now >= last_frame + gw.heartbeat_interval and now < deadline:
                    yield sse.frame("heartbeat", {"revision": sent, "ts": gw.clock()})
                    last_frame = now
        finally:
            gw.sse_streams -= 1

    return _sse_response(stream())


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

    async def stream() -> AsyncIterator[bytes]:
        # Subscribed inside the generator, so its finally always unsubscribes (a body that
        # never starts leaves nothing behind).  A change that reached the index between the
        # read above and this subscription is caught by comparing versions.
        slot = gw.index.subscribe(run_id)
        gw.sse_streams += 1
        try:
            pending: JSONObject | None = first
            if gw.index.version_of(run_id) > _version(first):
                pending = await read_snapshot(gw, run_id) or first
            deadline = trio.current_time() + timeout
            sent = last_id or 0
            last_frame = trio.current_time()
            while True:
                if pending is not None:
                    version = _version(pending)
                    if version > sent:
                        updated = pending.get("updated_at")
                        if since is None or not isinstance(updated, (int, float)) or updated >= since:
                            data = {"run_id": run_id, "snapshot": filter_snapshot(pending, wanted), "ts": gw.clock()}
                            yield sse.frame("snapshot", data, id=version, retry_ms=1000 if sent == (last_id or 0) else None)
                            last_frame = trio.current_time()
                        sent = version
                    if version >= sent and pending.get("status") in TERMINAL:
                        yield sse.frame(
                            "end",
                            {"run_id": run_id, "status": pending.get("status"), "version": sent, "ts": gw.clock()},
                            id=sent,
                        )
                        return
                    pending = None
                now = trio.current_time()
                if now >= deadline:
                    return
                pending = await _wait_slot(slot, min(deadline, last_frame + gw.heartbeat_interval) - now)
                now = trio.current_time()
                if pending is None and now >= last_frame + gw.heartbeat_interval and now < deadline:
                    yield sse.frame("heartbeat", {"run_id": run_id, "ts": gw.clock()})
                    last_frame = now
        finally:
            gw.index.unsubscribe(slot)
            gw.sse_streams -= 1

    return _sse_response(stream())


def _version(doc: JSONObject) -> int:
    version = doc.get("version")
    return version if isinstance(version, int) else 0


def _sse_response(body: AsyncIterator[bytes]) -> Response:
    response = Response(body, status=200, headers=sse.SSE_HEADERS)
    response.timeout = None  # streams end on their own deadline (timeout_sec)
    return response


async def _wait_slot(slot: Any, timeout: float) -> JSONObject | None:
    with trio.move_on_after(max(0.0, timeout)):
        await slot.changed.wait()
    return slot.take() if slot.changed.is_set() else None


async def _wait_event(event: trio.Event, timeout: float) -> None:
    with trio.move_on_after(max(0.0, timeout)):
        await event.wait()
