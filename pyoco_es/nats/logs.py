"""Task output in JetStream: the ``PYOCO_LOGS`` stream's chunk format, publishing and reading.

One subject per run (``pyoco.logs.<run_id>``, :func:`~.subjects.run_logs_subject`); each
message is a *chunk*: compact JSON ``{"attempt": n, "lines": [[task, try, stream, ts, text],
...]}``, written by the run's worker (:mod:`pyoco_es.worker.logship`).  A drop marker is a chunk
with ``"dropped": N`` and ``"reason"`` and one line of stream ``dropped`` saying so.

A line's **position** is ``stream sequence * POSITION_BASE + its index in the chunk``: it
increases along the run's output, survives restarts, and is what ``after`` and the SSE
``Last-Event-ID`` resume from (positions are not dense).
"""

from __future__ import annotations

import json
from typing import Any, Final

from ..core.codec import dumps
from ..core.errors import PyocoError
from ..ports import PubAck
from . import subjects
from .client import NatsClient

CHUNK_LINES: Final = 500  # lines per chunk at most (below POSITION_BASE)
CHUNK_CHARS: Final = 200_000  # text per chunk, roughly (well under NATS's 1 MB max_payload)
POSITION_BASE: Final = 1000
STREAMS: Final = ("stdout", "stderr", "log")
DROPPED: Final = "dropped"  # the stream of a drop marker's line

Line = list[Any]  # [task, try, stream, ts, text]


def chunk_body(attempt: int, lines: list[Line]) -> bytes:
    return dumps({"attempt": attempt, "lines": lines})


def marker_body(attempt: int, dropped: int, reason: str, now: float) -> bytes:
    text = f"[pyoco-es] {dropped} line{'s' if dropped != 1 else ''} dropped: {reason}"
    return dumps({"attempt": attempt, "dropped": dropped, "reason": reason, "lines": [[None, 1, DROPPED, now, text]]})


def decode_chunk(seq: int, data: bytes) -> list[dict[str, Any]]:
    """The lines of one stored chunk as the API serves them (``pos``, ``attempt``, ``task``,
    ``try``, ``stream``, ``ts``, ``text``; a marker's line also ``dropped``).  A chunk that is
    not of this format yields nothing (the stream is only ever written by workers)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("lines"), list):
        return []
    attempt = doc.get("attempt") if isinstance(doc.get("attempt"), int) else 1
    out = []
    for index, line in enumerate(doc["lines"][:POSITION_BASE]):
        if not isinstance(line, list) or len(line) != 5:
            continue
        task, try_no, stream, ts, text = line
        item: dict[str, Any] = {
            "pos": seq * POSITION_BASE + index,
            "attempt": attempt,
            "task": task if isinstance(task, str) else None,
            "try": try_no if isinstance(try_no, int) else 1,
            "stream": stream if isinstance(stream, str) else "stdout",
            "ts": ts if isinstance(ts, (int, float)) else None,
            "text": text if isinstance(text, str) else str(text),
        }
        if item["stream"] == DROPPED:
            item["dropped"] = doc.get("dropped") if isinstance(doc.get("dropped"), int) else 0
        out.append(item)
    return out


async def publish_chunks(client: NatsClient, items: list[tuple[str, bytes]]) -> list[PubAck | PyocoError]:
    """Store chunks ((run id, body) in order), pipelined in one crossing; per-chunk ack or error."""
    if not items:
        return []
    return await client.publish_many([(subjects.run_logs_subject(run_id), body, None, None) for run_id, body in items])


async def read_chunks(client: NatsClient, run_id: str, *, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
    """Up to ``limit`` chunks of the run stored after stream sequence ``after_seq``, in order.

    Raises:
        EventLogUnavailable: NATS (or the PYOCO_LOGS stream) did not answer.
    """
    subject = subjects.run_logs_subject(run_id)
    return await client.run("read logs", client._read_subject, subject, after_seq, limit, True, subjects.LOGS_STREAM)


__all__ = ["CHUNK_CHARS", "CHUNK_LINES", "DROPPED", "POSITION_BASE", "STREAMS", "chunk_body", "decode_chunk", "marker_body", "publish_chunks", "read_chunks"]
