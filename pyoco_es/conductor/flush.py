"""The projector's flush, as one transaction-like step over the NATS ports: write the dirty
snapshots (compare-and-swap) and publish the due work items concurrently, then ack the absorbed
events, only when every write and publish succeeded (an event is acked only once its effects are
stored, so a crash before the ack replays it: the fold is idempotent)."""

from __future__ import annotations

from collections.abc import Sequence

import outcome
import trio

from ..core.errors import PyocoError
from ..nats.client import NatsClient
from ..ports import Delivered, KVWrite, PubAck

DueWork = tuple[str, bytes, str | None]  # a work item: subject, body, Nats-Msg-Id


async def commit(
    nats: NatsClient,
    bucket: str,
    kv_items: Sequence[KVWrite],
    publishes: Sequence[DueWork],
    acks: Sequence[Delivered],
) -> tuple[list[int | PyocoError], list[PubAck | PyocoError]]:
    """Write ``kv_items`` into ``bucket`` and publish ``publishes`` concurrently, then ack ``acks``.

    Returns:
        Per item: the new revision or the error (``ConcurrencyConflict`` for a lost race), and
        per publish: its ack or the error.  The acks are sent only when none failed.

    Raises:
        InfraError: NATS did not answer for the whole batch (nothing is acked).
    """
    writes: outcome.Outcome[list[int | PyocoError]] = outcome.Value([])
    sent: outcome.Outcome[list[PubAck | PyocoError]] = outcome.Value([])

    async def write() -> None:
        nonlocal writes
        writes = await outcome.acapture(nats.kv_update_many, bucket, kv_items)

    async def publish() -> None:
        nonlocal sent
        sent = await outcome.acapture(nats.publish_many, [(subject, body, msg_id, None) for subject, body, msg_id in publishes])

    async with trio.open_nursery() as nursery:  # errors are captured: none leaves as a group
        if kv_items:
            nursery.start_soon(write)
        if publishes:
            nursery.start_soon(publish)
    kv_res, pub_res = writes.unwrap(), sent.unwrap()
    if acks and not any(isinstance(r, PyocoError) for r in (*kv_res, *pub_res)):
        await nats.ack_many(acks)
    return kv_res, pub_res
