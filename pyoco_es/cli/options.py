"""What the server-side commands share: their common options, settings from the environment
plus flags, and the one way they fail (``ERR-PYOCO-0018`` on stderr, exit code 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import asyncclick as click
import attrs

from ..config import LOG_LEVEL_ALIASES, LOG_LEVELS, Settings, refused_settings

NATS_URL = click.option("--nats-url", envvar="PYOCO_NATS_URL", default=None, help="Use this NATS server/cluster instead of the embedded one.")
DATA_DIR = click.option("--data-dir", envvar="PYOCO_DATA_DIR", default=".pyoco-es", show_default=True, type=click.Path(path_type=Path), help="Where the embedded NATS keeps its store.")
NATS_SYNC = click.option(
    "--nats-sync",
    envvar="PYOCO_NATS_SYNC",
    type=click.Choice(["1s", "always", "default"]),
    default="1s",
    show_default=True,
    help="Embedded NATS fsync: 1s (a killed process loses nothing, an OS crash at most ~1 s), always (fsync before every ack, ~3x slower), default (NATS's 2 min).",
)
LOG_LEVEL = click.option(
    "--log-level",
    default=None,
    type=click.Choice([*LOG_LEVELS, *LOG_LEVEL_ALIASES], case_sensitive=False),
    help="uvicorn's levels (warn, fatal, notset also accepted); default PYOCO_LOG_LEVEL, else warning. "
    "Format: PYOCO_LOG_FORMAT=text|json (json lines go to stdout).",
)


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of an exception group (what a command reports)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def settings_with(**overrides: object) -> Settings:
    """Settings from the environment, with the flags the user typed (``None``: not typed) on top.

    A pyoco-server setting we cannot honour (:func:`~pyoco_es.config.refused_settings`) ends the
    command here, before anything starts, with the reason.
    """
    refused = refused_settings()
    if refused:
        fail("; ".join(refused), hint="docs/operator-guide.md, section \"pyoco-server settings\"")
    base = Settings.from_env()
    return attrs.evolve(base, **{k: v for k, v in overrides.items() if v is not None})


def fail(message: str, *, hint: str | None = None) -> None:
    """Report ``message`` (and a hint) the way every command fails, and exit with code 1."""
    click.echo(f"ERR-PYOCO-0018: {message}", err=True)
    if hint:
        click.echo(f"- hint: {hint}", err=True)
    sys.exit(1)


def _port_free(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_server((host, port)):
            return True
    except OSError:
        return False


def nats_address(
    settings: Settings, nats_url: str | None, bootstrap: bool, host: str | None, client_port: int | None, http_port: int | None
) -> Settings:
    """``settings`` with the embedded NATS's address from ``up``'s pyoco-server flags.

    ``--with-nats-bootstrap`` serves NATS at ``--nats-listen-host``:``--nats-client-port``
    (pyoco-server's defaults 127.0.0.1:4222, monitoring 8222) and overrides PYOCO_NATS_URL; a
    typed ``--nats-url`` must name that same address (pyoco-server's rule).  Without it the
    ``--nats-*`` flags still place the embedded server, and make no sense beside a URL.
    A busy port fails here, naming it, before anything starts.
    """
    typed = [f for f, v in (("--nats-listen-host", host), ("--nats-client-port", client_port), ("--nats-http-port", http_port)) if v is not None]
    if bootstrap:
        host = host or "127.0.0.1"
        client_port = client_port or 4222
        http_port = http_port or 8222
        managed = f"nats://{host}:{client_port}"
        if nats_url and nats_url.rstrip("/") != managed:
            fail(f"--nats-url {nats_url} does not match --with-nats-bootstrap's address {managed}",
                 hint="drop --nats-url, or make it the same address")  # fmt: skip
        settings = attrs.evolve(settings, nats_url=None)
    elif typed and settings.nats_url:
        fail(f"{', '.join(typed)} place the embedded NATS, which --nats-url/PYOCO_NATS_URL ({settings.nats_url}) replaces",
             hint="drop one of them")  # fmt: skip
    if not bootstrap and not typed:
        return settings
    bind_host = host or settings.nats_listen_host
    for what, port in (("client", client_port), ("monitoring", http_port)):
        if port is not None and not _port_free(bind_host, port):
            fail(f"NATS {what} port is already in use: {bind_host}:{port}", hint=f"pick another --nats-{'client' if what == 'client' else 'http'}-port")
    return attrs.evolve(settings, nats_listen_host=bind_host, nats_client_port=client_port or -1, nats_http_port=http_port or -1)
