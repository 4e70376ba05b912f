"""Many finished runs, fast: each run's events appended and its folded snapshot written to the
runs bucket as the projector would (for the history benchmark and the read model tests)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any, Final

import attrs

from ..core.codec import encode_envelope, encode_snapshot
from ..core.events import Envelope, Producer, RunCancelled, RunClaimed, RunCompleted, RunFailed, RunSubmitted
from ..core.fold import fold
from ..core.model import RunSnapshot
from ..nats import subjects
from ..nats.client import NatsClient

PRODUCER = Producer(kind="conductor", id="bench")
FLOWS, TAGS, TENANTS, WORKERS = 20, 5, 10, 50
ERRORS = ("ZeroDivisionError: division by zero", "KeyError: 'missing'", "TimeoutError: upstream took too long",
          "ValueError: bad input row 17", "ConnectionError: database unreachable")


def run_id_of(i: int) -> str:
    return hashlib.sha256(f"run-{i}".encode()).hexdigest()[:32]


def run_events(i: int, base: float) -> list[Envelope]:
    run_id = run_id_of(i)
    t = base + i * 0.5
    submitted = RunSubmitted(
        flow_name=f"flow{i % FLOWS}", params={"i": i}, tag=f"t{i % TAGS}", tags=(f"t{i % TAGS}",), submitted_at=t,
        tenant_id=f"tenant{i % TENANTS}",
    )
    worker = f"w{i % WORKERS}"
    kind = i % 10
    events: list[Any] = [submitted]
    if kind == 9:
        events.append(RunCancelled(ended_at=t + 0.1, reason="not_started"))
    else:
        events.append(RunClaimed(worker_id=worker, attempt=1, lease_seconds=15.0))
        if kind in (7, 8):
            events.append(RunFailed(attempt=1, ended_at=t + 0.3, reason="error", error=ERRORS[(i // 10) % len(ERRORS)]))
        else:
            events.append(RunCompleted(attempt=1, ended_at=t + 0.3))
    return [
        Envelope(event_id=f"{run_id}-{n}", run_id=run_id, seq=n, occurred_at=t + n * 0.1, producer=PRODUCER, event=e)
        for n, e in enumerate(events, start=1)
    ]


async def fill(
    nats: NatsClient,
    n: int,
    *,
    first: int = 0,
    chunk: int = 2000,
    base: float | None = None,
    progress: bool = True,
    keep: list[RunSnapshot] | None = None,
) -> float:
    """Append runs ``first .. first + n - 1`` (events, then snapshots), ``chunk`` at a time,
    ``updated_at`` half a second apart from ``base`` (default: ending now); returns runs/s.
    ``keep`` collects the snapshots written (folded from the events appended)."""
    base = time.time() - (first + n) * 0.5 if base is None else base
    t0 = time.perf_counter()
    for start in range(first, first + n, chunk):
        runs = [run_events(i, base) for i in range(start, min(first + n, start + chunk))]
        events = [(subjects.run_events_subject(e.run_id), encode_envelope(e), e.event_id, None) for envs in runs for e in envs]
        acks = iter(await nats.publish_many(events))
        kv = []
        for envs in runs:
            stored = []
            for env in envs:
                ack = next(acks)
                if isinstance(ack, Exception):
                    raise ack
                stored.append(attrs.evolve(env, stream_seq=ack.seq))
            snap = fold(None, stored)  # with last_stream_seq, as the projector writes it
            assert snap is not None
            if keep is not None:
                keep.append(snap)
            kv.append((subjects.kv_subject(subjects.RUNS_BUCKET, snap.run_id), encode_snapshot(snap), None, None))
        for res in await nats.publish_many(kv):
            if isinstance(res, Exception):
                raise res
        if progress and ((start - first) // chunk) % 25 == 0:
            print(f"\rfilled {start - first + chunk:,}/{n:,}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return n / (time.perf_counter() - t0)


PERIOD: Final = 100  # every field run_events varies repeats with this period in i


async def fill_snapshots(nats: NatsClient, n: int, *, first: int = 0, chunk: int = 5000, base: float | None = None) -> float:
    """Only the snapshots of runs ``first .. first + n - 1`` (what a gateway reads), built from
    ``PERIOD`` folded templates with the run id, times and params changed: a million in minutes.
    The event stream stays empty (``replay`` has nothing to compare).  Returns runs/s."""
    base = time.time() - (first + n) * 0.5 if base is None else base
    templates = []
    for i in range(PERIOD):
        snap = fold(None, run_events(i, 0.0))
        assert snap is not None
        templates.append(snap.to_json())
    t0 = time.perf_counter()
    for start in range(first, first + n, chunk):
        kv = []
        for i in range(start, min(first + n, start + chunk)):
            doc = dict(templates[i % PERIOD])
            shift = base + (i - i % PERIOD) * 0.5
            for key, value in doc.items():
                if isinstance(value, float) and (key.endswith("_at") or key.endswith("_time")):
                    doc[key] = value + shift
            doc["run_id"] = run_id_of(i)
            doc["params"] = {"i": i}
            kv.append((subjects.kv_subject(subjects.RUNS_BUCKET, doc["run_id"]), json.dumps(doc, separators=(",", ":")).encode(), None, None))
        for res in await nats.publish_many(kv):
            if isinstance(res, Exception):
                raise res
        print(f"\rwrote {start - first + chunk:,}/{n:,} snapshots", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return n / (time.perf_counter() - t0)
