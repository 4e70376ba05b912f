"""The worker's side of live logs: ``log`` frames from run processes → chunks in ``PYOCO_LOGS``.

A :class:`RunDriver` hands each ``log`` frame of its child to :meth:`LogShipper.offer` (never
blocks: the lines go into one bounded buffer for the whole worker) and, before it appends the
run's terminal event, waits (briefly) in :meth:`LogShipper.flushed` until the attempt's lines are
stored, so a reader who sees the run end and reads the subject to its end has every line.

:meth:`LogShipper.run` publishes what is buffered in one bridge crossing per round (chunks of up
to ``CHUNK_LINES`` lines, pipelined, in order per run), on ``pyoco.logs.<run_id>``
(:mod:`pyoco_es.nats.logs` holds the chunk format).

Never slow a task, never lose a run: lines that do not fit (NATS slow or away: the buffer is full;
the run process could not send them; JetStream refused the chunk; the run reached
``PYOCO_LOGS_MAX_MSGS_PER_RUN`` chunks) are dropped and counted.  A marker chunk "N lines
dropped" is published before the run's next lines (for the per-run limit: once, when the attempt
ends, in the slot kept for it), and :attr:`LogShipper.dropped_total` goes into the worker's
registry record (``log_lines_dropped``), which the gateway's ``/metrics`` sums.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import attrs
import trio

from ..config import Settings
from ..core.errors import PyocoError
from ..nats.client import NatsClient
from ..nats.logs import CHUNK_CHARS, CHUNK_LINES, Line, chunk_body, marker_body, publish_chunks

log = logging.getLogger(__name__)

FLUSH_WAIT: Final = 5.0  # seconds an ending attempt waits for its lines to be stored, at most
FORGET_AFTER: Final = 600.0  # an attempt quiet this long with nothing pending is forgotten (one that never ended: lost)
GIVE_UP_AFTER: Final = 60.0  # an ended attempt whose marker NATS keeps refusing is forgotten (the metric keeps the count)

Key = tuple[str, int]  # (run id, attempt)


@attrs.define(eq=False)
class _AttemptLog:
    lines: list[Line] = attrs.Factory(list)
    dropped: int = 0  # not yet reported in a marker
    reason: str = ""
    chunks: int = 0  # chunks sent for this attempt (the per-run limit keeps one for the marker)
    limited: bool = False  # the per-run limit was reached: the marker waits for the end
    ending: bool = False
    in_flight: int = 0
    touched: float = 0.0  # trio clock of the last offer
    refused: bool = False  # NATS did not store the attempt's last chunk (an ending run does not wait for it)


def _valid_lines(raw: object) -> list[Line]:
    """The frame's lines that have the shape ``[task, try, stream, ts, text]`` (a run process
    is trusted code, but a malformed frame must not stop the shipping)."""
    if not isinstance(raw, list):
        return []
    return [line for line in raw if isinstance(line, list) and len(line) == 5 and isinstance(line[4], str)]


class LogShipper:
    """One per worker: the bounded buffer of lines from all its run processes and their sender."""

    def __init__(self, nats: NatsClient, settings: Settings) -> None:
        self.nats = nats
        self.buffer_lines = settings.logs_buffer_lines
        self.max_chunks = settings.logs_max_msgs_per_run
        self.dropped_total = 0
        self._attempts: dict[Key, _AttemptLog] = {}
        self._buffered = 0
        self._wake = trio.Event()
        self._round = trio.Event()  # set after every publishing round

    def _drop(self, state: _AttemptLog, count: int, reason: str) -> None:
        if count > 0:
            state.dropped += count
            state.reason = reason
            self.dropped_total += count

    def offer(self, run_id: str, attempt: int, frame: dict[str, Any]) -> None:
        """Take a ``log`` frame's lines (and the run process's own drop count)."""
        state = self._attempts.setdefault((run_id, attempt), _AttemptLog())
        state.touched = trio.current_time()
        lines = _valid_lines(frame.get("lines"))
        dropped = frame.get("dropped")
        if isinstance(dropped, int) and dropped > 0:
            self._drop(state, dropped, "the run process produced output faster than the worker took it")
        if state.limited:
            self._drop(state, len(lines), f"the run reached its log limit of {self.max_chunks} chunks (PYOCO_LOGS_MAX_MSGS_PER_RUN)")
            return
        room = self.buffer_lines - self._buffered
        if room < len(lines):
            self._drop(state, len(lines) - max(0, room), "NATS was too slow: the worker's log buffer was full (PYOCO_LOGS_BUFFER_LINES)")
            lines = lines[: max(0, room)]
        state.lines.extend(lines)
        self._buffered += len(lines)
        self._wake.set()

    async def flushed(self, run_id: str, attempt: int) -> None:
        """Wait (at most ``FLUSH_WAIT`` s) until the attempt's lines and its drop marker are
        stored.  Returns at once for an attempt that printed nothing.  What is still pending
        then (NATS slow) is published after the run's end; the attempt is forgotten once all
        of it is stored."""
        state = self._attempts.get((run_id, attempt))
        if state is None:
            return
        state.ending = True
        self._wake.set()
        with trio.move_on_after(FLUSH_WAIT):
            while (state.lines or state.in_flight or state.dropped) and not state.refused:
                await self._round.wait()
        if state.lines or state.in_flight or state.dropped:
            log.warning("run %s attempt %d: %d log lines still being stored as the run ends", run_id, attempt, len(state.lines))

    def _take(self, now: float) -> list[tuple[Key, _AttemptLog, bytes, int, int]]:
        """This round's chunks: (attempt, its state, body, lines in it, lines a marker reports),
        a run's marker before its lines."""
        out: list[tuple[Key, _AttemptLog, bytes, int, int]] = []
        now_t = trio.current_time()

        def done(s: _AttemptLog) -> bool:
            if s.in_flight:
                return False
            if s.ending and s.refused and s.touched < now_t - GIVE_UP_AFTER:
                return True  # NATS keeps refusing (no room, no stream): stop retrying its marker
            return (s.ending or s.touched < now_t - FORGET_AFTER) and not (s.lines or s.dropped)

        for key in [k for k, s in self._attempts.items() if done(s)]:
            self._buffered -= len(self._attempts[key].lines)
            del self._attempts[key]  # ended and stored, or quiet and never ended (lost, killed)
        for key, state in self._attempts.items():
            if state.dropped and (not state.limited or state.ending):
                out.append((key, state, marker_body(key[1], state.dropped, state.reason, now), 0, state.dropped))
                state.dropped = 0
            start = 0
            while start < len(state.lines):
                if state.chunks >= self.max_chunks - 1:  # keep the last slot for the marker
                    state.limited = True
                    rest = len(state.lines) - start
                    self._drop(state, rest, f"the run reached its log limit of {self.max_chunks} chunks (PYOCO_LOGS_MAX_MSGS_PER_RUN)")
                    break
                end, chars = start, 0
                while end < len(state.lines) and end - start < CHUNK_LINES and chars < CHUNK_CHARS:
                    chars += len(state.lines[end][4]) + 40
                    end += 1
                out.append((key, state, chunk_body(key[1], state.lines[start:end]), end - start, 0))
                state.chunks += 1
                start = end
            self._buffered -= len(state.lines)
            state.lines = []
        return out

    async def run(self) -> None:
        """Publish buffered lines until cancelled (one round at a time, so a run's chunks stay
        in order)."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            chunks = self._take(time.time())
            for chunk in chunks:
                chunk[1].in_flight += 1
            try:
                results: list[Any] = await publish_chunks(self.nats, [(chunk[0][0], chunk[2]) for chunk in chunks])
            except PyocoError as exc:
                results = [exc] * len(chunks)
            for (key, state, _body, lines, reported), res in zip(chunks, results, strict=True):
                state.in_flight -= 1
                state.refused = isinstance(res, PyocoError)
                if not state.refused:
                    continue
                if reported:  # a marker that was not stored: it goes again with the next round
                    state.dropped += reported
                else:
                    log.warning("run %s: %d log lines not stored: %s", key[0], lines, res)
                    self._drop(state, lines, f"NATS did not store them ({res.message[:200]})")
            self._round.set()
            self._round = trio.Event()
            # What this round left or made publishable (a marker for lines it dropped at the
            # per-run limit of an ending attempt, a marker NATS refused) goes in the next one.
            if any(s.lines or (s.dropped and (not s.limited or s.ending)) for s in self._attempts.values()):
                if any(isinstance(res, PyocoError) for res in results):
                    await trio.sleep(0.5)  # NATS refuses: try again soon, not in a hot loop
                self._wake.set()


__all__ = ["LogShipper"]
