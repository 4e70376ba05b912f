"""Server-Sent Events framing (pure): bytes for one event, comment lines, and headers.

Data is compact JSON on a single ``data:`` line, so a frame never needs multi-line splitting.
"""

from __future__ import annotations

from typing import Final

from ..core.codec import dumps

SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}

def frame(event: str, data: object, *, id: int | str | None = None, retry_ms: int | None = None) -> bytes:
    """One SSE event: ``id:`` (if any), ``event:``, ``data:`` (compact JSON), blank line."""
    if "\n" in event or "\r" in event:
        raise ValueError("an SSE event name cannot contain a line break")
    lines = []
    if retry_ms is not None:
        lines.append(f"retry: {int(retry_ms)}")
    if id is not None:
        sid = str(id)
        if "\n" in sid or "\r" in sid:
            raise ValueError("an SSE id cannot contain a line break")
        lines.append(f"id: {sid}")
    lines.append(f"event: {event}")
    lines.append(f"data: {dumps(data).decode('ascii')}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def comment(text: str = "") -> bytes:
    """A comment line (ignored by clients; keeps proxies from timing the stream out)."""
    return f": {text}\n\n".encode("utf-8")


def parse_last_event_id(raw: str | None) -> int | None:
    """The integer position in a ``Last-Event-ID`` header (None when absent or empty).

    Raises:
        ValueError: the header is not a non-negative integer (we only ever send integers).
    """
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 19:
        raise ValueError(f"Last-Event-ID must be a non-negative integer (the id: of the last event received), got {raw[:40]!r}")
    return int(raw)
