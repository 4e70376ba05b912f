"""The gateway about itself: ``/health``, ``/ready`` (NATS, JetStream writes, the run index),
``/metrics`` (Prometheus text) and ``/openapi.json``."""

from __future__ import annotations

from collections.abc import Awaitable

import trio
from quart import Blueprint, Response, current_app

from ..core.errors import PyocoError
from ..core.events import JSONObject
from ..nats import subjects
from .answer import json_response
from .auth import public_rules
from .context import Gateway, current_gateway
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import MetricValues, local_day_bounds, render
from .openapi import app_routes, openapi_document
from .registry import ALIVE_STATES

blueprint = Blueprint("status", __name__)


@blueprint.get("/health")
async def health() -> Response:
    return json_response({"status": "ok"})


@blueprint.get("/ready")
async def ready() -> Response:
    gw = current_gateway()
    stats = gw.index.statistics()
    jetstream = await jetstream_state(gw)
    ok = gw.nats.is_connected and stats.ready and jetstream["writable"]
    return json_response(
        {
            "status": "ready" if ok else "not_ready",
            "nats": {"connected": gw.nats.is_connected, "url": gw.nats.url},
            "jetstream": jetstream,
            "run_index": {"ready": stats.ready, "watching": stats.watching, "runs": stats.runs},
        },
        200 if ok else 503,
    )


@blueprint.get("/openapi.json")
async def openapi() -> Response:
    gw = current_gateway()
    keys_on = gw.keys is not None  # as server.py: the auth layer guards the app exactly when there is a key ring
    return json_response(openapi_document(
        app_routes(current_app.url_map),
        api_key_header=gw.settings.api_key_header if keys_on else None,
        public=public_rules(public_metrics=gw.settings.http_metrics_public),
    ))


@blueprint.get("/metrics")
async def metrics() -> Response:
    gw = current_gateway()
    now = gw.clock()
    start, end = local_day_bounds(now)
    loaded = gw.index.ready.is_set()
    today, waiting, unprojectable = await gw.index.figures(start, end) if loaded else ({}, {}, 0)
    workers_alive = await _optional(_workers_alive(gw))
    dlq = appended = lag = None
    depth: dict[str, int] | None = None
    if gw.nats.is_connected:
        try:
            counts = await gw.nats.subject_counts(subjects.WORK_STREAM, f"{gw.settings.work_subject_prefix}.>")
            depth = {subj.rsplit(".", 1)[-1]: n for subj, n in counts.items()}
        except PyocoError:
            depth = None
        dlq = await _optional(_stream_field(gw, subjects.DLQ_STREAM, "messages"))
        appended = await _optional(_stream_field(gw, subjects.EVENTS_STREAM, "last_seq"))
        lag = await _optional(_projector_lag(gw))
    values = MetricValues(
        runs_by_status=await gw.index.status_counts() if loaded else {},
        runs_today_by_status=today,
        workers_alive=workers_alive,
        dlq_messages=dlq,
        events_appended=appended,
        projector_lag=lag,
        sse_streams=gw.sse_streams,
        index_runs=len(gw.index),
        queue_depth=waiting,
        work_items=depth,
        unprojectable_runs=unprojectable,
        log_lines_dropped=await _log_drops(gw),
    )
    return Response(render(values, gw.http), content_type=METRICS_CONTENT_TYPE)


async def jetstream_state(gw: Gateway) -> JSONObject:
    """Whether JetStream takes writes, for ``/ready``: connectivity alone is not enough (a full
    disk or full account limits refuse every write while the connection is fine).  Not writable
    after a refused write until a write is stored again (or a minute has passed), and while the
    account answers with an error (JetStream disabled, e.g. out of resources)."""
    refused = gw.nats.recent_write_refusal()
    out: JSONObject = {"writable": refused is None, "last_write_refused": refused}
    if gw.nats.is_connected:
        try:
            with trio.move_on_after(2):
                info = await gw.nats.account_info()
                if isinstance(info.get("error"), dict):
                    out["writable"] = False
                    out["account_error"] = str(info["error"].get("description", info["error"]))
                out["storage_bytes"] = info.get("storage")
        except PyocoError as exc:
            out["writable"] = False
            out["account_error"] = exc.message
    return out


async def _optional(coro: Awaitable[int]) -> int | None:
    """A metric value, or None (its line is omitted) when NATS cannot tell."""
    try:
        return await coro
    except PyocoError:
        return None


async def _workers_alive(gw: Gateway) -> int:
    return sum(view["state"] in ALIVE_STATES for view in await gw.worker_views())


async def _log_drops(gw: Gateway) -> dict[str, int] | None:
    """Each worker's ``log_lines_dropped`` (its registry record; None: the registry is not loaded)."""
    try:
        views = await gw.worker_views()
    except PyocoError:
        return None
    return {str(v.get("worker_id")): v["log_lines_dropped"] for v in views if isinstance(v.get("log_lines_dropped"), int)}


async def _stream_field(gw: Gateway, stream: str, field: str) -> int:
    return (await gw.nats.stream_info(stream))[field]


async def _projector_lag(gw: Gateway) -> int:
    info = await gw.nats.consumer_pending(subjects.EVENTS_STREAM, subjects.PROJECTOR_DURABLE)
    return info["num_pending"] + info["num_ack_pending"]
