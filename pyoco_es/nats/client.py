"""NatsClient: the Trio face of nats-py.

Every public method is a Trio coroutine; the work happens on the bridge's asyncio loop and
NATS errors are translated into the :mod:`pyoco_es.core.errors` tree there, so no nats
exception crosses this module.  Batch methods (``append_many``, ``kv_update_many``,
``ack_many``...) cross the bridge once for many operations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import nats

from ..core.errors import CorruptStreamError, EventLogUnavailable, PyocoError
from ..ports import Delivered, DueWork, KVEntry, KVWrite, OnStored, PubAck
from .bridge import AsyncioThread
from .connection import DEFAULT_MAX_MSG_SIZE, NATS_TRANSIENT_ERRORS, _guard, log
from .event_log import NatsEventLog
from .kv import WATCH_CAUGHT_UP, NatsSnapshotStore
from .urls import split_nats_urls
from .work import NatsWorkQueue, PullSubscription


class NatsClient(NatsEventLog, NatsSnapshotStore, NatsWorkQueue):
    """One NATS connection serving every port: the event log, the snapshot store and the work
    queue (each in its own module), on the connection of :class:`~.connection.NatsConnection`."""

    async def store_then_ack(
        self, bucket: str, kv_items: Sequence[KVWrite], publishes: Sequence[DueWork], acks: Sequence[Delivered]
    ) -> tuple[list[int | PyocoError], list[PubAck | PyocoError]]:
        """CAS writes into ``bucket`` and publishes (concurrently), then ``acks``, sent only when
        every write and publish succeeded: one crossing, so the acks follow the writes at once.

        The :class:`~pyoco_es.ports.ProcessRecorder` port (what eventsourcing's process recorder
        does with a tracking position); the projector's flush decides what to write.
        """

        async def go() -> tuple[list[Any], list[Any]]:
            async with asyncio.timeout(self.op_timeout * 2):
                kv_res, pub_res = await asyncio.gather(
                    self._gather("kv update", self._cas_one, [(bucket, *it) for it in kv_items]),
                    self._gather("publish", self._publish_one, publishes),
                )
            if not any(isinstance(r, PyocoError) for r in (*kv_res, *pub_res)):
                publish = self._nc.publish
                for m in acks:
                    await publish(m.msg.reply, b"+ACK")
            return kv_res, pub_res

        return await self._call("store then ack", go)


@asynccontextmanager
async def open_nats(
    url: str, *, name: str = "pyoco-es", op_timeout: float = 5.0, connect_timeout: float = 5.0, unavailable_wait: float = 10.0
) -> AsyncIterator[NatsClient]:
    """Connect to NATS (reconnecting forever in the background) and close cleanly on exit.

    ``url`` is one server or a cluster's nodes, comma-separated (:func:`~.urls.split_nats_urls`);
    the client fails over between them.

    Raises:
        NatsUrlError: ``url`` is not a list of NATS server URLs (nothing was started).
        EventLogUnavailable: no server could be reached within ``connect_timeout``.
    """
    servers = split_nats_urls(url)
    thread = AsyncioThread(name=f"nats:{name}")
    closing: list[bool] = []
    try:

        async def connect() -> Any:
            async def _noop_err(exc: Exception) -> None:
                log.debug("nats error: %s", exc)

            async def _disc() -> None:
                if not closing:
                    log.warning("disconnected from NATS at %s", url)

            async def _reco() -> None:
                log.warning("reconnected to NATS at %s", url)

            # nats-py retries the first connect forever when reconnects are unlimited: bound it
            # (each server of a list may take connect_timeout: a frozen node never refuses).
            async with asyncio.timeout(connect_timeout * (len(servers) + 1)):
                return await nats.connect(
                    servers,
                    name=name,
                    connect_timeout=connect_timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    error_cb=_noop_err,
                    disconnected_cb=_disc,
                    reconnected_cb=_reco,
                    pending_size=64 * 1024 * 1024,
                )

        try:
            nc = await thread.call(_guard, f"connect to {url}", connect)
        except PyocoError as exc:
            raise EventLogUnavailable(
                f"cannot connect to NATS at {url}: {exc.message}. Start one with `pyoco-server up` "
                "(embedded) or pass --nats-url"
            ) from exc
        client = NatsClient(thread, nc, url=url, op_timeout=op_timeout, unavailable_wait=unavailable_wait)
        try:
            yield client
        finally:
            closing.append(True)
            await client.close()
    finally:
        thread.stop()


__all__ = [
    "DEFAULT_MAX_MSG_SIZE",
    "CorruptStreamError",
    "Delivered",
    "KVEntry",
    "NATS_TRANSIENT_ERRORS",
    "NatsClient",
    "OnStored",
    "PubAck",
    "PullSubscription",
    "WATCH_CAUGHT_UP",
    "open_nats",
]
