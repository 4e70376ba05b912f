"""The work-queue port over JetStream: publishing work items, the pull consumers workers and
the projector take them from, and their acks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import nats
import nats.js.errors
import trio
from nats.js import api

from ..core.codec import dumps
from ..core.errors import EventLogUnavailable, PyocoError
from ..ports import Delivered, PubAck
from . import subjects
from .connection import NatsConnection, log


class _Puller:
    """Pull-consumer fetches without nats-py's per-message ``wait_for`` (its cost dominated the
    projector: ~65 µs per message).  One persistent inbox; a fetch first asks for what is
    available (``no_wait``), and only when nothing is, long-polls for the first message."""

    def __init__(self, nc: Any, stream: str, durable: str) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = ""
        self._sub: Any = None
        self._buf: list[Any] = []
        self._want = 0
        self._wake = asyncio.Event()
        self.missing = False  # the last request met no consumer (503: deleted with its stream?)

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)

    async def _on_msg(self, msg: Any) -> None:
        headers = msg.headers
        if headers and not msg.data and "Status" in headers:
            if headers["Status"] != "100":  # 404 no messages, 408 expired, 409 ...: this request ended
                self.missing = headers["Status"] == "503"
                self._wake.set()
            return
        self._buf.append(msg)
        if len(self._buf) >= self._want:
            self._wake.set()

    async def _request(self, batch: int, *, no_wait: bool, expires: float, wait: float) -> None:
        self._want = batch
        self._wake.clear()
        req: dict[str, Any] = {"batch": batch}
        if no_wait:
            req["no_wait"] = True
        else:
            req["expires"] = int(expires * 1e9)
        await self._nc.publish(self._api, dumps(req), reply=self._inbox)
        try:
            async with asyncio.timeout(wait):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _take(self, batch: int) -> list[Any]:
        out, self._buf = self._buf[:batch], self._buf[batch:]
        return out

    async def fetch(self, batch: int, timeout: float) -> list[Delivered]:
        self.missing = False
        if len(self._buf) < batch:
            await self._request(batch - len(self._buf), no_wait=True, expires=0, wait=5.0)
        if not self._buf and not self.missing:
            await self._request(1, no_wait=False, expires=timeout, wait=timeout + 1.0)
        if not self._buf and self.missing:
            raise EventLogUnavailable(f"no consumer answered on {self._api} (deleted with its stream?)")
        out = []
        for m in self._take(batch):
            seq, delivered, pending = subjects.ack_metadata(m.reply)
            out.append(Delivered(data=m.data, subject=m.subject, headers=m.headers, stream_seq=seq, num_delivered=delivered, num_pending=pending, msg=m))
        return out

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


@attrs.define(eq=False)
class PullSubscription:
    """A pull subscription on a durable consumer (one per fetching task)."""

    client: NatsWorkQueue
    puller: _Puller
    stream: str = ""
    durable: str = ""
    recreate: dict[str, Any] | None = None  # the consumer's config, to create it again if deleted

    async def fetch(self, batch: int, timeout: float) -> list[Delivered]:
        """Up to ``batch`` messages: what is available now, else the first to arrive within
        ``timeout``; ``[]`` when none did.

        A consumer that is gone (its stream was deleted and created again) is created again
        when this subscription knows its config; the fetch then raises, and the next one works.
        """
        try:
            return await self.client._call("fetch", self.puller.fetch, batch, timeout)
        except EventLogUnavailable:
            if self.puller.missing and self.recreate is not None:
                log.warning("consumer %s on %s is missing; creating it again", self.durable, self.stream)
                await self.client.ensure_pull_consumer(self.stream, self.durable, self.recreate)
            raise


class NatsWorkQueue(NatsConnection):
    """The work queue: publishes, pull consumers, acks."""

    async def work_items(self, subject: str) -> list[tuple[str, int]]:
        """(run id, attempt) of every item waiting on a work subject (delivered-but-unacked
        included), read with batched direct gets: what the reconcile compares PENDING runs with."""
        raw = await self._call("read work", self._read_subject, subject, 0, 256, False, subjects.WORK_STREAM)
        out: list[tuple[str, int]] = []
        for _seq, data in raw:
            try:
                doc = json.loads(data)
                out.append((str(doc["run_id"]), int(doc.get("attempt") or 1)))
            except (ValueError, KeyError, TypeError):
                continue  # not a work item we can read: the worker dead-letters it
        return out

    async def publish(
        self, subject: str, data: bytes, *, msg_id: str | None = None, headers: dict[str, str] | None = None
    ) -> PubAck:
        res = (await self.publish_many([(subject, data, msg_id, headers)]))[0]
        if isinstance(res, PyocoError):
            raise res
        return res

    async def publish_many(
        self, items: Sequence[tuple[str, bytes, str | None, dict[str, str] | None]]
    ) -> list[PubAck | PyocoError]:
        """JetStream publishes with optional ``Nats-Msg-Id``, pipelined; per-item result or error."""

        async def go() -> list[Any]:
            async with asyncio.timeout(self.op_timeout * 2):
                return await self._gather("publish", self._publish_one, items)

        return await self._call("publish", go)

    # -- consumers ------------------------------------------------------------------------------

    async def ensure_pull_consumer(self, stream: str, durable: str, config: dict[str, Any], *, update: bool = True) -> None:
        """Create the durable pull consumer, or (with ``update``) update it when its config differs.

        ``config`` holds ConsumerConfig fields; ``ack_policy`` / ``deliver_policy`` may be given
        as plain strings ("explicit", "all", ...), so callers need no nats import.
        """
        config = dict(config)
        if isinstance(config.get("ack_policy"), str):
            config["ack_policy"] = api.AckPolicy(config["ack_policy"])
        if isinstance(config.get("deliver_policy"), str):
            config["deliver_policy"] = api.DeliverPolicy(config["deliver_policy"])

        async def go() -> None:
            cfg = api.ConsumerConfig(durable_name=durable, **config)
            try:
                info = await self._js.consumer_info(stream, durable)
            except nats.js.errors.NotFoundError:
                await self._js.add_consumer(stream, cfg)
                return
            current = info.config
            changed = {k: v for k, v in config.items() if getattr(current, k, None) != v} if update else {}
            if changed:
                log.info("updating consumer %s on %s: %s", durable, stream, sorted(changed))
                try:
                    await self._js.add_consumer(stream, cfg)  # same name + new config = update
                except nats.js.errors.BadRequestError as exc:
                    log.warning("cannot update consumer %s (%s); keeping its old config", durable, exc.description)

        await self._call("ensure consumer", go)

    @asynccontextmanager
    async def pull_subscription(
        self, stream: str, durable: str, *, recreate: dict[str, Any] | None = None
    ) -> AsyncIterator[PullSubscription]:
        """Bind a durable pull consumer.  With ``recreate`` (its config) a consumer deleted under
        us (with its stream) is created again by the next fetch."""
        puller = _Puller(self._nc, stream, durable)
        await self._call("bind consumer", puller.start)
        try:
            yield PullSubscription(self, puller, stream, durable, recreate)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self._call("unbind consumer", puller.stop)
                except PyocoError:
                    pass

    async def ack_many(self, msgs: Sequence[Delivered]) -> None:
        async def go() -> None:
            publish = self._nc.publish
            for m in msgs:
                await publish(m.msg.reply, b"+ACK")

        await self._call("ack", go)

    async def nak(self, msg: Delivered, delay: float | None = None) -> None:
        await self._call("nak", msg.msg.nak, delay)

    async def term(self, msg: Delivered) -> None:
        await self._call("term", msg.msg.term)

    async def in_progress_many(self, msgs: Sequence[Delivered]) -> None:
        async def go() -> None:
            for m in msgs:
                await m.msg.in_progress()

        await self._call("in progress", go)

    async def consumer_pending(self, stream: str, durable: str) -> dict[str, int]:
        async def go() -> dict[str, int]:
            try:
                info = await self._js.consumer_info(stream, durable)
            except nats.js.errors.NotFoundError:
                return {"num_pending": 0, "num_ack_pending": 0, "delivered_stream_seq": 0}
            return {
                "num_pending": info.num_pending or 0,
                "num_ack_pending": info.num_ack_pending or 0,
                "delivered_stream_seq": info.delivered.stream_seq if info.delivered else 0,
                "ack_floor_stream_seq": info.ack_floor.stream_seq if info.ack_floor else 0,
            }

        return await self._call("consumer info", go)
