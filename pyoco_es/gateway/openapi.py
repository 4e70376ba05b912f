"""The OpenAPI 3.1 document served at ``/openapi.json`` (hand-written; the routes are few)."""

from __future__ import annotations

from typing import Any

from .. import __version__

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON = {"application/json": {"schema": {"type": "object"}}}
_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}}
_INCLUDE = {
    "name": "include",
    "in": "query",
    "schema": {"type": "array", "items": {"type": "string", "enum": ["records", "task_records", "full", "all"]}},
    "description": "records/task_records/full/all keep task_records in the snapshot.",
}


def _q(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _op(summary: str, *, params: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
        ok: dict[str, Any] | None = None, errors: tuple[int, ...] = (422, 503)) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "parameters": params or []}
    if body is not None:
        op["requestBody"] = body
    op["responses"] = {"200": ok or {"description": "OK", "content": _JSON}}
    for code in errors:
        op["responses"][str(code)] = _ERROR
    return op


def openapi_document() -> dict[str, Any]:
    submit_ok = {"description": "Accepted: run.submitted is durable", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SubmitResponse"}}}}
    idem = {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255},
            "description": "A retry with the same key and request returns the same run (forever); another request with the key is a 422."}
    sse_ok = {"description": "Server-Sent Events", "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    last_id = {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}, "description": "Resume after this id."}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pyoco-es gateway", "version": __version__,
                 "description": "pyoco-server compatible HTTP API on an event-sourced backend (NATS JetStream)."},
        "paths": {
            "/health": {"get": _op("Liveness (does not check NATS)", errors=())},
            "/ready": {"get": _op("Readiness: NATS connection and run index", errors=(503,))},
            "/runs": {
                "post": _op("Submit a named flow", params=[idem], ok=submit_ok, errors=(409, 413, 422, 503), body={
                    "required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunSubmit"}}}}),
                "get": _op("List runs (plain array, or delta mode with updated_after/cursor/workflow_yaml_sha256)", params=[
                    _q("status", {"type": "string"}), _q("flow", {"type": "string"}), _q("tag", {"type": "string"}),
                    _q("workflow_yaml_sha256", {"type": "string"}), _q("schedule_id", {"type": "string"}),
                    _q("updated_after", {"type": "number"}), _q("cursor", {"type": "string"}),
                    _q("include", {"type": "array", "items": {"type": "string", "enum": ["full", "all"]}}),
                    _q("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50})]),
            },
            "/runs/yaml": {"post": _op("Submit a single-flow flow.yaml (multipart)", params=[idem], ok=submit_ok,
                                       errors=(413, 422, 503), body={"required": True, "content": {"multipart/form-data": {"schema": {
                                           "type": "object", "required": ["workflow", "flow_name"], "properties": {
                                               "workflow": {"type": "string", "format": "binary"},
                                               "flow_name": {"type": "string"}, "tag": {"type": "string"}}}}}})},
            "/runs/stream": {"get": _op("SSE of run summaries as they change (event: run, id: KV revision; ready on connect, reset when Last-Event-ID is unknown, heartbeat)", params=[
                _q("status", {"type": "string"}), _q("flow", {"type": "string"}), _q("tag", {"type": "string"}),
                _q("after", {"type": "integer"}), _q("timeout_sec", {"type": "integer", "minimum": 1, "maximum": 3600}), last_id], ok=sse_ok)},
            "/runs/{run_id}": {"get": _op("Run snapshot with worker liveness", params=[_RUN_ID, _INCLUDE], errors=(404, 503))},
            "/runs/{run_id}/tasks": {"get": _op("Tasks and task records", params=[_RUN_ID], errors=(404, 503))},
            "/runs/{run_id}/events": {"get": _op("The run's event history (audit trail)", params=[
                _RUN_ID, _q("after_seq", {"type": "integer", "minimum": 0, "default": 0})], errors=(404, 422, 503))},
            "/runs/{run_id}/watch": {"get": _op("SSE of the run's snapshots (event: snapshot, id: version; heartbeat; end)", params=[
                _RUN_ID, _INCLUDE, _q("since", {"type": "number"}),
                _q("timeout_sec", {"type": "integer", "minimum": 1, "maximum": 600, "default": 60}), last_id], ok=sse_ok, errors=(404, 422, 503))},
            "/runs/{run_id}/cancel": {"post": _op("Cancel: PENDING→CANCELLED, RUNNING→CANCELLING, terminal unchanged", params=[_RUN_ID], errors=(404, 503))},
            "/workers": {"get": _op("Worker registry", params=[
                _q("scope", {"type": "string", "enum": ["active", "all"]}),
                _q("state", {"type": "string", "enum": ["RUNNING", "IDLE", "STOPPED_GRACEFUL", "DISCONNECTED"]}),
                _q("include_hidden", {"type": "boolean"}), _q("limit", {"type": "integer", "minimum": 1, "maximum": 500})])},
            "/workers/{worker_id}": {"patch": _op("Hide or unhide a worker", params=[
                {"name": "worker_id", "in": "path", "required": True, "schema": {"type": "string"}}], errors=(404, 422, 503), body={
                    "required": True, "content": {"application/json": {"schema": {"type": "object", "required": ["hidden"],
                                                                                  "properties": {"hidden": {"type": "boolean"}}}}}})},
            "/metrics": {"get": _op("Prometheus metrics", ok={"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}, errors=())},
            "/openapi.json": {"get": _op("This document", errors=())},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "properties": {"detail": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}},
            "RunSubmit": {"type": "object", "required": ["flow_name"], "properties": {
                "flow_name": {"type": "string", "minLength": 1}, "params": {"type": "object", "default": {}},
                "tag": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9_-]+$"},
                "tags": {"type": "array", "items": {"type": "string"}, "default": []}}},
            "SubmitResponse": {"type": "object", "properties": {
                "run_id": {"type": "string"}, "status": {"type": "string"}, "bundle_hash": {"type": ["string", "null"]}}},
        }},
    }
