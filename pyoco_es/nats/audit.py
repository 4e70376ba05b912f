"""Audit entries that belong to no run (API keys, hidden workers, dead letters, wheels, archived
runs): JSON documents appended to the
event stream on their own ``pyoco.evt.audit.*`` subject (the projector reads only
``pyoco.evt.run.*``), and read back oldest first."""

from __future__ import annotations

import json
import logging
from typing import Any

from . import subjects
from .client import NatsClient

log = logging.getLogger(__name__)


async def append_audit(client: NatsClient, subject: str, doc: dict[str, Any]) -> None:
    """Append one audit entry to ``PYOCO_EVENTS`` on ``subject``."""
    body = json.dumps(doc, ensure_ascii=True, separators=(",", ":"), default=str).encode()

    async def go() -> None:
        await client.js.publish(subject, body, stream=subjects.EVENTS_STREAM)

    await client.run(f"record audit on {subject}", go)


async def read_audit_after(client: NatsClient, subject: str, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
    """The entries on ``subject`` after stream sequence ``after``, oldest first, with their
    sequences (pass the last one back to read only what came since).  An entry that is not a
    JSON object is skipped with a warning."""
    out: list[tuple[int, dict[str, Any]]] = []
    while batch := await client.read_events(subject, after_stream_seq=after):
        for seq, raw in batch:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                out.append((seq, doc))
            else:
                log.warning("audit entry at stream seq %d on %s is not a JSON object; skipped", seq, subject)
        after = batch[-1][0]
    return out


async def read_audit(client: NatsClient, subject: str) -> list[dict[str, Any]]:
    """Every entry on ``subject``, oldest first (one that is not a JSON object is skipped)."""
    return [doc for _, doc in await read_audit_after(client, subject)]
