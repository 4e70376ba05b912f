"""The live terminal view of ``pyoco-client watch``: status, elapsed time, each task in place.

Hand-written ANSI (cursor-up + clear-to-end), no extra dependency: the view is a dozen lines
redrawn a few times a second, which is all ``rich.live`` would do for us here.
:func:`render` is pure (snapshot + clock → lines) so it is tested without a terminal.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

import attrs
import trio

from .client_http import SseEvent, TERMINAL_STATUSES
from .client_output import as_mapping, fmt_duration
from .client_plugins import wheels_text

REDRAW_INTERVAL: Final = 0.25
_ICONS: Final = {
    "PENDING": "·",
    "RUNNING": "▶",
    "SUCCEEDED": "✓",
    "FAILED": "✗",
    "CANCELLED": "⊘",
    "INTERRUPTED": "↯",
}
_COLOURS: Final = {
    "RUNNING": "\x1b[33m",
    "CANCELLING": "\x1b[33m",
    "SUCCEEDED": "\x1b[32m",
    "COMPLETED": "\x1b[32m",
    "FAILED": "\x1b[31m",
    "CANCELLED": "\x1b[35m",
    "INTERRUPTED": "\x1b[35m",
}
_RESET: Final = "\x1b[0m"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _paint(text: str, state: str, colour: bool) -> str:
    code = _COLOURS.get(state)
    return f"{code}{text}{_RESET}" if colour and code else text


def task_duration(record: Mapping[str, Any], now: float) -> float | None:
    """Seconds a task took (finished) or has been running (still running); None if not started."""
    ms = _num(record.get("duration_ms"))
    if ms is not None:
        return ms / 1000.0
    started = _num(record.get("started_at"))
    if started is None:
        return None
    ended = _num(record.get("ended_at"))
    return max(0.0, (ended if ended is not None else now) - started)


def _task_rows(snapshot: Mapping[str, Any], now: float) -> list[tuple[str, str]]:
    """(state, text) per task, in the run's task order."""
    states = as_mapping(snapshot.get("tasks"))
    records = as_mapping(snapshot.get("task_records"))
    names = list(states) + [n for n in records if n not in states]
    name_w = max((len(n) for n in names), default=4)
    end = _num(snapshot.get("end_time"))
    finished = str(snapshot.get("status")) in TERMINAL_STATUSES
    rows = []
    for name in names:
        record = as_mapping(records.get(name))
        state = str(states.get(name) or record.get("state") or "PENDING")
        if finished and state != "SUCCEEDED" and _num(record.get("started_at")) is not None and _num(record.get("ended_at")) is None:
            # Started, never ended, and the run is over: its process died or was killed (a forced
            # cancel, a lost worker).  As the dashboard says it; it ran until the run ended.
            state = "INTERRUPTED"
            record = {**record, "ended_at": end} if end is not None else record
        took = task_duration(record, now)
        dur = fmt_duration(took) if took is not None else ""
        tries = record.get("tries")
        if isinstance(tries, int) and tries > 1:  # retried (issue 16): how many tries so far
            dur = f"{dur}  ({tries} tries)" if dur else f"({tries} tries)"
        rows.append((state, f"  {_ICONS.get(state, '?')} {name.ljust(name_w)}  {state.ljust(9)}  {dur}".rstrip()))
    return rows


def _fit(rows: list[tuple[str, str]], room: int) -> list[tuple[str, str]]:
    """At most ``room`` rows: succeeded tasks fold into one line first, then the tail is cut."""
    if len(rows) <= room:
        return rows
    done = [r for r in rows if r[0] == "SUCCEEDED"]
    rest = [r for r in rows if r[0] != "SUCCEEDED"]
    if done:
        rows = [("SUCCEEDED", f"  {_ICONS['SUCCEEDED']} {len(done)} tasks succeeded"), *rest]
    if len(rows) > room:
        keep = max(0, room - 1)
        rows = [*rows[:keep], ("", f"  … {len(rows) - keep} more")]
    return rows


def render(
    snapshot: Mapping[str, Any] | None,
    *,
    run_id: str,
    now: float,
    width: int = 80,
    height: int | None = None,
    note: str = "",
    colour: bool = False,
) -> list[str]:
    """The view's lines for one moment.  Lines never exceed ``width`` and there are never more
    than ``height`` of them (no wrapping or scrolling, so the cursor arithmetic of the redraw
    stays right)."""
    lines: list[str] = []
    if snapshot is None:
        lines.append(f"run {run_id}: connecting…"[:width])
    else:
        status = str(snapshot.get("status") or "?")
        start = _num(snapshot.get("start_time")) or _num(snapshot.get("submitted_at"))
        end = _num(snapshot.get("end_time"))
        stop = end if end is not None and status in TERMINAL_STATUSES else now
        elapsed = fmt_duration(max(0.0, stop - start)) if start is not None else "-"
        head = f"run {snapshot.get('run_id', run_id)}  flow {snapshot.get('flow_name', '?')}  tag {snapshot.get('tag', '?')}"
        attempt = snapshot.get("attempt")
        if isinstance(attempt, int) and attempt > 1:
            head += f"  attempt {attempt}"
        lines.append(head[:width])
        code = f"  code {wheels_text(snapshot['wheels'])}" if snapshot.get("wheels") else ""  # wheel sync: which code runs
        rest = f"  elapsed {elapsed}{code}"[: max(0, width - 7 - len(status))]
        lines.append(f"status {_paint(status, status, colour)}{rest}")
        tail = [f"error: {snapshot['error']}"[:width]] if snapshot.get("error") else []
        if note:
            tail.append(note[:width])
        rows = _task_rows(snapshot, now) or [("", "  (no tasks yet)")]
        room = len(rows) if height is None else max(1, height - len(lines) - len(tail))
        lines.extend(_paint(text[:width], state, colour) for state, text in _fit(rows, room))
        return lines + tail
    if note:
        lines.append(note[:width])
    return lines


@attrs.define
class LiveView:
    """Redraws :func:`render`'s lines in place on a terminal stream."""

    out: TextIO
    run_id: str
    width: int = 80
    colour: bool = True
    snapshot: dict[str, Any] | None = None
    note: str = ""
    _drawn: int = 0

    def update(self, event: SseEvent) -> None:
        if event.snapshot is not None:
            self.snapshot = event.snapshot

    def set_note(self, note: str) -> None:
        self.note = note
        self.draw()

    def draw(self) -> None:
        size = shutil.get_terminal_size((self.width + 1, 24))  # follows resizes
        lines = render(
            self.snapshot,
            run_id=self.run_id,
            now=time.time(),
            width=max(20, size.columns - 1),
            height=max(3, size.lines - 1),
            note=self.note,
            colour=self.colour,
        )
        buf = []
        if self._drawn:
            buf.append(f"\x1b[{self._drawn}F")  # to the start of the first line drawn last time
        buf.append("\x1b[J")  # clear from there to the end of the screen
        buf.append("\n".join(lines) + "\n")
        self.out.write("".join(buf))
        self.out.flush()
        self._drawn = len(lines)

    async def run_ticker(self) -> None:
        """Redraw a few times a second so elapsed times keep moving between events."""
        while True:
            self.draw()
            await trio.sleep(REDRAW_INTERVAL)
