"""``pyoco-es replay --read-model FILE``: check a gateway's SQLite read model against the runs
bucket it follows (or rebuild it), like ``replay`` checks the bucket against the event stream."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import attrs
import trio

from ..nats import subjects
from ..nats.client import NatsClient
from ..readmodel import open_store, summarize

BATCH = 2000


@attrs.frozen
class ReadModelReport:
    checked: int  # runs in the bucket compared with the file
    behind: int  # bucket changes newer than the file's checkpoint (a live gateway applies them next)
    differences: tuple[tuple[str, str, str], ...]  # (run_id, kind, detail)
    checkpoint: int
    integrity: str
    rebuilt_seconds: float | None = None


async def rebuild_read_model(nats: NatsClient, path: Path) -> float:
    """Delete ``path`` and build it again from the bucket; returns the seconds it took."""
    from ..gateway.runindex import RunIndex

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(RunIndex(nats, path=path).run)
        nursery.cancel_scope.cancel()
    return trio.current_time() - t0


async def check_read_model(nats: NatsClient, path: Path, *, rebuild: bool = False) -> ReadModelReport:
    """Compare every run in the bucket with its row in the file (missing, different, extra)."""
    took = await rebuild_read_model(nats, path) if rebuild else None
    if not path.exists():
        return ReadModelReport(0, 0, ((str(path), "missing", "no read model file"),), 0, "missing", took)
    store, reason = await trio.to_thread.run_sync(functools.partial(open_store, path, identity=subjects.RUNS_BUCKET))
    try:
        if reason:
            return ReadModelReport(0, 0, ((str(path), "unreadable", reason),), 0, "rebuilt empty", took)
        checkpoint = store.checkpoint()
        integrity = await trio.to_thread.run_sync(store.integrity)
        differences: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        checked = behind = 0
        async with nats.kv_batches(subjects.RUNS_BUCKET, batch=BATCH) as batches:
            async for entries in batches:
                live = [e for e in entries if e.value is not None]
                held = await trio.to_thread.run_sync(store.rows, [e.key for e in live])
                for e in live:
                    if e.revision > checkpoint:
                        behind += 1
                        continue
                    seen.add(e.key)
                    checked += 1
                    row = held.get(e.key)
                    want = summarize(json.loads(e.value or b"{}"))
                    if row is None:
                        differences.append((e.key, "missing", f"bucket revision {e.revision}"))
                    elif row[1] != want:
                        differences.append((e.key, "different", f"file revision {row[0]}, bucket revision {e.revision}"))
        for run_id in await trio.to_thread.run_sync(lambda: [r for r in store.all_run_ids() if r not in seen]):
            if not await nats.kv_get(subjects.RUNS_BUCKET, run_id):
                differences.append((run_id, "extra", "in the file, not in the bucket"))
        return ReadModelReport(checked, behind, tuple(differences), checkpoint, integrity, took)
    finally:
        store.close()


async def run_read_model_check(settings: object, path: Path, *, rebuild: bool, output: str) -> bool:
    """The CLI step: check (or rebuild then check) and print; True when the file matches."""
    import click

    from ..core.errors import PyocoError
    from ..runtime import open_system_nats
    from .options import fail

    try:
        async with open_system_nats(settings, name="pyoco-replay", attach=True) as nats:  # type: ignore[arg-type]
            report = await check_read_model(nats, path, rebuild=rebuild)
    except PyocoError as exc:
        fail(exc.message)
        return False
    if output == "json":
        click.echo(json.dumps({"read_model": str(path), **attrs.asdict(report)}))
    else:
        built = f"rebuilt in {report.rebuilt_seconds:.1f} s; " if report.rebuilt_seconds is not None else ""
        click.echo(
            f"read model {path}: {built}checkpoint revision {report.checkpoint}, {report.checked} runs checked, "
            f"{report.behind} newer than the checkpoint, integrity {report.integrity}: {len(report.differences)} difference(s)"
        )
        for run_id, kind, detail in report.differences:
            click.echo(f"  {kind:<9} {run_id}  {detail}")
    return not report.differences and report.integrity == "ok"
