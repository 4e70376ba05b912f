"""Bulk operations (issue 18): ``POST /runs/batch`` (up to :data:`BATCH_MAX` submits in one request)
and ``POST /runs/cancel`` (many runs by id, or every active run matching a filter).

A batch is validated item by item exactly as ``POST /runs`` / ``POST /runs/yaml`` validate one
submit; a bad item is refused with its reason and never stored, the good ones are appended
together: every item's ``run.submitted`` goes out in one crossing to the NATS thread, pipelined
(``NatsClient.append_many``), and each stored event hands its first attempt to the workers from
the append's hook, as a single submit does.  An item whose run id already has events (an
``idempotency_key`` used before, or twice in the batch) takes the single submit's path, which
answers it as a replay (``duplicate``) or refuses a key reused for another request.

A bulk cancel goes through the normal cancel decision per run (``run.cancel_requested`` or
``run.cancelled``), so a run that completes meanwhile ends exactly once.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from typing import Any, Final

import attrs
import trio
from quart import Blueprint, Response

from ..core import decide
from ..core.errors import ConcurrencyConflict, OutcomeUnknown, PayloadTooLarge, PyocoError, RunNotFound, ValidationError
from ..core.events import Event, JSONObject, JSONValue, RunSubmitted
from ..core.fold import apply
from ..core.model import TERMINAL_STATUSES, RunSnapshot, RunStatus
from .answer import json_response
from .auth import Principal
from .context import Gateway, caller, current_gateway, request_body, tenant_filter
from .params import QUERY_STR_MAX, RequestInvalid, check_flow_name, check_tag, check_text, field_error, idempotency_key, invalid, json_loads
from .snapshot import valid_run_id
from .submit import (
    INLINE_PARSE_BYTES,
    ensure_work_queue,
    first_dispatch,
    parse_submit_body,
    prepare_submit,
    submit_event,
    yaml_document,
    yaml_event,
)

blueprint = Blueprint("bulk", __name__)

BATCH_MAX: Final = 1000  # items in one POST /runs/batch, run ids in one POST /runs/cancel
CANCEL_FILTER_KEYS: Final = ("status", "flow_name", "tag")
CONCURRENCY: Final = 32  # single-path submits or cancel decisions in flight at once
_ITEM_KEYS: Final = frozenset({"flow_name", "params", "tag", "tags", "idempotency_key", "workflow_yaml"})


def fresh_run_ids(n: int) -> list[str]:
    """``n`` new run ids in :func:`~pyoco_es.service.new_run_id`'s form (uuid4) from one
    ``os.urandom`` call: a system call per id was a tenth of a batch's time in a sandbox."""
    raw = os.urandom(16 * n)
    return [str(uuid.UUID(bytes=raw[i : i + 16], version=4)) for i in range(0, 16 * n, 16)]


def fresh_event_ids(n: int) -> list[str]:
    """``n`` UUIDv7 event ids (now's milliseconds, then a counter in ``rand_a`` so they sort in
    batch order, then random bits) from one ``os.urandom`` call, as :func:`fresh_run_ids`."""
    if n > 4096:
        raise ValueError("at most 4096 ids share a millisecond's counter")
    ms = time.time_ns() // 1_000_000
    raw = os.urandom(8 * n)
    out = []
    for i in range(n):
        rand_b = int.from_bytes(raw[8 * i : 8 * i + 8], "big") & ((1 << 62) - 1)
        out.append(str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (i << 64) | (0b10 << 62) | rand_b)))
    return out


class BatchTooLarge(PayloadTooLarge):
    """More than :data:`BATCH_MAX` items: the whole request is refused (nothing stored)."""


def _items_of(body: object, field: str) -> list[object]:
    if not isinstance(body, dict):
        raise invalid("model_attributes_type", ("body",), f'request body must be a JSON object {{"{field}": [...]}}', body)
    items = body.get(field)
    if not isinstance(items, list):
        raise invalid("list_type", ("body", field), f"{field} must be a list", items)
    if len(items) > BATCH_MAX:
        raise BatchTooLarge(f"too many {field}: {len(items)}, the limit is {BATCH_MAX} per request; send them in chunks")
    return items


