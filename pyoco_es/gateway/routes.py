"""The HTTP routes (contract §1) on top of :class:`~pyoco_es.gateway.app.Gateway`.

Writes go through ``RunStore.execute`` (decide, then append fenced by the run's last stream
seq) and answer only after the PubAck.  Reads come from the KV snapshot, the in-memory run
index, or, right after a write the projector has not folded yet, from the run's events.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import locale
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Final

import attrs
import trio
from quart import Response, request, send_from_directory
from quart_trio import QuartTrio
from werkzeug.exceptions import NotFound

from ..core.work import WorkItem
from ..core import decide
from ..core.codec import dumps, envelope_to_json, event_data
from ..core.errors import (
    ConcurrencyConflict,
    InfraError,
    OutcomeUnknown,
    PayloadTooLarge,
    PyocoError,
    RunAlreadyExists,
    RunNotFound,
    ValidationError,
)
from ..core.events import JSONObject, JSONValue, RunSubmitted
from ..core.model import TERMINAL_STATUSES
from ..flows.yaml import WorkflowDoc, parse_workflow_yaml
from ..nats import subjects
from ..nats.client import KVEntry
from ..service import new_run_id
from . import sse
from .app import MULTIPART_SLACK, Gateway, json_response
from .multipart import parse_form
from .index import decode_cursor
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import MetricValues, local_day_bounds, render
from .openapi import app_routes, openapi_document
from .params import (
    IDEMPOTENCY_KEY_MAX,
    RUN_ID_MAX,
    WORKER_ID_MAX,
    RequestInvalid,
    TAG_MAX,
    TAGS_MAX_ITEMS,
    check_flow_name,
    check_params,
    check_tag,
    field_error,
    invalid,
    json_loads,
    query_bool,
    query_float,
    query_int,
    query_str,
)
from .workers import ALIVE_STATES, WORKER_STATES, liveness, normalize_worker, worker_view

RECORD_INCLUDES: Final = frozenset({"records", "task_records", "full", "all"})
FULL_INCLUDES: Final = frozenset({"full", "all"})
TERMINAL: Final = frozenset(s.value for s in TERMINAL_STATUSES)
IDEMPOTENCY_NAMESPACE: Final = uuid.UUID("5b0f8a51-3f0c-4c55-9d55-70796f636f65")
LANG_PLACEHOLDER: Final = "__PYOCO_DASHBOARD_LANG_VALUE__"

INLINE_PARSE_BYTES = 16 * 1024  # smaller YAML documents are parsed on the event loop
PATCH_RETRY_SECONDS = 5.0  # how long PATCH /workers/{id} keeps retrying its compare-and-swap


# -- pure helpers -------------------------------------------------------------------------------


def run_id_for_key(tenant_id: str | None, key: str) -> str:
    """The run id an Idempotency-Key maps to (per tenant): a retry appends to the same run, whose
    create-once ``run.submitted`` makes it a no-op forever, not just within the dedupe window.

    Canonical UUID form like every new run id; :func:`legacy_run_id_for_key` is the 32-hex form
    earlier versions derived, still honoured for keys first used before the change."""
    return str(_key_uuid(tenant_id, key))


def legacy_run_id_for_key(tenant_id: str | None, key: str) -> str:
    return _key_uuid(tenant_id, key).hex


def _key_uuid(tenant_id: str | None, key: str) -> uuid.UUID:
    return uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{tenant_id or ''}\x00{key}")


def request_fingerprint(doc: JSONObject) -> str:
    """sha256 of the normalised request (canonical JSON), to tell a retry from a reused key."""
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def valid_run_id(run_id: str) -> bool:
    return len(run_id) <= RUN_ID_MAX and subjects.is_token(run_id)


def filter_snapshot(doc: JSONObject, includes: set[str]) -> JSONObject:
    """Drop ``task_records`` unless asked for (contract §1.5)."""
    if includes & RECORD_INCLUDES:
        return doc
    out = dict(doc)
    out.pop("task_records", None)
    out.pop("task_records_truncated", None)
    return out


def resolve_dashboard_lang(setting: str, env: dict[str, str] | None = None) -> str:
    """``ja`` or ``en`` from PYOCO_DASHBOARD_LANG, else from the locale (contract §6.2)."""
    value = (setting or "auto").strip().lower()
    if value.startswith("ja"):
        return "ja"
    if value.startswith("en"):
        return "en"
    env = dict(os.environ) if env is None else env
    candidates = [env.get(name, "") for name in ("LC_ALL", "LANGUAGE", "LC_MESSAGES", "LANG")]
    try:
        candidates.append(locale.getlocale()[0] or "")
    except ValueError:  # pragma: no cover - broken locale settings
        pass
    for cand in candidates:
        c = cand.strip().lower()
        if c.startswith("ja"):
            return "ja"
        if c.startswith("en"):
            return "en"
    return "en"


def _includes() -> set[str]:
    out: set[str] = set()
    for value in request.args.getlist("include"):
        out.update(v.strip().lower() for v in value.split(",") if v.strip())
    return out


def _idempotency_key() -> str | None:
    return idempotency_key(request.headers.get("Idempotency-Key"))


def idempotency_key(key: str | None) -> str | None:
    """The ``Idempotency-Key`` header's value, validated (None when absent).

    Raises:
        RequestInvalid: blank, too long or not printable.
    """
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not (key.isascii() and key.isprintable()):
        raise invalid(
            "idempotency_key",
            ("header", "Idempotency-Key"),
            f"Idempotency-Key must be 1..{IDEMPOTENCY_KEY_MAX} printable ASCII characters (e.g. a UUID)",
            key[:64],
        )
    return key


def _last_event_id() -> int | None:
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.args.get("last_event_id")
    try:
        return sse.parse_last_event_id(raw)
    except ValueError as exc:
        raise invalid("int_parsing", ("header", "Last-Event-ID"), str(exc), raw) from None


def parse_submit_body(body: object, *, default_tag: str, max_params_bytes: int) -> tuple[str, JSONObject, str, list[str]]:
    """Validate ``POST /runs`` (contract §1.2): flow_name, params, tag, tags.

    Raises:
        RequestInvalid: with one FastAPI-style item per problem.
        PayloadTooLarge: params over ``max_params_bytes``.
    """
    if not isinstance(body, dict):
        raise invalid("model_attributes_type", ("body",), "request body must be a JSON object", body)
    errors = []
    flow_name = body.get("flow_name")
    if "flow_name" not in body:
        errors.append(field_error("missing", ("body", "flow_name"), "Field required: flow_name (the flow to run)"))
    else:
        _collect(errors, check_flow_name, flow_name, ("body", "flow_name"))
    params = body.get("params", {})
    if params is None or not isinstance(params, dict):
        errors.append(field_error("dict_type", ("body", "params"), "params must be a JSON object", params))
    tag = body.get("tag")
    if tag is not None:
        _collect(errors, check_tag, tag, ("body", "tag"))
    tags = body.get("tags", [])
    if tags is None:
        tags = []
    if not isinstance(tags, list):
        errors.append(field_error("list_type", ("body", "tags"), "tags must be a list of strings", tags))
    elif len(tags) > TAGS_MAX_ITEMS:
        errors.append(field_error("too_long", ("body", "tags"), f"at most {TAGS_MAX_ITEMS} tags", len(tags)))
    else:
        for i, t in enumerate(tags):
            _collect(errors, functools.partial(check_tag, what="each tag"), t, ("body", "tags", i))
    if errors:
        raise RequestInvalid(errors)
    check_params(params, ("body", "params"), max_bytes=max_params_bytes)
    routing = (tag or "").strip() or default_tag
    stored_tags = [str(t) for t in tags] if tags else [routing]
    return str(flow_name), params, routing, stored_tags


def _collect(errors: list[dict[str, JSONValue]], check: Any, value: object, loc: tuple[str | int, ...]) -> None:
    try:
        check(value, loc)
    except RequestInvalid as exc:
        errors.extend(exc.detail)  # type: ignore[arg-type]


async def _body() -> bytes:
    raw = await request.get_data(cache=False)
    return raw if isinstance(raw, bytes) else raw.encode("utf-8")


def check_yaml_length(gw: Gateway, length: int | None) -> None:
    """A declared upload size over the limit is refused before the body is read."""
    limit = gw.settings.workflow_yaml_max_bytes
    if length is not None and length > limit + MULTIPART_SLACK:
        raise PayloadTooLarge(f"workflow too large: the upload is {length} bytes, the limit is {limit} bytes (PYOCO_WORKFLOW_YAML_MAX_BYTES)")


def yaml_form(gw: Gateway, body: bytes, content_type: str | None) -> tuple[str, str, bytes]:
    """``POST /runs/yaml``'s form: (flow name, tag, the workflow file's bytes).

    Raises:
        RequestInvalid: not multipart, a missing or blank field, a bad tag.
        PayloadTooLarge: the file is over ``PYOCO_WORKFLOW_YAML_MAX_BYTES``.
    """
    try:
        parsed = parse_form(body, content_type)
    except ValidationError as exc:
        raise RequestInvalid(exc.message) from None
    form, files = parsed.fields, parsed.files
    errors = []
    upload = files.get("workflow")
    if upload is None:
        errors.append(field_error("missing", ("body", "workflow"), "Field required: workflow (the flow.yaml file, multipart)"))
    flow_name = form.get("flow_name")
    if flow_name is None:
        errors.append(field_error("missing", ("body", "flow_name"), "Field required: flow_name"))
    if errors:
        raise RequestInvalid(errors)
    raw_tag = (form.get("tag") or "").strip() or gw.settings.default_tag
    if not subjects.is_token(raw_tag) or len(raw_tag) > TAG_MAX:
        raise RequestInvalid(f"invalid tag: tag must match [A-Za-z0-9_-]+ (no dots, spaces or wildcards), at most {TAG_MAX} characters")
    assert upload is not None and flow_name is not None
    limit = gw.settings.workflow_yaml_max_bytes
    if len(upload.data) > limit:
        raise PayloadTooLarge(f"workflow too large: the limit is {limit} bytes (PYOCO_WORKFLOW_YAML_MAX_BYTES)")
    name = str(flow_name).strip()
    if not name:
        raise RequestInvalid("missing flow_name: flow_name must not be blank")
    check_flow_name(name, ("body", "flow_name"))
    return name, raw_tag, upload.data


def yaml_document(gw: Gateway, data: bytes) -> WorkflowDoc:
    """Parse and validate an uploaded flow.yaml (cached by hash).

    Raises:
        RequestInvalid: the document is not a valid, safe workflow (the message says why).
        PayloadTooLarge: over the size limit.
    """
    try:
        return parse_workflow_yaml(data, max_bytes=gw.settings.workflow_yaml_max_bytes)
    except PayloadTooLarge:
        raise
    except ValidationError as exc:
        raise RequestInvalid(f"invalid workflow yaml: {exc.message}") from None


def yaml_event(gw: Gateway, name: str, tag: str, doc: WorkflowDoc) -> tuple[RunSubmitted, JSONObject]:
    """The ``run.submitted`` of a YAML upload and its idempotency fingerprint.

    Raises:
        RequestInvalid: ``flow.defaults`` holds something params cannot (names the key path).
        PayloadTooLarge: the defaults are over PYOCO_MAX_PARAMS_BYTES.
    """
    check_params(doc.flow_defaults, ("body", "workflow", "flow", "defaults"), max_bytes=gw.settings.max_params_bytes)
    event = RunSubmitted(
        flow_name=name,
        params=dict(doc.flow_defaults),
        tag=tag,
        tags=(tag,),
        submitted_at=gw.clock(),
        max_attempts=gw.settings.max_attempts,
        workflow_yaml=doc.text,
        workflow_yaml_sha256=doc.sha256,
        workflow_yaml_bytes=doc.size,
    )
    return event, {"kind": "yaml", "flow_name": name, "tag": tag, "workflow_yaml_sha256": doc.sha256}


# -- the gateway's operations -------------------------------------------------------------------


async def submit(gw: Gateway, event: RunSubmitted, fingerprint: JSONObject) -> Response:
    """Append ``run.submitted`` and answer after the PubAck; Idempotency-Key retries are 200s."""
    doc, headers = await submit_event(gw, event, fingerprint, _idempotency_key())
    return json_response(doc, headers=headers)


async def submit_event(gw: Gateway, event: RunSubmitted, fingerprint: JSONObject, key: str | None) -> tuple[JSONObject, dict[str, str]]:
    """:func:`submit` without Quart: the answer's body and headers.

    Raises:
        PayloadTooLarge: the event would not fit NATS's max_payload (nothing appended).
        RequestInvalid: the Idempotency-Key names a different request.
        InfraError: NATS is down or did not acknowledge.
    """
    tenant = event.tenant_id
    run_id = run_id_for_key(tenant, key) if key else new_run_id()
    if key:
        legacy = gw.index.get(legacy_run_id_for_key(tenant, key))
        if legacy is not None:  # the key's run from before run ids took the canonical form
            run_id = str(legacy["run_id"])
    event = attrs.evolve(event, idempotency_key=key, request_sha256=request_fingerprint(fingerprint), fast_dispatch=True)
    size = len(dumps(event_data(event))) + 1024
    if size > gw.nats.max_payload:
        raise PayloadTooLarge(
            f"run too large: the submitted event would be about {size} bytes, above the NATS max_payload of "
            f"{gw.nats.max_payload} bytes; send smaller params or workflow"
        )
    await gw.await_nats()
    subject = subjects.work_subject(event.tag, gw.settings.work_subject_prefix)

    def dispatch(seqs: list[int]) -> None:
        # Fast path, on the NATS thread the moment the PubAck is in: hand the first attempt to
        # the workers without a thread hop.  The event says so (fast_dispatch), so the conductor
        # does not publish it again; if this publish is lost, its reconcile publishes the item.
        item = WorkItem.for_attempt(event, run_id=run_id, attempt=1, run_version=1, run_last_stream_seq=seqs[-1]).to_json()
        gw.nats.publish_soon(subject, item, subjects.work_msg_id(run_id, 1))

    try:
        outcome = await gw.store.execute(
            run_id,
            lambda snap: decide.submit_run(snap, event, run_id=run_id),
            producer=gw.producer,
            assume_new=True,
            on_stored=dispatch,
        )
    except OutcomeUnknown as exc:
        exc.run_id = run_id  # the 503 names it: the client may look it up
        raise
    except RunAlreadyExists as exc:
        if exc.same_request:
            return await replayed_answer(gw, run_id)
        raise RequestInvalid(
            f"Idempotency-Key {key!r} was already used for a different request (run {run_id}); "
            "use a new key for a new run, or resend the identical request to get the same run"
        ) from None
    if outcome.snapshot is not None:
        gw.index.note(outcome.snapshot.to_json())
    return {"run_id": run_id, "status": "PENDING", "bundle_hash": None}, {}


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


async def replayed_answer(gw: Gateway, run_id: str) -> tuple[JSONObject, dict[str, str]]:
    """The answer to a retried submit: the run as it is now (a finished run is not PENDING)."""
    doc = await read_snapshot(gw, run_id)
    status = doc.get("status") if doc is not None else None
    return (
        {"run_id": run_id, "status": status if isinstance(status, str) else "PENDING", "bundle_hash": None},
        {"Idempotent-Replayed": "true"},
    )


async def read_snapshot(gw: Gateway, run_id: str) -> JSONObject | None:
    """The run's snapshot: KV, or the fold of its events when KV misses it or is older than a
    write this gateway acknowledged (read-your-writes)."""
    cached = gw.index.doc_of(run_id)
    if cached is not None:
        return cached
    entry = await gw.nats.kv_get(subjects.RUNS_BUCKET, run_id)
    if entry is not None and entry.value:
        try:
            doc = json.loads(entry.value)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("version", 0) >= gw.index.version_of(run_id):
            return doc
    snap = await gw.store.load(run_id)
    return None if snap is None else snap.to_json()


async def read_existing(gw: Gateway, run_id: str) -> JSONObject:
    """:func:`read_snapshot` for a route: a malformed or unknown id is a 404, NATS down a 503."""
    if not valid_run_id(run_id):
        raise RunNotFound(run_id)
    gw.require_nats()
    doc = await read_snapshot(gw, run_id)
    if doc is None:
        raise RunNotFound(run_id)
    return doc


async def enrich(gw: Gateway, doc: JSONObject) -> JSONObject:
    worker_id = doc.get("worker_id")
    if not isinstance(worker_id, str) or not worker_id:
        return doc
    if gw.workers.ready.is_set():
        record = gw.workers.get(worker_id)  # the registry as the watch delivered it: no round trip
    else:
        try:
            entry = await gw.nats.kv_get(subjects.WORKERS_BUCKET, worker_id)
            record = json.loads(entry.value) if entry is not None and entry.value else None
        except (PyocoError, ValueError):
            return doc  # best effort, like pyoco-server
    if record is not None and not isinstance(record, dict):
        record = None
    out = dict(doc)
    out.update(
        liveness(record, key=worker_id, now=gw.clock(), disconnect_timeout=gw.settings.worker_disconnect_timeout)
    )
    return out


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


async def _load_workers(gw: Gateway) -> list[tuple[str, JSONObject]]:
    await _wait_ready(gw.workers.ready, f"the worker registry is still loading from NATS at {gw.nats.url}")
    return gw.workers.records()


def register_routes(app: QuartTrio, gw: Gateway) -> None:  # noqa: C901 - one flat list of routes
    # -- health ----------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
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

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document(app_routes(app.url_map)))

    # -- dashboard -------------------------------------------------------------------------

    @app.get("/")
    async def dashboard() -> Response:
        index_html = gw.static_dir / "index.html"
        try:
            text = await trio.Path(index_html).read_text(encoding="utf-8")
        except OSError:
            return json_response({"detail": "dashboard not found"}, 404)
        text = text.replace(LANG_PLACEHOLDER, resolve_dashboard_lang(gw.settings.dashboard_lang))
        return Response(text, content_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/static/<path:filename>")
    async def static(filename: str) -> Response:
        if "\x00" in filename or "\\" in filename or len(filename) > 255:
            raise NotFound()
        try:
            return await send_from_directory(gw.static_dir, filename)
        except (OSError, ValueError):  # e.g. a name too long for the file system (found by the fuzzer)
            raise NotFound() from None

    # -- submit ----------------------------------------------------------------------------

    @app.post("/runs")
    async def submit_run() -> Response:
        await gw.await_nats()
        body = json_loads(await _body())
        flow_name, params, tag, tags = parse_submit_body(
            body, default_tag=gw.settings.default_tag, max_params_bytes=gw.settings.max_params_bytes
        )
        event = RunSubmitted(
            flow_name=flow_name,
            params=params,
            tag=tag,
            tags=tuple(tags),
            submitted_at=gw.clock(),
            max_attempts=gw.settings.max_attempts,
        )
        fingerprint: JSONObject = {"kind": "flow", "flow_name": flow_name, "params": params, "tag": tag, "tags": list[JSONValue](tags)}
        return await submit(gw, event, fingerprint)

    @app.post("/runs/yaml")
    async def submit_yaml() -> Response:
        await gw.await_nats()
        check_yaml_length(gw, request.content_length)
        name, tag, data = yaml_form(gw, await request.get_data(cache=False), request.headers.get("Content-Type"))
        if len(data) <= INLINE_PARSE_BYTES:
            doc = yaml_document(gw, data)  # ~1 ms, and cached by hash
        else:
            # A large document takes seconds of pure-Python parsing: off the event loop, one
            # at a time, so SSE streams and other requests keep flowing meanwhile.
            doc = await trio.to_thread.run_sync(functools.partial(yaml_document, gw, data), limiter=gw.parse_limiter)
        event, fingerprint = yaml_event(gw, name, tag, doc)
        return await submit(gw, event, fingerprint)

    # -- list ------------------------------------------------------------------------------

    @app.get("/runs")
    async def list_runs() -> Response:
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
        }
        delta = "updated_after" in args or "cursor" in args or "workflow_yaml_sha256" in args
        await _wait_index_ready(gw)
        page = gw.index.page(
            limit=limit, filters={k: v for k, v in filters.items() if v}, updated_after=updated_after, before=before
        )
        items = page.items
        if _includes() & FULL_INCLUDES and items:
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

    @app.get("/runs/stream")
    async def stream_runs() -> Response:
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
        after = _last_event_id()
        if after is None and "after" in args:
            after = query_int(args, "after", default=0, lo=0, hi=2**62)
        await _wait_index_ready(gw)

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

    # -- one run ---------------------------------------------------------------------------

    @app.get("/runs/<run_id>")
    async def get_run(run_id: str) -> Response:
        doc = await read_existing(gw, run_id)
        return json_response(await enrich(gw, filter_snapshot(doc, _includes())))

    @app.get("/runs/<run_id>/tasks")
    async def get_tasks(run_id: str) -> Response:
        doc = await read_existing(gw, run_id)
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

    @app.get("/runs/<run_id>/events")
    async def get_events(run_id: str) -> Response:
        if not valid_run_id(run_id):
            raise RunNotFound(run_id)
        after_seq = query_int(request.args, "after_seq", default=0, lo=0, hi=2**62)
        gw.require_nats()
        events = await gw.store.history(run_id)
        if not events:
            raise RunNotFound(run_id)
        items = []
        for env in events:
            if env.seq <= after_seq:
                continue
            doc = envelope_to_json(env)
            doc["stream_seq"] = env.stream_seq
            items.append(doc)
        return json_response({"run_id": run_id, "last_seq": events[-1].seq, "events": items})

    @app.post("/runs/<run_id>/cancel")
    async def cancel_run(run_id: str) -> Response:
        if not valid_run_id(run_id):
            raise RunNotFound(run_id)
        await gw.await_nats()
        now = gw.clock()
        outcome = await gw.store.execute(
            run_id, lambda snap: decide.request_cancel(snap, run_id=run_id, now=now), producer=gw.producer
        )
        if outcome.snapshot is None:  # pragma: no cover - request_cancel raises RunNotFound first
            raise RunNotFound(run_id)
        doc = outcome.snapshot.to_json()
        if outcome.appended:
            gw.index.note(doc)
        return json_response(filter_snapshot(doc, set()))

    @app.get("/runs/<run_id>/watch")
    async def watch_run(run_id: str) -> Response:
        if not valid_run_id(run_id):
            raise RunNotFound(run_id)
        includes = _includes()
        since = query_float(request.args, "since")
        timeout = query_int(request.args, "timeout_sec", default=60, lo=1, hi=600)
        last_id = _last_event_id()
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
                                data = {"run_id": run_id, "snapshot": filter_snapshot(pending, includes), "ts": gw.clock()}
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

    # -- workers ---------------------------------------------------------------------------

    @app.get("/workers")
    async def list_workers() -> Response:
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
        now = gw.clock()  # served from the registry index, also while NATS is away
        items = []
        for key, record in await _load_workers(gw):
            view = worker_view(record, key=key, now=now, disconnect_timeout=gw.settings.worker_disconnect_timeout)
            if view["hidden"] and not include_hidden:
                continue
            if scope == "active" and view["state"] not in ALIVE_STATES:
                continue
            if state is not None and view["state"] != state:
                continue
            items.append(view)
        items.sort(key=lambda w: (w.get("last_seen_at") or 0.0, str(w.get("worker_id"))), reverse=True)
        return json_response(items[:limit])

    @app.patch("/workers/<worker_id>")
    async def patch_worker(worker_id: str) -> Response:
        body = json_loads(await _body())
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
            return json_response({"detail": "worker not found"}, 404)
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
                return json_response({"detail": "worker not found"}, 404)
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
            return json_response({"worker_id": worker_id, "hidden": hidden, "updated_at": now})
        raise InfraError(f"worker {worker_id}: gave up after repeated concurrent updates")

    # -- metrics ---------------------------------------------------------------------------

    @app.get("/metrics")
    async def metrics() -> Response:
        now = gw.clock()
        start, end = local_day_bounds(now)
        today: dict[str, int] = {}
        waiting: dict[str, int] = {}
        unprojectable = 0
        for summary in gw.index.summaries():
            if summary.get("projection_error"):
                unprojectable += 1
            if summary.get("status") == "PENDING":
                tag = str(summary.get("tag") or "")
                waiting[tag] = waiting.get(tag, 0) + 1
            updated = summary.get("updated_at")
            if isinstance(updated, (int, float)) and start <= updated < end:
                status = str(summary.get("status") or "UNKNOWN")
                today[status] = today.get(status, 0) + 1
        workers_alive = await _optional(_workers_alive(gw, now))
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
            runs_by_status=gw.index.counts(),
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
        )
        return Response(render(values, gw.http), content_type=METRICS_CONTENT_TYPE)


async def _optional(coro: Awaitable[int]) -> int | None:
    """A metric value, or None (its line is omitted) when NATS cannot tell."""
    try:
        return await coro
    except PyocoError:
        return None


async def _workers_alive(gw: Gateway, now: float) -> int:
    timeout = gw.settings.worker_disconnect_timeout
    views = [worker_view(r, key=k, now=now, disconnect_timeout=timeout) for k, r in await _load_workers(gw)]
    return sum(v["state"] in ALIVE_STATES for v in views)


async def _stream_field(gw: Gateway, stream: str, field: str) -> int:
    return (await gw.nats.stream_info(stream))[field]


async def _projector_lag(gw: Gateway) -> int:
    info = await gw.nats.consumer_pending(subjects.EVENTS_STREAM, subjects.PROJECTOR_DURABLE)
    return info["num_pending"] + info["num_ack_pending"]


async def _wait_index_ready(gw: Gateway) -> None:
    await _wait_ready(gw.index.ready, f"the run index is still loading from NATS at {gw.nats.url}")


async def _wait_ready(ready: trio.Event, what: str, timeout: float = 5.0) -> None:
    if ready.is_set():
        return
    with trio.move_on_after(timeout):
        await ready.wait()
    if not ready.is_set():
        raise InfraError(what)
