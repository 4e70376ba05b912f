"""Retention with an audit archive: terminal runs older than a cut-off are written to the archive
(:mod:`pyoco_es.archive`), recorded, then removed from the event stream and the runs bucket.

Order per batch, each step safe to repeat after a crash: (1) append the runs' chained lines to
their day files and fsync; (2) publish ``run.archived`` on the audit subject (deduplicated by
``Nats-Msg-Id``) and record where the archive is in ``pyoco_archived`` (GET /runs/{id} answers
410 from it); (3) purge the run's subject from PYOCO_EVENTS; (4) purge its key from the runs
bucket (every gateway's read model drops the row on that change).  A run already in
``pyoco_archived`` is not written again: only the removal steps are finished.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from .. import archive
from ..core.codec import envelope_to_json
from ..core.errors import ConcurrencyConflict, InfraError, PyocoError
from ..nats import subjects
from ..nats.client import NatsClient

log = logging.getLogger(__name__)

TERMINAL: Final = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
BATCH: Final = 200


class PurgeDenied(InfraError):
    """The event stream was created with deny_purge."""


@attrs.frozen
class ArchiveReport:
    archived: int
    files: tuple[str, ...]
    skipped: int  # already archived by an earlier pass (only their removal was finished)


async def candidates(nats: NatsClient, cutoff: float) -> list[tuple[str, float, str | None]]:
    """(run_id, updated_at, tenant_id) of the terminal runs last updated before ``cutoff``."""
    out = []
    async with nats.kv_batches(subjects.RUNS_BUCKET, batch=2000) as batches:
        async for entries in batches:
            for e in entries:
                if e.value is None:
                    continue
                try:
                    doc = json.loads(e.value)
                except ValueError:
                    continue
                updated = doc.get("updated_at")
                if doc.get("status") in TERMINAL and isinstance(updated, (int, float)) and updated < cutoff:
                    out.append((e.key, float(updated), doc.get("tenant_id")))
    return out


async def archive_runs(
    nats: NatsClient,
    *,
    older_than: float,
    directory: Path,
    now: float,
    by: str = "pyoco-es archive",
    progress: Callable[[int, int], None] | None = None,
) -> ArchiveReport:
    """Archive then remove every terminal run last updated more than ``older_than`` seconds
    before ``now``.

    Raises:
        PurgeDenied: PYOCO_EVENTS denies purge (nothing was written or removed).
    """
    if not await nats.events_purgeable():
        raise PurgeDenied(
            "the PYOCO_EVENTS stream was created with deny_purge (the default: an append-only audit log), and NATS "
            "cannot lift it: retention needs a stream created with PYOCO_EVENTS_ALLOW_PURGE=1 (docs/operator-guide.md, "
            "\"Retention and the audit archive\")"
        )
    runs = await candidates(nats, now - older_than)
    files: set[str] = set()
    skipped = done = 0
    for k in range(0, len(runs), BATCH):
        batch = runs[k : k + BATCH]
        known = await nats.kv_get_many(subjects.ARCHIVED_BUCKET, [r[0] for r in batch])
        fresh = [r for r, rec in zip(batch, known, strict=True) if rec is None]
        skipped += len(batch) - len(fresh)
        records = await _write(nats, fresh, directory, now, by)
        files.update(rec["file"] for rec in records.values())
        for run_id, _, _ in batch:
            await nats.purge_run_events(run_id)
            await nats.kv_purge(subjects.RUNS_BUCKET, run_id)
        done += len(batch)
        if progress is not None:
            progress(done, len(runs))
    return ArchiveReport(archived=done - skipped, files=tuple(sorted(files)), skipped=skipped)


async def _write(
    nats: NatsClient, runs: list[tuple[str, float, str | None]], directory: Path, now: float, by: str
) -> dict[str, dict[str, Any]]:
    """Steps 1 and 2 for ``runs`` (not archived before); returns each run's archive record."""
    if not runs:
        return {}
    histories = await nats.read_runs([r[0] for r in runs])
    by_file: dict[Path, list[str]] = {}
    records: dict[str, dict[str, Any]] = {}
    for (run_id, updated, tenant), history in zip(runs, histories, strict=True):
        if isinstance(history, PyocoError):
            raise history
        events = []
        for env in history:
            doc = envelope_to_json(env)
            doc["stream_seq"] = env.stream_seq
            events.append(doc)
        path = archive.day_file(directory, updated)
        lines, head = archive.run_lines(run_id, events)
        by_file.setdefault(path, []).extend(lines)
        records[run_id] = {"run_id": run_id, "file": path.name, "directory": str(directory.resolve()), "head": head,
                           "events": len(events), "archived_at": now, "tenant_id": tenant, "by": by}
    for path, lines in by_file.items():
        await trio.to_thread.run_sync(archive.append, path, lines)
    audit = [
        (subjects.RUN_ARCHIVED_SUBJECT, json.dumps({"type": "run.archived", **rec}, separators=(",", ":")).encode(),
         f"run.archived:{rec['run_id']}", None)
        for rec in records.values()
    ]
    for res in await nats.publish_many(audit):
        if isinstance(res, PyocoError):
            raise res
    for rec in records.values():
        await nats.kv_put(subjects.ARCHIVED_BUCKET, rec["run_id"], json.dumps(rec, separators=(",", ":")).encode())
    return records


LOCK_KEY: Final = "retention-lock"  # in pyoco_archived: one conductor archives at a time


async def _take_turn(nats: NatsClient, holder: str, now: float, ttl: float) -> bool:
    """Whether this conductor may run a retention pass now (a compare-and-swap lease)."""
    entry = await nats.kv_get(subjects.ARCHIVED_BUCKET, LOCK_KEY)
    if entry is not None and entry.value:
        try:
            held = json.loads(entry.value)
            if held.get("holder") != holder and float(held.get("until", 0)) > now:
                return False
        except (ValueError, TypeError, AttributeError):
            pass
    value = json.dumps({"holder": holder, "until": now + ttl}).encode()
    try:
        await nats.kv_update(subjects.ARCHIVED_BUCKET, LOCK_KEY, value, last=entry.revision if entry is not None else 0)
    except ConcurrencyConflict:
        return False
    return True


async def run_retention(
    nats: NatsClient,
    *,
    days: float | None,
    directory: Path,
    holder: str,
    interval: float = 3600.0,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every ``interval`` seconds, archive then remove terminal runs older than ``days`` (the
    conductor's part of PYOCO_RUN_RETENTION_DAYS; None: retention off, returns at once)."""
    task_status.started()
    if days is None:
        return
    while True:
        now = clock()
        try:
            if await _take_turn(nats, holder, now, ttl=interval * 2):
                report = await archive_runs(nats, older_than=days * 86400.0, directory=directory, now=now, by=f"conductor:{holder}")
                if report.archived or report.skipped:
                    log.info("retention: archived %d run(s) to %s", report.archived, ", ".join(report.files))
        except PurgeDenied as exc:
            log.error("retention is off: %s", exc.message)
            return
        except PyocoError as exc:
            log.warning("retention pass failed (%s); next in %.0fs", exc.message, interval)
        await trio.sleep(interval)