def _reason(exc: PyocoError) -> str:
    detail = getattr(exc, "detail", None)
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail if isinstance(d, dict))
    return exc.message if hasattr(exc, "message") else str(exc)


Submitted = RunSubmitted | dict[str, Any]  # an event, or a named flow item's fields (built once, in prepare_submit)
YamlMemo = dict[tuple[str, str, str], tuple[RunSubmitted, JSONObject]]


async def _parse_item(gw: Gateway, raw: object, memo: YamlMemo) -> tuple[Submitted, JSONObject, str | None]:
    """One batch item → (event or its fields, fingerprint, Idempotency-Key), validated as the single routes do.
    ``memo`` keeps the batch's parsed YAML items: the same document, name and tag is parsed once.

    Raises:
        RequestInvalid, PayloadTooLarge: the item is refused (the message says why).
    """
    if not isinstance(raw, dict):
        raise invalid("model_attributes_type", ("body",), "each item must be a JSON object", raw)
    key_raw = raw.get("idempotency_key")
    if key_raw is not None and not isinstance(key_raw, str):
        raise invalid("string_type", ("body", "idempotency_key"), "idempotency_key must be a string", key_raw)
    key = idempotency_key(key_raw)
    if "workflow_yaml" not in raw:
        body = {k: v for k, v in raw.items() if k != "idempotency_key"}
        flow_name, params, tag, tags = parse_submit_body(body, default_tag=gw.settings.default_tag, max_params_bytes=gw.settings.max_params_bytes)
        event = {"flow_name": flow_name, "params": params, "tag": tag, "tags": tuple(tags), "submitted_at": gw.clock(), "max_attempts": gw.settings.max_attempts}
        fingerprint: JSONObject = {"kind": "flow", "flow_name": flow_name, "params": params, "tag": tag, "tags": list[JSONValue](tags)}
        return event, fingerprint, key
    text, name, tag = raw.get("workflow_yaml"), raw.get("flow_name"), raw.get("tag")
    if not isinstance(text, str) or not text.strip():
        raise invalid("string_type", ("body", "workflow_yaml"), "workflow_yaml must be the flow.yaml text", text)
    for extra in ("params", "tags"):
        if extra in raw:
            raise invalid("extra_forbidden", ("body", extra), f"{extra} is not taken with workflow_yaml (as POST /runs/yaml): put defaults in flow.defaults")
    if not isinstance(name, str) or not name.strip():
        raise invalid("missing", ("body", "flow_name"), "Field required: flow_name (the flow of workflow_yaml)", name)
    check_flow_name(name.strip(), ("body", "flow_name"))
    routing = gw.settings.default_tag if tag is None or (isinstance(tag, str) and not tag.strip()) else check_tag(tag, ("body", "tag"))
    known = memo.get((text, name, routing))
    if known is not None:
        return known[0], known[1], key
    data = text.encode("utf-8", errors="surrogatepass")
    if len(data) <= INLINE_PARSE_BYTES:
        doc = yaml_document(gw, data)
    else:
        doc = await trio.to_thread.run_sync(functools.partial(yaml_document, gw, data), limiter=gw.parse_limiter)
    event, fingerprint = memo[(text, name, routing)] = yaml_event(gw, name.strip(), routing, doc)
    return event, fingerprint, key


