"""Load a run and execute a decision against it: the one decide-append loop every shell uses.

Appends are fenced by the run's last stream seq.  On a conflict the run's missing events are
read from the stream and the *same* decision function is called again against the new state
(a cancel that raced a completion becomes a no-op); it is never blindly retried.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence

import attrs
import uuid6

from .core.codec import decode_snapshot
from .core.decide import stamp
from .core.errors import ConcurrencyConflict, CorruptStreamError, InfraError
from .core.events import Envelope, Event, Producer
from .core.fold import SequenceGap, apply, fold
from .core.model import RunSnapshot
from .nats import subjects
from .nats.client import NatsClient, OnStored

log = logging.getLogger(__name__)

MAX_CONFLICTS = 20


def new_event_id() -> str:
    return str(uuid6.uuid7())


def new_run_id() -> str:
    """A fresh run id in pyoco-server's form, ``str(uuid4())`` (36 characters, with dashes).

    Runs stored by earlier pyoco-es versions have ``uuid4().hex`` ids (32 hex characters); both
    forms are valid ids everywhere (routes, CLI, subjects, KV keys), so old runs stay readable.
    """
    return str(uuid.uuid4())


@attrs.frozen
class Outcome:
    """The run after a decision and the envelopes that were appended (empty for a no-op)."""

    snapshot: RunSnapshot | None
    appended: tuple[Envelope, ...]


class RunStore:
    """Reads runs (KV snapshot, completed from the stream) and appends decisions."""

    def __init__(self, nats: NatsClient, *, clock: Callable[[], float] = time.time) -> None:
        self.nats = nats
        self.clock = clock

    async def load(self, run_id: str, *, hint: RunSnapshot | None = None, from_leader: bool = False) -> RunSnapshot | None:
        """The run's current state: the projected snapshot (or ``hint``) plus any newer events
        (``from_leader``: read from the stream's leader, not a replica that may lag).

        Raises:
            CorruptStreamError: an event of this run cannot be folded.
        """
        snap = hint
        if snap is None:
            entry = await self.nats.kv_get(subjects.RUNS_BUCKET, run_id)
            if entry is not None and entry.value:
                try:
                    snap = decode_snapshot(entry.value)
                except (ValueError, KeyError, TypeError):
                    snap = None
        after = snap.last_stream_seq if snap is not None and snap.last_stream_seq else 0
        if snap is not None and not after:
            snap = None  # folded without positions: refold from the start
        events = await self.nats.read_run(run_id, after_stream_seq=after, from_leader=from_leader)
        try:
            return fold(snap, events)
        except SequenceGap:
            # The snapshot and the stream disagree about positions: trust the stream.
            return fold(None, await self.nats.read_run(run_id))

    async def history(self, run_id: str, *, after_seq: int = 0) -> list[Envelope]:
        events = await self.nats.read_run(run_id)
        return [e for e in events if e.seq > after_seq]

    async def execute(
        self,
        run_id: str,
        decide: Callable[[RunSnapshot | None], Sequence[Event]],
        *,
        producer: Producer,
        hint: RunSnapshot | None = None,
        assume_new: bool = False,
        causation_id: str | None = None,
        correlation_id: str | None = None,
        on_stored: OnStored | None = None,
    ) -> Outcome:
        """Decide against the current state and append; on a conflict, reload and decide again.

        ``hint`` is a snapshot the caller already holds (a worker's own view of its run);
        ``assume_new`` skips the read for a run id that cannot exist yet (a fresh submit): if it
        does exist after all, the create-once append conflicts and the decision is re-run on it.
        ``on_stored`` is :meth:`NatsClient.append`'s follow-up hook, for the first try only (a
        re-decision after a conflict appends without it).

        Raises:
            DomainError: from ``decide`` (nothing appended).
            InfraError: NATS failed; events may be partially appended (each is a legal fact).
        """
        snap = hint if hint is not None or assume_new else await self.load(run_id)
        stored: list[Event] = []  # events of this command an earlier, conflicting try did store
        appended: list[Envelope] = []
        for _ in range(MAX_CONFLICTS):
            # A re-decision may propose again what a partially applied try already stored
            # (value-equal events): those are facts already, never appended twice.
            events = [e for e in decide(snap) if e not in stored]
            if not events:
                return Outcome(snap, tuple(appended))
            envs = stamp(
                snap,
                events,
                run_id=run_id,
                producer=producer,
                now=self.clock(),
                new_id=new_event_id,
                causation_id=causation_id,
                correlation_id=correlation_id,
            )
            expected = snap.last_stream_seq if snap is not None else 0
            try:
                seqs = await self.nats.append(run_id, envs, expected_last=expected, on_stored=on_stored)
            except ConcurrencyConflict as exc:
                on_stored = None
                log.debug("conflict appending to run %s; re-deciding", run_id, extra={"run_id": run_id})
                stored += [e.event for e in envs[: exc.appended]]
                appended += envs[: exc.appended]
                # The append proved a newer event exists: a replica's read could still miss it.
                snap = await self.load(run_id, hint=snap, from_leader=True)
                continue
            stored_now = [attrs.evolve(e, stream_seq=s) for e, s in zip(envs, seqs, strict=True)]
            for env in stored_now:
                snap = apply(snap, env)
            return Outcome(snap, tuple(appended) + tuple(stored_now))
        raise InfraError(f"run {run_id}: gave up after {MAX_CONFLICTS} concurrent-update conflicts")


__all__ = ["CorruptStreamError", "Outcome", "RunStore", "new_event_id", "new_run_id"]
