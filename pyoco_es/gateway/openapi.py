"""The OpenAPI 3.1 document served at ``/openapi.json``, generated from the app's routes.

The paths and methods come from the app's URL map (:func:`openapi_document` is given the
routes), and each operation's request description from :data:`OPERATIONS`, whose limits are
the constants the validators in :mod:`.params` enforce.  A route without an entry here is an
error (a test builds the document from the real app), so the document cannot drift from the
routes.  ``tests/test_fuzz_api.py`` generates requests from this very document.

With API keys on (``PYOCO_HTTP_AUTH_MODE=api_key``) the document declares the key header as the
security scheme :data:`API_KEY_SCHEME` and puts it on every route the auth layer guards: the
caller passes the same public rules the layer uses (``auth.public_rules``), so the two cannot
disagree.  Without keys the document names no scheme (no route asks for one).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any, Final

from .. import __version__
from ..core.wheels import NAME_MAX as WHEEL_NAME_MAX
from ..flows.policy import MAX_SECONDS
from .params import FLOW_NAME_MAX, IDEMPOTENCY_KEY_MAX, QUERY_STR_MAX, RUN_ID_MAX, TAG_MAX, TAGS_MAX_ITEMS, WORKER_ID_MAX

JSONSchema = dict[str, Any]

TOKEN_PATTERN: Final = "^[A-Za-z0-9_-]+$"  # ECMA regex: `$` is the end of the string

_ERROR: Final = {"description": "Error ({\"detail\": ...})", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON_OK: Final = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
_SSE_OK: Final = {"description": "Server-Sent Events", "content": {"text/event-stream": {"schema": {"type": "string"}}}}
_TAG: Final = {"type": "string", "minLength": 1, "maxLength": TAG_MAX, "pattern": TOKEN_PATTERN}
_FLOW_NAME: Final = {"type": "string", "minLength": 1, "maxLength": FLOW_NAME_MAX,
                     "description": "Printable text (no control characters or lone surrogates)."}
_TEXT: Final = {"type": "string", "maxLength": QUERY_STR_MAX}
_HTML: Final = {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
_TIMEOUT: Final = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS,
                   "description": "The run's deadline in seconds after submission: past it the run ends FAILED (reason timeout)."}


def _path(name: str, max_len: int) -> JSONSchema:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": max_len, "pattern": TOKEN_PATTERN}}


def _q(name: str, schema: JSONSchema, description: str = "") -> JSONSchema:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _h(name: str, schema: JSONSchema, description: str) -> JSONSchema:
    return {"name": name, "in": "header", "schema": schema, "description": description}


def _body(media: str, schema: JSONSchema) -> JSONSchema:
    return {"required": True, "content": {media: {"schema": schema}}}


def _op(summary: str, *, params: list[JSONSchema] | None = None, body: JSONSchema | None = None,
        ok: JSONSchema | None = None, errors: tuple[int, ...] = ()) -> JSONSchema:
    op: JSONSchema = {"summary": summary, "parameters": params or []}
    if body is not None:
        op["requestBody"] = body
    op["responses"] = {"200": ok or _JSON_OK}
    for code in errors:
        op["responses"][str(code)] = _ERROR
    return op


_RUN_ID: Final = _path("run_id", RUN_ID_MAX)
_INCLUDE: Final = _q("include", {"type": "array", "items": {"type": "string", "enum": ["records", "task_records", "full", "all"]}},
                     "records/task_records/full/all keep task_records in the snapshot.")
_IDEM: Final = _h("Idempotency-Key", {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX, "pattern": "^[\\x20-\\x7e]+$"},
                  "Printable ASCII.  A retry with the same key and request returns the same run; another request with the key is a 422.")
_DLQ_ID: Final = {"name": "dlq_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                  "description": "The dead letter's id (its sequence in the PYOCO_DLQ stream)."}
_LAST_ID: Final = _h("Last-Event-ID", {"type": "integer", "minimum": 0}, "Resume after this id.")
_WHEEL_NAME: Final = {"name": "wheel_name", "in": "path", "required": True, "schema": {
    "type": "string", "minLength": 5, "maxLength": WHEEL_NAME_MAX, "pattern": "^[A-Za-z0-9._+-]+\\.whl$"}}
_SUBMIT_OK: Final = {"description": "Accepted: run.submitted is durable",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SubmitResponse"}}}}
# 403: a browser's cross-site write (PYOCO_HTTP_ALLOWED_ORIGINS); 415: a body type the route does not take.
_WRITE_ERRORS: Final = (403, 413, 415, 422, 503)

OPERATIONS: Final[dict[tuple[str, str], JSONSchema]] = {
    ("GET", "/health"): _op("Liveness (does not check NATS)"),
    ("GET", "/ready"): _op("Readiness: NATS connection and run index", errors=(503,)),
    ("GET", "/openapi.json"): _op("This document"),
    ("GET", "/docs"): _op("This document as a page (operations folded; offline, public)", ok=_HTML, errors=(404,)),
    ("GET", "/redoc"): _op("This document as a page (two columns, every operation open; offline, public)", ok=_HTML, errors=(404,)),
    ("GET", "/"): _op("The dashboard (HTML)", ok={"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}, errors=(404,)),
    ("GET", "/static/<path:filename>"): _op("Dashboard assets", params=[
        {"name": "filename", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 256}}],
        ok={"description": "A file", "content": {"*/*": {"schema": {"type": "string"}}}}, errors=(404,)),
    ("POST", "/runs"): _op("Submit a named flow", params=[_IDEM], ok=_SUBMIT_OK, errors=_WRITE_ERRORS,
                           body=_body("application/json", {"$ref": "#/components/schemas/RunSubmit"})),
    ("POST", "/runs/yaml"): _op("Submit a single-flow flow.yaml (multipart)", params=[_IDEM], ok=_SUBMIT_OK, errors=_WRITE_ERRORS,
                                body=_body("multipart/form-data", {
                                    "type": "object", "required": ["workflow", "flow_name"], "properties": {
                                        "workflow": {"type": "string", "format": "binary",
                                                     "description": "flow.yaml, at most PYOCO_WORKFLOW_YAML_MAX_BYTES (413)"},
                                        "flow_name": _FLOW_NAME, "tag": _TAG, "timeout_sec": _TIMEOUT}})),
    ("GET", "/runs"): _op("List runs (plain array, or delta mode with updated_after/cursor/workflow_yaml_sha256)", params=[
        _q("status", _TEXT), _q("flow", _TEXT), _q("tag", _TEXT), _q("workflow_yaml_sha256", _TEXT), _q("schedule_id", _TEXT),
        _q("updated_after", {"type": "number"}), _q("cursor", {"type": "string", "maxLength": 2048}),
        _q("worker_id", _TEXT), _q("tenant_id", _TEXT, "Ignored for an API key (its own tenant only)."),
        _q("updated_before", {"type": "number"}), _q("run_id_prefix", _TEXT, "Runs whose id starts with this."),
        _q("error_contains", _TEXT, "Case-insensitive text in the run's error or failure reason."),
        _q("include", {"type": "array", "items": {"type": "string", "enum": ["full", "all"]}}),
        _q("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50})], errors=(422, 503)),
    ("GET", "/runs/stream"): _op("SSE of run summaries as they change (event: run, id: KV revision; ready on connect, reset when Last-Event-ID is unknown, heartbeat)", params=[
        _q("status", _TEXT), _q("flow", _TEXT), _q("tag", _TEXT), _q("after", {"type": "integer", "minimum": 0}),
        _q("timeout_sec", {"type": "integer", "minimum": 1, "maximum": 3600}), _LAST_ID], ok=_SSE_OK, errors=(422, 503)),
    ("GET", "/runs/<run_id>"): _op("Run snapshot with worker liveness", params=[_RUN_ID, _INCLUDE], errors=(404, 410, 503)),
    ("GET", "/runs/<run_id>/tasks"): _op("Tasks and task records", params=[_RUN_ID], errors=(404, 503)),
    ("GET", "/runs/<run_id>/events"): _op("The run's event history (audit trail)", params=[
        _RUN_ID, _q("after_seq", {"type": "integer", "minimum": 0, "default": 0})], errors=(404, 422, 503)),
    ("GET", "/runs/<run_id>/watch"): _op("SSE of the run's snapshots (event: snapshot, id: version; heartbeat; end)", params=[
        _RUN_ID, _INCLUDE, _q("since", {"type": "number"}),
        _q("timeout_sec", {"type": "integer", "minimum": 1, "maximum": 600, "default": 60}), _LAST_ID], ok=_SSE_OK, errors=(404, 422, 503)),
    ("GET", "/runs/<run_id>/logs"): _op("Task output (stdout, stderr, logging) by position; next is the after of the next page", params=[
        _RUN_ID, _q("task", {"type": "string", "maxLength": 256}), _q("stream", {"type": "string", "enum": ["stdout", "stderr", "log"]}),
        _q("after", {"type": "integer", "minimum": 0, "maximum": 2**62, "default": 0}),
        _q("limit", {"type": "integer", "minimum": 1, "maximum": 5000, "default": 1000})], errors=(404, 422, 503)),
    ("GET", "/runs/<run_id>/logs/stream"): _op("SSE of task output (event: logs, id: last line's position; heartbeat; end once the run ended and its output is read)", params=[
        _RUN_ID, _q("task", {"type": "string", "maxLength": 256}), _q("stream", {"type": "string", "enum": ["stdout", "stderr", "log"]}),
        _q("after", {"type": "integer", "minimum": 0, "maximum": 2**62}),
        _q("timeout_sec", {"type": "integer", "minimum": 1, "maximum": 3600, "default": 600}), _LAST_ID], ok=_SSE_OK, errors=(404, 422, 503)),
    ("POST", "/runs/<run_id>/cancel"): _op("Cancel: PENDING→CANCELLED, RUNNING→CANCELLING, terminal unchanged (any body is ignored)",
                                           params=[_RUN_ID], errors=(403, 404, 503)),
    ("GET", "/workers"): _op("Worker registry", params=[
        _q("scope", {"type": "string", "enum": ["active", "all"]}),
        _q("state", {"type": "string", "enum": ["RUNNING", "IDLE", "STOPPED_GRACEFUL", "DISCONNECTED"]}),
        _q("include_hidden", {"type": "boolean"}), _q("limit", {"type": "integer", "minimum": 1, "maximum": 500})], errors=(422, 503)),
    ("PATCH", "/workers/<worker_id>"): _op("Hide or unhide a worker", params=[_path("worker_id", WORKER_ID_MAX)],
                                           errors=(403, 404, 415, 422, 503), body=_body("application/json", {
                                               "type": "object", "required": ["hidden"], "properties": {"hidden": {"type": "boolean"}}})),
    ("GET", "/auth/whoami"): _op("Who is calling: the auth mode and, with an API key, its tenant and key id", errors=(401, 403, 503),
                                 ok={"description": "OK", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/WhoAmI"}}}}),
    # -- bulk operations and dead letters (issues 18 and 15) --
    ("POST", "/runs/batch"): _op("Submit up to 1000 runs (named flows or flow.yaml text); one result per item, in order",
                                 ok={"description": "One result per item", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchResponse"}}}},
                                 errors=_WRITE_ERRORS, body=_body("application/json", {"$ref": "#/components/schemas/RunBatch"})),
    ("POST", "/runs/cancel"): _op("Cancel many runs: by run_ids, or every active run matching a filter (status, flow_name, tag)",
                                  errors=_WRITE_ERRORS, body=_body("application/json", {"$ref": "#/components/schemas/RunCancelMany"})),
    ("GET", "/dlq"): _op("Dead letters, newest first (reason, run, flow, when, size, resubmitted: [{run_id, at, key_id}])", params=[
        _q("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}),
        _q("before", {"type": "integer", "minimum": 1}, "next_cursor of the previous page: entries with a smaller id")],
        errors=(422, 503)),
    ("GET", "/dlq/<int:dlq_id>"): _op("One dead letter with its payload (as text or JSON, never executed) and its re-submissions", params=[_DLQ_ID], errors=(404, 503)),
    ("DELETE", "/dlq/<int:dlq_id>"): _op("Drop a dead letter (recorded in the audit history)", params=[_DLQ_ID], errors=(403, 404, 503)),
    ("POST", "/dlq/<int:dlq_id>/resubmit"): _op("Re-submit a dead letter's run as a new run (recorded; the new run's events name the dead letter)",
                                                params=[_DLQ_ID], ok=_SUBMIT_OK, errors=(403, 404, 409, 413, 422, 503)),
    ("GET", "/wheels"): _op("The wheel registry, by name (pyoco-server's fields)", errors=(503,)),
    ("POST", "/wheels"): _op("Upload a wheel (multipart); its version must be above every stored one of its package (409)",
                             errors=(*_WRITE_ERRORS, 409, 507), body=_body("multipart/form-data", {
                                 "type": "object", "required": ["wheel"], "properties": {
                                     "wheel": {"type": "string", "format": "binary",
                                               "description": "the .whl (PEP 427 filename), at most PYOCO_WHEEL_MAX_BYTES (413)"},
                                     "tags": {"type": "string", "maxLength": 8192, "description": "comma-separated tags ([A-Za-z0-9_-]+)"},
                                     "replace": {"type": "boolean", "default": True}}})),
    ("GET", "/wheels/history"): _op("Wheel uploads and deletes, newest first", params=[
        _q("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}),
        _q("wheel_name", {"type": "string", "maxLength": WHEEL_NAME_MAX}),
        _q("action", {"type": "string", "enum": ["upload", "delete"]})], errors=(422, 503)),
    ("GET", "/wheels/<wheel_name>"): _op("Download a wheel", params=[_WHEEL_NAME], errors=(404, 503), ok={
        "description": "The wheel's bytes", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}),
    ("DELETE", "/wheels/<wheel_name>"): _op("Delete a wheel", params=[_WHEEL_NAME], errors=(403, 404, 503)),
    ("GET", "/metrics"): _op("Prometheus metrics", ok={"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}),
}

_SCHEMAS: Final = {
    "Error": {"type": "object", "properties": {"detail": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}},
    "RunSubmit": {"type": "object", "required": ["flow_name"], "properties": {
        "flow_name": _FLOW_NAME,
        "params": {"type": "object", "default": {},
                   "description": "JSON object: finite numbers, integers below 10**64, valid Unicode, nesting at most 64, "
                                  "at most PYOCO_MAX_PARAMS_BYTES of JSON (413)."},
        "tag": {"oneOf": [_TAG, {"type": "null"}]},
        "tags": {"type": "array", "items": _TAG, "maxItems": TAGS_MAX_ITEMS, "default": []},
        "timeout_sec": {"oneOf": [_TIMEOUT, {"type": "null"}]}}},
    "WhoAmI": {"type": "object", "required": ["auth_mode", "tenant_id", "api_key_id"], "properties": {
        "auth_mode": {"type": "string", "enum": ["none", "api_key"]},
        "tenant_id": {"type": ["string", "null"]}, "api_key_id": {"type": ["string", "null"]}}},
    "RunBatch": {"type": "object", "required": ["items"], "properties": {"items": {
        "type": "array", "maxItems": 1000, "description": "More than 1000 items: 413 (nothing stored).",
        "items": {"type": "object", "properties": {
            "flow_name": _FLOW_NAME, "params": {"type": "object"}, "tag": {"oneOf": [_TAG, {"type": "null"}]},
            "tags": {"type": "array", "items": _TAG, "maxItems": TAGS_MAX_ITEMS},
            "idempotency_key": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX, "pattern": "^[\\x20-\\x7e]+$"},
            "workflow_yaml": {"type": "string", "description": "flow.yaml text (validated as POST /runs/yaml); with flow_name and tag only"}}}}}},
    "BatchResponse": {"type": "object", "properties": {
        "results": {"type": "array", "items": {"type": "object", "required": ["index", "status"], "properties": {
            "index": {"type": "integer"}, "status": {"type": "string", "enum": ["accepted", "duplicate", "refused"]},
            "run_id": {"type": "string"}, "error": {"type": "string"}}}},
        "accepted": {"type": "integer"}, "duplicate": {"type": "integer"}, "refused": {"type": "integer"}}},
    "RunCancelMany": {"type": "object", "description": "Exactly one of run_ids or filter.", "properties": {
        "run_ids": {"type": "array", "maxItems": 1000, "items": {"type": "string", "maxLength": RUN_ID_MAX}},
        "filter": {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": {
            "status": _TEXT, "flow_name": _TEXT, "tag": _TEXT}}}},
    "SubmitResponse": {"type": "object", "properties": {
        "run_id": {"type": "string"}, "status": {"type": "string"}, "bundle_hash": {"type": ["string", "null"]}}},
}

API_KEY_SCHEME: Final = "ApiKey"
_AUTH_ERRORS: Final = {"401": {**_ERROR, "description": "No API key (\"api key required\")"},
                       "403": {**_ERROR, "description": "A wrong, unknown or revoked API key (\"invalid api key\")"}}


def _security_scheme(header: str) -> JSONSchema:
    return {"type": "apiKey", "in": "header", "name": header,
            "description": "An API key (made with pyoco-server-admin api-key create). "
                           "Without it a protected route answers 401, with a bad one 403."}


def _guarded(op: JSONSchema) -> JSONSchema:
    """``op`` as a route the auth layer guards: the key required, its 401/403 answers listed."""
    return {**op, "security": [{API_KEY_SCHEME: []}], "responses": {**op["responses"], **_AUTH_ERRORS}}


_CONVERTER: Final = re.compile(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def openapi_document(
    routes: Iterable[tuple[str, str]], *, api_key_header: str | None = None, public: Collection[str] = ()
) -> dict[str, Any]:
    """The document for ``routes`` ((method, werkzeug rule) pairs, e.g. from the app's URL map).

    Args:
        api_key_header: with API keys on, their header (``X-API-Key``): declared as the security
            scheme and required on every route whose rule is not in ``public``.  None: keys off.
        public: the rules the auth layer serves without a key (``auth.public_rules``).

    Raises:
        KeyError: a route has no entry in :data:`OPERATIONS` (document it there).
    """
    paths: dict[str, dict[str, Any]] = {}
    for method, rule in sorted(routes):
        if method in ("HEAD", "OPTIONS"):
            continue
        op = OPERATIONS.get((method, rule))
        if op is None:
            raise KeyError(f"route {method} {rule} has no OpenAPI entry in pyoco_es/gateway/openapi.py")
        if api_key_header is not None and rule not in public:
            op = _guarded(op)
        paths.setdefault(_CONVERTER.sub(r"{\1}", rule), {})[method.lower()] = op
    components: dict[str, Any] = {"schemas": _SCHEMAS}
    if api_key_header is not None:
        components["securitySchemes"] = {API_KEY_SCHEME: _security_scheme(api_key_header)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pyoco-es gateway", "version": __version__,
                 "description": "pyoco-server compatible HTTP API on an event-sourced backend (NATS JetStream). "
                                "Browsers' cross-site writes are refused (403) unless their origin is in PYOCO_HTTP_ALLOWED_ORIGINS."},
        "paths": paths,
        "components": components,
    }


def app_routes(url_map: Any) -> list[tuple[str, str]]:  # noqa: ANN401 - werkzeug's Map
    """(method, rule) of every route in a werkzeug/Quart URL map."""
    return [(m, r.rule) for r in url_map.iter_rules() for m in sorted(r.methods or ()) if m not in ("HEAD", "OPTIONS")]


__all__ = ["API_KEY_SCHEME", "OPERATIONS", "app_routes", "openapi_document"]
