"""``pyoco-client``: the command line client of the pyoco HTTP API (contract §5.3), on asyncclick + Trio.

pyoco-server's subcommands, flags, output and error shapes, plus: a live terminal view for
``watch``, resumable watching (``Last-Event-ID``), exit codes that tell a run's outcome,
``--wait``/``--watch``/``--idempotency-key`` on submit, and ``events`` (the audit history).

The group is exported as :data:`client` so the umbrella ``pyoco-es`` command can mount it as
``pyoco-es client``; :func:`main` is the ``pyoco-client`` console script.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncclick as click

from ..lifeline import exit_with_parent
from . import client_wheels
from .client_bulk import cancel_by_filter, cancel_filter_options, register
from .client_command import ClientGroup, api_command
from .client_errors import ERR_CANCEL, EXIT_INTERRUPTED, EXIT_OK, CliError, input_error
from .client_http import Api, ClientSettings, WatchOptions
from .client_logs import logs_cmd
from .client_output import (
    EVENT_COLUMNS,
    RUN_COLUMNS,
    WORKER_COLUMNS,
    event_rows,
    render_table,
    run_rows,
    terminal_width,
    worker_rows,
    write_json,
    write_text,
)
from .client_plugins import PLUGIN_COLUMNS, plugin_rows
from .client_params import build_params, check_tag, parse_tags, read_text_file, sub_command
from .client_watch import after_submit, cancel_timing, default_cancel_wait, default_watch_output, outcome_code, watch_run

DEFAULT_SERVER: Final = "http://127.0.0.1:8000"
_CONTEXT: Final = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

F = TypeVar("F", bound=Callable[..., Any])


# -- the group -----------------------------------------------------------------------------------


@click.group("client", cls=ClientGroup, context_settings=_CONTEXT, no_args_is_help=True)
@click.option(
    "--server",
    default=DEFAULT_SERVER,
    show_default=True,
    envvar="PYOCO_SERVER_URL",
    show_envvar=True,
    help="Base URL of the gateway.",
)
@click.option("--api-key", default=None, envvar="PYOCO_API_KEY", show_envvar=True, help="API key, when the gateway has auth on.")
@click.option(
    "--api-key-header",
    default="X-API-Key",
    show_default=True,
    envvar="PYOCO_HTTP_API_KEY_HEADER",
    show_envvar=True,
    help="Header that carries the API key.",
)
@click.version_option(package_name="pyoco-es", message="%(prog)s (pyoco-es) %(version)s")
@click.pass_context
async def client(ctx: click.Context, server: str, api_key: str | None, api_key_header: str) -> None:
    """Submit, inspect, watch and cancel pyoco runs over HTTP.

    Talks to a pyoco-es gateway (or a pyoco-server) through its HTTP API only.

    \b
    Examples:
      pyoco-client submit --flow-name main --param x=1 --wait
      pyoco-client submit-yaml --workflow-file flow.yaml --flow-name main --watch
      pyoco-client list --output table
      pyoco-client watch RUN_ID
      pyoco-client events RUN_ID

    \b
    Exit codes: 0 success (run COMPLETED when waiting), 1 error,
    2 run FAILED, 3 run CANCELLED (when waiting or watching until the end),
    4 wait/watch timed out before the run ended, 130 interrupted (Ctrl-C).
    """
    ctx.obj = ClientSettings(
        server=server,
        api_key=api_key or None,
        api_key_header=api_key_header,
        command_path=ctx.command_path,
    )


# -- parameter helpers -------------------------------------------------------------------------


def _json_or_table(default: str) -> Callable[[F], F]:
    return click.option(
        "--output",
        type=click.Choice(["json", "table"]),
        default=default,
        show_default=True,
        help="json: the server's JSON; table: columns that fit the terminal.",
    )


def _items(body: Any) -> list[dict[str, Any]]:
    """A list answer, or the ``items`` (``events``) of a ``{"items": [...]}`` answer."""
    items = body.get("items", body.get("events")) if isinstance(body, dict) else body
    return [it for it in items if isinstance(it, dict)] if isinstance(items, list) else []


def _print_items(body: Any, output: str, columns: Sequence[str], rows: Callable[[list[dict[str, Any]]], list[list[Any]]]) -> None:
    if output == "table":
        write_text(render_table(columns, rows(_items(body)), terminal_width()))
    else:
        write_json(body.get("items", []) if isinstance(body, dict) else body)


# -- waiting and watching ---------------------------------------------------------------------


def _wait_options(fn: F) -> F:
    fn = click.option("--timeout-sec", type=click.FloatRange(min=0.1), default=None, help="With --wait/--watch: give up after this many seconds (exit 4). Default: no limit.")(fn)
    fn = click.option("--watch", "watch", is_flag=True, help="Then watch the run until it ends (live view on a terminal, JSON lines otherwise); exit code tells the outcome.")(fn)
    fn = click.option("--wait", "wait", is_flag=True, help="Then wait until the run ends and print its final snapshot; exit 0 COMPLETED, 2 FAILED, 3 CANCELLED.")(fn)
    fn = click.option("--idempotency-key", default=None, help="Send an Idempotency-Key header: resubmitting with the same key returns the same run instead of starting another.")(fn)
    return fn


_run_timeout_option = click.option(
    "--run-timeout-sec", type=click.FloatRange(min=0, min_open=True), default=None,
    help="The run's deadline: past this many seconds after submission it ends FAILED (reason timeout), wherever it is.",
)


def _idempotency_headers(key: str | None) -> dict[str, str] | None:
    return {"Idempotency-Key": key} if key else None


# -- commands ---------------------------------------------------------------------------------


@client.command("submit")
@click.option("--flow-name", default="main", show_default=True, help="Name of the flow to run.")
@click.option("--params", default=None, help='Params as a JSON object, e.g. \'{"x": 1}\'.')
@click.option("--params-file", default=None, help="A JSON or YAML file holding the params object.")
@click.option("--param", multiple=True, metavar="KEY=VALUE", help="One param (repeatable); VALUE is JSON if it parses, else a string. Wins over --params and --params-file.")
@click.option("--tag", default=None, help="Routing tag: which workers may run it (default: the server's default tag).")
@click.option("--tags", default=None, help="Display tags, comma separated.")
@_run_timeout_option
@_wait_options
@api_command
async def submit_cmd(
    api: Api,
    flow_name: str,
    params: str | None,
    params_file: str | None,
    param: tuple[str, ...],
    tag: str | None,
    tags: str | None,
    run_timeout_sec: float | None,
    idempotency_key: str | None,
    wait: bool,
    watch: bool,
    timeout_sec: float | None,
) -> int:
    """Submit a run of a named flow.

    Params merge in the order --params-file, --params, --param (later wins).
    Prints the server's answer ({"run_id", "status", ...}) as JSON.

    \b
    Examples:
      pyoco-client submit --flow-name main --param x=1 --param name=alice
      pyoco-client submit --params-file params.yaml --tag gpu --wait
      pyoco-client submit --idempotency-key order-42 --params '{"order": 42}'
      pyoco-client submit --flow-name nightly --run-timeout-sec 600 --watch
    """
    body: dict[str, Any] = {"flow_name": flow_name, "params": build_params(params_file, params, param)}
    checked = check_tag(tag, "submit")
    if checked is not None:
        body["tag"] = checked
    tag_list = parse_tags(tags)
    if tag_list is not None:
        body["tags"] = tag_list
    if run_timeout_sec is not None:
        body["timeout_sec"] = run_timeout_sec
    submitted = await api.post_json("/runs", json_body=body, headers=_idempotency_headers(idempotency_key))
    return await after_submit(api, submitted, wait=wait, watch=watch, timeout_sec=timeout_sec)


@client.command("submit-yaml")
@click.option("--workflow-file", required=True, help="Path to a flow.yaml.")
@click.option("--flow-name", required=True, help="Name to record for the run.")
@click.option("--tag", default=None, help="Routing tag (default: the server's default tag).")
@_run_timeout_option
@_wait_options
@api_command
async def submit_yaml_cmd(
    api: Api,
    workflow_file: str,
    flow_name: str,
    tag: str | None,
    run_timeout_sec: float | None,
    idempotency_key: str | None,
    wait: bool,
    watch: bool,
    timeout_sec: float | None,
) -> int:
    """Submit a run of a flow.yaml file.

    The file is uploaded as multipart form data.
    The flow's params are its `flow.defaults`.

    \b
    Examples:
      pyoco-client submit-yaml --workflow-file flow.yaml --flow-name main --tag default
      pyoco-client submit-yaml --workflow-file flow.yaml --flow-name nightly --wait && next-step
    """
    text = read_text_file(workflow_file, flag="--workflow-file")
    data = {"flow_name": flow_name}
    checked = check_tag(tag, "submit-yaml")
    if checked is not None:
        data["tag"] = checked
    if run_timeout_sec is not None:  # else the document's runtime.timeout_sec, if any
        data["timeout_sec"] = repr(run_timeout_sec)
    files = {"workflow": (Path(workflow_file).name or "flow.yaml", text.encode("utf-8"), "application/x-yaml")}
    submitted = await api.post_json("/runs/yaml", files=files, data=data, headers=_idempotency_headers(idempotency_key))
    return await after_submit(api, submitted, wait=wait, watch=watch, timeout_sec=timeout_sec)


@client.command("get")
@click.argument("run_id")
@click.option("--records", is_flag=True, help="Include task_records (inputs, outputs, errors, durations).")
@api_command
async def get_cmd(api: Api, run_id: str, records: bool) -> None:
    """Print a run's snapshot as JSON.

    \b
    Example:
      pyoco-client get 0b7c3e9a9d2f4c1e8a5f6d7c8b9a0e1f --records
    """
    params = [("include", "records")] if records else None
    write_json(await api.get_json(f"/runs/{run_id}", params=params))


@client.command("tasks")
@click.argument("run_id")
@api_command
async def tasks_cmd(api: Api, run_id: str) -> None:
    """Print a run's tasks and task records as JSON.

    \b
    Example:
      pyoco-client tasks 0b7c3e9a9d2f4c1e8a5f6d7c8b9a0e1f
    """
    write_json(await api.get_json(f"/runs/{run_id}/tasks"))


def _list_params(status: str | None, flow: str | None, tag: str | None, full: bool, limit: int | None) -> list[tuple[str, Any]]:
    params: list[tuple[str, Any]] = []
    for key, value in (("status", status), ("flow", flow), ("tag", tag)):
        if value:
            params.append((key, value))
    if full:
        params.append(("include", "full"))
    if limit is not None:
        params.append(("limit", limit))
    return params


def _list_options(fn: F) -> F:
    fn = click.option("--limit", type=click.IntRange(1, 200), default=None, help="At most this many runs (server default 50).")(fn)
    fn = click.option("--full", is_flag=True, help="Whole snapshots instead of summaries (JSON output).")(fn)
    fn = click.option("--tag", default=None, help="Only runs routed to this tag.")(fn)
    fn = click.option("--flow", default=None, help="Only runs of this flow name.")(fn)
    fn = click.option("--status", default=None, help="Only runs in this status (PENDING, RUNNING, COMPLETED, ...).")(fn)
    return fn


@client.command("list")
@_list_options
@_json_or_table("json")
@api_command
async def list_cmd(api: Api, status: str | None, flow: str | None, tag: str | None, full: bool, limit: int | None, output: str) -> None:
    """List runs, newest first.

    \b
    Examples:
      pyoco-client list --status RUNNING --output table
      pyoco-client list --flow main --limit 10
    """
    body = await api.get_json("/runs", params=_list_params(status, flow, tag, full, limit))
    _print_items(body, output, RUN_COLUMNS, run_rows)


@client.command("list-vnext")
@_list_options
@click.option("--updated-after", type=float, default=None, help="Only runs updated after this unix time (delta mode).")
@click.option("--cursor", default=None, help="Continue after this next_cursor from a previous page.")
@click.option("--workflow-yaml-sha256", default=None, help="Only runs of this flow.yaml (sha256 of its bytes).")
@_json_or_table("json")
@api_command
async def list_vnext_cmd(
    api: Api,
    status: str | None,
    flow: str | None,
    tag: str | None,
    full: bool,
    limit: int | None,
    updated_after: float | None,
    cursor: str | None,
    workflow_yaml_sha256: str | None,
    output: str,
) -> None:
    """List runs in delta mode (items plus next_cursor).

    Prints {"items": [...], "next_cursor": ...} as JSON.
    The table output ends with a `next_cursor: X` line when there are more pages.

    \b
    Examples:
      pyoco-client list-vnext --limit 20 --output table
      pyoco-client list-vnext --cursor eyJ1Ijo... --limit 20
      pyoco-client list-vnext --updated-after 1767225600
    """
    params = _list_params(status, flow, tag, full, limit)
    if updated_after is None and not cursor and not workflow_yaml_sha256:
        updated_after = 0.0  # ask for delta mode (paged, with next_cursor) even without a filter
    if updated_after is not None:
        params.append(("updated_after", updated_after))
    if cursor:
        params.append(("cursor", cursor))
    if workflow_yaml_sha256:
        params.append(("workflow_yaml_sha256", workflow_yaml_sha256))
    body = await api.get_json("/runs", params=params)
    if isinstance(body, list):
        body = {"items": body, "next_cursor": None}
    if output == "table":
        write_text(render_table(RUN_COLUMNS, run_rows(_items(body)), terminal_width()))
        if isinstance(body, dict) and body.get("next_cursor"):
            write_text(f"next_cursor: {body['next_cursor']}")
    else:
        write_json(body)


@client.command("watch")
@click.argument("run_id")
@click.option("--records", is_flag=True, help="Include task_records in each snapshot.")
@click.option("--since", type=float, default=None, help="Skip snapshots not updated since this unix time.")
@click.option("--timeout-sec", type=click.FloatRange(min=1), default=None, help="Stop watching after this many seconds (default: 60, or until the end with --until-terminal or the live view).")
@click.option("--max-events", type=click.IntRange(min=0), default=0, show_default=True, help="Stop after this many events (0 = unlimited).")
@click.option("--until-terminal", is_flag=True, help="Stop when the run ends; the exit code tells the outcome (0 COMPLETED, 2 FAILED, 3 CANCELLED, 4 timed out).")
@click.option(
    "--output",
    type=click.Choice(["json", "status", "live"]),
    default=None,
    help="json: one JSON line per event; status: ts<TAB>event<TAB>status<TAB>run_id; live: status and tasks updated in place. Default: live on a terminal, json otherwise.",
)
@api_command
async def watch_cmd(
    api: Api,
    run_id: str,
    records: bool,
    since: float | None,
    timeout_sec: float | None,
    max_events: int,
    until_terminal: bool,
    output: str | None,
) -> int:
    """Follow a run's progress (Server-Sent Events).

    Reconnects by itself after a dropped connection (Last-Event-ID), printing nothing twice.
    On a terminal it shows a live view of the run's status and each task's state and
    duration, and follows the run until it ends.

    \b
    Examples:
      pyoco-client watch RUN_ID
      pyoco-client watch RUN_ID --until-terminal --output status
      pyoco-client watch RUN_ID --output json --max-events 5
    """
    output = output or default_watch_output()
    live = output == "live"
    options = WatchOptions(
        run_id=run_id,
        records=records or live,
        since=since,
        timeout_sec=timeout_sec,
        until_terminal=until_terminal or (live and timeout_sec is None),
    )
    result = await watch_run(api, options, output=output, max_events=max_events)
    if options.until_terminal and (result.terminal or result.timed_out):
        return outcome_code(result, run_id, timeout_sec)
    return EXIT_OK  # stopped by --max-events, or the watch window ended


@client.command("cancel")
@click.option("--run-id", default=None, help="The run to cancel.")
@click.option("--wait", is_flag=True, help="Wait until the run has ended, then print its final snapshot.")
@click.option(
    "--timeout-sec",
    type=click.FloatRange(min=0.1),
    default=None,
    help="With --wait: give up after this many seconds (ERR-PYOCO-CANCEL, exit 1). Default: the longest a cancel "
    "can take, the cancel grace (PYOCO_CANCEL_GRACE_PERIOD_SEC, 30) + two run leases (PYOCO_RUN_LEASE_SEC, 15) + 5 s.",
)
@cancel_filter_options
@api_command
async def cancel_cmd(api: Api, run_id: str | None, wait: bool, timeout_sec: float | None, filters: tuple[str, ...], yes: bool) -> int | None:
    """Ask a run to stop. Cancelling an ended run changes nothing.

    A running run's worker stops it at the next task boundary, or kills it when the cancel grace
    period has passed (the run ends CANCELLED either way); if its worker is gone, the conductor
    cancels it after the grace plus two leases.  --wait waits that long by default.

    \b
    Examples:
      pyoco-client cancel --run-id RUN_ID
      pyoco-client cancel --run-id RUN_ID --wait --timeout-sec 120
      pyoco-client cancel --filter status=RUNNING --filter flow_name=etl --yes
    """
    if run_id is None and not filters:
        raise input_error("Missing option '--run-id' (or --filter KEY=VALUE to cancel every matching run)", hint=f"{sub_command('cancel')} -h")
    if run_id is not None and filters:
        raise input_error("give --run-id or --filter, not both", hint=f"{sub_command('cancel')} -h")
    if filters:
        return await cancel_by_filter(api, filters, yes)
    grace, lease = cancel_timing()
    timeout_sec = timeout_sec or default_cancel_wait()
    snapshot = await api.post_json(f"/runs/{run_id}/cancel")
    status = snapshot.get("status") if isinstance(snapshot, dict) else None
    if wait and status not in ("COMPLETED", "FAILED", "CANCELLED"):
        options = WatchOptions(run_id=run_id, timeout_sec=timeout_sec, until_terminal=True)
        result = await watch_run(api, options, output="none")
        if not result.terminal:
            raise CliError(
                ERR_CANCEL,
                "wait timeout",
                reason=f"run {run_id} is still {result.status or status} after {timeout_sec:g} s",
                hint=(
                    f"the cancel is recorded and still in progress: a worker kills a run that ignores it "
                    f"{grace:g} s after the request (the cancel grace), and the conductor ends it "
                    f"{grace + 2 * lease:g} s after the request if its worker is gone; follow it with "
                    f"`{sub_command('watch')} {run_id} --until-terminal`, or wait longer with --timeout-sec"
                ),
            )
        snapshot = await api.get_json(f"/runs/{run_id}")
    write_json(snapshot)
    return None


@client.command("workers")
@click.option("--scope", type=click.Choice(["active", "all"]), default=None, help="active (default): RUNNING and IDLE only; all: every known worker.")
@click.option("--state", type=click.Choice(["RUNNING", "IDLE", "STOPPED_GRACEFUL", "DISCONNECTED"], case_sensitive=False), default=None, help="Only workers in this state.")
@click.option("--include-hidden", is_flag=True, help="Include workers hidden from the dashboard.")
@click.option("--limit", type=click.IntRange(1, 500), default=None, help="At most this many workers (server default 100).")
@click.option(
    "--output",
    type=click.Choice(["json", "table", "plugins"]),
    default="json",
    show_default=True,
    help="json: the server's JSON; table: columns that fit the terminal; plugins: one row per synced wheel of each worker.",
)
@api_command
async def workers_cmd(api: Api, scope: str | None, state: str | None, include_hidden: bool, limit: int | None, output: str) -> None:
    """List workers and their state.

    \b
    Examples:
      pyoco-client workers --output table
      pyoco-client workers --scope all --state DISCONNECTED
      pyoco-client workers --output plugins
    """
    params: list[tuple[str, Any]] = []
    if scope:
        params.append(("scope", scope))
    if state:
        params.append(("state", state.upper()))
    if include_hidden:
        params.append(("include_hidden", "true"))
    if limit is not None:
        params.append(("limit", limit))
    body = await api.get_json("/workers", params=params)
    if output == "plugins":
        write_text(render_table(PLUGIN_COLUMNS, plugin_rows(_items(body)), terminal_width()))
        return
    _print_items(body, output, WORKER_COLUMNS, worker_rows)


@client.command("metrics")
@api_command
async def metrics_cmd(api: Api) -> None:
    """Print the Prometheus metrics text.

    \b
    Example:
      pyoco-client metrics | grep pyoco_runs_total
    """
    response = await api.request("GET", "/metrics")
    write_text(response.text)


@client.command("events")
@click.argument("run_id")
@click.option("--after-seq", type=click.IntRange(min=0), default=0, show_default=True, help="Only events after this per-run sequence number.")
@click.option(
    "--output",
    type=click.Choice(["table", "json"]),
    default=None,
    help="table: one row per event; json: one JSON envelope per line. Default: table on a terminal, json otherwise.",
)
@api_command
async def events_cmd(api: Api, run_id: str, after_seq: int, output: str | None) -> None:
    """Print a run's audit history (every event recorded for it, in order).

    \b
    Examples:
      pyoco-client events RUN_ID
      pyoco-client events RUN_ID --output json | jq .type
    """
    output = output or ("table" if sys.stdout.isatty() else "json")
    body = await api.get_json(f"/runs/{run_id}/events", params=[("after_seq", after_seq)])
    items = _items(body)
    if output == "table":
        write_text(render_table(EVENT_COLUMNS, event_rows(items), terminal_width()))
    else:
        for item in items:
            write_json(item)


client.add_command(logs_cmd)  # `logs` (cli/client_logs.py)
register(client)  # submit-batch, dlq (cli/client_bulk.py)
client_wheels.register(client)  # wheels, wheel-history, wheel-upload, wheel-delete


# -- entry point ------------------------------------------------------------------------------


def main() -> None:
    """The ``pyoco-client`` console script: run the group on Trio."""
    exit_with_parent()  # a parent that asked (PYOCO_ES_PARENT_FD): die with it
    try:
        client(prog_name="pyoco-client", _anyio_backend="trio")
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


cli = client

if __name__ == "__main__":
    main()
