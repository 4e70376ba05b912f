"""The event-log port over JetStream: optimistic appends to a run's subject, and reads of a
run's history (one run, many runs, or a whole subject filter)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import nats
import nats.errors

from ..core.codec import decode_envelope, encode_envelope_bounded
from ..core.errors import ConcurrencyConflict, CorruptStreamError, EventLogUnavailable, OutcomeUnknown, PayloadTooLarge, PyocoError, WritesRefused
from ..core.events import Envelope
from ..ports import OnStored
from . import subjects
from .connection import WRONG_LAST_SEQUENCE, JetStreamAckError, NatsConnection, _guard, log


OnStored = Callable[[list[int]], None]


class NatsEventLog(NatsConnection):
    """The event log: appends fenced by the run's last sequence, and history reads."""

    # -- events -------------------------------------------------------------------------------

    async def append(
        self, run_id: str, envelopes: Sequence[Envelope], *, expected_last: int, on_stored: OnStored | None = None
    ) -> list[int]:
        """Append one run's events in order, each fenced by the previous one's stream seq.

        Returns the stream seqs.  ``on_stored(seqs)`` runs on the NATS thread as soon as the last
        PubAck is in, before the caller resumes: follow-up I/O that must not wait for a thread hop
        (:meth:`publish_unacked_soon`, a write to a pipe).  It must not block, must not touch Trio state,
        and its exceptions are logged, not raised.

        Raises:
            ConcurrencyConflict: the run's last stream seq was not ``expected_last`` (somebody
                else appended): re-read, re-decide.  Events before the conflicting one are stored.
            EventLogUnavailable: NATS did not acknowledge (the event may or may not be stored;
                a retry with the same event ids deduplicates).
        """
        limit = self.max_message_bytes
        payloads = [(e.event_id, encode_envelope_bounded(e, limit)) for e in envelopes]
        return await self._call("append", self._append, run_id, payloads, expected_last, on_stored)

    async def append_many(
        self, batches: Sequence[tuple[str, Sequence[Envelope], int] | tuple[str, Sequence[Envelope], int, OnStored | None]]
    ) -> list[list[int] | PyocoError]:
        """``append`` for many runs at once, pipelined, one crossing.  Per-run results or errors.
        An item may carry a fourth element, its ``on_stored`` hook (see :meth:`append`).
        An event too large even shrunk is that item's ``PayloadTooLarge``, not the batch's."""
        limit = self.max_message_bytes
        prepared: list[tuple[str, list[tuple[str, bytes]], int, OnStored | None]] = []
        refused: dict[int, PyocoError] = {}
        for i, b in enumerate(batches):
            try:
                payloads = [(e.event_id, encode_envelope_bounded(e, limit)) for e in b[1]]
            except PayloadTooLarge as exc:
                refused[i] = exc
                continue
            prepared.append((b[0], payloads, b[2], b[3] if len(b) > 3 else None))  # type: ignore[misc]
        results = iter(await self._call("append", self._gather, "append", self._append, prepared) if prepared else [])
        return [refused[i] if i in refused else next(results) for i in range(len(batches))]

    async def append_first_many(self, items: Sequence[tuple[Envelope, OnStored | None]]) -> list[list[int] | PyocoError]:
        """The first event of many new runs (each fenced by ``expected_last = 0``), in one
        crossing: every publish goes out before any PubAck is awaited, with no task per event (a
        batch submit).  Per-item stream seqs (as :meth:`append`) or errors; an item with no answer
        in time goes through :meth:`append`'s retrying path, which first looks whether it was
        stored, so an item is never reported twice nor stored twice."""
        limit = self.max_message_bytes
        prepared: list[tuple[int, str, str, bytes, OnStored | None]] = []
        out: list[list[int] | PyocoError] = []
        for i, (env, hook) in enumerate(items):
            try:
                prepared.append((i, env.run_id, env.event_id, encode_envelope_bounded(env, limit), hook))
                out.append(EventLogUnavailable("not sent"))
            except PayloadTooLarge as exc:
                out.append(exc)
        if prepared:
            for i, res in await self._call("append", self._append_first_many, prepared):
                out[i] = res
        return out

    async def _append_first_many(self, prepared: list[tuple[int, str, str, bytes, OnStored | None]]) -> list[tuple[int, Any]]:
        pub = self._pub
        sent: list[tuple[int, str, str, bytes, OnStored | None, str, asyncio.Future[Any]]] = []
        results: list[tuple[int, Any]] = []
        late: list[tuple[int, str, str, bytes, OnStored | None]] = []
        for i, run_id, event_id, data, hook in prepared:
            subject = subjects.run_events_subject(run_id)
            headers = {"Nats-Msg-Id": event_id, "Nats-Expected-Last-Subject-Sequence": "0", "Nats-Expected-Stream": subjects.EVENTS_STREAM}
            try:
                reply, fut = await pub.send(subject, data, headers)
            except Exception:  # noqa: BLE001 - not sent: the retrying path decides
                late.append((i, run_id, event_id, data, hook))
                continue
            sent.append((i, run_id, event_id, data, hook, reply, fut))
        if sent:
            await asyncio.wait([s[6] for s in sent], timeout=self.op_timeout)
        for i, run_id, event_id, data, hook, reply, fut in sent:
            pub._futures.pop(reply, None)
            if not fut.done():
                fut.cancel()
                late.append((i, run_id, event_id, data, hook))
                continue
            subject = subjects.run_events_subject(run_id)
            try:
                seq, _ = pub.outcome(subject, fut.result())
            except JetStreamAckError as exc:
                results.append((i, ConcurrencyConflict(subject, 0) if exc.err_code in WRONG_LAST_SEQUENCE else exc.translate(f"append to {subject}")))
                continue
            except PyocoError:  # no stream answered (restarting?): the retrying path decides
                late.append((i, run_id, event_id, data, hook))
                continue
            self._note_write(None)
            results.append((i, self._stored([seq], subject, hook)))
        for i, run_id, event_id, data, hook in late:
            try:
                results.append((i, await _guard("append", self._append_unanswered, run_id, event_id, data, hook)))
            except PyocoError as exc:
                results.append((i, exc))
        return results

    async def _append_unanswered(self, run_id: str, event_id: str, data: bytes, on_stored: OnStored | None) -> list[int]:
        """An event of :meth:`append_first_many` that got no answer: sent again through
        :meth:`append`'s retrying path; a "wrong last sequence" then is this very event when the
        run's first message holds its bytes (the first send was stored after all)."""
        subject = subjects.run_events_subject(run_id)
        try:
            return await self._append(run_id, [(event_id, data)], 0, on_stored)
        except ConcurrencyConflict:
            wait = max(self.unavailable_wait, self.op_timeout)
            seq = await self._stored_copy(subject, 0, data, asyncio.get_running_loop().time() + wait)
            if seq is not None:
                return self._stored([seq], subject, on_stored)
            raise

    async def _stored_copy(self, subject: str, after: int, data: bytes, deadline: float) -> int | None:
        """The stream seq of ``subject``'s first message after ``after`` if it holds ``data`` (an
        earlier send of this very event was stored after all), else None.  A read with no answer
        is tried again until ``deadline`` (loop time): the server may stall again right after it
        refused the re-send, and the event, stored, must not be reported as NATS unavailable.

        Raises:
            OutcomeUnknown: no read was answered by ``deadline``.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                got = await self._read_subject(subject, after, 1, True)
            except (TimeoutError, nats.errors.TimeoutError) as exc:
                if loop.time() < deadline:
                    continue
                self.writes_outcome_unknown += 1
                raise OutcomeUnknown(f"append to {subject}: sent, and reading it back got no answer in time; the event may or may not be stored", subject=subject) from exc
            return got[0][0] if got and got[0][1] == data else None

    def _stored(self, seqs: list[int], subject: str, on_stored: OnStored | None) -> list[int]:
        if on_stored is not None:
            try:
                on_stored(seqs)
            except Exception:  # noqa: BLE001 - a follow-up's failure must not undo a stored append
                log.exception("follow-up of an append to %s failed", subject)
        return seqs

    async def _append(
        self, run_id: str, payloads: list[tuple[str, bytes]], expected_last: int, on_stored: OnStored | None = None
    ) -> list[int]:
        subject = subjects.run_events_subject(run_id)
        last = expected_last
        seqs: list[int] = []
        for event_id, data in payloads:
            headers = {
                "Nats-Msg-Id": event_id,
                "Nats-Expected-Last-Subject-Sequence": str(last),
                "Nats-Expected-Stream": subjects.EVENTS_STREAM,
            }
            last = await self._store_event(subject, data, headers, expected=last, appended=len(seqs))
            seqs.append(last)
        return self._stored(seqs, subject, on_stored)

    async def _store_event(self, subject: str, data: bytes, headers: dict[str, str], *, expected: int, appended: int) -> int:
        """Publish one event and learn its outcome (on the asyncio side); returns its stream seq.

        A publish that got no answer (NATS frozen, restarting, a lost connection) has an unknown
        outcome: it is sent again, the same bytes with the same ``Nats-Msg-Id`` and expected
        sequence, until an answer comes or ``unavailable_wait`` has passed.  JetStream checks
        the expected sequence *before* its duplicate window (measured on nats-server 2.15:
        ``tests/test_nats_client.py::test_jetstream_checks_expected_sequence_before_dedupe``),
        so a re-send of an event that was in fact stored is refused as "wrong last sequence";
        the run's next message is then read, and if it is this very event, that is the answer.

        Raises:
            ConcurrencyConflict: someone else appended after ``expected``.
            PayloadTooLarge: the server refused the size (never reported as an outage).
            WritesRefused: JetStream has no room (disk or limits full); nothing was stored.
            OutcomeUnknown: sent, but no answer within the wait (may or may not be stored).
            EventLogUnavailable: not sent (the connection is closed) within the wait.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self.unavailable_wait, self.op_timeout)
        unanswered = 0  # tries that may have reached the server without an answer
        while True:
            if unanswered or not self._nc.is_connected:
                while not self._nc.is_connected and not self._nc.is_closed and loop.time() < deadline:
                    await asyncio.sleep(0.02)
            remaining = deadline - loop.time()
            try:
                if self._nc.is_closed:
                    raise nats.errors.ConnectionClosedError
                async with asyncio.timeout(max(0.05, min(self.op_timeout, remaining))):
                    seq, _duplicate = await self._pub.publish_ack(subject, data, headers)
                self._note_write(None)
                return seq
            except JetStreamAckError as exc:
                if exc.err_code in WRONG_LAST_SEQUENCE:
                    if unanswered and (seq := await self._stored_copy(subject, expected, data, deadline)) is not None:
                        self._note_write(None)
                        return seq
                    raise ConcurrencyConflict(subject, expected, appended=appended) from exc
                error = exc.translate(f"append to {subject}")
                if isinstance(error, WritesRefused):
                    self._note_write(error.message)
                raise error from exc
            except nats.errors.MaxPayloadError as exc:
                raise PayloadTooLarge(f"append to {subject}: {len(data)} bytes is above the NATS server's max_payload") from exc
            except (TimeoutError, nats.errors.TimeoutError):
                unanswered += 1  # sent, no answer: it may be stored
                why = "no answer"
            except EventLogUnavailable:
                why = "no JetStream answered (restarting?)"  # a 503 status: this try was not stored
                await asyncio.sleep(0.1)
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError):
                why = "connection lost"
                if self._nc.is_closed:
                    deadline = loop.time()
                else:
                    await asyncio.sleep(0.05)
            if loop.time() >= deadline:
                if unanswered:
                    self.writes_outcome_unknown += 1
                    raise OutcomeUnknown(
                        f"append to {subject}: sent {unanswered} time(s), {why} within {max(self.unavailable_wait, self.op_timeout):g}s; "
                        "the event may or may not be stored",
                        subject=subject,
                    )
                raise EventLogUnavailable(f"append to {subject}: NATS unavailable ({why}); nothing was stored")

    def publish_unacked_soon(self, subject: str, data: bytes, msg_id: str) -> None:
        """Start a JetStream publish from the NATS thread (inside an ``on_stored`` hook) without
        waiting for a PubAck: queued, and sent by one task with every other item queued meanwhile
        (no future, task or ack per item; a send that fails is logged).  Only for hand-offs
        someone else makes good when lost (the conductor's reconcile re-publishes a PENDING run's
        missing item), deduplicated by ``msg_id``."""
        self._unacked.append((subject, data, msg_id))
        if len(self._unacked) == 1:
            task = asyncio.get_running_loop().create_task(self._send_unacked())
            self._soon.add(task)
            task.add_done_callback(self._soon_done)

    async def _send_unacked(self) -> None:
        await asyncio.sleep(0)  # let the rest of the batch's appends queue theirs
        items, self._unacked = self._unacked, []
        publish = self._nc.publish
        for subject, data, msg_id in items:
            await publish(subject, data, headers={"Nats-Msg-Id": msg_id})

    def _soon_done(self, task: asyncio.Task[Any]) -> None:
        self._soon.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("fast-path publish failed (the conductor's reconcile publishes it again): %s", task.exception())

    async def read_run(self, run_id: str, *, after_stream_seq: int = 0, from_leader: bool = False) -> list[Envelope]:
        """A run's events in order (after ``after_stream_seq``), read with batched direct gets.

        On a cluster a direct get may be answered by a replica still catching up: the newest
        events can be missing (never reordered).  ``from_leader`` asks the stream's leader, one
        message per request, for a read that has every acknowledged event.

        Raises:
            CorruptStreamError: an event on the subject cannot be decoded.
        """
        read = self._read_subject_from_leader if from_leader else self._read_subject
        raw = await self._call("read run", read, subjects.run_events_subject(run_id), after_stream_seq)
        return [decode_envelope(data, stream_seq=seq) for seq, data in raw]

    async def read_runs(self, run_ids: Sequence[str]) -> list[list[Envelope] | PyocoError]:
        """``read_run`` (from the start) for several runs in one crossing; per-run events or error.

        The worker reads every run it is about to claim; under load this batches those reads.
        """

        async def go() -> list[Any]:
            return list(
                await asyncio.gather(
                    *(_guard("read run", self._read_subject, subjects.run_events_subject(r), 0) for r in run_ids),
                    return_exceptions=True,
                )
            )

        raw = await self._call("read runs", go)
        out: list[list[Envelope] | PyocoError] = []
        for r in raw:
            if isinstance(r, PyocoError):
                out.append(r)
            elif isinstance(r, BaseException):
                raise r
            else:
                try:
                    out.append([decode_envelope(data, stream_seq=seq) for seq, data in r])
                except CorruptStreamError as exc:
                    out.append(exc)
        return out

    async def read_events(self, subject_filter: str, *, after_stream_seq: int, limit: int = 1024) -> list[tuple[int, bytes]]:
        """Up to ``limit`` raw events on ``subject_filter`` (wildcards allowed) after a position."""
        return await self._call("read events", self._read_subject, subject_filter, after_stream_seq, limit, True)

    async def read_stream(self, *, after_stream_seq: int, limit: int = 1024) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` events of any subject after a position, in stream order: (seq, subject,
        raw event).  For walks of the whole stream: a wildcard filter (``read_events``) makes the
        server look through the stream's subjects for every batch, ~0.1-0.8 s a batch with a
        million runs' subjects, while the stream read in order costs the same at any size."""

        async def go() -> list[tuple[int, str, bytes]]:
            names: list[str] = []
            got = await self._read_subject(">", after_stream_seq, limit, True, names=names)
            return [(seq, name, data) for (seq, data), name in zip(got, names, strict=True)]

        return await self._call("read events", go)

    async def purge_run_events(self, run_id: str) -> None:
        """Remove every event of ``run_id`` from the event stream (retention, after archiving).

        Raises:
            InfraError: the stream denies purge (created with deny_purge), or NATS is away.
        """

        async def go() -> None:
            await self._js.purge_stream(subjects.EVENTS_STREAM, subject=subjects.run_events_subject(run_id))

        await self._call("purge run events", go)

    async def events_purgeable(self) -> bool:
        """Whether the event stream allows purging (it was created without deny_purge)."""

        async def go() -> bool:
            return not (await self._js.stream_info(subjects.EVENTS_STREAM)).config.deny_purge

        return await self._call("stream info", go)
