"""The live terminal view of ``pyoco-client watch``: status, elapsed time, each task in place.

Hand-written ANSI (cursor-up + clear-to-end), no extra dependency: the view is a dozen lines
redrawn a few times a second, which is all ``rich.live`` would do for us here.
:func:`render` is pure (snapshot + clock → lines) so it is tested without a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

import attrs
import trio

from .client_http import SseEvent, TERMINAL_STATUSES
from .client_output import fmt_duration

REDRAW_INTERVAL: Final = 0.25
_ICONS: Final = {
    "PENDING": "·",
    "RUNNING": "▶",
    "SUCCEEDED": "✓",
    "FAILED": "✗",
    "CANCELLED": "⊘",
}
_COLOURS: Final = {
    "RUNNING": "\x1b[33m",
    "CANCELLING": "\x1b[33m",
    "SUCCEEDED": "\x1b[32m",
    "COMPLETED": "\x1b[32m",
    "FAILED": "\x1b[31m",
    "CANCELLED": "\x1b[35m",
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


def render(
    snapshot: Mapping[str, Any] | None,
    *,
    run_id: str,
    now: float,
    width: int = 80,
    note: str = "",
    colour: bool = False,
) -> list[str]:
    """The view's lines for one moment.  Lines never exceed ``width`` (no wrapping, so the
    cursor arithmetic of the redraw stays right)."""
    lines: list[str] = []
    if snapshot is None:
        lines.append(f"run {run_id}: connecting…")
    else:
        status = str(snapshot.get("status") or "?")
        start = _num(snapshot.get("start_time")) or _num(snapshot.get("submitted_at"))
        end = _num(snapshot.get("end_time"))
        if start is not None:
            elapsed = fmt_duration(max(0.0, (end if end is not None and status in TERMINAL_STATUSES else now) - start))
        else:
            elapsed = "-"
        head = f"run {snapshot.get('run_id', run_id)}  flow {snapshot.get('flow_name', '?')}  tag {snapshot.get('tag', '?')}"
        lines.append(head[:width])
        lines.append(f"status {_paint(status, status, colour)}  elapsed {elapsed}")
        states = snapshot.get("tasks") if isinstance(snapshot.get("tasks"), Mapping) else {}
        records = snapshot.get("task_records") if isinstance(snapshot.get("task_records"), Mapping) else {}
        names = list(states) + [n for n in records if n not in states]
        name_w = max((len(n) for n in names), default=4)
        for name in names:
            record = records.get(name) if isinstance(records.get(name), Mapping) else {}
            state = str(states.get(name) or record.get("state") or "PENDING")
            took = task_duration(record, now)
            dur = fmt_duration(took) if took is not None else ""
            icon = _ICONS.get(state, "?")
            text = f"  {icon} {name.ljust(name_w)}  {state.ljust(9)}  {dur}".rstrip()
            lines.append(_paint(text[:width], state, colour))
        if not names:
            lines.append("  (no tasks yet)")
        if snapshot.get("error"):
            lines.append(f"error: {snapshot['error']}"[:width])
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
        lines = render(self.snapshot, run_id=self.run_id, now=time.time(), width=self.width, note=self.note, colour=self.colour)
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
