"""``pyoco-es``: the umbrella command (up, conductor, gateway, worker, replay, events, client),
plus ``pyoco-server`` (defaults to ``up``) and ``pyoco-worker`` as compatible names."""

from __future__ import annotations

import json
from contextlib import suppress
from functools import partial
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncclick as click
import attrs
import trio

from ..core.codec import compact_json, envelope_to_json
from ..core.errors import PyocoError
from ..logs import announce
from ..lifeline import exit_with_parent
from ..nats.client import NatsClient
from ..runtime import configure_logging, open_system_nats, run_child_service, serve_until_stopped, wait_for_stop_signal
from .options import DATA_DIR, LOG_LEVEL, NATS_SYNC, NATS_URL, fail, first_error, nats_address, settings_with

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """pyoco-es: event-sourced execution backend for pyoco workflows.

    \b
    Example:
      pyoco-es up --with-worker          # NATS + conductor + gateway + a worker on :8000
      pyoco-es client submit-yaml --workflow-file flow.yaml --flow-name main --tag default
    """


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int, help="HTTP port (0 = random).")
@NATS_URL
@DATA_DIR
@NATS_SYNC
@click.option("--dashboard-lang", type=click.Choice(["auto", "ja", "en"]), default=None, help="Dashboard language (PYOCO_DASHBOARD_LANG).")
@click.option("--with-worker", is_flag=True, help="Also start a worker, as a child process that stops with this one.")
@click.option("--worker-id", default="worker", show_default=True)
@click.option("--worker-tags", default="default", show_default=True, help="CSV of tags the worker serves.")
@click.option("--worker-concurrency", default=4, show_default=True, type=int)
@click.option("--worker-flow-resolver", default=None, help="module:function or path.py:function resolving named flows.")
@click.option("--allow-module", "allow_modules", multiple=True, help="Module prefix YAML callables may import (repeatable).")
@click.option("--expose-env", "expose_env", multiple=True, help="Environment variable the worker lets YAML runs read (repeatable; default none).")
@click.option(
    "--with-nats-bootstrap",
    is_flag=True,
    help="pyoco-server's flag: serve NATS at a fixed address (the --nats-* flags below; default nats://127.0.0.1:4222, "
    "monitoring on 8222) so other processes can reach it. Here that server is the embedded one: it keeps its store "
    "in --data-dir (pyoco-server's nats-bootstrap kept none) and stops with this command. Without this flag the "
    "embedded server takes random free ports; --nats-url must then be absent or the same address.",
)
@click.option("--nats-listen-host", default=None, help="Address the embedded NATS listens on (with --with-nats-bootstrap: default 127.0.0.1).")
@click.option("--nats-client-port", default=None, type=click.IntRange(1, 65535), help="Embedded NATS client port (with --with-nats-bootstrap: default 4222; otherwise random).")
@click.option("--nats-http-port", default=None, type=click.IntRange(1, 65535), help="Embedded NATS monitoring port (with --with-nats-bootstrap: default 8222; otherwise random).")
@LOG_LEVEL
async def up(
    host: str,
    port: int,
    nats_url: str | None,
    data_dir: Path,
    nats_sync: str,
    dashboard_lang: str | None,
    with_worker: bool,
    worker_id: str,
    worker_tags: str,
    worker_concurrency: int,
    worker_flow_resolver: str | None,
    allow_modules: tuple[str, ...],
    expose_env: tuple[str, ...],
    with_nats_bootstrap: bool,
    nats_listen_host: str | None,
    nats_client_port: int | None,
    nats_http_port: int | None,
    log_level: str | None,
) -> None:
    """Run the whole system: embedded NATS (unless --nats-url), conductor, gateway + dashboard.

    \b
    Example:
      pyoco-server up --with-worker --allow-module examples
      open http://127.0.0.1:8000/
    """
    settings = settings_with(nats_url=nats_url, data_dir=data_dir, nats_sync=nats_sync, dashboard_lang=dashboard_lang)
    configure_logging(settings, log_level, service="pyoco-server:http")
    settings = nats_address(settings, nats_url, with_nats_bootstrap, nats_listen_host, nats_client_port, nats_http_port)
    if allow_modules:
        settings = attrs.evolve(settings, allowed_modules=tuple(allow_modules))
    from ..conductor.service import run_conductor
    from ..gateway.server import run_gateway
    from .worker import load_flow_resolver, trusted_settings

    try:  # a module that can never be allowed fails here, before anything starts
        settings = trusted_settings(settings, (), expose_env)
    except ValueError as exc:
        fail(str(exc), hint="pyoco-server up --help")

    if worker_flow_resolver:
        try:  # a bad spec fails here, before anything starts
            worker_flow_resolver = load_flow_resolver(worker_flow_resolver, flag="--worker-flow-resolver")
        except click.BadParameter as exc:
            fail(f"--worker-flow-resolver: {exc.message}", hint="pyoco-server up --help")
    stop = trio.Event()
    try:
        async with open_system_nats(settings, name="pyoco-server", announce=True) as nats:
            # The worker runs as a child process (its own interpreter and GIL, so the gateway's
            # HTTP work never waits behind it); the conductor shares this process and its NATS
            # connection (measured: a separate conductor process cost more CPU per run than it
            # saved in contention).
            worker_args = ["worker", "--nats-url", nats.url, "--log-level", log_level or settings.log_level or "warning", "--worker-id", worker_id,
                           "--tags", worker_tags, "--concurrency", str(worker_concurrency)]
            for module in settings.allowed_modules:
                worker_args += ["--allow-module", module]
            for name in settings.worker_expose_env:
                worker_args += ["--expose-env", name]
            if worker_flow_resolver:
                worker_args += ["--flow-resolver", worker_flow_resolver]
            async with trio.open_nursery() as nursery:
                await nursery.start(wait_for_stop_signal, stop)
                await nursery.start(run_conductor, nats, settings)
                bound = await nursery.start(lambda task_status: run_gateway(nats, settings, host=host, port=port, task_status=task_status))
                async with trio.open_nursery() as services:
                    if with_worker:  # restarted whenever it dies, until we stop
                        await services.start(partial(run_child_service, worker_args, ready_marker="serving", name="worker"))
                    announce(f"pyoco-es gateway on http://{bound[0]}:{bound[1]}/ (Ctrl-C to stop)")
                    await stop.wait()
                    services.cancel_scope.cancel()
                # The worker has drained and stopped; the gateway answered until now.
                nursery.cancel_scope.cancel()
    except* PyocoError as group:
        fail(first_error(group).message, hint="pyoco-server up --help")  # type: ignore[attr-defined]
    except* OSError as group:
        exc = first_error(group)
        if getattr(exc, "errno", None) == 98:
            fail(f"cannot listen on {host}:{port}: the address is already in use", hint="pick another --port (0 = random)")
        fail(f"{type(exc).__name__}: {exc}")


