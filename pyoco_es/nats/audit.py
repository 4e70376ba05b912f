"""Audit entries that belong to no run (API keys, hidden workers, dead letters, wheels, archived
runs): JSON documents appended to the
event stream on their own ``pyoco.evt.audit.*`` subject (the projector reads only
``pyoco.evt.run.*``), and read back oldest first."""

from __future__ import annotations

import json
from typing import Any

from . import subjects
from .client import NatsClient


async def append_audit(client: NatsClient, subject: str, doc: dict[str, Any]) -> None:
    """Append one audit entry to ``PYOCO_EVENTS`` on ``subject``."""
    body = json.dumps(doc, ensure_ascii=True, separators=(",", ":"), default=str).encode()

    async def go() -> None:
        await client.js.publish(subject, body, stream=subjects.EVENTS_STREAM)

    await client.run(f"record audit on {subject}", go)


async def read_audit(client: NatsClient, subject: str) -> list[dict[str, Any]]:
    """Every entry on ``subject``, oldest first (an unreadable one is skipped)."""
    out: list[dict[str, Any]] = []
    after = 0
    while batch := await client.read_events(subject, after_stream_seq=after):
        for _, body in batch:
            try:
                out.append(json.loads(body))
            except ValueError:
                continue
        after = batch[-1][0]
    return out
