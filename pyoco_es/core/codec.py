"""Envelopes and snapshots to and from bytes (compact ASCII JSON), with upcasting on read.

Old event versions are upcast when read and never rewritten: register a function in
``UPCASTERS[(type, from_version)]`` that returns the payload at ``from_version + 1``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

import attrs

from .errors import CorruptStreamError
from .events import EVENT_TYPES, Envelope, Event, JSONObject, Producer
from .model import RunSnapshot

ENVELOPE_VERSION: Final = 1

UPCASTERS: Final[dict[tuple[str, int], Callable[[JSONObject], JSONObject]]] = {}

_FIELDS: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(a.name for a in attrs.fields(cls)) for cls in EVENT_TYPES.values()
}
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode


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
    return _dumps(envelope_to_json(env)).encode("ascii")


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
    """The KV value of a snapshot; ``task_records`` are dropped (and flagged) above ``max_bytes``.

    Deterministic, so a replay produces byte-identical values.
    """
    doc = snap.to_json()
    raw = _dumps(doc).encode("ascii")
    if max_bytes > 0 and len(raw) > max_bytes:
        doc["task_records"] = {}
        doc["task_records_truncated"] = True
        raw = _dumps(doc).encode("ascii")
    return raw


def decode_snapshot(raw: bytes) -> RunSnapshot:
    return RunSnapshot.from_json(json.loads(raw))


def dumps(doc: object) -> bytes:
    """Compact ASCII JSON, the one format for everything pyoco-es writes."""
    return _dumps(doc).encode("ascii")
