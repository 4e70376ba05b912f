"""The dead letters resource (issue 15): list, show, re-submit as a new run, drop.

A dead letter is a message in ``PYOCO_DLQ`` published by a worker (``invalid_job``,
``flow_not_found``, ``execution_error``; contract §2.10); its id is its stream sequence.  Its
payload is untrusted bytes: it is shown as JSON data or as text (invalid UTF-8 replaced), never
interpreted.  A re-submission is a *new* run made through the normal submit path from the dead
run's own ``run.submitted`` (its flow, params, tags, workflow text), whose envelope carries
``correlation_id = "dlq:<id>"``; re-submissions and drops are appended to the event stream on
``pyoco.evt.audit.dlq``.  Those audit entries are also the dead letter's record of being
re-submitted: ``GET /dlq`` and ``GET /dlq/{id}`` show each re-submission (the new run, when, the
key that did it) as ``resubmitted``, read from the audit, never stored twice.

Tenants (``PYOCO_HTTP_AUTH_MODE=api_key``): a dead letter belongs to the tenant its body names,
else to the tenant of the run it names; a key sees only its tenant's dead letters (404
otherwise), so one that names no tenant (an unreadable work item, a run made with auth off) is
seen by no key, as such runs are not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Final

import attrs
import trio
from quart import Blueprint, Response, current_app, request

from ..core.errors import DomainError
from ..core.events import JSONObject, JSONValue, RunSubmitted
from ..nats import deadletter, subjects
from ..nats.client import NatsClient
from .answer import json_response
from .context import Gateway, caller, current_gateway, request_idempotency_key
from .params import ResourceNotFound, query_int
from .submit import submit_event

blueprint = Blueprint("dlq", __name__)

LIST_TEXT_MAX: Final = 500  # characters of the error text in a list item
SHOW_BYTES_MAX: Final = 64 * 1024  # of an unreadable payload shown as text
SCAN_WINDOWS: Final = 40  # windows walked per list request (a tenant's sparse page ends early, with a cursor)
_TEXT_FIELDS: Final = ("reason", "error", "run_id", "flow_name", "tag", "tenant_id", "worker_id", "subject")
SEQ_MAX: Final = 2**63 - 1
MARKS_KEY: Final = "pyoco.dlq_marks"  # this app's ResubmissionMarks, in app.extensions


class NothingToResubmit(DomainError):
    """The dead letter names no run whose request could be submitted again."""

    http_status: ClassVar[int] = 409


def _body(data: bytes) -> JSONObject | None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def entry_view(gw: Gateway, letter: deadletter.DeadLetter, *, full: bool = False) -> JSONObject:
    """What the API shows of a dead letter: its reason, run, flow, when and size (``full``: the body too)."""
    body = _body(letter.data)
    view: JSONObject = {"id": letter.seq, "stored_at": letter.stored_at, "size": len(letter.data), "dlq_subject": letter.subject}
    if body is None:
        view["reason"] = "unreadable"
        view["error"] = "the dead letter is not a JSON object"
    else:
        for k in _TEXT_FIELDS:
            v = body.get(k)
            if isinstance(v, str):
                view[k] = v if full or k != "error" else v[:LIST_TEXT_MAX]
        for k in ("timestamp", "attempt", "num_delivered"):
            v = body.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                view[k] = v
        if "run_id" not in view and isinstance(body.get("payload"), str):  # invalid_job: the item it could not run
            inner = _body(str(body["payload"]).encode("utf-8", errors="replace"))
            if inner is not None:
                if isinstance(inner.get("run_id"), str) and subjects.is_token(str(inner["run_id"])):
                    view["run_id"] = inner["run_id"]
                if isinstance(inner.get("flow_name"), str):
                    view.setdefault("flow_name", inner["flow_name"])
    if "tenant_id" not in view and isinstance(view.get("run_id"), str):
        run = gw.index.get(str(view["run_id"]))
        if run is not None and isinstance(run.get("tenant_id"), str):
            view["tenant_id"] = run["tenant_id"]
    if full:
        if body is not None:
            view["body"] = body
        else:
            view["raw"] = letter.data[:SHOW_BYTES_MAX].decode("utf-8", errors="replace")
            view["raw_truncated"] = len(letter.data) > SHOW_BYTES_MAX
    return view


Resubmissions = dict[tuple[int, str], list[JSONValue]]


def resubmissions(audit: Iterable[Mapping[str, Any]], into: Resubmissions | None = None) -> Resubmissions:
    """The re-submissions ``pyoco.evt.audit.dlq`` records, oldest first, keyed by (dead letter id,
    the run it names): the run too, so a dead letter whose id a recreated stream reused is not
    credited with an older one's.  Each: ``{"run_id": new run, "at": epoch s, "key_id": the API
    key's id, or None with auth off}``; entries missing a field are skipped.  ``into``: marks
    read before, to add the newer entries to."""
    out: Resubmissions = {} if into is None else into
    for doc in audit:
        dlq_id, run_id, new_run = doc.get("dlq_id"), doc.get("run_id"), doc.get("new_run_id")
        if doc.get("type") != "dlq.resubmitted" or type(dlq_id) is not int or not isinstance(run_id, str) or not isinstance(new_run, str):
            continue
        at, actor = doc.get("at"), doc.get("actor")
        key_id = actor.removeprefix("api_key:") if isinstance(actor, str) and actor.startswith("api_key:") else None
        out.setdefault((dlq_id, run_id), []).append(
            {"run_id": new_run, "at": at if isinstance(at, (int, float)) and not isinstance(at, bool) else None, "key_id": key_id})
    return out


def _with_resubmissions(view: JSONObject, marks: Resubmissions) -> JSONObject:
    dlq_id, run_id = view.get("id"), view.get("run_id")
    found = marks.get((dlq_id, run_id), []) if isinstance(dlq_id, int) and isinstance(run_id, str) else []
    view["resubmitted"] = list(found)
    return view


@attrs.define(eq=False)
class ResubmissionMarks:
    """The re-submissions this gateway has read from the audit: each read first catches up on
    the entries appended since (one round trip when there are none), so a list request does not
    re-read the whole audit history."""

    nats: NatsClient
    _reading: trio.Lock = attrs.Factory(trio.Lock)
    _after: int = 0
    _marks: Resubmissions = attrs.Factory(dict)

    async def current(self) -> Resubmissions:
        async with self._reading:  # two readers must not both add the same entries
            entries = await deadletter.read_dlq_audit_after(self.nats, self._after)
            if entries:
                resubmissions((doc for _, doc in entries), into=self._marks)
                self._after = entries[-1][0]
        return self._marks


async def _marks(gw: Gateway) -> Resubmissions:
    found = current_app.extensions.get(MARKS_KEY)
    if found is None:
        found = current_app.extensions[MARKS_KEY] = ResubmissionMarks(gw.nats)
    return await found.current()  # type: ignore[no-any-return]


def _visible(view: JSONObject) -> bool:
    who = caller()
    return who is None or view.get("tenant_id") == who.tenant_id


async def _one(gw: Gateway, dlq_id: int, *, full: bool = False) -> JSONObject:
    """The dead letter's view, for this caller.

    Raises:
        ResourceNotFound: no such dead letter, or another tenant's.
    """
    letter = await deadletter.get_dead_letter(gw.nats, dlq_id) if 0 < dlq_id <= SEQ_MAX else None
    view = entry_view(gw, letter, full=full) if letter is not None else None
    if view is None or not _visible(view):
        raise ResourceNotFound(f"dead letter {dlq_id} not found")
    return view


def _actor() -> str:
    who = caller()
    return "http" if who is None else f"api_key:{who.key_id}"


@blueprint.get("/dlq")
async def list_dead_letters() -> Response:
    gw = current_gateway()
    gw.require_nats()
    limit = query_int(request.args, "limit", default=50, lo=1, hi=200)
    first, last = await deadletter.dlq_bounds(gw.nats)
    before = min(query_int(request.args, "before", default=last + 1, lo=1, hi=SEQ_MAX), last + 1)
    first = max(first, 1)
    items: list[JSONValue] = []
    cursor: int | None = None
    for _ in range(SCAN_WINDOWS):
        if before <= first or cursor is not None:
            break
        for letter in await deadletter.dead_letters_before(gw.nats, before, first=first):
            view = entry_view(gw, letter)
            if _visible(view):
                items.append(view)
                if len(items) == limit:
                    cursor = letter.seq
                    break
        if cursor is None:
            before = max(first, before - deadletter.WINDOW)
    if cursor is None and before > first:
        cursor = before  # the walk's budget ended: the next page goes on from here
    info = await gw.nats.stream_info(subjects.DLQ_STREAM)
    if items:
        marks = await _marks(gw)
        items = [_with_resubmissions(view, marks) for view in items if isinstance(view, dict)]
    return json_response({"items": items, "next_cursor": cursor if cursor is None or cursor > first else None, "total": info["messages"]})


@blueprint.get("/dlq/<int:dlq_id>")
async def show_dead_letter(dlq_id: int) -> Response:
    gw = current_gateway()
    gw.require_nats()
    view = await _one(gw, dlq_id, full=True)
    return json_response(_with_resubmissions(view, await _marks(gw)))


@blueprint.post("/dlq/<int:dlq_id>/resubmit")
async def resubmit_dead_letter(dlq_id: int) -> Response:
    gw = current_gateway()
    await gw.await_nats()
    view = await _one(gw, dlq_id)
    run_id = view.get("run_id")
    if not isinstance(run_id, str) or not subjects.is_token(run_id):
        raise NothingToResubmit(f"dead letter {dlq_id} ({view.get('reason')}) names no run: there is no request to submit again; drop it instead")
    history = await gw.store.history(run_id)
    original = history[0].event if history else None
    if not isinstance(original, RunSubmitted):
        raise NothingToResubmit(f"dead letter {dlq_id} names run {run_id}, which has no run.submitted to submit again")
    event = RunSubmitted(
        flow_name=original.flow_name, params=original.params, tag=original.tag, tags=original.tags, submitted_at=gw.clock(),
        max_attempts=original.max_attempts, tenant_id=original.tenant_id, api_key_id=original.api_key_id,
        workflow_yaml=original.workflow_yaml, workflow_yaml_sha256=original.workflow_yaml_sha256, workflow_yaml_bytes=original.workflow_yaml_bytes,
    )
    fingerprint: JSONObject = {"kind": "dlq_resubmit", "dlq_id": dlq_id, "run_id": run_id}
    doc, headers = await submit_event(gw, event, fingerprint, request_idempotency_key(), caller(), correlation_id=f"dlq:{dlq_id}")
    if not headers.get("Idempotent-Replayed"):
        await deadletter.record_dlq_audit(gw.nats, {
            "type": "dlq.resubmitted", "dlq_id": dlq_id, "reason": view.get("reason"), "run_id": run_id,
            "new_run_id": doc.get("run_id"), "tenant_id": view.get("tenant_id"), "actor": _actor(), "at": gw.clock(),
        })
    return json_response({**doc, "dlq_id": dlq_id, "resubmitted_from": run_id}, headers=headers)


@blueprint.delete("/dlq/<int:dlq_id>")
async def drop_dead_letter(dlq_id: int) -> Response:
    gw = current_gateway()
    await gw.await_nats()
    view = await _one(gw, dlq_id)
    if not await deadletter.drop_dead_letter(gw.nats, dlq_id):
        raise ResourceNotFound(f"dead letter {dlq_id} not found")
    await deadletter.record_dlq_audit(gw.nats, {
        "type": "dlq.dropped", "dlq_id": dlq_id, "reason": view.get("reason"), "run_id": view.get("run_id"),
        "tenant_id": view.get("tenant_id"), "actor": _actor(), "at": gw.clock(),
    })
    return json_response({"id": dlq_id, "dropped": True})
