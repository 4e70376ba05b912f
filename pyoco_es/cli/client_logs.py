"""``pyoco-client logs``: a run's task output (``GET /runs/{id}/logs``), or its live tail
(``GET /runs/{id}/logs/stream``, resumed with ``Last-Event-ID`` after a dropped connection).

Task output is untrusted text: every control character (a task printing ``\\x1b[2J`` must not
clear the user's terminal) and every bidirectional override is shown escaped (``\\x1b[2J``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any, Final

import asyncclick as click
import httpx
import trio

from .client_command import ClientCommand, api_command
from .client_errors import ERR_HTTP, CliError
from .client_http import REQUEST_TIMEOUT, RETRYABLE_STATUSES, SSE_READ_TIMEOUT, Api, SseParser, http_error
from .client_output import write_json

# C0 controls but tab, DEL, C1 controls, and the bidi/format characters that reorder or hide text.
_UNSAFE: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
RECONNECT_GIVE_UP_SEC: Final = 120.0
RECONNECT_BACKOFF: Final = (0.1, 0.2, 0.5, 1.0, 2.0)


def escape_terminal(text: str) -> str:
    """``text`` safe to print on a terminal: control and bidi characters become visible escapes
    (``\\x1b``, ``\\u202e``); everything else is unchanged."""

    def one(m: re.Match[str]) -> str:
        code = ord(m.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNSAFE.sub(one, text)


def render_line(line: dict[str, Any]) -> str:
    """One line for a terminal: ``[task] text``, the stream named when it is not stdout."""
    task = line.get("task")
    stream = str(line.get("stream") or "stdout")
    label = escape_terminal(str(task)) if task else "-"
    if stream != "stdout":
        label = f"{label} {escape_terminal(stream)}"
    return f"[{label}] {escape_terminal(str(line.get('text', '')))}"


def print_lines(lines: Iterable[dict[str, Any]], output: str) -> None:
    if output == "json":
        for line in lines:
            write_json(line)
        return
    text = "".join(render_line(line) + "\n" for line in lines)
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _filters(task: str | None, stream: str | None) -> list[tuple[str, Any]]:
    params: list[tuple[str, Any]] = []
    if task:
        params.append(("task", task))
    if stream:
        params.append(("stream", stream))
    return params


async def print_all(api: Api, run_id: str, params: list[tuple[str, Any]], output: str) -> None:
    after = 0
    while True:
        body = await api.get_json(f"/runs/{run_id}/logs", params=[*params, ("after", after)])
        if not isinstance(body, dict):
            raise CliError(ERR_HTTP, "unexpected response", reason=f"GET /runs/{run_id}/logs did not return an object")
        print_lines(body.get("lines") or [], output)
        after = int(body.get("next") or after)
        if not body.get("more"):
            return


async def _stream_once(api: Api, run_id: str, params: list[tuple[str, Any]], last_id: int | None, output: str) -> tuple[int | None, bool]:
    """One SSE connection; returns (the last id seen, whether the server said ``end``)."""
    headers = {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    timeout = httpx.Timeout(REQUEST_TIMEOUT.connect, read=SSE_READ_TIMEOUT)
    async with api.http.stream("GET", f"/runs/{run_id}/logs/stream", params=params, headers=headers, timeout=timeout) as response:
        if response.status_code >= 400:
            await response.aread()
            error = http_error(response, api.settings)
            if response.status_code in RETRYABLE_STATUSES:
                raise httpx.TransportError(error.reason or error.message)
            raise error
        parser = SseParser()
        async for raw in response.aiter_lines():
            event = parser.feed(raw.rstrip("\r"))
            if event is None:
                continue
            if event.event == "end":
                return last_id, True
            if event.event == "logs" and isinstance(event.data, dict):
                print_lines(event.data.get("lines") or [], output)
                if event.seq is not None:
                    last_id = event.seq
    return last_id, False


async def follow(api: Api, run_id: str, params: list[tuple[str, Any]], output: str) -> None:
    """Print lines as they are stored until the run has ended and its output is read; a dropped
    connection is resumed after the last line printed (nothing twice, nothing missed)."""
    last_id: int | None = None
    failures = 0
    outage: float | None = None
    while True:
        try:
            last_id, ended = await _stream_once(api, run_id, params, last_id, output)
        except (httpx.TransportError, httpx.StreamError) as exc:
            now = trio.current_time()
            outage = outage if outage is not None else now
            if last_id is None and failures == 0 and isinstance(exc, httpx.ConnectError):
                raise CliError(ERR_HTTP, "connection error", reason=f"cannot reach the server at {api.settings.server} ({exc})") from exc
            if now - outage > RECONNECT_GIVE_UP_SEC:
                raise CliError(ERR_HTTP, "connection error", reason=f"lost the log stream of {run_id} ({exc})") from exc
            await trio.sleep(RECONNECT_BACKOFF[min(failures, len(RECONNECT_BACKOFF) - 1)])
            failures += 1
            continue
        failures, outage = 0, None
        if ended:
            return


@click.command("logs", cls=ClientCommand)
@click.argument("run_id")
@click.option("--task", default=None, help="Only this task's lines.")
@click.option("--stream", type=click.Choice(["stdout", "stderr", "log"]), default=None, help="Only this stream (log: logging records).")
@click.option("--follow", "-f", "follow_", is_flag=True, help="Keep printing new lines until the run has ended (live tail).")
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True, help="text: [task] line; json: one line object per line.")
@api_command
async def logs_cmd(api: Api, run_id: str, task: str | None, stream: str | None, follow_: bool, output: str) -> None:
    """Print what a run's tasks wrote (stdout, stderr, logging), live with --follow.

    Control characters in task output are shown escaped (\\x1b), never sent to the terminal.
    A "[pyoco-es] N lines dropped" line says output was dropped (log limits, NATS too slow).

    \b
    Examples:
      pyoco-client logs RUN_ID
      pyoco-client logs RUN_ID --task fetch --stream stderr
      pyoco-client logs RUN_ID --follow
    """
    params = _filters(task, stream)
    if follow_:
        await follow(api, run_id, params, output)
    else:
        await print_all(api, run_id, params, output)


__all__ = ["escape_terminal", "logs_cmd", "render_line"]
