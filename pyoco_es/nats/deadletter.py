"""The dead-letter stream (``PYOCO_DLQ``) read, dropped and audited over NATS (issue 15).

A dead letter's id is its sequence in the stream.  Reads walk the stream backwards in windows
of :data:`WINDOW` sequences, each window fetched with pipelined ``STREAM.MSG.GET`` requests in one
crossing (the stream needs no ``allow_direct``); a dropped or expired sequence is simply absent.
Resubmits and drops are recorded on ``pyoco.evt.audit.dlq`` in the event stream (the projector
reads only ``pyoco.evt.run.*``), as API key changes are on ``pyoco.evt.audit.api_key``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import attrs
import nats.js.errors

from . import subjects
from .audit import append_audit, read_audit, read_audit_after
from .client import NatsClient

WINDOW: Final = 128  # sequences fetched per crossing when walking back


@attrs.frozen
class DeadLetter:
    """One stored dead letter: its id (stream seq), subject, store time and raw bytes."""

    seq: int
    subject: str
    stored_at: float | None
    data: bytes


def _dead_letter(msg: Any) -> DeadLetter:  # noqa: ANN401 - nats-py's RawStreamMsg
    stored = msg.time.timestamp() if msg.time is not None else None
    return DeadLetter(seq=int(msg.seq), subject=str(msg.subject or ""), stored_at=stored, data=bytes(msg.data or b""))


async def _get(client: NatsClient, seq: int) -> DeadLetter | None:  # on the asyncio side
    try:
        return _dead_letter(await client.js.get_msg(subjects.DLQ_STREAM, seq=seq))
    except nats.js.errors.NotFoundError:
        return None


async def dlq_bounds(client: NatsClient) -> tuple[int, int]:
    """(first, last) sequence of the dead-letter stream (last is 0 when it never held one)."""
    info = await client.stream_info(subjects.DLQ_STREAM)
    return info["first_seq"], info["last_seq"]


async def get_dead_letter(client: NatsClient, seq: int) -> DeadLetter | None:
    """The dead letter with id ``seq``; None when there is none (dropped, expired, never)."""
    if seq < 1:
        return None
    return await client.run("read dead letter", _get, client, seq)


async def dead_letters_before(client: NatsClient, before: int, *, first: int, count: int = WINDOW) -> list[DeadLetter]:
    """The dead letters with ids in ``[max(first, before - count), before)``, newest first (one crossing)."""
    low = max(first, before - count, 1)
    if low >= before:
        return []

    async def go() -> list[DeadLetter]:
        got = await asyncio.gather(*(_get(client, s) for s in range(before - 1, low - 1, -1)))
        return [d for d in got if d is not None]

    return await client.run("read dead letters", go)


async def drop_dead_letter(client: NatsClient, seq: int) -> bool:
    """Delete dead letter ``seq``; False when it was already gone."""

    async def go() -> bool:
        try:
            return bool(await client.js.delete_msg(subjects.DLQ_STREAM, seq))
        except nats.js.errors.NotFoundError:
            return False
        except nats.js.errors.APIError as exc:
            if getattr(exc, "err_code", None) == 10057 or getattr(exc, "code", None) == 404:  # no message found
                return False
            raise

    return await client.run("drop dead letter", go)


async def record_dlq_audit(client: NatsClient, doc: dict[str, Any]) -> None:
    """Append a ``dlq.<action>`` audit entry (who, when, which dead letter, the new run if any)."""
    await append_audit(client, subjects.DLQ_AUDIT_SUBJECT, doc)


async def read_dlq_audit(client: NatsClient) -> list[dict[str, Any]]:
    """Every dead letter resubmitted or dropped, oldest first."""
    return await read_audit(client, subjects.DLQ_AUDIT_SUBJECT)


async def read_dlq_audit_after(client: NatsClient, after: int) -> list[tuple[int, dict[str, Any]]]:
    """The audit entries after stream sequence ``after``, with their sequences (to catch up)."""
    return await read_audit_after(client, subjects.DLQ_AUDIT_SUBJECT, after)


__all__ = [
    "DeadLetter",
    "WINDOW",
    "dead_letters_before",
    "dlq_bounds",
    "drop_dead_letter",
    "get_dead_letter",
    "read_dlq_audit",
    "read_dlq_audit_after",
    "record_dlq_audit",
]
