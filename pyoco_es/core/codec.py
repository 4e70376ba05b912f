"""Envelopes and snapshots to and from bytes (compact ASCII JSON), with upcasting on read.

Old event versions are upcast when read and never rewritten: register a function in
``UPCASTERS[(type, from_version)]`` that returns the payload at ``from_version + 1``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

import attrs

from .errors import CorruptStreamError, PayloadTooLarge
from .events import EVENT_TYPES, Envelope, Event, JSONObject, JSONValue, Producer, TaskCompleted
from .model import RunSnapshot

ENVELOPE_VERSION: Final = 1

UPCASTERS: Final[dict[tuple[str, int], Callable[[JSONObject], JSONObject]]] = {}

_FIELDS: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(a.name for a in attrs.fields(cls)) for cls in EVENT_TYPES.values()
}
# The one compact JSON encoder (ASCII, no NaN/Infinity): every document pyoco-es writes or serves
# goes through it or :func:`dumps` (its bytes form).
compact_json: Final[Callable[[object], str]] = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode


def event_data(event: Event) -> JSONObject:
    return {name: getattr(event, name) for name in _FIELDS[type(event)]}  # type: ignore[misc]


def envelope_to_json(env: Envelope) -> JSONObject:
    return {
        "envelope_version": ENVELOPE_VERSION,
        "event_id": env.event_id,
        "type": env.type,
        "type_version": env.event.VERSION,
        "run_id": env.run_id,
        "seq": env.seq,
        "occurred_at": env.occurred_at,
        "producer": {"kind": env.producer.kind, "id": env.producer.id, "attempt": env.producer.attempt},
        "causation_id": env.causation_id,
        "correlation_id": env.correlation_id,
        "data": event_data(env.event),
    }


def encode_envelope(env: Envelope) -> bytes:
    return compact_json(envelope_to_json(env)).encode("ascii")


# Fields an oversized event may lose the tail of (each type's free text and task data); every
# other field is identity or bounded by the request that produced it.
SHRINKABLE: Final[dict[str, tuple[str, ...]]] = {
    "task.completed": ("output", "inputs"),
    "task.failed": ("traceback", "error", "inputs"),
    "task.retry_scheduled": ("error",),
    "run.failed": ("error",),
    "run.cancel_requested": ("reason", "by"),
    "run.released": ("reason",),
}
_MARK_ROOM: Final = 96  # bytes a truncation marker needs, with its JSON quoting


def truncate_text(text: str, max_bytes: int, *, total: int | None = None, unit: str = "bytes") -> str:
    """``text`` cut so that its JSON encoding fits ``max_bytes``, with a visible marker naming
    the full size (``total``: the size to report, default the encoded size of ``text``)."""
    size = len(compact_json(text))
    if size <= max_bytes:
        return text
    mark = f"...[truncated: {total if total is not None else size} {unit}]"
    keep = max(0, max_bytes - len(mark) - 2)
    head = text[:keep]
    while head and (enc := len(compact_json(head)) - 2) > keep:  # escapes (\uXXXX) take up to 6 bytes
        head = head[: min(len(head) - 1, len(head) * keep // enc)]
    return head + mark


_OBJECT_FIELDS: Final = frozenset({"inputs", "params"})  # must stay JSON objects


def cap_value(value: JSONValue, max_bytes: int, *, as_object: bool = False) -> tuple[JSONValue, bool]:
    """A JSON value whose encoding fits ``max_bytes``: itself, or a marked preview of its JSON
    text (a string, or with ``as_object`` ``{"_truncated": preview}``, the form the worker
    uses for task inputs).  Idempotent."""
    raw = compact_json(value)
    if len(raw) <= max_bytes:
        return value, False
    if isinstance(value, str):
        return truncate_text(value, max_bytes), True
    preview = truncate_text(raw, max(0, max_bytes - 16), total=len(raw), unit="bytes of JSON")
    if as_object:
        return {"_truncated": preview}, True
    return preview, True


def encode_envelope_bounded(env: Envelope, max_bytes: int) -> bytes:
    """``encode_envelope``, shrunk to fit ``max_bytes`` when it does not.

    The common case costs one length check of the encoded bytes.  An oversized event loses the
    tail of its free-text and task-data fields (``SHRINKABLE``) with a marker that names each
    field's full size; the event itself is the same fact (a failed task stays failed).

    Raises:
        PayloadTooLarge: the event has nothing to shrink (``run.submitted``: its params and
            workflow are the run) or cannot fit even shrunk.
    """
    raw = encode_envelope(env)
    if len(raw) <= max_bytes:
        return raw
    names = SHRINKABLE.get(env.type, ())
    data = event_data(env.event)
    sizes = {n: len(compact_json(data[n])) for n in names}
    budget = max_bytes - (len(raw) - sum(sizes.values())) - _MARK_ROOM * len(names)
    if names and budget > 0:
        # Water-filling: small fields stay whole, the big ones share what is left equally.
        alloc: dict[str, int] = {}
        left = budget
        ordered = sorted(names, key=lambda n: sizes[n])
        for i, n in enumerate(ordered):
            alloc[n] = min(sizes[n], left // (len(ordered) - i))
            left -= alloc[n]
        changes: dict[str, object] = {}
        for n in names:
            if sizes[n] > alloc[n]:
                changes[n] = cap_value(data[n], alloc[n], as_object=n in _OBJECT_FIELDS)[0]
        if isinstance(env.event, TaskCompleted) and "output" in changes:
            changes["truncated"] = True
        shrunk = encode_envelope(attrs.evolve(env, event=attrs.evolve(env.event, **changes)))
        if len(shrunk) <= max_bytes:
            return shrunk
    raise PayloadTooLarge(
        f"{env.type} event of run {env.run_id} is {len(raw)} bytes, above the {max_bytes}-byte limit "
        "(NATS max_payload minus headroom) and cannot be shrunk to fit"
    )


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


_INF: Final = float("inf")


def _finite_float(text: str) -> float:
    value = float(text)
    if value == _INF or value == -_INF:
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads(raw: bytes) -> object:
    """``json.loads`` that accepts only what :func:`dumps` can write back: no NaN/Infinity and no
    number that overflows to infinity (issue 10 #3: one such param in a stored event crashed the
    conductor when it encoded the work item).

    Raises:
        ValueError: not JSON (UnicodeDecodeError included), or such a number.
        RecursionError: nested too deeply.
    """
    return _DECODER.decode(raw.decode("utf-8"))  # strict UTF-8: no encoded surrogates either


# Built once: with a prebuilt decoder the float check costs about what ``json.loads`` spends
# detecting the encoding of bytes (measured: ~9 us per 460-byte event either way).
_DECODER: Final = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def decode_envelope(raw: bytes, *, stream_seq: int | None = None) -> Envelope:
    """Parse one stored event.

    Raises:
        CorruptStreamError: for bad JSON, a missing field, an unknown type or a payload that does
            not match its type's schema.  The message names the problem.
    """
    try:
        doc = loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptStreamError(f"event at stream seq {stream_seq} is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(doc, dict):
        raise CorruptStreamError(f"event at stream seq {stream_seq} is not a JSON object")
    run_id = doc.get("run_id") if isinstance(doc.get("run_id"), str) else None
    seq = doc.get("seq") if isinstance(doc.get("seq"), int) else None
    try:
        etype = doc["type"]
        cls = EVENT_TYPES.get(etype)
        if cls is None:
            raise CorruptStreamError(
                f"unknown event type {etype!r} at stream seq {stream_seq}", run_id=run_id, seq=seq
            )
        data = doc["data"]
        if not isinstance(data, dict):
            raise TypeError("data is not an object")
        version = doc.get("type_version", 1)
        while version < cls.VERSION:
            upcast = UPCASTERS.get((etype, version))
            if upcast is None:
                raise CorruptStreamError(
                    f"no upcaster for {etype} v{version}", run_id=run_id, seq=seq
                )
            data = upcast(data)
            version += 1
        if version > cls.VERSION:
            raise CorruptStreamError(
                f"{etype} v{version} is newer than this build understands (v{cls.VERSION})",
                run_id=run_id,
                seq=seq,
            )
        fields = _FIELDS[cls]
        event = cls(**{k: v for k, v in data.items() if k in fields})
        p = doc["producer"]
        return Envelope(
            event_id=doc["event_id"],
            run_id=doc["run_id"],
            seq=doc["seq"],
            occurred_at=doc["occurred_at"],
            producer=Producer(kind=p["kind"], id=p["id"], attempt=p.get("attempt")),
            event=event,
            causation_id=doc.get("causation_id"),
            correlation_id=doc.get("correlation_id"),
            stream_seq=stream_seq,
        )
    except CorruptStreamError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStreamError(
            f"malformed event at stream seq {stream_seq}: {type(exc).__name__}: {exc}",
            run_id=run_id,
            seq=seq,
        ) from exc


def encode_snapshot(snap: RunSnapshot, *, max_bytes: int = 262144) -> bytes:
    """The KV value of a snapshot, at most ``max_bytes`` (0: unbounded) by construction.

    The common case is one encode and a length check.  Above the limit, in order until it fits:
    each task record's ``output``/``inputs``/``error``/``traceback``, the run's ``error`` and its
    ``params`` are cut to a share of the limit with a marker naming their full size; then
    ``task_records`` are dropped (``task_records_truncated``); then the ``tasks`` map keeps its
    first names (``tasks_truncated``: how many there were).  The whole stays in the events.
    Deterministic, so a replay produces byte-identical values.
    """
    doc = snap.to_json()
    raw = compact_json(doc).encode("ascii")
    if max_bytes <= 0 or len(raw) <= max_bytes:
        return raw
    return bound_snapshot_doc(doc, max_bytes)


def bound_snapshot_doc(doc: dict[str, JSONValue], max_bytes: int) -> bytes:
    """:func:`encode_snapshot`'s shrinking steps for any snapshot-shaped document."""
    records = doc.get("task_records")
    if isinstance(records, dict) and records:
        per_field = max(512, max_bytes // (8 * len(records)))
        for rec in records.values():
            if isinstance(rec, dict):
                for name in ("output", "inputs", "error", "traceback"):
                    if rec.get(name) is not None:
                        rec[name], cut = cap_value(rec[name], per_field, as_object=name in _OBJECT_FIELDS)
                        if cut and name == "output":
                            rec["output_truncated"] = True
    for name, share in (("error", 8), ("params", 4)):
        if doc.get(name) is not None:
            doc[name] = cap_value(doc[name], max_bytes // share, as_object=name in _OBJECT_FIELDS)[0]
    raw = compact_json(doc).encode("ascii")
    if len(raw) <= max_bytes:
        return raw
    doc["task_records"] = {}
    doc["task_records_truncated"] = True
    raw = compact_json(doc).encode("ascii")
    if len(raw) <= max_bytes:
        return raw
    tasks = doc.get("tasks")
    if isinstance(tasks, dict) and tasks:
        room = max_bytes - (len(raw) - len(compact_json(tasks))) - 64
        kept: dict[str, JSONValue] = {}
        used = 2
        for name, state in tasks.items():
            used += len(compact_json({name: state})) - 1
            if used > room:
                break
            kept[name] = state
        doc["tasks"] = kept
        doc["tasks_truncated"] = len(tasks)
        raw = compact_json(doc).encode("ascii")
        if len(raw) <= max_bytes:
            return raw
    # Nothing bounded is left to cut (huge tags or names): identity and status only.
    keep = ("run_id", "status", "flow_name", "tag", "attempt", "max_attempts", "version", "last_stream_seq", "updated_at", "submitted_at", "end_time", "projection_error")
    small = {k: doc.get(k) for k in keep if k in doc}
    small["flow_name"] = cap_value(small.get("flow_name"), 1024)[0]
    small["tag"] = cap_value(small.get("tag"), 1024)[0]
    small["tags"] = []
    small["params"] = {"_truncated": "...[truncated]"}
    small["snapshot_truncated"] = True
    return compact_json(small).encode("ascii")


def decode_snapshot(raw: bytes) -> RunSnapshot:
    return RunSnapshot.from_json(json.loads(raw))


def dumps(doc: object) -> bytes:
    """Compact ASCII JSON, the one format for everything pyoco-es writes."""
    return compact_json(doc).encode("ascii")
