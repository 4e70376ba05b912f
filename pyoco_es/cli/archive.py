"""``pyoco-es archive``: retention with an audit archive (archive then remove old terminal runs),
and ``pyoco-es archive verify FILE`` (check every run's hash chain)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import asyncclick as click

from ..core.errors import PyocoError
from ..runtime import configure_logging, open_system_nats
from .options import DATA_DIR, LOG_LEVEL, NATS_URL, fail, settings_with

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT = {"": 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s`` or a plain number of days, in seconds."""
    m = _AGE.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r} is not an age: use e.g. 30d, 12h, 90m or 3600s")
    return float(m.group(1)) * _UNIT[m.group(2)]


@click.group(invoke_without_command=True)
@click.option("--older-than", "older_than", default=None, help="Archive terminal runs last updated longer ago than this (30d, 12h, ...).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Archive directory (default: PYOCO_ARCHIVE_DIR, else DATA_DIR/archive).")
@NATS_URL
@DATA_DIR
@LOG_LEVEL
@click.pass_context
async def archive(
    ctx: click.Context, older_than: str | None, directory: Path | None, nats_url: str | None, data_dir: Path, log_level: str | None
) -> None:
    """Archive terminal runs older than --older-than, then remove them from the event stream and
    the runs bucket (each removal recorded as a run.archived audit event).

    \b
    Examples:
      pyoco-es archive --older-than 30d --dir /backup/pyoco-archive
      pyoco-es archive verify /backup/pyoco-archive/pyoco-runs-2026-10-01.jsonl.gz
    """
    if ctx.invoked_subcommand is not None:
        return
    if older_than is None:
        fail("--older-than is required (e.g. --older-than 30d)", hint="pyoco-es archive --help")
        return
    age = parse_age(older_than)
    settings = settings_with(nats_url=nats_url, data_dir=data_dir)
    configure_logging(settings, log_level, service="pyoco-es:archive")
    from ..conductor.retention import archive_runs

    target = directory or settings.archive_directory()

    def progress(done: int, total: int) -> None:
        click.echo(f"archived {done}/{total}", err=True)

    try:
        async with open_system_nats(settings, name="pyoco-archive", attach=True) as nats:
            report = await archive_runs(nats, older_than=age, directory=target, now=time.time(), progress=progress)
    except PyocoError as exc:
        fail(exc.message)
        return
    click.echo(f"archived {report.archived} run(s) to {target} ({', '.join(report.files) or 'no files'}); "
               f"{report.skipped} already archived, removal finished")


@archive.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
async def verify(file: Path) -> None:
    """Check every run's hash chain in an archive file (exit 1 on any problem)."""
    from .. import archive as fmt

    checked = fmt.verify(file)
    for problem in checked.problems:
        click.echo(problem)
    click.echo(f"{file}: {len(checked.runs)} run(s) intact, {len(checked.problems)} problem(s)")
    sys.exit(0 if checked.ok else 1)
