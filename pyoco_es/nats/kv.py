"""The snapshot-store port over JetStream key/value buckets: reads, compare-and-swap writes
(one or many in one crossing), key listing and watches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
import trio

from ..core.errors import ConcurrencyConflict, PyocoError, WritesRefused
from ..ports import KVEntry
from . import subjects
from .connection import JetStreamAckError, NatsConnection, WRONG_LAST_SEQUENCE


WATCH_CAUGHT_UP: Final = None  # sent once on a watch channel when the initial values are delivered


class NatsSnapshotStore(NatsConnection):
    """The snapshot store (and every other KV bucket): reads, CAS writes, keys, watches."""

    # -- key/value ------------------------------------------------------------------------------

    async def kv_get(self, bucket: str, key: str) -> KVEntry | None:
        return (await self.kv_get_many(bucket, [key]))[0]

    async def kv_get_many(self, bucket: str, keys: Sequence[str]) -> list[KVEntry | None]:
        async def one(key: str) -> KVEntry | None:
            try:
                msg = await self._js.get_msg(subjects.kv_stream(bucket), subject=subjects.kv_subject(bucket, key), direct=True)
            except nats.js.errors.NotFoundError:
                return None
            hdrs = msg.headers or {}
            if hdrs.get("KV-Operation") in ("DEL", "PURGE"):
                return None
            return KVEntry(key=key, value=msg.data, revision=int(msg.seq))

        async def go() -> list[KVEntry | None]:
            return list(await asyncio.gather(*(one(k) for k in keys)))

        return await self._call("kv get", go)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        async def go() -> int:
            ack = await self._js.publish(subjects.kv_subject(bucket, key), value)
            return int(ack.seq)

        return await self._call("kv put", go)

    async def kv_update(self, bucket: str, key: str, value: bytes, *, last: int) -> int:
        """Compare-and-swap (``last=0``: create).  Raises ConcurrencyConflict on a lost race."""
        res = (await self.kv_update_many(bucket, [(key, value, last)]))[0]
        if isinstance(res, PyocoError):
            raise res
        return res

    async def kv_update_many(
        self, bucket: str, items: Sequence[tuple[str, bytes, int]]
    ) -> list[int | PyocoError]:
        """Pipelined compare-and-swap writes, one crossing; per-item new revision or error."""

        async def go() -> list[Any]:
            async with asyncio.timeout(self.op_timeout * 2):
                return await self._gather("kv update", self._cas_one, [(bucket, *it) for it in items])

        return await self._call("kv update", go)

    async def _cas_one(self, bucket: str, key: str, value: bytes, last: int) -> int:  # on the asyncio side
        subject = subjects.kv_subject(bucket, key)
        try:
            revision = await self._pub.publish(subject, value, {"Nats-Expected-Last-Subject-Sequence": str(last)})
            self._note_write(None)
            return revision
        except JetStreamAckError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise ConcurrencyConflict(subject, last) from exc
            error = exc.translate(f"kv update {subject}")
            if isinstance(error, WritesRefused):
                self._note_write(error.message)
            raise error from exc

    async def kv_keys(self, bucket: str) -> list[str]:
        """All live keys, in revision order ([] for an empty bucket).  Read by a pull consumer to
        the end: nats-py's ``keys()`` ends at a "caught up" marker that can come before the only
        value when that value is delivered during its consumer info call ([] for a 1-key bucket,
        seen in a test run)."""
        alive: dict[str, bool] = {}
        async with self.kv_batches(bucket) as batches:
            async for entries in batches:
                for entry in entries:
                    alive[entry.key] = entry.value is not None
        return [key for key, live in alive.items() if live]

    @asynccontextmanager
    async def kv_watch(
        self, bucket: str, key: str = ">"
    ) -> AsyncIterator[trio.MemoryReceiveChannel[KVEntry | None]]:
        """Watch keys: current values first, then ``WATCH_CAUGHT_UP`` (None), then live changes."""

        async def start(kv_key: str) -> Any:
            kv = await self._js.key_value(bucket)
            return await kv.watch(kv_key, include_history=False, ignore_deletes=False)

        watcher = await self._call("kv watch", start, key)

        async def produce(emit: Callable[[object], None]) -> None:
            while True:
                entry = await watcher.updates(timeout=None)
                if entry is None:
                    emit(WATCH_CAUGHT_UP)
                    continue
                value = None if entry.operation in ("DEL", "PURGE") else entry.value
                emit(KVEntry(key=entry.key, value=value, revision=int(entry.revision)))

        async with self._forward(produce, cleanup=watcher.stop) as channel:
            yield channel

    async def kv_purge(self, bucket: str, key: str) -> int:
        """Remove ``key``'s value and history (a PURGE marker rolls the key up)."""

        async def go() -> int:
            ack = await self._js.publish(subjects.kv_subject(bucket, key), b"", headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"})
            return int(ack.seq)

        return await self._call("kv purge", go)

    # -- following a bucket from a revision (the gateway's persistent read model) -----------------

    @asynccontextmanager
    async def kv_batches(self, bucket: str, *, batch: int = 1024) -> AsyncIterator[AsyncIterator[list[KVEntry]]]:
        """Every value of ``bucket`` (history 1: each key's latest; value None for a delete), in
        batches of up to ``batch`` read by :meth:`kv_pull` until none is pending: the one walk of a
        whole bucket (one pass, no get per key)."""
        async with self.kv_pull(bucket, 0) as fetch:

            async def batches() -> AsyncIterator[list[KVEntry]]:
                while True:
                    entries, pending = await fetch(batch)
                    if entries:
                        yield entries
                    if not entries or not pending:
                        return

            yield batches()

    @asynccontextmanager
    async def kv_pull(
        self, bucket: str, after: int
    ) -> AsyncIterator[Callable[[int], Awaitable[tuple[list[KVEntry], int]]]]:
        """Read every change of ``bucket`` after revision ``after`` in batches: yields ``fetch(n)``,
        which returns up to ``n`` entries (oldest first; value None for a delete) and how many are
        still pending after them.  A pull consumer: nothing is read ahead of the caller, so a
        million-key catch-up holds one batch in memory at a time."""

        async def start() -> Any:
            # JetStream answers 503 for a moment while a clustered stream elects or catches up:
            # tried again until unavailable_wait, as appends are.
            deadline = asyncio.get_running_loop().time() + max(self.unavailable_wait, self.op_timeout)
            while True:
                try:
                    return await subscribe()
                except nats.js.errors.ServiceUnavailableError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)

        async def subscribe() -> Any:
            if (await self._js.stream_info(subjects.kv_stream(bucket))).state.last_seq <= after:
                return None  # nothing to read: no consumer, and no fetch waiting out its timeout
            policy = DeliverPolicy.ALL if after <= 0 else DeliverPolicy.BY_START_SEQUENCE
            config = ConsumerConfig(
                deliver_policy=policy,
                opt_start_seq=None if after <= 0 else after + 1,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
                max_waiting=1,
            )
            return await self._js.pull_subscribe(
                subjects.kv_subject(bucket, ">"), durable=None, stream=subjects.kv_stream(bucket), config=config
            )

        sub = await self._call("kv pull", start)
        prefix = subjects.kv_subject(bucket, "")

        async def fetch(n: int) -> tuple[list[KVEntry], int]:
            async def go() -> tuple[list[KVEntry], int]:
                if sub is None:
                    return [], 0
                try:
                    msgs = await sub.fetch(n, timeout=self.op_timeout)
                except nats.errors.TimeoutError:
                    return [], 0
                out = [_kv_entry(m, prefix) for m in msgs]
                return out, (subjects.ack_metadata(msgs[-1].reply)[2] if msgs else 0)

            return await self._call("kv pull", go)

        try:
            yield fetch
        finally:
            if sub is not None:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(5):
                        try:
                            await self._call("kv pull close", sub.unsubscribe)
                        except PyocoError:
                            pass

    @asynccontextmanager
    async def kv_watch_from(self, bucket: str, after: int) -> AsyncIterator[trio.MemoryReceiveChannel[KVEntry]]:
        """Live changes of ``bucket`` with a revision above ``after`` (deletes with value None),
        in order; an ordered push consumer (recreated by nats-py when it falls out of order)."""
        prefix = subjects.kv_subject(bucket, "")
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def start() -> Any:
            async def on_msg(msg: Any) -> None:
                queue.put_nowait(msg)

            return await self._js.subscribe(
                subjects.kv_subject(bucket, ">"),
                stream=subjects.kv_stream(bucket),
                cb=on_msg,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=ConsumerConfig(opt_start_seq=after + 1),
                inactive_threshold=300.0,
            )

        sub = await self._call("kv watch", start)

        async def produce(emit: Callable[[object], None]) -> None:
            while True:
                emit(_kv_entry(await queue.get(), prefix))

        async with self._forward(produce, cleanup=sub.unsubscribe) as channel:
            yield channel


def _kv_entry(msg: Any, prefix: str) -> KVEntry:
    hdrs = msg.headers or {}
    deleted = hdrs.get("KV-Operation") in ("DEL", "PURGE") or hdrs.get("Nats-Marker-Reason") in ("MaxAge", "Purge", "Remove")
    return KVEntry(key=msg.subject[len(prefix):], value=None if deleted else msg.data, revision=subjects.ack_metadata(msg.reply)[0])