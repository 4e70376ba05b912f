"""``pyoco-client`` bulk commands (issue 18) and dead letters (issue 15):

- ``submit-batch FILE.jsonl``: one ``POST /runs`` body per line (or a ``workflow_yaml`` item),
  sent through ``POST /runs/batch`` in chunks of at most 1000 lines, progress on stderr;
- ``cancel --filter status=RUNNING --filter flow_name=x``: ``POST /runs/cancel`` by filter, after
  a confirmation (or ``--yes``), repeated until no matching active run is left;
- ``dlq list | show ID | resubmit ID | drop ID``.

:func:`register` adds them to the client group; the filter options are added to its ``cancel``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncclick as click
import trio

from .client_command import ClientCommand, ClientGroup, api_command
from .client_errors import EXIT_ERROR, EXIT_OK, input_error
from .client_http import Api
from .client_output import fmt_time, render_table, terminal_width, write_json, write_text

F = TypeVar("F", bound=Callable[..., Any])

CHUNK_ITEMS: Final = 1000  # the gateway's limit per POST /runs/batch
CHUNK_BYTES: Final = 900 * 1024  # under the gateway's 1 MiB body limit
FILTER_KEYS: Final = {"status": "status", "flow_name": "flow_name", "flow": "flow_name", "tag": "tag"}
DLQ_COLUMNS: Final = ("id", "reason", "run_id", "flow_name", "when", "size", "resubmitted", "error")


def _progress(text: str) -> None:
    click.echo(text, file=sys.stderr)


# -- submit-batch ---------------------------------------------------------------------------------


Line = tuple[int, dict[str, Any], int]  # line number, the item, its size in bytes


def read_jsonl(path: str) -> tuple[list[Line], list[dict[str, Any]]]:
    """(line number, item, size) of every non-blank line, and the lines that are not a JSON object."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise input_error(f"cannot read {path}: {exc.strerror or exc}") from exc
    items: list[Line] = []
    bad: list[dict[str, Any]] = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            bad.append({"line": n, "status": "invalid", "error": f"not JSON: {exc}"})
            continue
        if not isinstance(doc, dict):
            bad.append({"line": n, "status": "invalid", "error": "each line must be a JSON object (a POST /runs body)"})
            continue
        items.append((n, doc, len(raw)))
    return items, bad


def chunks(items: list[Line]) -> Iterator[list[Line]]:
    """At most CHUNK_ITEMS items and about CHUNK_BYTES of JSON per request (a line larger than that goes alone)."""
    chunk: list[Line] = []
    size = 0
    for item in items:
        if chunk and (len(chunk) == CHUNK_ITEMS or size + item[2] > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item[2] + 1
    if chunk:
        yield chunk


@click.command("submit-batch", cls=ClientCommand)
@click.argument("file", metavar="FILE.jsonl")
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: a summary and one line per failure; json: every line's result.")
@api_command
async def submit_batch_cmd(api: Api, file: str, output: str) -> int:
    """Submit many runs from a JSON Lines file: one POST /runs body per line.

    A line may also carry "idempotency_key", or "workflow_yaml" (flow.yaml text) with
    "flow_name" and "tag" instead of params.  Lines go in chunks of at most 1000 through
    POST /runs/batch; a refused line is reported and the others are still submitted.
    Exit 1 when any line was refused or unreadable.

    \b
    Examples:
      pyoco-client submit-batch runs.jsonl
      printf '{"flow_name": "main", "params": {"x": 1}}\\n' > runs.jsonl
    """
    items, results = read_jsonl(file)
    total = len(items)
    counts = {"accepted": 0, "duplicate": 0, "refused": 0}
    sent = 0
    for chunk in chunks(items):
        answer = await api.post_json("/runs/batch", json_body={"items": [doc for _, doc, _ in chunk]})
        for (line, _, _), res in zip(chunk, answer.get("results", []), strict=False):
            counts[str(res.get("status"))] = counts.get(str(res.get("status")), 0) + 1
            results.append({"line": line, **{k: v for k, v in res.items() if k != "index"}})
        sent += len(chunk)
        _progress(f"submit-batch: {sent}/{total} lines sent (accepted {counts['accepted']}, duplicate {counts['duplicate']}, refused {counts['refused']})")
    results.sort(key=lambda r: int(r["line"]))
    failed = [r for r in results if r["status"] in ("refused", "invalid")]
    summary = {**counts, "invalid": sum(1 for r in results if r["status"] == "invalid"), "lines": total + sum(1 for r in results if r["status"] == "invalid")}
    if output == "json":
        write_json({**summary, "results": results})
    else:
        for r in failed:
            write_text(f"line {r['line']}: {r['status']}: {r.get('error', '')}")
        write_text(" ".join(f"{k}={v}" for k, v in summary.items()))
    return EXIT_ERROR if failed else EXIT_OK


# -- cancel --filter --------------------------------------------------------------------------------


def cancel_filter_options(fn: F) -> F:
    fn = click.option("--yes", "-y", is_flag=True, help="With --filter: do not ask for confirmation.")(fn)
    fn = click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
                      help="Cancel every active run matching all filters (status, flow_name, tag; repeatable) instead of one --run-id.")(fn)
    return fn


