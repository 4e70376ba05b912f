"""A KV watch that cannot start (on a cluster: its consumer cannot be created while a stream
elects a leader, ``kv watch: NATS unavailable (TimeoutError)``) is retried; it used to escape the
follower's nursery as an exception group and end the gateway (found by the cluster fault suite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from pyoco_es.core.errors import EventLogUnavailable
from pyoco_es.watch import BucketFollower


class FlakyWatch:
    """``kv_watch`` fails ``failures`` times, then delivers the (empty) current values."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.starts = 0

    @asynccontextmanager
    async def kv_watch(self, bucket: str) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
        self.starts += 1
        if self.starts <= self.failures:
            raise EventLogUnavailable("kv watch: NATS unavailable (TimeoutError)")
        send, recv = trio.open_memory_channel[Any](10)
        send.send_nowait(None)  # caught up: no values
        async with send, recv:
            yield recv

    async def stream_info(self, stream: str) -> dict[str, int]:
        return {"last_seq": 0}


async def test_a_watch_that_cannot_start_is_retried_not_raised() -> None:
    nats = FlakyWatch(failures=2)
    follower = BucketFollower(nats, "pyoco_runs", on_entry=lambda entry: None)  # type: ignore[arg-type]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(follower.run)
            await follower.ready.wait()
            nursery.cancel_scope.cancel()
    assert nats.starts == 3 and follower.restarts == 2
