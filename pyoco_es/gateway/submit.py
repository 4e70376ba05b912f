"""Submitting a run, without HTTP: the request's validation, the ``run.submitted`` event, and its
append (shared by the Quart handlers in :mod:`.runs` and by :mod:`.fastpath`).

``submit_event`` goes through ``RunStore.execute`` (decide, then append fenced by the run's last
stream seq) and answers only after the PubAck; an Idempotency-Key maps to one run id forever.
"""

from __future__ import annotations

import functools
import logging
import hashlib
import json
import uuid
from typing import Any, Final

import attrs

from ..core import decide
from ..core.codec import dumps, event_data
from ..core.errors import OutcomeUnknown, PayloadTooLarge, PyocoError, RunAlreadyExists, ValidationError
from ..core.events import JSONObject, JSONValue, RunSubmitted
from ..core.work import WorkItem
from ..flows.yaml import WorkflowDoc, parse_workflow_yaml
from ..nats import subjects
from ..ports import OnStored
from ..nats.resources import ensure_work_consumer
from ..service import new_run_id
from .auth import Principal
from .context import MULTIPART_SLACK, Gateway
from .multipart import parse_form
from .params import (
    TAG_MAX,
    TAGS_MAX_ITEMS,
    RequestInvalid,
    check_flow_name,
    check_params,
    check_run_timeout,
    check_tag,
    field_error,
    invalid,
)
from .snapshot import read_snapshot

log = logging.getLogger(__name__)

IDEMPOTENCY_NAMESPACE: Final = uuid.UUID("5b0f8a51-3f0c-4c55-9d55-70796f636f65")
WORK_QUEUES_REMEMBERED: Final = 10_000  # tags whose consumer this gateway made sure of
INLINE_PARSE_BYTES: Final = 16 * 1024  # smaller YAML documents are parsed on the event loop


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



def check_yaml_length(gw: Gateway, length: int | None) -> None:
    """A declared upload size over the limit is refused before the body is read."""
    limit = gw.settings.workflow_yaml_max_bytes
    if length is not None and length > limit + MULTIPART_SLACK:
        raise PayloadTooLarge(f"workflow too large: the upload is {length} bytes, the limit is {limit} bytes (PYOCO_WORKFLOW_YAML_MAX_BYTES)")


def yaml_form(gw: Gateway, body: bytes, content_type: str | None) -> tuple[str, str, bytes, float | None]:
    """``POST /runs/yaml``'s form: (flow name, tag, the workflow file's bytes, ``timeout_sec``).

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
    return name, raw_tag, upload.data, check_run_timeout(form.get("timeout_sec"), ("body", "timeout_sec"))


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


def yaml_event(gw: Gateway, name: str, tag: str, doc: WorkflowDoc, timeout_sec: float | None = None) -> tuple[RunSubmitted, JSONObject]:
    """The ``run.submitted`` of a YAML upload and its idempotency fingerprint; the run's deadline
    is the form's ``timeout_sec``, else the document's ``runtime.timeout_sec``.

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
        timeout_sec=timeout_sec if timeout_sec is not None else doc.timeout_sec,
    )
    fingerprint: JSONObject = {"kind": "yaml", "flow_name": name, "tag": tag, "workflow_yaml_sha256": doc.sha256}
    if timeout_sec is not None:
        fingerprint["timeout_sec"] = timeout_sec
    return event, fingerprint


def named_event(gw: Gateway, body: object) -> tuple[RunSubmitted, JSONObject]:
    """The ``run.submitted`` of a ``POST /runs`` body (already JSON-decoded) and its idempotency
    fingerprint.

    Raises:
        RequestInvalid: a missing or bad field (one item per problem).
        PayloadTooLarge: params over PYOCO_MAX_PARAMS_BYTES.
    """
    flow_name, params, tag, tags = parse_submit_body(body, default_tag=gw.settings.default_tag, max_params_bytes=gw.settings.max_params_bytes)
    timeout = check_run_timeout(body.get("timeout_sec"), ("body", "timeout_sec"))  # type: ignore[union-attr]
    event = RunSubmitted(
        flow_name=flow_name,
        params=params,
        tag=tag,
        tags=tuple(tags),
        submitted_at=gw.clock(),
        max_attempts=gw.settings.max_attempts,
        timeout_sec=timeout,
    )
    fingerprint: JSONObject = {"kind": "flow", "flow_name": flow_name, "params": params, "tag": tag, "tags": list[JSONValue](tags)}
    if timeout is not None:
        fingerprint["timeout_sec"] = timeout
    return event, fingerprint


# -- the gateway's operations -------------------------------------------------------------------



