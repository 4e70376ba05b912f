"""The conductor's guard against pyoco-server workers on our work queue (issue 15).

pyoco-server 0.5's worker binds (and, when missing, creates) the per-tag consumer
``pyoco_workers_<tag>`` on the work stream, then runs what it pulls and writes run snapshots
itself, beside our history.  Where a pyoco-es worker has served the tag, its consumer
(``pyoco_es_work_<tag>``) holds the tag's filter and JetStream refuses that worker's bind.  On a
tag none of ours has served yet, its consumer is created: this guard follows JetStream's
consumer-created advisories for the work stream and deletes such a consumer at once (and
resource healing deletes any it missed), so that worker's next fetch fails and it exits.
"""

from __future__ import annotations

import logging

import trio

from ..core.errors import PyocoError
from ..nats import subjects
from ..nats.client import NatsClient
from ..nats.resources import drop_foreign_work_consumers

log = logging.getLogger(__name__)


async def run_foreign_consumer_guard(nats: NatsClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Delete every ``pyoco_workers_<tag>`` consumer on the work stream as soon as it is created;
    started once subscribed.  A NATS error is logged and the next advisory (or healing) retries."""
    advisories = f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{subjects.WORK_STREAM}.*"
    async with nats.subscribe(advisories) as created:
        task_status.started()
        async for subject, _ in created:
            if not subject.rsplit(".", 1)[-1].startswith(subjects.FOREIGN_WORK_DURABLE_PREFIX):
                continue
            try:
                await drop_foreign_work_consumers(nats)
            except PyocoError as exc:
                log.warning("cannot delete a pyoco-server work consumer (%s); resource healing will retry", exc)
