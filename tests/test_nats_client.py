"""The NATS adapter's own behaviour against a real server (and against none)."""

from __future__ import annotations

import socket

import pytest
import trio

from pyoco_es.core.errors import ConcurrencyConflict, EventLogUnavailable
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient, open_nats


async def test_an_unreachable_server_is_a_clear_error_not_a_hang() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nobody listens there
    with trio.fail_after(10):
        with pytest.raises(EventLogUnavailable, match="cannot connect to NATS at .*pyoco-server up"):
            async with open_nats(f"nats://127.0.0.1:{port}", connect_timeout=0.5):
                pass


async def test_kv_compare_and_swap_and_batched_reads(nats: NatsClient) -> None:
    with trio.fail_after(10):
        rev = await nats.kv_update(subjects.RUNS_BUCKET, "k1", b"one", last=0)
        with pytest.raises(ConcurrencyConflict):
            await nats.kv_update(subjects.RUNS_BUCKET, "k1", b"two", last=0)
        await nats.kv_update(subjects.RUNS_BUCKET, "k1", b"two", last=rev)
        got = await nats.kv_get_many(subjects.RUNS_BUCKET, ["k1", "missing"])
        assert got[0] is not None and got[0].value == b"two" and got[1] is None
        assert await nats.kv_keys(subjects.WORKERS_BUCKET) == []  # empty bucket: [] (not an error)


async def test_cancelling_a_call_cancels_it_on_the_asyncio_side(nats: NatsClient) -> None:
    """A Trio cancel reaches the bridged call: a long fetch returns at once, the client stays usable."""
    await nats.ensure_pull_consumer(subjects.WORK_STREAM, "idle", {"filter_subject": "pyoco.work.idle", "ack_policy": "explicit"})
    async with nats.pull_subscription(subjects.WORK_STREAM, "idle") as sub:
        with trio.fail_after(5):
            with trio.move_on_after(0.2) as scope:
                await sub.fetch(1, timeout=30)
            assert scope.cancelled_caught
            assert await nats.kv_keys(subjects.WORKERS_BUCKET) == []
