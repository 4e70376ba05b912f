"""``pyoco-worker`` (also ``pyoco-es worker``): run one worker actor against a NATS server.

Flags follow pyoco-server's ``pyoco-worker`` (contract §5.2) where they exist; configuration is
the environment (and ``.env``, contract §6) plus these overrides.  SIGINT/SIGTERM drain
gracefully (running runs finish within ``PYOCO_WORKER_DRAIN_TIMEOUT_SEC``, then are released);
a second signal stops at once.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import asyncclick as click
import attrs
import outcome
import trio

from ..config import Settings, refused_settings
from ..core.errors import PyocoError
from ..logs import announce
from ..nats import subjects
from ..nats.client import NatsClient, open_nats
from ..nats.resources import ensure_resources
from ..lifeline import exit_with_parent
from ..runtime import configure_logging, resource_config, wait_for_stop_signal
from .options import LOG_LEVEL
from ..worker.supervisor import normalize_tags, run_worker
from ..worker.trust import check_allowed_modules, check_env_names

log = logging.getLogger(__name__)

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
CONNECT_TIMEOUT = 10.0


def load_flow_resolver(spec: str, *, flag: str = "--flow-resolver") -> str:
    """Validate a flow-resolver spec and return it (the children import it, not the worker).

    ``module:function`` or ``path/to/file.py:function``, split on the **last** ``:``; a target
    that ends in ``.py`` or contains a path separator is a file.  Dotted attributes are allowed.
    Modules are looked up from the current directory too, as the children do (they get it first
    on their path), so ``examples.flows:resolve`` works from the project root without PYTHONPATH.
    ``flag`` is the option the user typed, for the messages.

    Raises:
        click.BadParameter: malformed spec, missing file, or a module that cannot be found.
    """
    import importlib.util

    usage = f"expected 'module:function' or 'path.py:function', got {spec!r}"
    if ":" not in spec:
        raise click.BadParameter(usage, param_hint=flag)
    target, attr = spec.rsplit(":", 1)
    if not target or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise click.BadParameter(usage, param_hint=flag)
    if target.endswith(".py") or "/" in target or "\\" in target:
        if not os.path.isfile(target):
            raise click.BadParameter(f"file not found: {target}", param_hint=flag)
        return f"{os.path.abspath(target)}:{attr}"
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError) as exc:
        raise click.BadParameter(f"cannot find module {target!r}: {exc}", param_hint=flag) from exc
    finally:
        if added:
            sys.path.remove(cwd)
    if found is None:
        raise click.BadParameter(f"cannot find module {target!r} (looked in {cwd} and the installed packages)", param_hint=flag)
    return spec


def trusted_settings(settings: Settings, allow_modules: Sequence[str], expose_env: Sequence[str]) -> Settings:
    """``settings`` with the operator's flags merged into its allowed modules and exposed names.

    Raises:
        ValueError: a module that can never be allowed (``os``, ...) or a malformed name.
    """
    return attrs.evolve(
        settings,
        allowed_modules=check_allowed_modules([*settings.allowed_modules, *allow_modules]),
        worker_expose_env=check_env_names([*settings.worker_expose_env, *expose_env]),
    )


def wheel_settings(
    settings: Settings, enabled: bool | None, directory: str | None, interval: float | None, timeout: float | None
) -> Settings:
    """``settings`` with the ``--wheel-*`` flags that were given (pyoco-server's overrides)."""
    changes: dict[str, Any] = {}
    if enabled is not None:
        changes["wheel_sync_enabled"] = enabled
    if directory:
        changes["wheel_sync_dir"] = directory
    if interval is not None:
        changes["wheel_sync_interval"] = interval
    if timeout is not None:
        changes["wheel_install_timeout"] = timeout
    return attrs.evolve(settings, **changes)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats-url", envvar="PYOCO_NATS_URL", default=None, help=f"NATS server (default {DEFAULT_NATS_URL}).")
@click.option("--tags", default="default", show_default=True, help="CSV of tags to serve (OR semantics).")
@click.option("--worker-id", default="worker", show_default=True, help="Registry key; letters, digits, '_' and '-'.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 256), help="Runs in flight (= warm child processes).")
@click.option("--flow-resolver", default=None, help="module:function or path/to/file.py:function mapping flow names to pyoco Flows.")
@click.option(
    "--allow-module",
    "allow_modules",
    multiple=True,
    help="Module prefix YAML `callable:` may import (repeatable; also PYOCO_ALLOWED_MODULES, CSV; '*' allows any).",
)
@click.option(
    "--expose-env",
    "expose_env",
    multiple=True,
    help="Environment variable a YAML run may read as `$env.NAME` (repeatable; also PYOCO_WORKER_EXPOSE_ENV, CSV; default none).",
)
@click.option("--poll-timeout", default=None, type=click.FloatRange(0.05, 60), help="Long-poll duration of one fetch, seconds.")
@click.option(
    "--run-once",
    is_flag=True,
    help="pyoco-server's flag: one poll cycle (up to --poll-timeout), run the one item it brings to its end, then exit 0 "
    "(also when no run came). Implies --concurrency 1.",
)
@click.option(
    "--wheel-sync/--no-wheel-sync",
    "wheel_sync",
    default=None,
    help="Install the wheel registry's wheels for these tags into versioned directories new run processes import from "
    "(default: PYOCO_WHEEL_SYNC_ENABLED, off).",
)
@click.option("--wheel-sync-dir", default=None, help="Where synced wheels are installed (PYOCO_WHEEL_SYNC_DIR, default .pyoco/wheels).")
@click.option("--wheel-sync-interval-sec", type=click.FloatRange(0.1), default=None, help="Seconds between sync passes (PYOCO_WHEEL_SYNC_INTERVAL_SEC, default 10).")
@click.option("--wheel-install-timeout-sec", type=click.FloatRange(1.0), default=None, help="pip's time limit per wheel (PYOCO_WHEEL_INSTALL_TIMEOUT_SEC, default 180).")
@LOG_LEVEL
async def worker(
    nats_url: str | None,
    tags: str,
    worker_id: str,
    concurrency: int,
    flow_resolver: str | None,
    allow_modules: tuple[str, ...],
    expose_env: tuple[str, ...],
    poll_timeout: float | None,
    run_once: bool,
    wheel_sync: bool | None,
    wheel_sync_dir: str | None,
    wheel_sync_interval_sec: float | None,
    wheel_install_timeout_sec: float | None,
    log_level: str | None,
) -> None:
    """Run a worker: claim runs for TAGS and execute them in warm child processes.

    \b
    Example:
      pyoco-worker --nats-url nats://127.0.0.1:4222 --tags default,gpu --worker-id w1 \\
          --allow-module mytasks --flow-resolver flows.py:resolve --expose-env API_BASE_URL
    """
    refused = refused_settings()
    if refused:
        _fail("; ".join(refused))
    settings = Settings.from_env()
    configure_logging(settings, log_level, service="pyoco-server:worker")
    if run_once:
        concurrency = 1
    settings = wheel_settings(settings, wheel_sync, wheel_sync_dir, wheel_sync_interval_sec, wheel_install_timeout_sec)
    try:
        settings = trusted_settings(settings, allow_modules, expose_env)
    except ValueError as exc:
        _fail(str(exc))
    try:
        tag_list = normalize_tags(tags.split(","), settings.default_tag)
    except ValueError as exc:
        _fail(str(exc))
    if not subjects.is_token(worker_id):
        _fail(f"invalid worker id {worker_id!r}: letters, digits, '_' and '-' only")
    try:
        resolver = load_flow_resolver(flow_resolver) if flow_resolver else None
    except click.BadParameter as exc:
        _fail(f"--flow-resolver: {exc.message}")
    url = nats_url or settings.nats_url or DEFAULT_NATS_URL
    stop = trio.Event()
    try:
        async with AsyncExitStack() as stack:
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    nats = await stack.enter_async_context(open_nats(url, name=f"pyoco-worker:{worker_id}", unavailable_wait=settings.nats_unavailable_wait))
                    await ensure_resources(nats, resource_config(settings))
            except trio.TooSlowError:
                _fail(f"cannot reach NATS at {url} within {CONNECT_TIMEOUT:g}s (start one with `pyoco-server up`, or pass --nats-url)")
            sync = f"; wheel sync into {settings.wheel_sync_dir}" if settings.wheel_sync_enabled else ""
            announce(f"pyoco-worker {worker_id} serving {','.join(tag_list)} on {url} "
                     f"(concurrency {concurrency}{sync}; Ctrl-C to stop)", worker_id=worker_id)  # fmt: skip
            async with trio.open_nursery() as nursery:
                await nursery.start(wait_for_stop_signal, stop)
                # Captured so an error is not wrapped in the nursery's exception group.
                result = await outcome.acapture(
                    _serve,
                    nats,
                    settings,
                    worker_id=worker_id,
                    tags=tag_list,
                    concurrency=concurrency,
                    flow_resolver=resolver,
                    stop=stop,
                    poll_timeout=poll_timeout,
                    run_once=run_once,
                )
                nursery.cancel_scope.cancel()
            result.unwrap()
            announce(f"pyoco-worker {worker_id} stopped", worker_id=worker_id)
    except ValueError as exc:
        _fail(str(exc))
    except PyocoError as exc:
        _fail(exc.message)


async def _serve(nats: NatsClient, settings: Settings, *, stop: trio.Event, poll_timeout: float | None, run_once: bool, **kw: Any) -> None:
    """:func:`run_worker` until ``stop``; with ``run_once``, until one poll cycle brought nothing
    or the one item it brought has ended (pyoco-server's ``run_once``), then drain and return."""
    if not run_once:
        await run_worker(nats, settings, stop=stop, poll_timeout=poll_timeout, allowed_modules=settings.allowed_modules, **kw)
        return
    window = poll_timeout if poll_timeout is not None else settings.worker_poll_timeout
    async with trio.open_nursery() as nursery:
        actor = await nursery.start(
            functools.partial(run_worker, nats, settings, stop=stop, poll_timeout=window, allowed_modules=settings.allowed_modules, **kw)
        )
        intake = actor.intake
        intake.limit = 1  # counted from the start: an item accepted before this line is the one
        with trio.move_on_after(window + ONCE_SLACK):
            while not intake.accepted and not stop.is_set():
                await trio.sleep(ONCE_TICK)
        while intake.pending and not stop.is_set():  # the one item, to its end
            await trio.sleep(ONCE_TICK)
        stop.set()


ONCE_TICK = 0.02  # how often --run-once looks whether its item came / ended
ONCE_SLACK = 0.5  # the fetch started just before the window closed may still bring an item


def _fail(message: str) -> None:
    click.echo(f"ERR-PYOCO-0018: pyoco-worker cannot start\n- reason: {message}\n- hint: pyoco-worker --help", err=True)
    sys.exit(1)


def worker_main() -> None:
    """Console-script entry point (``pyoco-worker``); Ctrl-C twice exits 130."""
    exit_with_parent()  # a parent that asked (PYOCO_ES_PARENT_FD): die with it
    try:
        worker(_anyio_backend="trio")
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["load_flow_resolver", "trusted_settings", "wheel_settings", "worker", "worker_main"]
