"""pyoco-client's waiting and watching: following a run to its end (live view, JSON lines or
quietly), the exit code its outcome gives, and what submit does with --wait/--watch."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Final

import trio

from .client_errors import ERR_WAIT, EXIT_OK, OUTCOME_EXIT_CODES, WaitTimeout
from .client_http import TERMINAL_STATUSES, Api, SseEvent, WatchOptions, WatchResult, follow_run
from .client_live import LiveView
from .client_output import terminal_width, watch_status_line, write_json, write_text
from .client_params import sub_command


CANCEL_WAIT_MARGIN: Final = 5.0  # past the longest a cancel may take: appends, projection, the stream


def default_cancel_wait() -> float:
    """How long ``cancel --wait`` waits by default: the longest a cancel may take."""
    grace, lease = cancel_timing()
    return grace + 2 * lease + CANCEL_WAIT_MARGIN


def cancel_timing() -> tuple[float, float]:
    """(cancel grace, run lease) in seconds, as the server's environment sets them (same names,
    same ``.env``); the client cannot ask the server, so it reads what the operator configured."""
    from ..config import Settings

    settings = Settings.from_env()
    return settings.cancel_grace_period, settings.run_lease_seconds


def _stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


async def watch_run(
    api: Api,
    options: WatchOptions,
    *,
    output: str,
    max_events: int = 0,
) -> WatchResult:
    """Follow a run's SSE stream and print it as ``output`` (json, status, live or none)."""
    result = WatchResult()
    send, recv = trio.open_memory_channel[SseEvent](0)
    view = LiveView(sys.stdout, options.run_id, width=max(20, (terminal_width() or 80) - 1)) if output == "live" else None

    def on_reconnect(lost: bool) -> None:
        note = "connection lost; reconnecting…" if lost else ""
        if view is not None:
            view.set_note(note)
        elif output != "none":
            _stderr(f"watch {options.run_id}: {'connection lost; reconnecting' if lost else 'reconnected'}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(follow_run, api, options, send, result, on_reconnect=on_reconnect))
        if view is not None:
            nursery.start_soon(view.run_ticker)
        count = 0
        async with recv:
            async for event in recv:
                if view is not None:
                    view.update(event)
                    view.draw()
                elif output == "json":
                    write_json(event.to_json())
                elif output == "status":
                    write_text(watch_status_line(event.event, event.data))
                count += 1
                if max_events and count >= max_events:
                    break
                # This event's own status: ``result`` may already describe a later frame the
                # follower has parsed but not handed over yet (it would never be shown).
                if options.until_terminal and event.status in TERMINAL_STATUSES:
                    break
        nursery.cancel_scope.cancel()
    if view is not None:
        view.note = ""
        view.draw()
    return result


def outcome_code(result: WatchResult, run_id: str, waited: float | None) -> int:
    if result.terminal and result.status is not None:
        return OUTCOME_EXIT_CODES.get(result.status, EXIT_OK)
    raise WaitTimeout(
        ERR_WAIT,
        "wait timeout",
        reason=f"run {run_id} is still {result.status or 'not finished'} after {waited:g} s" if waited else f"run {run_id} did not finish",
        hint=f"keep following it with `{sub_command('watch')} {run_id}`",
    )


def default_watch_output() -> str:
    return "live" if sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb" else "json"


async def after_submit(api: Api, submitted: Any, *, wait: bool, watch: bool, timeout_sec: float | None) -> int:
    """Print the submit answer, then optionally wait for / watch the run; return the exit code."""
    run_id = submitted.get("run_id") if isinstance(submitted, dict) else None
    if not (wait or watch) or not run_id:
        write_json(submitted)
        return EXIT_OK
    options = WatchOptions(run_id=str(run_id), records=watch, timeout_sec=timeout_sec, until_terminal=True)
    if watch:
        output = default_watch_output()
        if output == "json":
            write_json(submitted)
        result = await watch_run(api, options, output=output)
        return outcome_code(result, str(run_id), timeout_sec)
    if sys.stderr.isatty():
        _stderr(f"submitted {run_id}; waiting for it to finish…")
    result = await watch_run(api, options, output="none")
    code = outcome_code(result, str(run_id), timeout_sec)
    write_json(await api.get_json(f"/runs/{run_id}"))
    return code

