"""``run_conductor``: the projector/dispatcher, the reaper and the reconcile in one nursery."""

from __future__ import annotations

import os
import socket

import attrs
import trio

from ..config import Settings
from ..nats.client import NatsClient
from ..nats.resources import ResourceConfig, ensure_resources
from .foreign import run_foreign_consumer_guard
from .projector import Projector, run_projector
from .reaper import Reaper, run_reaper
from .reconcile import Reconciler, run_reconciler
from .retention import run_retention


@attrs.frozen
class Conductor:
    projector: Projector
    reaper: Reaper
    reconciler: Reconciler


async def run_conductor(
    nats: NatsClient,
    settings: Settings,
    *,
    conductor_id: str | None = None,
    task_status: trio.TaskStatus[Conductor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled.  ``task_status.started`` reports once every part is live."""
    cid = conductor_id or f"{socket.gethostname()}-{os.getpid()}"
    resources = ResourceConfig.from_settings(settings)

    async def heal() -> None:
        # Streams, buckets deleted under a running system come back (their consumers with the
        # next bind: workers and the projector re-create theirs).
        await ensure_resources(nats, resources)

    async with trio.open_nursery() as nursery:
        projector = await nursery.start(
            lambda task_status: run_projector(
                nats,
                work_prefix=settings.work_subject_prefix,
                max_snapshot_bytes=settings.max_run_snapshot_bytes,
                heal=heal,
                task_status=task_status,
            )
        )
        reaper = await nursery.start(lambda task_status: run_reaper(nats, settings, conductor_id=cid, task_status=task_status))
        reconciler = Reconciler(
            nats,
            projector,
            work_prefix=settings.work_subject_prefix,
            min_age=min(2.0, settings.reconcile_interval),
            heal=heal,
        )
        await nursery.start(lambda task_status: run_reconciler(reconciler, interval=settings.reconcile_interval, task_status=task_status))
        await nursery.start(lambda task_status: run_retention(
            nats, days=settings.run_retention_days, directory=settings.archive_directory(), holder=cid,
            interval=settings.run_retention_interval, task_status=task_status))
        await nursery.start(run_foreign_consumer_guard, nats)  # pyoco-server workers: docs/library.md
        task_status.started(Conductor(projector, reaper, reconciler))