@cli.command()
@NATS_URL
@DATA_DIR
@NATS_SYNC
@LOG_LEVEL
async def conductor(nats_url: str | None, data_dir: Path, nats_sync: str, log_level: str | None) -> None:
    """Run a conductor alone (projector, dispatcher, reaper); run several for availability.

    \b
    Example:
      pyoco-es conductor --nats-url nats://nats-1:4222
    """
    settings = settings_with(nats_url=nats_url, data_dir=data_dir, nats_sync=nats_sync)
    configure_logging(settings, log_level, service="pyoco-es:conductor")
    from ..conductor.service import run_conductor

    async def start(nats: NatsClient, nursery: trio.Nursery) -> str:
        await nursery.start(run_conductor, nats, settings)
        return "conductor running (Ctrl-C to stop)"

    try:
        await serve_until_stopped(settings, name="pyoco-conductor", start=start)
    except* PyocoError as group:
        fail(first_error(group).message)  # type: ignore[attr-defined]


@cli.command()
@NATS_URL
@DATA_DIR
@click.option("--rebuild", is_flag=True, help="Also write missing/different snapshots into the live bucket (and, with --read-model, build that file afresh).")
@click.option("--read-model", "read_model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also check a gateway's SQLite read model file against the runs bucket.")
@click.option("--skip-events", is_flag=True, help="With --read-model: check only the file, not the event stream.")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@LOG_LEVEL
async def replay(
    nats_url: str | None, data_dir: Path, rebuild: bool, read_model: Path | None, skip_events: bool, output: str, log_level: str | None
) -> None:
    """Fold the whole event stream into a fresh bucket and report snapshots that differ from the
    live read model, and wheels whose registry events disagree with the object store.  Exit code
    1 when any differ.

    \b
    Example:
      pyoco-es replay --nats-url nats://127.0.0.1:4222
      pyoco-es replay --read-model .pyoco-es/read-model/gateway-8000.sqlite3 --skip-events
    """
    settings = settings_with(nats_url=nats_url, data_dir=data_dir)
    configure_logging(settings, log_level, service="pyoco-es:replay", stdout_is_output=True)
    if read_model is not None:
        from .readmodel_check import run_read_model_check

        ok = await run_read_model_check(settings, read_model, rebuild=rebuild, output=output)
        if skip_events:
            sys.exit(0 if ok else 1)
    from ..conductor.replay import REPLAY_BUCKET, replay as do_replay
    from ..nats.resources import delete_bucket
    from ..nats.wheelstore import WheelStore

    try:
        async with open_system_nats(settings, name="pyoco-replay", attach=True) as nats:

            def progress(stage: str, done: int, total: int) -> None:
                if sys.stderr.isatty():
                    print(f"\r{stage} {done}/{total}\x1b[K", end="", file=sys.stderr, flush=True)

            try:
                store = WheelStore(nats, bucket=settings.wheel_object_store_bucket, history_bucket=settings.wheel_history_kv_bucket)
                report = await do_replay(
                    nats, rebuild=rebuild, progress=progress, max_snapshot_bytes=settings.max_run_snapshot_bytes, wheel_store=store
                )
            finally:
                # The scratch bucket is never left behind: not on an error, not on Ctrl-C.
                with trio.CancelScope(shield=True), trio.move_on_after(10), suppress(PyocoError):
                    await delete_bucket(nats, REPLAY_BUCKET)
    except PyocoError as exc:
        fail(exc.message)
        return
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if output == "json":
        click.echo(json.dumps({
            "events": report.events, "runs": report.runs, "differences": [attrs.asdict(d) for d in report.differences],
            "wheel_events": report.wheel_events, "wheels": report.wheels,
            "wheel_differences": [attrs.asdict(d) for d in report.wheel_differences],
        }))
    else:
        click.echo(f"replayed {report.events} events of {report.runs} runs: {len(report.differences)} difference(s)")
        for d in report.differences:
            click.echo(f"  {d.kind:<9} {d.run_id}  {d.detail}")
        click.echo(f"wheel registry: {report.wheel_events} events, {report.wheels} wheel(s): {len(report.wheel_differences)} difference(s)")
        for w in report.wheel_differences:
            click.echo(f"  {w.kind:<9} {w.name}  {w.detail}")
        if rebuild and report.differences:
            click.echo("rebuilt the live snapshots listed above")
    sys.exit(0 if report.ok else 1)


