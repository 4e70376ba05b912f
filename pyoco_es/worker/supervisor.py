"""The worker's supervisor: :func:`run_worker` starts one :class:`~.actor.WorkerActor` and its
parts (intake, registry, attempts, the child pool) and stops them in a written-down order.

``run_worker`` validates its arguments, opens the scratch directory and binds the consumers;
:func:`serve_worker` owns the layers (pool, liveness, acks) and :func:`serve_runs` the attempts.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import trio

from ..config import Settings
from ..core.errors import PyocoError
from ..core.work import WORKER_IDLE, WORKER_STOPPED
from ..nats import subjects
from ..nats.client import NatsClient, PullSubscription
from ..nats.resources import ensure_work_consumer, work_consumer_config
from .actor import WorkerActor
from .stopping import HANDBACK_WAIT
from .scratch import open_scratch_root
from .trust import check_allowed_modules, check_env_names

log = logging.getLogger(__name__)


def offset_clock(offset: float) -> Callable[[], float]:
    """The wall clock, shifted by ``offset`` seconds (``PYOCO_WORKER_CLOCK_OFFSET_SEC``: tests
    simulate a worker whose clock is wrong; nothing may judge liveness from these stamps)."""
    if not offset:
        return time.time
    return lambda: time.time() + offset


def normalize_tags(tags: Sequence[str], default_tag: str) -> tuple[str, ...]:
    """Strip, drop empties, default to ``[default_tag]``; a tag must be one subject token.

    Raises:
        ValueError: a tag contains ``.`` or other characters outside ``[A-Za-z0-9_-]``.
    """
    out: list[str] = []
    for raw in tags:
        for part in str(raw).split(","):
            tag = part.strip()
            if not tag:
                continue
            if not subjects.is_token(tag):
                raise ValueError(f"invalid tag {tag!r}: tags may only contain letters, digits, '_' and '-'")
            if tag not in out:
                out.append(tag)
    return tuple(out) or (default_tag,)


consumer_config = work_consumer_config  # the per-tag work consumer (nats/resources.py)


def resolver_spec(flow_resolver: Callable[..., Any] | str | None) -> str | None:
    """The resolver as an import spec the child processes can load.

    Raises:
        ValueError: a callable that cannot be imported by name (lambda, closure, ``__main__``).
    """
    if flow_resolver is None or isinstance(flow_resolver, str):
        return flow_resolver
    module = getattr(flow_resolver, "__module__", None)
    qualname = getattr(flow_resolver, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise ValueError(
            "flow_resolver must be importable by name (module:function) because runs execute in child "
            f"processes; got {flow_resolver!r}"
        )
    return f"{module}:{qualname}"


async def run_worker(
    nats: NatsClient,
    settings: Settings,
    *,
    worker_id: str,
    tags: Sequence[str],
    concurrency: int = 4,
    flow_resolver: Callable[..., Any] | str | None = None,
    allowed_modules: Sequence[str] = (),
    stop: trio.Event | None = None,
    poll_timeout: float | None = None,
    clock: Callable[[], float] | None = None,
    task_status: trio.TaskStatus[WorkerActor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one worker actor until ``stop`` is set, then drain gracefully and return.

    Args:
        worker_id: the registry key and ``run.claimed``'s worker; must be a subject token.
        tags: the tags to serve (OR semantics; CSV entries are split); default ``[default_tag]``.
        concurrency: runs in flight at once (= warm child processes).
        flow_resolver: ``module:function`` / ``path.py:function`` or an importable function that
            maps a flow name to a pyoco ``Flow`` (raising KeyError for unknown names).  It is
            called in the child processes, never in the worker.
        allowed_modules: module prefixes YAML ``callable:`` entries may import (``*``: any);
            merged with ``settings.allowed_modules``.
        stop: set it to drain and return (``None``: run until cancelled).
        poll_timeout: long-poll duration of a fetch (default ``settings.worker_poll_timeout``).
        clock: the wall clock for event and registry stamps (default: ``time.time`` shifted by
            ``settings.worker_clock_offset``).  Liveness is never judged from it.

    ``task_status.started(actor)`` fires once the consumers are bound and polling.

    Raises:
        ValueError: bad tags, worker id, resolver, or an allowed module that can never be allowed.
        InfraError: NATS is unavailable at start-up.
    """
    if not subjects.is_token(worker_id):
        raise ValueError(f"invalid worker id {worker_id!r}: letters, digits, '_' and '-' only")
    tag_list = normalize_tags(tags, settings.default_tag)
    spec = resolver_spec(flow_resolver)
    allowed = check_allowed_modules([*settings.allowed_modules, *allowed_modules])
    check_env_names(settings.worker_expose_env)
    with open_scratch_root(worker_id) as scratch_root:
        actor = WorkerActor(
            nats,
            settings,
            worker_id=worker_id,
            tags=tag_list,
            concurrency=max(1, concurrency),
            flow_resolver=spec,
            allowed_modules=allowed,
            poll_timeout=poll_timeout if poll_timeout is not None else settings.worker_poll_timeout,
            drain_timeout=settings.worker_drain_timeout,
            scratch_root=scratch_root,
            clock=clock or offset_clock(settings.worker_clock_offset),
        )
        for tag in tag_list:
            await ensure_work_consumer(nats, tag, settings)
        try:
            await serve_worker(actor, stop=stop, task_status=task_status)
        finally:
            await actor.pool.aclose()