async def submit_batch(gw: Gateway, items: list[object], principal: Principal | None) -> list[JSONObject]:
    """Validate every item, append the good ones together, and answer one result per item, in order."""
    results: list[JSONObject] = [{"index": i, "status": "refused"} for i in range(len(items))]
    first: list[tuple[int, str, RunSubmitted, tuple[Submitted, JSONObject, str | None]]] = []  # appended together
    again: list[tuple[int, Submitted, JSONObject, str | None]] = []  # a run id already in this batch
    taken: set[str] = set()
    fresh = fresh_run_ids(len(items))
    memo: YamlMemo = {}
    for i, raw in enumerate(items):
        try:
            event, fingerprint, key = await _parse_item(gw, raw, memo)
            run_id, prepared = prepare_submit(gw, event, fingerprint, key, principal, fresh_id=fresh[i], check_size=False)
        except (ValidationError, UnicodeError) as exc:
            results[i]["error"] = _reason(exc) if isinstance(exc, PyocoError) else f"not valid text: {exc}"
            continue
        if run_id in taken:
            again.append((i, event, fingerprint, key))
            continue
        taken.add(run_id)
        first.append((i, run_id, prepared, (event, fingerprint, key)))
    if first:
        await gw.await_nats()
        for tag in sorted({ev.tag for _, _, ev, _ in first}):
            await ensure_work_queue(gw, tag)  # before the tag's first item (a pyoco-server worker cannot bind it)
        now = gw.clock()
        event_id = iter(fresh_event_ids(len(first))).__next__
        batches = [
            (decide.stamp(None, [ev], run_id=run_id, producer=gw.producer, now=now, new_id=event_id)[0], first_dispatch(gw, ev, run_id))
            for _, run_id, ev, _ in first
        ]
        stored = await gw.nats.append_first_many(batches)
        for (i, run_id, _, request), (env, _), res in zip(first, batches, stored, strict=True):
            if isinstance(res, ConcurrencyConflict):  # the run exists: a replay, or a reused key
                again.append((i, *request))
            elif isinstance(res, PyocoError):
                results[i]["error"] = _reason(res)
                if isinstance(res, OutcomeUnknown):
                    results[i]["run_id"] = run_id  # it may be stored: look it up, or resend the key
            else:
                snap = apply(None, attrs.evolve(env, stream_seq=res[-1]))
                gw.index.note(snap.to_json())
                results[i] = {"index": i, "status": "accepted", "run_id": run_id}
    # Their runs exist already, so their order does not change their outcome (a retried batch of
    # keyed items is all replays): in parallel, bounded.
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def alone(i: int, event: Submitted, fingerprint: JSONObject, key: str | None) -> None:
        async with limiter:
            results[i] = await _submit_alone(gw, i, event, fingerprint, key, principal)

    async with trio.open_nursery() as nursery:
        for item in again:
            nursery.start_soon(alone, *item)
    return results


async def _submit_alone(
    gw: Gateway, i: int, event: Submitted, fingerprint: JSONObject, key: str | None, principal: Principal | None
) -> JSONObject:
    """A batch item on the single submit's path (its run id already has events)."""
    try:
        doc, headers = await submit_event(gw, event, fingerprint, key, principal)
    except PyocoError as exc:
        out: JSONObject = {"index": i, "status": "refused", "error": _reason(exc)}
        if isinstance(exc, OutcomeUnknown) and exc.run_id:
            out["run_id"] = exc.run_id
        return out
    status = "duplicate" if headers.get("Idempotent-Replayed") else "accepted"
    return {"index": i, "status": status, "run_id": doc.get("run_id")}


@blueprint.post("/runs/batch")
async def submit_runs_batch() -> Response:
    gw = current_gateway()
    await gw.await_nats()
    items = _items_of(json_loads(await request_body()), "items")
    results = await submit_batch(gw, items, caller())
    counts = {s: sum(1 for r in results if r["status"] == s) for s in ("accepted", "duplicate", "refused")}
    return json_response({"results": results, **counts})


# -- bulk cancel ------------------------------------------------------------------------------------