def prepare_submit(
    gw: Gateway,
    event: RunSubmitted | dict[str, Any],
    fingerprint: JSONObject,
    key: str | None,
    principal: Principal | None = None,
    *,
    fresh_id: str | None = None,
    check_size: bool = True,
) -> tuple[str, RunSubmitted]:
    """The run id and the final ``run.submitted`` of a request (tenant, Idempotency-Key, fingerprint).
    ``event`` may also be the event's fields (it is then built once, not built and evolved: a
    batch's items).  ``fresh_id`` is the id of a run without a key (default: a new one);
    ``check_size=False`` leaves the size to the append, which refuses an event that cannot fit
    (``PayloadTooLarge``).

    Raises:
        PayloadTooLarge: the event would not fit NATS's max_payload.
    """
    tenant = principal.tenant_id if principal is not None else (event.get("tenant_id") if isinstance(event, dict) else event.tenant_id)
    run_id = run_id_for_key(tenant, key) if key else (fresh_id or new_run_id())
    if key:
        legacy = gw.index.get(legacy_run_id_for_key(tenant, key))
        if legacy is not None:  # the key's run from before run ids took the canonical form
            run_id = str(legacy["run_id"])
    changes: dict[str, object] = {"idempotency_key": key, "request_sha256": request_fingerprint(fingerprint), "fast_dispatch": True}
    if principal is not None:
        changes.update(tenant_id=principal.tenant_id, api_key_id=principal.key_id)
    event = RunSubmitted(**{**event, **changes}) if isinstance(event, dict) else attrs.evolve(event, **changes)
    if check_size:
        size = len(dumps(event_data(event))) + 1024
        if size > gw.nats.max_payload:
            raise PayloadTooLarge(
                f"run too large: the submitted event would be about {size} bytes, above the NATS max_payload of "
                f"{gw.nats.max_payload} bytes; send smaller params or workflow"
            )
    return run_id, event


def first_dispatch(gw: Gateway, event: RunSubmitted, run_id: str) -> OnStored:
    """The append hook that hands attempt 1 to the workers (see :func:`submit_event`), sent
    without waiting for its PubAck: nothing waits on it (a lost item is the reconcile's to
    publish again either way), and an ack per submit cost ~0.1-0.2 ms of gateway CPU."""
    subject = subjects.work_subject(event.tag, gw.settings.work_subject_prefix)
    publish = gw.nats.publish_unacked_soon

    def dispatch(seqs: list[int]) -> None:
        # Fast path, on the NATS thread the moment the PubAck is in: hand the first attempt to
        # the workers without a thread hop.  The event says so (fast_dispatch), so the conductor
        # does not publish it again; if this publish is lost, its reconcile publishes the item.
        item = WorkItem.for_attempt(event, run_id=run_id, attempt=1, run_version=1, run_last_stream_seq=seqs[-1]).to_json()
        publish(subject, item, subjects.work_msg_id(run_id, 1))

    return dispatch


async def submit_event(
    gw: Gateway,
    event: RunSubmitted | dict[str, Any],
    fingerprint: JSONObject,
    key: str | None,
    principal: Principal | None = None,
    *,
    correlation_id: str | None = None,
) -> tuple[JSONObject, dict[str, str]]:
    """Append ``run.submitted`` (Idempotency-Key retries are replays): the answer's body and headers.
    With API keys on, the run belongs to the ``principal``'s tenant and key.  ``correlation_id``
    goes on the event's envelope (a dead letter's re-submission names the dead letter).

    Raises:
        PayloadTooLarge: the event would not fit NATS's max_payload (nothing appended).
        RequestInvalid: the Idempotency-Key names a different request.
        InfraError: NATS is down or did not acknowledge.
    """
    run_id, event = prepare_submit(gw, event, fingerprint, key, principal)
    await gw.await_nats()
    await ensure_work_queue(gw, event.tag)
    try:
        outcome = await gw.store.execute(
            run_id,
            lambda snap: decide.submit_run(snap, event, run_id=run_id),
            producer=gw.producer,
            assume_new=True,
            on_stored=first_dispatch(gw, event, run_id),
            correlation_id=correlation_id,
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



async def ensure_work_queue(gw: Gateway, tag: str) -> None:
    """Our consumer for ``tag`` exists before the tag's first work item is published (once per tag
    per gateway), so a pyoco-server worker cannot bind the tag and take the item (issue 15).  It
    is created, never changed: the workers' settings decide its limits.  Best effort: the submit
    goes on when it cannot be made (the work stream is gone, say: the item is then re-derived by
    the conductor once the stream is back), and the next submit of the tag tries again.
    """
    if tag in gw.work_queues:
        return
    try:
        await ensure_work_consumer(gw.nats, tag, gw.settings, update=False)
    except PyocoError as exc:
        log.warning("cannot make sure the work consumer of tag %s exists (%s); submitting anyway", tag, exc.message)
        return
    if len(gw.work_queues) >= WORK_QUEUES_REMEMBERED:
        gw.work_queues.clear()
    gw.work_queues.add(tag)


async def replayed_answer(gw: Gateway, run_id: str) -> tuple[JSONObject, dict[str, str]]:
    """The answer to a retried submit: the run as it is now (a finished run is not PENDING)."""
    doc = await read_snapshot(gw, run_id)
    status = doc.get("status") if doc is not None else None
    return (
        {"run_id": run_id, "status": status if isinstance(status, str) else "PENDING", "bundle_hash": None},
        {"Idempotent-Replayed": "true"},
    )

