"""Replay for audits: fold the whole event stream again and compare with the live read model."""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

from ..core import wheels
from ..core.codec import decode_envelope, decode_snapshot, encode_snapshot
from ..core.errors import ConcurrencyConflict, CorruptStreamError, InfraError, PyocoError
from ..core.fold import apply
from ..core.model import RunSnapshot
from ..nats import subjects
from ..nats.client import NatsClient
from ..nats.resources import delete_bucket, recreate_bucket
from ..nats.wheelstore import WheelStore

log = logging.getLogger(__name__)
REPLAY_BUCKET = "pyoco_runs_replay"
WRITE_CHUNK = 1024  # snapshots written (and live values read) per round trip


@attrs.frozen
class Difference:
    run_id: str
    kind: str  # "missing" (no live snapshot), "different", "extra" (live key with no events), "corrupt", "unwritable"
    detail: str = ""


@attrs.frozen
class WheelDifference:
    name: str
    kind: str  # "missing" (an upload event, no object), "extra" (an object, no upload event), "different" (sha256)
    detail: str = ""


@attrs.frozen
class ReplayReport:
    events: int
    runs: int
    differences: tuple[Difference, ...]
    wheel_events: int = 0
    wheels: int = 0  # the wheels the registry's events say exist
    wheel_differences: tuple[WheelDifference, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.differences and not self.wheel_differences


async def replay_wheels(store: WheelStore) -> tuple[int, int, tuple[WheelDifference, ...]]:
    """Fold the registry's events (``pyoco.evt.audit.wheel``) and compare the wheels they say
    exist with the object store: (events, wheels, differences)."""
    events = [doc for _, doc in await store.events()]
    live = wheels.live_wheels(events)
    stored = {o.name: o for o in await store.list()}
    diffs: list[WheelDifference] = []
    for name in sorted(set(live) | set(stored)):
        event, obj = live.get(name), stored.get(name)
        if obj is None:
            diffs.append(WheelDifference(name, "missing", "uploaded by its events, not in the object store"))
        elif event is None:
            diffs.append(WheelDifference(name, "extra", "in the object store without an upload event (stored by pyoco-server or by hand?)"))
        elif event.get("sha256_hex") != obj.sha256_hex:
            diffs.append(WheelDifference(name, "different", f"sha256 {obj.sha256_hex} stored, {event.get('sha256_hex')} uploaded"))
    return len(events), len(live), tuple(diffs)


async def replay(
    nats: NatsClient,
    *,
    rebuild: bool = False,
    out_bucket: str = REPLAY_BUCKET,
    max_snapshot_bytes: int = 262144,
    progress: Callable[[str, int, int], None] | None = None,
    wheel_store: WheelStore | None = None,
) -> ReplayReport:
    """Fold every run event into ``out_bucket`` (recreated empty) and diff it with ``pyoco_runs``.

    With ``rebuild``, snapshots that are missing or different in the live bucket are written
    there too (stop the conductors first, or let them overwrite with the same values).
    The wheel registry's events are checked against ``wheel_store`` (default: the default
    buckets); the registry is reported, never rebuilt.
    """
    snaps: dict[str, RunSnapshot | None] = {}
    # A finished run is parked as its (unbounded) encoding, ~a fifth of the object's memory, and
    # decoded again in the rare case a later event comes for it (the encoding round-trips exactly).
    parked: dict[str, bytes] = {}
    corrupt: dict[str, str] = {}
    events = 0
    total = (await nats.stream_info(subjects.EVENTS_STREAM))["last_seq"]
    after = 0
    run_subjects = subjects.RUN_EVENTS_WILDCARD.removesuffix("*")
    # The whole stream in order, run events kept here (a wildcard filter costs the server a look
    # through every run's subject per batch: quadratic in the history).
    while batch := await nats.read_stream(after_stream_seq=after, limit=1024):
        touched: set[str] = set()
        for seq, subject, data in batch:
            if not subject.startswith(run_subjects):
                continue
            events += 1
            try:
                env = decode_envelope(data, stream_seq=seq)
            except CorruptStreamError as exc:
                corrupt[exc.run_id or f"seq-{seq}"] = str(exc)
                continue
            run_id = env.run_id
            if run_id in corrupt:
                continue
            prev = snaps.get(run_id)
            try:
                if prev is None and run_id in parked:
                    prev = decode_snapshot(parked.pop(run_id))
                snaps[run_id] = apply(prev, env)
                touched.add(run_id)
            except Exception as exc:  # noqa: BLE001 - one run's trouble is reported, never aborts the replay
                corrupt[run_id] = str(exc) if isinstance(exc, CorruptStreamError) else f"{type(exc).__name__}: {exc}"
                if prev is not None:
                    snaps[run_id] = prev  # counted among the runs, as a run that never got parked
        for run_id in touched:
            snap = snaps.get(run_id)
            if snap is not None and snap.terminal and run_id not in corrupt:
                parked[run_id] = encode_snapshot(snap, max_bytes=0)
                del snaps[run_id]
        after = batch[-1][0]
        if progress is not None:
            progress("folded up to stream seq", after, total)
    await recreate_bucket(nats, out_bucket)
    limit = min(max_snapshot_bytes, nats.max_message_bytes) if max_snapshot_bytes > 0 else nats.max_message_bytes
    runs = len(snaps) + len(parked)
    encoded: dict[str, bytes] = {}
    for run_id in sorted([*snaps, *parked]):  # encoded as the objects are let go: both are never held in full
        raw = parked.pop(run_id, None)
        snap = snaps.pop(run_id, None)
        if run_id in corrupt:
            continue
        if raw is not None:  # the bounded value is the same bytes when it fits (encode_snapshot)
            encoded[run_id] = raw if len(raw) <= limit else encode_snapshot(decode_snapshot(raw), max_bytes=limit)
        elif snap is not None:
            encoded[run_id] = encode_snapshot(snap, max_bytes=limit)
    diffs: list[Difference] = [Difference(r, "corrupt", why) for r, why in sorted(corrupt.items())]
    ids = list(encoded)
    for i in range(0, len(ids), WRITE_CHUNK):  # pipelined: one round trip per chunk, not per run
        part = ids[i : i + WRITE_CHUNK]
        written = await nats.kv_update_many(out_bucket, [(run_id, encoded[run_id], 0) for run_id in part])
        for run_id, res in zip(part, written, strict=True):
            if isinstance(res, InfraError):
                raise res
            if isinstance(res, PyocoError):  # this run only: report it and go on
                diffs.append(Difference(run_id, "unwritable", res.message))
        if progress is not None:
            progress("snapshots written", i + len(part), len(ids))
    found, extra, revisions = await _compare_live(nats, encoded, corrupt, progress)
    diffs += found + extra
    if rebuild:
        await _rebuild(nats, [(d.run_id, encoded[d.run_id], revisions.get(d.run_id, 0)) for d in found])
    await delete_bucket(nats, out_bucket)  # scratch only (the CLI also drops it on an error)
    wheel_events, wheel_count, wheel_diffs = await replay_wheels(wheel_store or WheelStore(nats))
    return ReplayReport(
        events=events, runs=runs, differences=tuple(diffs),
        wheel_events=wheel_events, wheels=wheel_count, wheel_differences=wheel_diffs,
    )


async def _rebuild(nats: NatsClient, fixes: list[tuple[str, bytes, int]]) -> None:
    """Write the replayed snapshots of ``fixes`` (run id, value, the live revision compared, 0 for
    missing) into the live bucket, pipelined; a key written meanwhile (a running conductor) is
    overwritten as before, one by one."""
    for i in range(0, len(fixes), WRITE_CHUNK):
        part = fixes[i : i + WRITE_CHUNK]
        for (run_id, value, _), res in zip(part, await nats.kv_update_many(subjects.RUNS_BUCKET, part), strict=True):
            if isinstance(res, ConcurrencyConflict):
                await nats.kv_put(subjects.RUNS_BUCKET, run_id, value)
            elif isinstance(res, PyocoError):
                raise res


async def _compare_live(
    nats: NatsClient, encoded: dict[str, bytes], corrupt: dict[str, str], progress: Callable[[str, int, int], None] | None
) -> tuple[list[Difference], list[Difference], dict[str, int]]:
    """One pass over the live bucket's values (history 1: each key once), instead of a get per
    run and a key listing: (missing and different runs, by run id; live keys without events;
    the revision of each different one)."""
    revisions: dict[str, int] = {}
    found: list[Difference] = []
    extra: list[Difference] = []
    seen: set[str] = set()
    read = 0
    live = (await nats.stream_info(subjects.kv_stream(subjects.RUNS_BUCKET)))["messages"]  # for the progress
    async with nats.kv_batches(subjects.RUNS_BUCKET, batch=WRITE_CHUNK) as batches:
        async for entries in batches:
            read += len(entries)
            for entry in entries:
                if entry.value is None:  # a delete marker
                    continue
                seen.add(entry.key)
                replayed = encoded.get(entry.key)
                if replayed is None:
                    if entry.key not in corrupt:
                        extra.append(Difference(entry.key, "extra", "live snapshot without events"))
                elif entry.value != replayed:
                    found.append(Difference(entry.key, "different", _first_difference(entry.value, replayed)))
                    revisions[entry.key] = entry.revision
            if progress is not None:
                progress("live snapshots compared", read, live)
    found += [Difference(run_id, "missing", "no live snapshot") for run_id in encoded if run_id not in seen]
    return sorted(found, key=lambda d: d.run_id), sorted(extra, key=lambda d: d.run_id), revisions


def _first_difference(live: bytes, replayed: bytes) -> str:
    """Every field that differs, ``status`` first with both values (live → replayed)."""
    import json

    try:
        a, b = json.loads(live), json.loads(replayed)
    except ValueError:
        return "live value is not JSON"
    if not isinstance(a, dict) or not isinstance(b, dict):
        return "live value is not a JSON object"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    head = ""
    if "status" in keys:
        keys.remove("status")
        head = f"status {a.get('status')} → {b.get('status')}; "
        keys.insert(0, "status")
    return f"{head}{len(keys)} field(s) differ: " + ", ".join(keys)
