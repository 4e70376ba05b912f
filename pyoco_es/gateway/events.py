"""The events resource: a run's audit history (``GET /runs/{id}/events``), read from its stream."""

from __future__ import annotations

from quart import Blueprint, Response, request

from ..core.codec import envelope_to_json
from ..core.errors import RunNotFound
from .answer import json_response
from .context import check_tenant, current_gateway
from .params import query_int
from .snapshot import valid_run_id

blueprint = Blueprint("events", __name__)


@blueprint.get("/runs/<run_id>/events")
async def get_events(run_id: str) -> Response:
    gw = current_gateway()
    if not valid_run_id(run_id):
        raise RunNotFound(run_id)
    after_seq = query_int(request.args, "after_seq", default=0, lo=0, hi=2**62)
    gw.require_nats()
    events = await gw.store.history(run_id)
    if not events:
        raise RunNotFound(run_id)
    check_tenant(envelope_to_json(events[0])["data"], run_id)  # run.submitted names the tenant
    items = []
    for env in events:
        if env.seq <= after_seq:
            continue
        doc = envelope_to_json(env)
        doc["stream_seq"] = env.stream_seq
        items.append(doc)
    return json_response({"run_id": run_id, "last_seq": events[-1].seq, "events": items})