def _cancel_targets(body: object) -> tuple[list[str] | None, dict[str, str]]:
    """``{"run_ids": [...]}`` or ``{"filter": {...}}`` (at least one of status, flow_name, tag).

    Raises:
        RequestInvalid: neither or both, a bad id list or an empty or unknown filter.
    """
    if not isinstance(body, dict):
        raise invalid("model_attributes_type", ("body",), 'request body must be {"run_ids": [...]} or {"filter": {...}}', body)
    if ("run_ids" in body) == ("filter" in body):
        raise invalid("missing", ("body",), 'give exactly one of run_ids (a list of run ids) or filter ({"status", "flow_name", "tag"})')
    if "run_ids" in body:
        ids = _items_of(body, "run_ids")
        for n, run_id in enumerate(ids):
            if not isinstance(run_id, str):
                raise invalid("string_type", ("body", "run_ids", n), "each run id must be a string", run_id)
        return [str(r) for r in ids], {}
    flt = body.get("filter")
    if not isinstance(flt, dict):
        raise invalid("dict_type", ("body", "filter"), "filter must be an object", flt)
    unknown = sorted(str(k) for k in flt if k not in CANCEL_FILTER_KEYS)
    if unknown:
        raise invalid("extra_forbidden", ("body", "filter", unknown[0]), f"unknown filter field {unknown[0]!r}: use {', '.join(CANCEL_FILTER_KEYS)}")
    out: dict[str, str] = {}
    for k in CANCEL_FILTER_KEYS:
        v = flt.get(k)
        if v is not None and v != "":
            if not isinstance(v, str):
                raise invalid("string_type", ("body", "filter", k), f"filter.{k} must be a string", v)
            out[k] = check_text(v, ("body", "filter", k), max_len=QUERY_STR_MAX)
    if not out:
        raise RequestInvalid([field_error("missing", ("body", "filter"), f"filter must name at least one of {', '.join(CANCEL_FILTER_KEYS)} (a bulk cancel of every run is not offered)")])
    if "status" in out:
        out["status"] = out["status"].upper()
    return None, out


async def _filtered(gw: Gateway, filters: dict[str, str]) -> tuple[list[str], bool]:
    """Active (not terminal, not already CANCELLING) runs matching ``filters``: up to BATCH_MAX, and
    whether more remain.  Read through the run index's list (after this gateway's own writes)."""
    await gw.wait_index_ready()
    out: list[str] = []
    before = None
    done = {s.value for s in TERMINAL_STATUSES} | {RunStatus.CANCELLING.value}
    while True:
        page = await gw.index.list_page(limit=200, filters={**filters, **tenant_filter()}, before=before)
        for item in page.items:
            if item.get("status") in done:
                continue
            if len(out) == BATCH_MAX:
                return out, True
            out.append(str(item["run_id"]))
        if page.next_cursor is None or not page.keys:
            return out, False
        before = page.keys[-1]


async def cancel_runs(gw: Gateway, run_ids: list[str], who: Principal | None) -> dict[str, list[str]]:
    """The normal cancel decision for each run (bounded concurrency); which runs got a cancel,
    which were already ending or ended, which do not exist (for this caller)."""
    report: dict[str, list[str]] = {"cancel_requested": [], "already_cancelling": [], "already_terminal": [], "not_found": []}
    outcome: dict[str, str] = {}
    limiter = trio.CapacityLimiter(CONCURRENCY)
    by = None if who is None else f"api_key:{who.key_id}"

    async def one(run_id: str) -> None:
        if not valid_run_id(run_id):
            outcome[run_id] = "not_found"
            return
        seen: list[RunStatus] = []

        def decide_cancel(snap: RunSnapshot | None) -> list[Event]:
            if who is not None and (snap is None or snap.tenant_id != who.tenant_id):
                raise RunNotFound(run_id)
            if snap is not None:
                seen.append(snap.status)
            return decide.request_cancel(snap, run_id=run_id, now=gw.clock(), by=by)

        async with limiter:
            try:
                result = await gw.store.execute(run_id, decide_cancel, producer=gw.producer)
            except RunNotFound:
                outcome[run_id] = "not_found"
                return
        if result.appended:
            outcome[run_id] = "cancel_requested"
            if result.snapshot is not None:
                gw.index.note(result.snapshot.to_json())
        elif seen and seen[-1] is RunStatus.CANCELLING:
            outcome[run_id] = "already_cancelling"
        else:
            outcome[run_id] = "already_terminal"

    unique = list(dict.fromkeys(run_ids))
    async with trio.open_nursery() as nursery:
        for run_id in unique:
            nursery.start_soon(one, run_id)
    for run_id in unique:
        report[outcome[run_id]].append(run_id)
    return report


@blueprint.post("/runs/cancel")
async def cancel_many() -> Response:
    gw = current_gateway()
    await gw.await_nats()
    run_ids, filters = _cancel_targets(json_loads(await request_body()))
    more = False
    if run_ids is None:
        run_ids, more = await _filtered(gw, filters)
    report = await cancel_runs(gw, run_ids, caller())
    return json_response({**report, "more": more})
