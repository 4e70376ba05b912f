"""``pyoco-client``: the command line client of the pyoco HTTP API (contract §5.3), on asyncclick + Trio.

pyoco-server's subcommands, flags, output and error shapes, plus: a live terminal view for
``watch``, resumable watching (``Last-Event-ID``), exit codes that tell a run's outcome,
``--wait``/``--watch``/``--idempotency-key`` on submit, and ``events`` (the audit history).

The group is exported as :data:`client` so the umbrella ``pyoco-es`` command can mount it as
``pyoco-es client``; :func:`main` is the ``pyoco-client`` console script.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncclick as click
import trio
import yaml

from .client_errors import (
    ERR_CANCEL,
    ERR_UNEXPECTED,
    ERR_WAIT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    INPUT_MESSAGE,
    OUTCOME_EXIT_CODES,
    ERR_INPUT,
    CliError,
    WaitTimeout,
    input_error,
)
from .client_http import (
    TERMINAL_STATUSES,
    Api,
    ClientSettings,
    SseEvent,
    WatchOptions,
    WatchResult,
    follow_run,
    open_api,
)
from .client_live import LiveView
from .client_output import (
    EVENT_COLUMNS,
    RUN_COLUMNS,
    WORKER_COLUMNS,
    event_rows,
    render_table,
    run_rows,
    terminal_width,
    watch_status_line,
    worker_rows,
    write_json,
    write_text,
)

DEFAULT_SERVER: Final = "http://127.0.0.1:8000"
_TAG_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_CONTEXT: Final = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

F = TypeVar("F", bound=Callable[..., Any])


# -- error translation: one place, at the top of every command ---------------------------------


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _translate(exc: BaseException) -> BaseException:
    """Map what a command raised to what asyncclick should see (CliError, Exit) or re-raise."""
    leaves = list(_leaves(exc))
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        return click.exceptions.Exit(EXIT_INTERRUPTED)
    for e in leaves:
        if isinstance(e, (click.ClickException, click.exceptions.Exit, click.Abort)):
            return e
    for e in leaves:
        if isinstance(e, Exception):
            if os.environ.get("PYOCO_CLIENT_DEBUG"):
                return exc
            return CliError(
                ERR_UNEXPECTED,
                f"{type(e).__name__}: {e}",
                hint="set PYOCO_CLIENT_DEBUG=1 to see the traceback, and please report it",
            )
    return exc


def _usage_error(exc: click.UsageError) -> CliError:
    ctx = exc.ctx
    usage = ctx.get_usage().removeprefix("Usage: ").strip() if ctx is not None else None
    path = ctx.command_path if ctx is not None else "pyoco-client"
    return CliError(ERR_INPUT, INPUT_MESSAGE, reason=exc.format_message(), usage=usage, hint=f"{path} -h")


class _Command(click.Command):
    """A command whose parse errors and failures come out in pyoco-server's error shape."""

    async def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return await super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_error(exc) from exc

    async def invoke(self, ctx: click.Context) -> Any:
        try:
            return await super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BaseException as exc:  # translated and re-raised: KeyboardInterrupt → 130, groups unwrapped
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc


class _Group(click.Group):
    """The client group: usage errors (unknown command or flag) in pyoco-server's error shape."""

    command_class = _Command

    async def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return await super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            assert exc.ctx is not None
            click.echo(exc.ctx.get_help())
            raise click.exceptions.Exit(EXIT_OK) from exc
        except click.UsageError as exc:
            raise _usage_error(exc) from exc

    async def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return await super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _usage_error(exc) from exc


async def _cancel_on_sigint(scope: trio.CancelScope, *, task_status: trio.TaskStatus[trio.Event] = trio.TASK_STATUS_IGNORED) -> None:
    """Cancel ``scope`` on the first SIGINT; the event it reports says whether that happened.  A
    second SIGINT (the receiver is gone by then) interrupts at once, as Trio does by default."""
    interrupted = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        task_status.started(interrupted)
        async for _ in signals:
            interrupted.set()
            scope.cancel()
            return