def parse_filters(filters: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in filters:
        key, sep, value = f.partition("=")
        name = FILTER_KEYS.get(key.strip().lower())
        if not sep or name is None or not value.strip():
            raise input_error(f"invalid --filter {f!r}: use KEY=VALUE with KEY one of status, flow_name, tag",
                              hint="e.g. --filter status=RUNNING --filter flow_name=etl")
        out[name] = value.strip().upper() if name == "status" else value.strip()
    return out


async def cancel_by_filter(api: Api, filters: tuple[str, ...], yes: bool) -> int:
    """Confirm, then ``POST /runs/cancel`` with the filter until no matching active run is left."""
    flt = parse_filters(filters)
    shown = ", ".join(f"{k}={v}" for k, v in flt.items())
    if not yes:
        if not sys.stdin.isatty():
            raise input_error(f"cancelling every run matching {shown} needs a confirmation", hint="pass --yes to confirm without a prompt")
        if not await trio.to_thread.run_sync(lambda: click.confirm(f"Cancel every active run matching {shown}?", err=True), abandon_on_cancel=True):
            _progress("nothing cancelled")
            return EXIT_ERROR
    report: dict[str, list[str]] = {"cancel_requested": [], "already_cancelling": [], "already_terminal": [], "not_found": []}
    while True:
        answer = await api.post_json("/runs/cancel", json_body={"filter": flt})
        for key in report:
            report[key] += [str(r) for r in answer.get(key, [])]
        _progress(f"cancel: {len(report['cancel_requested'])} run(s) asked to cancel so far")
        if not answer.get("more") or not answer.get("cancel_requested"):
            break
    write_json(report)
    return EXIT_OK


# -- dlq -------------------------------------------------------------------------------------------


@click.group("dlq", cls=ClientGroup, no_args_is_help=True)
def dlq_group() -> None:
    """Inspect dead letters: work items and runs a worker gave up on (PYOCO_DLQ).

    \b
    Examples:
      pyoco-client dlq list
      pyoco-client dlq show 12
      pyoco-client dlq resubmit 12
      pyoco-client dlq drop 12
    """


def _resubmitted(item: dict[str, Any]) -> str:
    """The newest run made from the dead letter (its first 8 characters, as the dashboard's short
    ids; ``dlq show`` has them whole) and how many more there were: ``"eb2f77a4 (+1)"``."""
    runs = [r for r in item.get("resubmitted") or [] if isinstance(r, dict)]
    if not runs:
        return ""
    return str(runs[-1].get("run_id") or "")[:8] + (f" (+{len(runs) - 1})" if len(runs) > 1 else "")


def _dlq_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    return [[it.get("id"), it.get("reason"), it.get("run_id"), it.get("flow_name"), fmt_time(it.get("timestamp", it.get("stored_at"))),
             it.get("size"), _resubmitted(it), (str(it.get("error") or "")).splitlines()[0] if it.get("error") else ""] for it in items]


@dlq_group.command("list")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True, help="Dead letters per page.")
@click.option("--before", type=click.IntRange(min=1), default=None, help="Only ids below this (the next_cursor of a previous page).")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@api_command
async def dlq_list_cmd(api: Api, limit: int, before: int | None, output: str) -> None:
    """List dead letters, newest first: id, reason, run, flow, when, size, error; and when one on
    the page was re-submitted, the run it was last re-submitted as (with how many more)."""
    params: list[tuple[str, Any]] = [("limit", limit)] + ([("before", before)] if before else [])
    body = await api.get_json("/dlq", params=params)
    if output == "json":
        write_json(body)
        return
    items = list(body.get("items", []))
    rows = _dlq_rows(items)
    columns = DLQ_COLUMNS
    if not any(_resubmitted(it) for it in items):  # the column only when a dead letter on the page has one
        at = DLQ_COLUMNS.index("resubmitted")
        columns, rows = DLQ_COLUMNS[:at] + DLQ_COLUMNS[at + 1 :], [r[:at] + r[at + 1 :] for r in rows]
    write_text(render_table(columns, rows, terminal_width()))
    if body.get("next_cursor"):
        write_text(f"(more: --before {body['next_cursor']})")


@dlq_group.command("show")
@click.argument("dlq_id", type=click.IntRange(min=1))
@api_command
async def dlq_show_cmd(api: Api, dlq_id: int) -> None:
    """Print one dead letter with its payload (as JSON)."""
    write_json(await api.get_json(f"/dlq/{dlq_id}"))


@dlq_group.command("resubmit")
@click.argument("dlq_id", type=click.IntRange(min=1))
@click.option("--idempotency-key", default=None, help="Send an Idempotency-Key: resubmitting again with it returns the same new run.")
@api_command
async def dlq_resubmit_cmd(api: Api, dlq_id: int, idempotency_key: str | None) -> None:
    """Submit the dead letter's run again, as a new run (prints the new run's id)."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    write_json(await api.post_json(f"/dlq/{dlq_id}/resubmit", headers=headers))


@dlq_group.command("drop")
@click.argument("dlq_id", type=click.IntRange(min=1))
@api_command
async def dlq_drop_cmd(api: Api, dlq_id: int) -> None:
    """Delete a dead letter (recorded in the audit history)."""
    response = await api.request("DELETE", f"/dlq/{dlq_id}")
    write_json(response.json())


def register(group: click.Group) -> None:
    """Add the bulk and dead-letter commands to the client group."""
    group.add_command(submit_batch_cmd)
    group.add_command(dlq_group)
