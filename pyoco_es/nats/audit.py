"""Audit entries that are not run events: who made or revoked an API key, who hid or showed a
worker.  Each is one compact JSON document on a ``pyoco.evt.audit.<what>`` subject of the event
stream (so it shares its retention and deny-delete), never read by the projector, which follows
``pyoco.evt.run.*`` only.  Documents never hold a secret.
"""

from __future__ import annotations

import json
from typing import Any

from . import subjects
from .client import NatsClient


async def record_audit(client: NatsClient, subject: str, doc: dict[str, Any]) -> None:
    """Append ``doc`` to the audit ``subject``; returns once JetStream stored it.

    Raises:
        InfraError: NATS did not store it (the caller's change is already made: say so, or retry).
    """
    body = json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode()

    async def go() -> None:
        await client.js.publish(subject, body, stream=subjects.EVENTS_STREAM)

    await client.run(f"record audit on {subject}", go)


async def read_audit(client: NatsClient, subject: str) -> list[dict[str, Any]]:
    """Every entry on an audit ``subject``, oldest first."""
    out: list[dict[str, Any]] = []
    after = 0
    while batch := await client.read_events(subject, after_stream_seq=after):
        out.extend(json.loads(body) for _, body in batch)
        after = batch[-1][0]
    return out