def _api_command(fn: Callable[..., Awaitable[int | None]]) -> Callable[..., Awaitable[None]]:
    """Run ``fn(api, **params)`` with an open :class:`Api`; its int result is the exit status."""

    @functools.wraps(fn)
    @click.pass_context
    async def wrapper(ctx: click.Context, /, **kwargs: Any) -> None:
        settings = ctx.find_object(ClientSettings)
        assert settings is not None, "the client group's callback sets ClientSettings"
        code: int | None = None
        # Ctrl-C cancels the command at its next checkpoint, like any cancellation, instead of
        # a KeyboardInterrupt raised wherever the signal lands (inside an HTTP stream's
        # generator, say, which then prints a traceback while being finalized).
        async with trio.open_nursery() as nursery:
            interrupted = await nursery.start(_cancel_on_sigint, nursery.cancel_scope)
            async with open_api(settings) as api:
                code = await fn(api, **kwargs)
            nursery.cancel_scope.cancel()
        if interrupted.is_set():
            raise click.exceptions.Exit(EXIT_INTERRUPTED)
        if code:
            raise click.exceptions.Exit(code)

    return wrapper


# -- the group -----------------------------------------------------------------------------------


@click.group("client", cls=_Group, context_settings=_CONTEXT, no_args_is_help=True)
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


def _settings() -> ClientSettings:
    settings = click.get_current_context().find_object(ClientSettings)
    assert settings is not None
    return settings


def _sub(name: str) -> str:
    return f"{_settings().command_path} {name}"


def parse_json_object(raw: str, *, flag: str, example: str) -> dict[str, Any]:
    """``--params``: a JSON object, or an input error saying how to write one."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise input_error(f"{flag} must be valid JSON object ({exc})", hint=example) from exc
    if not isinstance(value, dict):
        raise input_error(f"{flag} must be JSON object (got {type(value).__name__})", hint=example)
    return value


def parse_param_assignments(items: Sequence[str], *, example: str) -> dict[str, Any]:
    """``--param k=v`` (repeatable): the value is JSON when it parses, else the plain string."""
    out: dict[str, Any] = {}
    for raw in items:
        key, sep, text = raw.partition("=")
        key, text = key.strip(), text.strip()
        if not sep:
            raise input_error(f"--param must be key=value (got {raw!r})", hint=example)
        if not key:
            raise input_error(f"--param key is empty (got {raw!r})", hint=example)
        if text == "":
            out[key] = ""
            continue
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def read_text_file(path: str, *, flag: str) -> str:
    """A UTF-8 file named by ``flag``, or ``ERR-PYOCO-0018: file I/O error`` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(
            ERR_INPUT,
            "file I/O error",
            reason=f"cannot read {flag} {path}: {detail}",
            hint="check the path and that the file is readable UTF-8 text",
        ) from exc


def parse_params_file(path: str, *, example: str) -> dict[str, Any]:
    """``--params-file``: a JSON or YAML (``yaml.safe_load``) object."""
    text = read_text_file(path, flag="--params-file")
    try:
        value = json.loads(text)
    except ValueError as json_exc:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as yaml_exc:
            raise input_error(
                f"--params-file must be JSON/YAML object ({path}): not JSON ({json_exc}) nor YAML ({yaml_exc})".replace("\n", " "),
                hint=example,
            ) from yaml_exc
    if not isinstance(value, dict):
        raise input_error(f"--params-file must contain an object at the top level ({path}, got {type(value).__name__})", hint=example)
    return value