def _ts(value: float) -> str:
    return datetime.fromtimestamp(value, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@cli.command()
@click.argument("run_id")
@NATS_URL
@DATA_DIR
@click.option("--output", type=click.Choice(["table", "json"]), default=None, help="Default: table on a terminal, JSON lines otherwise.")
@click.option("--archive", "archive_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Read the history from an archive file (pyoco-es archive) instead of the stream; its hash chain is verified.")
@LOG_LEVEL
async def events(
    run_id: str, nats_url: str | None, data_dir: Path, output: str | None, archive_file: Path | None, log_level: str | None
) -> None:
    """Print a run's full event history (the audit trail) straight from the event stream.

    \b
    Example:
      pyoco-es events 3f2a... --output json | jq .type
      pyoco-es events --archive archive/pyoco-runs-2026-10-01.jsonl.gz 3f2a...
    """
    from ..nats.subjects import is_token
    from ..service import RunStore

    settings = settings_with(nats_url=nats_url, data_dir=data_dir)
    configure_logging(settings, log_level, service="pyoco-es:events", stdout_is_output=True)
    if not is_token(run_id):
        fail(f"invalid run id {run_id!r}: use letters, digits, '_' or '-'")
    if archive_file is not None:
        history = _archived_history(archive_file, run_id)
    else:
        try:
            async with open_system_nats(settings, name="pyoco-events", attach=True) as nats:
                history = await RunStore(nats).history(run_id)
        except PyocoError as exc:
            fail(exc.message)
            return
    if not history:
        fail(f"run {run_id} has no events", hint="check the run id with `pyoco-client list`")
    mode = output or ("table" if sys.stdout.isatty() else "json")
    for env in history:
        if mode == "json":
            doc = envelope_to_json(env)
            doc["stream_seq"] = env.stream_seq
            click.echo(compact_json(doc))
        else:
            who = f"{env.producer.kind}:{env.producer.id}" + (f"#{env.producer.attempt}" if env.producer.attempt else "")
            data = {k: v for k, v in envelope_to_json(env)["data"].items() if v not in (None, {}, [], "") and k != "workflow_yaml"}
            detail = json.dumps(data, separators=(",", ":"), default=str)
            width = max(20, (os.get_terminal_size().columns if sys.stdout.isatty() else 160) - 75)
            click.echo(f"{env.seq:>4}  {_ts(env.occurred_at)}  {env.type:<21} {who:<24} {detail[:width]}")


def _archived_history(path: Path, run_id: str) -> list[Any]:
    """A run's events from an archive file, after checking its hash chain (exit 1 if broken)."""
    from .. import archive
    from ..core.codec import decode_envelope

    events, checked = archive.read_run(path, run_id)
    broken = [p for p in checked.problems if run_id in p or "unreadable" in p]
    if broken:
        fail(f"archive {path} fails verification for run {run_id}: {'; '.join(broken)}")
    if events and run_id not in checked.runs:
        fail(f"archive {path}: run {run_id} is incomplete")
    history = []
    for doc in events:
        seq = doc.pop("stream_seq", None)
        history.append(decode_envelope(compact_json(doc).encode(), stream_seq=seq))
    return history


def _mount_optional() -> None:
    """Mount the component commands (worker, gateway, client) that live in their own modules."""
    try:
        from .worker import worker as worker_cmd

        cli.add_command(worker_cmd, "worker")
    except ImportError:  # pragma: no cover - during development of a component
        pass
    try:
        from .gateway import gateway as gateway_cmd

        cli.add_command(gateway_cmd, "gateway")
    except ImportError:  # pragma: no cover
        pass
    try:
        from .client import cli as client_group

        cli.add_command(client_group, "client")
    except ImportError:  # pragma: no cover
        pass
    from .admin import admin as admin_group
    from .cluster import dev_cluster

    cli.add_command(admin_group, "admin")
    cli.add_command(dev_cluster)
    from .archive import archive as archive_group

    cli.add_command(archive_group, "archive")


_mount_optional()


def main() -> None:
    exit_with_parent()  # a parent that asked (PYOCO_ES_PARENT_FD): die with it, even when it is SIGKILLed
    cli(_anyio_backend="trio")


def server_main() -> None:
    """``pyoco-server``: like pyoco-server, no sub-command (or flags first) means ``up``."""
    exit_with_parent()
    args = sys.argv[1:]
    if not args or args[0].startswith("-") and args[0] not in ("-h", "--help"):
        args = ["up", *args]
    sys.argv = [sys.argv[0], *args]
    cli(_anyio_backend="trio")


def worker_main() -> None:
    from .worker import worker_main as run

    run()
