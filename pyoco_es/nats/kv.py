"""The snapshot-store port over JetStream key/value buckets: reads, compare-and-swap writes
(one or many in one crossing), key listing and watches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import nats
import nats.js.errors
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
        """All live keys ([] for an empty bucket, unlike nats-py's NoKeysError)."""

        async def go() -> list[str]:
            kv = await self._js.key_value(bucket)
            try:
                return list(await kv.keys())
            except nats.js.errors.NoKeysError:
                return []

        return await self._call("kv keys", go)

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
