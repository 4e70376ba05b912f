"""The workers resource: ``GET /workers`` (the registry with each worker's effective state) and
``PATCH /workers/{id}`` (hide or show one, a compare-and-swap on its registry record, then an
entry in the audit history naming who did it)."""

from __future__ import annotations

import itertools
import json
import random
from typing import Final

import trio
from quart import Blueprint, Response, request

from ..core.codec import dumps
from ..core.errors import ConcurrencyConflict, InfraError, OutcomeUnknown
from ..nats import subjects
from ..nats.audit import append_audit
from ..nats.client import KVEntry
from .answer import json_response
from .context import Gateway, caller, current_gateway, request_body
from .params import WORKER_ID_MAX, RequestInvalid, ResourceNotFound, invalid, json_loads, query_bool, query_int
from .registry import ALIVE_STATES, WORKER_STATES, normalize_worker

PATCH_RETRY_SECONDS: Final = 5.0  # how long PATCH /workers/{id} keeps retrying its compare-and-swap

blueprint = Blueprint("workers", __name__)


@blueprint.get("/workers")
async def list_workers() -> Response:
    gw = current_gateway()
    args = request.args
    scope = (args.get("scope") or "active").strip().lower()
    if scope not in ("active", "all"):
        raise RequestInvalid("invalid workers request: scope must be 'active' or 'all'")
    state = args.get("state")
    if state is not None and state.strip():
        state = state.strip().upper()
        if state not in WORKER_STATES:
            raise RequestInvalid(f"invalid workers request: state must be one of {', '.join(WORKER_STATES)}")
    else:
        state = None
    include_hidden = query_bool(args, "include_hidden", default=False)
    limit = query_int(args, "limit", default=100, lo=1, hi=500)
    items = []
    for view in await gw.worker_views():
        if view["hidden"] and not include_hidden:
            continue
        if scope == "active" and view["state"] not in ALIVE_STATES:
            continue
        if state is not None and view["state"] != state:
            continue
        items.append(view)
    items.sort(key=lambda w: (w.get("last_seen_at") or 0.0, str(w.get("worker_id"))), reverse=True)
    return json_response(items[:limit])


@blueprint.patch("/workers/<worker_id>")
async def patch_worker(worker_id: str) -> Response:
    gw = current_gateway()
    body = json_loads(await request_body())
    if not isinstance(body, dict):
        raise invalid("model_attributes_type", ("body",), 'request body must be a JSON object like {"hidden": true}', body)
    if "hidden" not in body:
        raise invalid("missing", ("body", "hidden"), "Field required: hidden (true or false)")
    hidden = body["hidden"]
    if isinstance(hidden, str) and hidden.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        hidden = hidden.strip().lower() in ("true", "1", "yes", "on")
    elif isinstance(hidden, int) and not isinstance(hidden, bool) and hidden in (0, 1):
        hidden = bool(hidden)
    if not isinstance(hidden, bool):
        raise invalid("bool_type", ("body", "hidden"), "hidden must be true or false", body["hidden"])
    if not subjects.is_token(worker_id) or len(worker_id) > WORKER_ID_MAX:
        raise ResourceNotFound("worker not found")
    gw.require_nats()
    deadline = trio.current_time() + PATCH_RETRY_SECONDS
    for attempt in itertools.count():
        if attempt and trio.current_time() > deadline:
            break
        if attempt:
            # Lost the race to a heartbeat: back off a little (jittered) so a busy writer
            # cannot starve the toggle.
            await trio.sleep(random.uniform(0, min(0.05, 0.002 * attempt)))
        entry = await gw.nats.kv_get(subjects.WORKERS_BUCKET, worker_id)
        if entry is None or not entry.value:
            raise ResourceNotFound("worker not found")
        try:
            record = json.loads(entry.value)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            record = {"worker_id": worker_id}
        record = normalize_worker(record, key=worker_id)
        now = gw.clock()
        record["hidden"] = hidden
        record["updated_at"] = now
        value = dumps(record)
        try:
            revision = await gw.nats.kv_update(subjects.WORKERS_BUCKET, worker_id, value, last=entry.revision)
        except ConcurrencyConflict:
            continue  # a heartbeat landed in between: re-read and apply the toggle again
        gw.workers.apply(KVEntry(key=worker_id, value=value, revision=revision))  # read-your-writes
        await _record_toggle(gw, worker_id, hidden, now)
        return json_response({"worker_id": worker_id, "hidden": hidden, "updated_at": now})
    raise InfraError(f"worker {worker_id}: gave up after repeated concurrent updates")


async def _record_toggle(gw: Gateway, worker_id: str, hidden: bool, now: float) -> None:
    """Who hid or showed the worker, in the audit history (``pyoco.evt.audit.worker``).

    Raises:
        OutcomeUnknown: the toggle is made but its entry was not stored (PATCH again: the same
            toggle is harmless and records it).
    """
    who = caller()
    doc = {
        "type": "worker.hidden" if hidden else "worker.unhidden",
        "worker_id": worker_id,
        "hidden": hidden,
        "actor": f"api_key:{who.key_id}" if who is not None else "anonymous",
        "tenant_id": who.tenant_id if who is not None else None,
        "api_key_id": who.key_id if who is not None else None,
        "gateway": gw.producer.id,
        "at": now,
    }
    try:
        await append_audit(gw.nats, subjects.WORKER_AUDIT_SUBJECT, doc)
    except InfraError as exc:
        raise OutcomeUnknown(f"worker {worker_id} is {'hidden' if hidden else 'shown'} but its audit entry was not stored "
                             f"({exc.message}): PATCH again to record it") from exc
