"""Follow a KV bucket for as long as a service runs: the loop behind the gateway's indexes and the reaper.

nats-py's KV watcher has two gaps this loop closes:

* it does not survive a NATS server restart (its ephemeral consumer is gone and nothing notices),
  so a watchdog compares the bucket's last stream sequence with the last revision delivered and
  restarts a watch that stays behind for a whole check interval;
* a restart (or a failed start) is retried with backoff, and each new watch re-delivers every
  current value, so nothing missed in between is lost (``on_loaded`` gets the keys present, so the
  follower can forget keys deleted meanwhile).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from .core.errors import PyocoError
from .nats import subjects
from .nats.client import KVEntry, NatsClient

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class BucketFollower:
    """Feeds ``on_entry`` every change of ``bucket``; ``ready`` is set once the current values
    have been delivered the first time."""

    nats: NatsClient
    bucket: str
    on_entry: Callable[[KVEntry], None]
    on_loaded: Callable[[set[str]], None] = lambda present: None
    check_interval: float = 2.0
    ready: trio.Event = attrs.field(factory=trio.Event)
    watching: bool = False
    revision: int = 0  # highest revision delivered
    restarts: int = 0
    stalls: int = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow until cancelled; ``started`` once loaded, or after the first failed attempt (so
        the gateway still starts, and answers 503 while NATS is away)."""
        await follow_forever(f"KV watch on {self.bucket}", self._attempt, self, task_status)

    async def _attempt(self, loaded: Callable[[], None]) -> None:
        async with trio.open_nursery() as nursery:
            async with self.nats.kv_watch(self.bucket) as updates:
                self.watching = True
                nursery.start_soon(self._watchdog, nursery.cancel_scope)
                initial: set[str] | None = set()
                async for item in updates:
                    if item is None:
                        if initial is not None:
                            self.on_loaded(initial)
                            initial = None
                        loaded()
                        continue
                    if initial is not None:
                        initial.add(item.key)
                    self.revision = max(self.revision, item.revision)
                    self.on_entry(item)
            nursery.cancel_scope.cancel()

    async def _watchdog(self, watch_scope: trio.CancelScope) -> None:
        if await watch_stalled(self.nats, self.bucket, self.check_interval, lambda: self.revision):
            self.stalls += 1
            watch_scope.cancel()


class Follower(Protocol):
    ready: trio.Event
    watching: bool
    restarts: int


async def follow_forever(
    what: str, attempt: Callable[[Callable[[], None]], Awaitable[None]], owner: Follower, task_status: trio.TaskStatus[None]
) -> None:
    """Run ``attempt(loaded)`` again and again (with backoff) until cancelled: an attempt ends
    when its watch breaks.  ``loaded()`` (called by the attempt once caught up) sets
    ``owner.ready`` and reports ``started``; a first attempt that fails reports it too."""
    started = False
    backoff = 0.1

    def loaded() -> None:
        nonlocal started, backoff
        owner.ready.set()
        backoff = 0.1
        if not started:
            started = True
            task_status.started()

    while True:
        try:
            await attempt(loaded)
            log.warning("%s ended; restarting", what)
        except* PyocoError as group:
            # Grouped: a watch that cannot start (its consumer cannot be created while a cluster
            # elects a leader) fails inside the attempt's nursery; it used to end the process.
            log.warning("%s failed (%s); retrying in %.1fs", what, _messages(group), backoff)
        finally:
            owner.watching = False
        if not started:
            started = True
            task_status.started()
        owner.restarts += 1
        await trio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


async def watch_stalled(nats: NatsClient, bucket: str, interval: float, delivered: Callable[[], int]) -> bool:
    """Return (True) once a revision that existed one check ago still has not been delivered
    (``delivered()``: the highest revision the watch has handed over); runs until then."""
    owed: int | None = None
    while True:
        await trio.sleep(interval)
        try:
            last = (await nats.stream_info(subjects.kv_stream(bucket)))["last_seq"]
        except PyocoError:
            owed = None  # NATS is away; judge again once it answers
            continue
        revision = delivered()
        if owed is not None and revision < owed:
            log.warning("KV watch on %s stalled at revision %d (bucket at %d); restarting it", bucket, revision, last)
            return True
        owed = last if last > revision else None


def _messages(group: BaseExceptionGroup[PyocoError]) -> str:
    """The messages of every error in ``group`` (nested groups flattened)."""
    out: list[str] = []
    for exc in group.exceptions:
        out.append(_messages(exc) if isinstance(exc, BaseExceptionGroup) else exc.message)
    return "; ".join(out)
