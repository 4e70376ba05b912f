"""``run_conductor``: the projector/dispatcher and the reaper in one nursery."""

from __future__ import annotations

import os
import socket

import attrs
import trio

from ..config import Settings
from ..nats.client import NatsClient
from .projector import Projector, run_projector
from .reaper import Reaper, run_reaper


@attrs.frozen
class Conductor:
    projector: Projector
    reaper: Reaper


async def run_conductor(
    nats: NatsClient,
    settings: Settings,
    *,
    conductor_id: str | None = None,
    task_status: trio.TaskStatus[Conductor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled.  ``task_status.started`` reports once both parts are live."""
    cid = conductor_id or f"{socket.gethostname()}-{os.getpid()}"
    async with trio.open_nursery() as nursery:
        projector = await nursery.start(
            lambda task_status: run_projector(
                nats,
                work_prefix=settings.work_subject_prefix,
                max_snapshot_bytes=settings.max_run_snapshot_bytes,
                task_status=task_status,
            )
        )
        reaper = await nursery.start(lambda task_status: run_reaper(nats, settings, conductor_id=cid, task_status=task_status))
        task_status.started(Conductor(projector, reaper))
