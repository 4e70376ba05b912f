"""Replay for audits: fold the whole event stream again and compare with the live read model."""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

from ..core import wheels
from ..core.codec import decode_envelope, encode_snapshot
from ..core.errors import CorruptStreamError, InfraError, PyocoError
from ..core.fold import apply
from ..core.model import RunSnapshot
from ..nats import subjects
from ..nats.client import NatsClient
from ..nats.resources import delete_bucket, recreate_bucket
from ..nats.wheelstore import WheelStore

log = logging.getLogger(__name__)
REPLAY_BUCKET = "pyoco_runs_replay"


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
    progress: Callable[[int, int], None] | None = None,
    wheel_store: WheelStore | None = None,
) -> ReplayReport:
    """Fold every run event into ``out_bucket`` (recreated empty) and diff it with ``pyoco_runs``.

    With ``rebuild``, snapshots that are missing or different in the live bucket are written
    there too (stop the conductors first, or let them overwrite with the same values).
    The wheel registry's events are checked against ``wheel_store`` (default: the default
    buckets); the registry is reported, never rebuilt.
    """
    snaps: dict[str, RunSnapshot | None] = {}
    corrupt: dict[str, str] = {}
    after = 0
    events = 0
    total = (await nats.stream_info(subjects.EVENTS_STREAM))["last_seq"]
    while True:
        batch = await nats.read_events(subjects.RUN_EVENTS_WILDCARD, after_stream_seq=after, limit=1024)
        if not batch:
            break
        for seq, data in batch:
            events += 1
            # The subject is not in the batch; the envelope names its run.
            try:
                env = decode_envelope(data, stream_seq=seq)
            except CorruptStreamError as exc:
                corrupt[exc.run_id or f"seq-{seq}"] = str(exc)
                continue
            if env.run_id in corrupt:
                continue
            try:
                snaps[env.run_id] = apply(snaps.get(env.run_id), env)
            except Exception as exc:  # noqa: BLE001 - one run's trouble is reported, never aborts the replay
                corrupt[env.run_id] = str(exc) if isinstance(exc, CorruptStreamError) else f"{type(exc).__name__}: {exc}"
        after = batch[-1][0]
        if progress is not None:
            progress(after, total)
    await recreate_bucket(nats, out_bucket)
    limit = min(max_snapshot_bytes, nats.max_message_bytes) if max_snapshot_bytes > 0 else nats.max_message_bytes
    encoded = {r: encode_snapshot(s, max_bytes=limit) for r, s in snaps.items() if s is not None and r not in corrupt}
    ids = sorted(encoded)
    diffs: list[Difference] = [Difference(r, "corrupt", why) for r, why in sorted(corrupt.items())]
    chunk = 256
    to_fix: list[tuple[str, bytes]] = []
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        for run_id in part:
            try:
                await nats.kv_put(out_bucket, run_id, encoded[run_id])
            except InfraError:
                raise
            except PyocoError as exc:  # this run only: report it and go on
                diffs.append(Difference(run_id, "unwritable", exc.message))
        live = await nats.kv_get_many(subjects.RUNS_BUCKET, part)
        for run_id, entry in zip(part, live, strict=True):
            if entry is None:
                diffs.append(Difference(run_id, "missing", "no live snapshot"))
                to_fix.append((run_id, encoded[run_id]))
            elif entry.value != encoded[run_id]:
                diffs.append(Difference(run_id, "different", _first_difference(entry.value or b"", encoded[run_id])))
                to_fix.append((run_id, encoded[run_id]))
    for key in await nats.kv_keys(subjects.RUNS_BUCKET):
        if key not in encoded and key not in corrupt:
            diffs.append(Difference(key, "extra", "live snapshot without events"))
    if rebuild:
        for run_id, value in to_fix:
            await nats.kv_put(subjects.RUNS_BUCKET, run_id, value)
    await delete_bucket(nats, out_bucket)  # scratch only (the CLI also drops it on an error)
    wheel_events, wheel_count, wheel_diffs = await replay_wheels(wheel_store or WheelStore(nats))
    return ReplayReport(
        events=events, runs=len(snaps), differences=tuple(diffs),
        wheel_events=wheel_events, wheels=wheel_count, wheel_differences=wheel_diffs,
    )


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
