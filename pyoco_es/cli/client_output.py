"""pyoco-client's output: JSON documents and lines, tables that fit the terminal, watch lines.

Pure string builders plus two tiny writers; nothing here talks to the network.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

from .client_plugins import wheels_text

EMPTY_TABLE: Final = "(no items)"
RUN_COLUMNS: Final = ("run_id", "status", "flow_name", "tag", "updated_at")
WORKER_COLUMNS: Final = ("worker_id", "state", "tags", "heartbeat", "last_run_id")
EVENT_COLUMNS: Final = ("seq", "time", "type", "producer", "details")
_GAP: Final = "  "
# When a table is too wide, shrink these columns first (most droppable first).
# run_id last: it is the column people copy.
_SHRINK_ORDER: Final = ("details", "error", "resubmitted", "tags", "flow_name", "tag", "last_run_id", "producer", "type", "heartbeat", "time", "run_id")
_MIN_WIDTH: Final = 6


def dumps(obj: Any) -> str:
    """One JSON document on one line (pyoco-server's output is a JSON value per line)."""
    return json.dumps(obj, ensure_ascii=False)


def write_json(obj: Any, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    stream.write(dumps(obj) + "\n")
    stream.flush()


def write_text(text: str, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    stream.write(text if text.endswith("\n") or not text else text + "\n")
    stream.flush()


def terminal_width(out: TextIO | None = None) -> int | None:
    """The width to fit tables into: the terminal's, or $COLUMNS; None when piped (no limit)."""
    stream = out or sys.stdout
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    try:
        if stream.isatty():
            return shutil.get_terminal_size().columns
    except (AttributeError, ValueError, OSError):
        pass
    return None


def fmt_time(value: Any) -> str:
    """A unix timestamp as local ``MM-DD HH:MM:SS`` (tables are narrow); other values as text."""
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return time.strftime("%m-%d %H:%M:%S", time.localtime(value))
    return str(value)


def fmt_age(value: Any, now: float | None = None) -> str:
    """A unix timestamp as ``12s ago``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - value)
    return f"{fmt_duration(seconds)} ago"


def fmt_duration(seconds: float) -> str:
    """``0.42s``, ``12.3s``, ``4m05s``, ``2h03m``."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one (server answers are untrusted)."""
    return value if isinstance(value, Mapping) else {}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return dumps(value)
    return str(value).replace("\n", " ")


def _clip(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    return text[: width - 1] + "…"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None = None) -> str:
    """Left-aligned columns two spaces apart; shrinks the widest droppable columns to fit ``width``.

    An empty table is ``(no items)`` (pyoco-server's).
    """
    if not rows:
        return EMPTY_TABLE
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    if width is not None:
        excess = sum(widths) + len(_GAP) * (len(widths) - 1) - width
        for name in _SHRINK_ORDER:
            if excess <= 0:
                break
            if name not in headers:
                continue
            i = list(headers).index(name)
            floor = min(_MIN_WIDTH, widths[i])
            cut = min(excess, widths[i] - floor)
            if cut > 0:
                widths[i] -= cut
                excess -= cut
    lines = []
    for row in [list(headers), *cells]:
        parts = [_clip(c, widths[i]).ljust(widths[i]) for i, c in enumerate(row)]
        line = _GAP.join(parts).rstrip()
        lines.append(line[:width] if width is not None else line)
    return "\n".join(lines)


def run_rows(items: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    return [
        [it.get("run_id"), it.get("status"), it.get("flow_name"), it.get("tag"), fmt_time(it.get("updated_at"))]
        for it in items
    ]


def worker_rows(items: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    now = time.time()
    return [
        [
            it.get("worker_id"),
            it.get("state"),
            it.get("tags"),
            fmt_age(it.get("heartbeat_at", it.get("last_heartbeat_at")), now),
            it.get("current_run_id") or it.get("last_run_id"),
        ]
        for it in items
    ]


def _producer(value: Any) -> str:
    if not isinstance(value, Mapping):
        return _cell(value)
    text = f"{value.get('kind', '?')}:{value.get('id', '?')}"
    if value.get("attempt") is not None:
        text += f"#{value['attempt']}"
    return text


def fmt_clock(value: Any) -> str:
    """A unix timestamp as local ``HH:MM:SS.mmm`` (event times within a run)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _cell(value)
    return time.strftime("%H:%M:%S", time.localtime(value)) + f".{int(value * 1000) % 1000:03d}"


_SKIPPED_DETAILS: Final = frozenset({"attempt"})  # already in the producer column


def _details(data: Any) -> str:
    """An event's data as ``key=value`` pairs, most telling first (``task`` names lead)."""
    if not isinstance(data, Mapping):
        return _cell(data)
    parts = []
    for key in sorted(data, key=lambda k: k not in ("task", "status", "reason")):
        value = data[key]
        if key in _SKIPPED_DETAILS or value in (None, "", [], {}):
            continue
        if key == "workflow_yaml":
            value = f"<{len(str(value))} chars>"
        elif key == "wheels":
            value = wheels_text(value)
        elif key.endswith("_at"):
            value = fmt_clock(value)
        elif isinstance(value, (dict, list)):
            value = dumps(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def event_rows(items: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Audit-history envelopes as table rows: seq, time, type, producer, data summary."""
    rows = []
    for env in items:
        occurred = env.get("occurred_at")
        rows.append(
            [env.get("seq"), fmt_clock(occurred), env.get("type"), _producer(env.get("producer")), _details(env.get("data"))]
        )
    return rows


def watch_status_line(event: str, data: Any) -> str:
    """pyoco-server's ``watch --output status`` line: ``ts<TAB>event<TAB>status<TAB>run_id``."""
    payload = as_mapping(data)
    snapshot = as_mapping(payload.get("snapshot"))
    run_id = payload.get("run_id") or snapshot.get("run_id") or "-"
    status = snapshot.get("status") or payload.get("status") or "-"
    ts = payload.get("ts") or snapshot.get("updated_at") or "-"
    return f"{ts}\t{event}\t{status}\t{run_id}"
