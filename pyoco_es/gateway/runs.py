"""The runs resource: submit (JSON or a flow.yaml upload), list, read one run, its tasks, cancel.

Writes answer only after the PubAck (:mod:`.submit`, ``RunStore.execute``); reads come from the
run index, the KV snapshot or, right after a write the projector has not folded yet, the run's
events (:mod:`.snapshot`).  The SSE streams are in :mod:`.streams`, the audit history in :mod:`.events`.
"""

from __future__ import annotations

import functools
import json

import trio
from quart import Blueprint, Response, request

from ..core import decide
from ..core.errors import RunNotFound
from ..core.events import Event, JSONObject, JSONValue, RunSubmitted
from ..core.model import RunSnapshot
from ..nats import subjects
from .answer import json_response
from .archived import read_or_gone
from .context import Gateway, caller, check_tenant, current_gateway, includes, request_body, request_idempotency_key, tenant_filter
from .index import decode_cursor
from .params import RequestInvalid, check_run_timeout, json_loads, query_float, query_int, query_str
from .snapshot import FULL_INCLUDES, enrich, filter_snapshot, read_existing, valid_run_id
from .submit import INLINE_PARSE_BYTES, check_yaml_length, named_event, submit_event, yaml_document, yaml_event, yaml_form

blueprint = Blueprint("runs", __name__)


async def submit(gw: Gateway, event: RunSubmitted, fingerprint: JSONObject) -> Response:
    """Append ``run.submitted`` and answer after the PubAck; Idempotency-Key retries are 200s."""
    doc, headers = await submit_event(gw, event, fingerprint, request_idempotency_key(), caller())
    return json_response(doc, headers=headers)


@blueprint.post("/runs")
async def submit_run() -> Response:
    gw = current_gateway()
    await gw.await_nats()
    event, fingerprint = named_event(gw, json_loads(await request_body()))
    return await submit(gw, event, fingerprint)


@blueprint.post("/runs/yaml")
async def submit_yaml() -> Response:
    gw = current_gateway()
    await gw.await_nats()
    check_yaml_length(gw, request.content_length)
    name, tag, data, timeout = yaml_form(gw, await request.get_data(cache=False), request.headers.get("Content-Type"))
    if len(data) <= INLINE_PARSE_BYTES:
        doc = yaml_document(gw, data)  # ~1 ms, and cached by hash
    else:
        # A large document takes seconds of pure-Python parsing: off the event loop, one
        # at a time, so SSE streams and other requests keep flowing meanwhile.
        doc = await trio.to_thread.run_sync(functools.partial(yaml_document, gw, data), limiter=gw.parse_limiter)
    event, fingerprint = yaml_event(gw, name, tag, doc, timeout)
    return await submit(gw, event, fingerprint)


@blueprint.get("/runs")
async def list_runs() -> Response:
    gw = current_gateway()
    args = request.args
    limit = query_int(args, "limit", default=50, lo=1, hi=200)
    updated_after = query_float(args, "updated_after")
    cursor = args.get("cursor")
    before = None
    if cursor is not None:
        try:
            before = decode_cursor(cursor)
        except ValueError as exc:
            raise RequestInvalid(f"invalid list query: {exc}") from None
    filters = {
        "status": query_str(args, "status"),
        "flow_name": query_str(args, "flow"),
        "tag": query_str(args, "tag"),
        "workflow_yaml_sha256": query_str(args, "workflow_yaml_sha256"),
        "schedule_id": query_str(args, "schedule_id"),
        "worker_id": query_str(args, "worker_id"),
        "tenant_id": query_str(args, "tenant_id"),
        **tenant_filter(),
    }
    delta = "updated_after" in args or "cursor" in args or "workflow_yaml_sha256" in args
    await gw.wait_index_ready()
    page = await gw.index.list_page(
        limit=limit,
        filters={k: v for k, v in filters.items() if v},
        updated_after=updated_after,
        before=before,
        updated_before=query_float(args, "updated_before"),
        run_id_prefix=query_str(args, "run_id_prefix"),
        error_contains=query_str(args, "error_contains"),
    )
    items = page.items
    if includes() & FULL_INCLUDES and items:
        entries = await gw.nats.kv_get_many(subjects.RUNS_BUCKET, [str(i["run_id"]) for i in items])
        full = []
        for item, entry in zip(items, entries, strict=True):
            try:
                full.append(json.loads(entry.value) if entry is not None and entry.value else item)
            except ValueError:
                full.append(item)
        items = full
    headers = {"X-Pyoco-Index-Revision": str(gw.index.revision)}
    if delta:
        return json_response({"items": items, "next_cursor": page.next_cursor}, headers=headers)
    return json_response(items, headers=headers)


@blueprint.get("/runs/<run_id>")
async def get_run(run_id: str) -> Response:
    gw = current_gateway()
    doc = await read_or_gone(gw, run_id)
    check_tenant(doc, run_id)
    return json_response(await enrich(gw, filter_snapshot(doc, includes())))


@blueprint.get("/runs/<run_id>/tasks")
async def get_tasks(run_id: str) -> Response:
    gw = current_gateway()
    doc = await read_existing(gw, run_id)
    check_tenant(doc, run_id)
    return json_response(
        {
            "run_id": doc.get("run_id", run_id),
            "flow_name": doc.get("flow_name"),
            "status": doc.get("status"),
            "tasks": doc.get("tasks") or {},
            "task_records": doc.get("task_records") or {},
            "task_records_truncated": bool(doc.get("task_records_truncated", False)),
        }
    )


@blueprint.post("/runs/<run_id>/cancel")
async def cancel_run(run_id: str) -> Response:
    gw = current_gateway()
    if not valid_run_id(run_id):
        raise RunNotFound(run_id)
    await gw.await_nats()
    now = gw.clock()
    who = caller()

    def decide_cancel(snap: RunSnapshot | None) -> list[Event]:
        if who is not None and (snap is None or snap.tenant_id != who.tenant_id):
            raise RunNotFound(run_id)  # another tenant's run does not exist for this caller
        return decide.request_cancel(snap, run_id=run_id, now=now, by=None if who is None else f"api_key:{who.key_id}")

    outcome = await gw.store.execute(run_id, decide_cancel, producer=gw.producer)
    if outcome.snapshot is None:  # pragma: no cover - request_cancel raises RunNotFound first
        raise RunNotFound(run_id)
    doc = outcome.snapshot.to_json()
    if outcome.appended:
        gw.index.note(doc)
    return json_response(filter_snapshot(doc, set()))
