"""What the server-side commands share: their common options, settings from the environment
plus flags, and the one way they fail (``ERR-PYOCO-0018`` on stderr, exit code 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import asyncclick as click
import attrs

from ..config import Settings

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
LOG_LEVEL = click.option("--log-level", default="warning", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of an exception group (what a command reports)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def settings_with(**overrides: object) -> Settings:
    """Settings from the environment, with the flags the user typed (``None``: not typed) on top."""
    base = Settings.from_env()
    return attrs.evolve(base, **{k: v for k, v in overrides.items() if v is not None})


def fail(message: str, *, hint: str | None = None) -> None:
    """Report ``message`` (and a hint) the way every command fails, and exit with code 1."""
    click.echo(f"ERR-PYOCO-0018: {message}", err=True)
    if hint:
        click.echo(f"- hint: {hint}", err=True)
    sys.exit(1)