async def serve_worker(
    actor: WorkerActor, *, stop: trio.Event | None, task_status: trio.TaskStatus[WorkerActor] = trio.TASK_STATUS_IGNORED
) -> None:
    """The worker's supervisor: start its parts, and stop them in order once ``stop`` is set.

    Each nursery below owns one layer; an outer layer outlives every inner one, which is the stop
    order (also when cancelled):

    1. **Runs** (:func:`serve_runs`): stop pulling, NAK what was fetched but not started, let the
       running attempts finish within ``drain_timeout``, release the rest, cancel what outlived
       even that.
    2. **Acks**: the ack loop flushes the acks of the attempts that just ended, then returns.
    3. **Liveness** (heartbeat, in-progress acks) and the read/append batchers are cancelled: no
       attempt is held any more.
    4. **Registry**: ``STOPPED_GRACEFUL`` is written (shielded, within what is left of
       :data:`~.stopping.HANDBACK_WAIT`, at least 0.5 s; skipped when NATS is not connected).
    5. **Pool**: warming and wheel sync stop; :func:`run_worker` then closes the children and
       removes the scratch directory.

    With wheel sync on, the first pass runs before the pool warms and the pulls start.
    """
    async with trio.open_nursery() as pool_nursery:
        await actor.registry.write(WORKER_IDLE)
        if actor.wheels is not None:
            await actor.wheels.sync_once()  # before warming and pulling: the first runs get the synced code
            pool_nursery.start_soon(actor.wheels.run)
        pool_nursery.start_soon(actor.pool.warm)
        async with trio.open_nursery() as liveness:
            liveness.start_soon(actor.registry.run_heartbeat)
            liveness.start_soon(actor.intake.run_progress)
            liveness.start_soon(actor.batched.run)
            liveness.start_soon(actor.logship.run)
            async with trio.open_nursery() as acks:
                acks.start_soon(actor.intake.run_acks)
                await serve_runs(actor, stop=stop, task_status=task_status)
                actor.intake.close_acks()  # the ack loop flushes what is left, then ends
                acks.cancel_scope.deadline = _handback_deadline(actor)
            if acks.cancel_scope.cancelled_caught:
                log.warning("stopping: the last acks were not confirmed within the hand-back wait "
                            "(their items are redelivered and found obsolete)")  # fmt: skip
            liveness.cancel_scope.cancel()
        await _write_stopped(actor)
        pool_nursery.cancel_scope.cancel()


def _handback_deadline(actor: WorkerActor) -> float:
    """When a stopping worker gives up handing back (:data:`~.stopping.HANDBACK_WAIT` after the
    drain; a worker cancelled without a drain gets the whole wait from now)."""
    return min(actor.handback_by, trio.current_time() + HANDBACK_WAIT)


async def _write_stopped(actor: WorkerActor) -> None:
    """``STOPPED_GRACEFUL`` in the registry, within what is left of the hand-back wait (at least
    :data:`STOPPED_WRITE_MIN` s); skipped when NATS is not connected.  Not written, the entry keeps
    its last state until the conductor judges it by its stale heartbeat."""
    if not actor.nats.is_connected:
        log.warning("could not write STOPPED_GRACEFUL: not connected to NATS (the registry entry goes stale instead)")
        return
    deadline = max(_handback_deadline(actor), trio.current_time() + STOPPED_WRITE_MIN)
    with trio.CancelScope(shield=True, deadline=deadline) as scope:  # the deadline binds inside the shield
        try:
            await actor.registry.write(WORKER_STOPPED)
        except PyocoError as exc:
            log.warning("could not write STOPPED_GRACEFUL: %s", exc)
    if scope.cancelled_caught:
        log.warning("could not write STOPPED_GRACEFUL: NATS did not answer in time (the registry entry goes stale instead)")


STOPPED_WRITE_MIN = 0.5  # seconds the STOPPED_GRACEFUL write always gets, even past the hand-back wait


async def serve_runs(
    actor: WorkerActor, *, stop: trio.Event | None, task_status: trio.TaskStatus[WorkerActor] = trio.TASK_STATUS_IGNORED
) -> None:
    """Pull work for every tag and run each item as an attempt in one nursery, until ``stop``;
    then drain (see :meth:`WorkerActor.drain`) and cancel only what outlived the drain."""
    async with trio.open_nursery() as attempts:
        attempts.start_soon(actor.cancel_watch_loop, attempts)
        async with _bound(actor.nats, actor.tags, actor.settings) as psubs:
            async with trio.open_nursery() as pulls:
                for tag, psub in psubs:
                    pulls.start_soon(functools.partial(actor.intake.run_pulls, tag, psub, actor.process, handler_nursery=attempts))
                task_status.started(actor)
                if stop is None:
                    await trio.sleep_forever()
                else:
                    await stop.wait()
                await actor.drain()
                # the pull loops end on their own (within one poll), so no pull request is
                # left lingering on the server to capture an item; a fetch that a frozen NATS
                # never answers is cut at the hand-back deadline, and with NATS disconnected at
                # once (nothing can come; an item a cut fetch brought is redelivered)
                pulls.cancel_scope.deadline = actor.handback_by if actor.nats.is_connected else trio.current_time()
        attempts.cancel_scope.cancel()  # only what outlived the drain and the release

class _bound:
    """Bind one pull subscription per tag (an async context manager over several)."""

    def __init__(self, nats: NatsClient, tags: Sequence[str], settings: Settings) -> None:
        self.nats = nats
        self.tags = tags
        self.settings = settings
        self._stack: Any = None

    async def __aenter__(self) -> list[tuple[str, PullSubscription]]:
        self._stack = AsyncExitStack()
        out = []
        for tag in self.tags:
            psub = await self._stack.enter_async_context(
                self.nats.pull_subscription(
                    subjects.WORK_STREAM, subjects.work_durable(tag), recreate=consumer_config(tag, self.settings)
                )
            )
            out.append((tag, psub))
        return out

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)


__all__ = ["consumer_config", "normalize_tags", "offset_clock", "resolver_spec", "run_worker", "serve_runs", "serve_worker"]