def build_params(params_file: str | None, params: str | None, param: Sequence[str]) -> dict[str, Any]:
    """Merge params-file → --params → --param; later wins."""
    sub = _sub("submit")
    merged: dict[str, Any] = {}
    if params_file:
        merged.update(parse_params_file(params_file, example=f"{sub} --params-file params.yaml  (containing e.g. x: 1)"))
    if params is not None:
        merged.update(parse_json_object(params, flag="--params", example=f"{sub} --params '{{\"x\": 1}}'"))
    if param:
        merged.update(parse_param_assignments(param, example=f"{sub} --param x=1 --param name=alice"))
    return merged


def parse_tags(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    tags = [t.strip() for t in raw.split(",") if t.strip()]
    return tags or None


def check_tag(tag: str | None, command: str) -> str | None:
    if tag is None:
        return None
    tag = tag.strip()
    if tag and not _TAG_RE.fullmatch(tag):
        raise input_error(
            f"--tag must be letters, digits, '_' or '-' (got {tag!r})",
            hint=f"{_sub(command)} --tag default",
        )
    return tag or None


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


def _outcome_code(result: WatchResult, run_id: str, waited: float | None) -> int:
    if result.terminal and result.status is not None:
        return OUTCOME_EXIT_CODES.get(result.status, EXIT_OK)
    raise WaitTimeout(
        ERR_WAIT,
        "wait timeout",
        reason=f"run {run_id} is still {result.status or 'not finished'} after {waited:g} s" if waited else f"run {run_id} did not finish",
        hint=f"keep following it with `{_sub('watch')} {run_id}`",
    )


def _default_watch_output() -> str:
    return "live" if sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb" else "json"


async def _after_submit(api: Api, submitted: Any, *, wait: bool, watch: bool, timeout_sec: float | None) -> int:
    """Print the submit answer, then optionally wait for / watch the run; return the exit code."""
    run_id = submitted.get("run_id") if isinstance(submitted, dict) else None
    if not (wait or watch) or not run_id:
        write_json(submitted)
        return EXIT_OK
    options = WatchOptions(run_id=str(run_id), records=watch, timeout_sec=timeout_sec, until_terminal=True)
    if watch:
        output = _default_watch_output()
        if output == "json":
            write_json(submitted)
        result = await watch_run(api, options, output=output)
        return _outcome_code(result, str(run_id), timeout_sec)
    if sys.stderr.isatty():
        _stderr(f"submitted {run_id}; waiting for it to finish…")
    result = await watch_run(api, options, output="none")
    code = _outcome_code(result, str(run_id), timeout_sec)
    write_json(await api.get_json(f"/runs/{run_id}"))
    return code


def _wait_options(fn: F) -> F:
    fn = click.option("--timeout-sec", type=click.FloatRange(min=0.1), default=None, help="With --wait/--watch: give up after this many seconds (exit 4). Default: no limit.")(fn)
    fn = click.option("--watch", "watch", is_flag=True, help="Then watch the run until it ends (live view on a terminal, JSON lines otherwise); exit code tells the outcome.")(fn)
    fn = click.option("--wait", "wait", is_flag=True, help="Then wait until the run ends and print its final snapshot; exit 0 COMPLETED, 2 FAILED, 3 CANCELLED.")(fn)
    fn = click.option("--idempotency-key", default=None, help="Send an Idempotency-Key header: resubmitting with the same key returns the same run instead of starting another.")(fn)
    return fn


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
@_wait_options
@_api_command
async def submit_cmd(
    api: Api,
    flow_name: str,
    params: str | None,
    params_file: str | None,
    param: tuple[str, ...],
    tag: str | None,
    tags: str | None,
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
    """
    body: dict[str, Any] = {"flow_name": flow_name, "params": build_params(params_file, params, param)}
    checked = check_tag(tag, "submit")
    if checked is not None:
        body["tag"] = checked
    tag_list = parse_tags(tags)
    if tag_list is not None:
        body["tags"] = tag_list
    submitted = await api.post_json("/runs", json_body=body, headers=_idempotency_headers(idempotency_key))
    return await _after_submit(api, submitted, wait=wait, watch=watch, timeout_sec=timeout_sec)


@client.command("submit-yaml")
@click.option("--workflow-file", required=True, help="Path to a flow.yaml.")
@click.option("--flow-name", required=True, help="Name to record for the run.")
@click.option("--tag", default=None, help="Routing tag (default: the server's default tag).")
@_wait_options
@_api_command
async def submit_yaml_cmd(
    api: Api,
    workflow_file: str,
    flow_name: str,
    tag: str | None,
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
    files = {"workflow": (Path(workflow_file).name or "flow.yaml", text.encode("utf-8"), "application/x-yaml")}
    submitted = await api.post_json("/runs/yaml", files=files, data=data, headers=_idempotency_headers(idempotency_key))
    return await _after_submit(api, submitted, wait=wait, watch=watch, timeout_sec=timeout_sec)


@client.command("get")
@click.argument("run_id")
@click.option("--records", is_flag=True, help="Include task_records (inputs, outputs, errors, durations).")
@_api_command
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
@_api_command
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
@_api_command
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
@_api_command
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
@_api_command
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
    output = output or _default_watch_output()
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
        return _outcome_code(result, run_id, timeout_sec)
    return EXIT_OK  # stopped by --max-events, or the watch window ended


@client.command("cancel")
@click.option("--run-id", required=True, help="The run to cancel.")
@click.option("--wait", is_flag=True, help="Wait until the run has ended, then print its final snapshot.")
@click.option(
    "--timeout-sec",
    type=click.FloatRange(min=0.1),
    default=None,
    help="With --wait: give up after this many seconds (ERR-PYOCO-CANCEL, exit 1). Default: the longest a cancel "
    "can take, the cancel grace (PYOCO_CANCEL_GRACE_PERIOD_SEC, 30) + two run leases (PYOCO_RUN_LEASE_SEC, 15) + 5 s.",
)
@_api_command
async def cancel_cmd(api: Api, run_id: str, wait: bool, timeout_sec: float | None) -> None:
    """Ask a run to stop. Cancelling an ended run changes nothing.

    A running run's worker stops it at the next task boundary, or kills it when the cancel grace
    period has passed (the run ends CANCELLED either way); if its worker is gone, the conductor
    cancels it after the grace plus two leases.  --wait waits that long by default.

    \b
    Examples:
      pyoco-client cancel --run-id RUN_ID
      pyoco-client cancel --run-id RUN_ID --wait --timeout-sec 120
    """
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
                    f"`{_sub('watch')} {run_id} --until-terminal`, or wait longer with --timeout-sec"
                ),
            )
        snapshot = await api.get_json(f"/runs/{run_id}")
    write_json(snapshot)


@client.command("workers")
@click.option("--scope", type=click.Choice(["active", "all"]), default=None, help="active (default): RUNNING and IDLE only; all: every known worker.")
@click.option("--state", type=click.Choice(["RUNNING", "IDLE", "STOPPED_GRACEFUL", "DISCONNECTED"], case_sensitive=False), default=None, help="Only workers in this state.")
@click.option("--include-hidden", is_flag=True, help="Include workers hidden from the dashboard.")
@click.option("--limit", type=click.IntRange(1, 500), default=None, help="At most this many workers (server default 100).")
@_json_or_table("json")
@_api_command
async def workers_cmd(api: Api, scope: str | None, state: str | None, include_hidden: bool, limit: int | None, output: str) -> None:
    """List workers and their state.

    \b
    Examples:
      pyoco-client workers --output table
      pyoco-client workers --scope all --state DISCONNECTED
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
    _print_items(body, output, WORKER_COLUMNS, worker_rows)


@client.command("metrics")
@_api_command
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
@_api_command
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


# -- entry point ------------------------------------------------------------------------------


def main() -> None:
    """The ``pyoco-client`` console script: run the group on Trio."""
    try:
        client(prog_name="pyoco-client", _anyio_backend="trio")
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


cli = client

if __name__ == "__main__":
    main()
