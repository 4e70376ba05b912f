"""Idempotent bootstrap of the streams, buckets and consumers pyoco-es needs.

Unlike pyoco-server (which never updates an existing resource), a changed setting is applied to
the existing stream, and a setting that JetStream cannot change in place is reported loudly.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import nats.js.errors
from nats.js import api

from ..config import Settings
from ..core.errors import PyocoError
from . import subjects
from .client import DEFAULT_MAX_MSG_SIZE, NatsClient

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class ResourceConfig:
    replicas: int = 1
    duplicate_window: float = 120.0
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE
    work_prefix: str = subjects.WORK_PREFIX
    dlq_prefix: str = subjects.DLQ_PREFIX
    dlq_stream: str = subjects.DLQ_STREAM
    dlq_max_age: float = 604800.0
    dlq_max_msgs: int = 100000
    dlq_max_bytes: int = 536870912
    auth_bucket: str = subjects.AUTH_BUCKET

    @classmethod
    def from_settings(cls, settings: Settings) -> ResourceConfig:
        """The streams' and buckets' shape that ``settings`` asks for (every process that
        creates or heals resources uses this one, so none reverts another's settings)."""
        return cls(
            replicas=settings.nats_replicas,
            work_prefix=settings.work_subject_prefix,
            dlq_max_age=settings.dlq_max_age,
            dlq_max_msgs=settings.dlq_max_msgs,
            dlq_max_bytes=settings.dlq_max_bytes,
            auth_bucket=settings.auth_kv_bucket,
        )


def _stream_configs(cfg: ResourceConfig) -> list[api.StreamConfig]:
    return [
        api.StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[f"{subjects.EVENTS_PREFIX}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=cfg.replicas,
            duplicate_window=cfg.duplicate_window,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
            max_msg_size=cfg.max_msg_size,
        ),
        api.StreamConfig(
            name=subjects.WORK_STREAM,
            subjects=[f"{cfg.work_prefix}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=cfg.replicas,
            duplicate_window=cfg.duplicate_window,
            allow_direct=True,  # the conductor's reconcile reads the waiting items
        ),
        api.StreamConfig(
            name=cfg.dlq_stream,
            subjects=[f"{cfg.dlq_prefix}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=cfg.replicas,
            max_age=cfg.dlq_max_age,
            max_msgs=cfg.dlq_max_msgs,
            max_bytes=cfg.dlq_max_bytes,
            duplicate_window=cfg.duplicate_window,
        ),
        _kv_config(subjects.RUNS_BUCKET, cfg, history=1),
        _kv_config(subjects.WORKERS_BUCKET, cfg, history=1),
        _kv_config(cfg.auth_bucket, cfg, history=1),
    ]


def _kv_config(bucket: str, cfg: ResourceConfig, *, history: int) -> api.StreamConfig:
    # The layout nats-py's create_key_value produces, so its KeyValue API binds to it.
    return api.StreamConfig(
        name=subjects.kv_stream(bucket),
        subjects=[f"$KV.{bucket}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=cfg.replicas,
        max_msgs_per_subject=history,
        discard=api.DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        max_msg_size=cfg.max_msg_size,
        duplicate_window=120.0,
    )


_COMPARED = (
    "subjects",
    "retention",
    "num_replicas",
    "duplicate_window",
    "deny_delete",
    "deny_purge",
    "allow_direct",
    "max_msg_size",
    "max_age",
    "max_msgs",
    "max_bytes",
    "max_msgs_per_subject",
    "discard",
    "allow_rollup_hdrs",
)


def _diff(want: api.StreamConfig, have: api.StreamConfig) -> dict[str, tuple[Any, Any]]:
    out = {}
    for name in _COMPARED:
        w = getattr(want, name, None)
        if w is None:
            continue
        h = getattr(have, name, None)
        if isinstance(w, float) and isinstance(h, (int, float)):
            if abs(w - h) < 1e-6:
                continue
        if w != h:
            out[name] = (h, w)
    return out


async def ensure_resources(client: NatsClient, cfg: ResourceConfig | None = None) -> list[str]:
    """Create what is missing and update what changed.  Returns a log of what it did."""
    cfg = cfg or ResourceConfig()
    client.stream_max_msg_size = cfg.max_msg_size

    async def go() -> list[str]:
        js = client.js
        done: list[str] = []
        for want in _stream_configs(cfg):
            try:
                info = await js.stream_info(want.name)
            except nats.js.errors.NotFoundError:
                await js.add_stream(want)
                done.append(f"created {want.name}")
                continue
            diff = _diff(want, info.config)
            if diff:
                log.warning("stream %s config changed, updating: %s", want.name, diff)
                merged = attrs_merge(info.config, want)
                await js.update_stream(merged)
                done.append(f"updated {want.name}: {sorted(diff)}")
        done += await _drop_foreign_work_consumers(js)
        return done

    return await client.run("ensure resources", go)


def work_consumer_config(tag: str, settings: Settings) -> dict[str, Any]:
    """The per-tag work consumer ``pyoco_es_work_<tag>`` (shared by the tag's workers)."""
    return {
        "filter_subject": subjects.work_subject(tag, settings.work_subject_prefix),
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": settings.consumer_ack_wait,
        "max_deliver": settings.consumer_max_deliver,
        "max_ack_pending": settings.consumer_max_ack_pending,
    }


async def ensure_work_consumer(client: NatsClient, tag: str, settings: Settings, *, update: bool = True) -> None:
    """Make ``pyoco_es_work_<tag>`` exist (``update``: with ``settings``' values), taking the
    tag's filter from a pyoco-server work consumer if one holds it.  The gateway calls it (without
    ``update``) before a tag's first work item, so a tag with items always has our consumer and a
    pyoco-server worker's bind on it is refused (docs/library.md).

    Raises:
        InfraError: NATS is unavailable, or the consumer cannot be created.
    """
    try:
        await client.ensure_pull_consumer(subjects.WORK_STREAM, subjects.work_durable(tag), work_consumer_config(tag, settings), update=update)
    except PyocoError:
        if not await drop_foreign_work_consumers(client):
            raise
        await client.ensure_pull_consumer(subjects.WORK_STREAM, subjects.work_durable(tag), work_consumer_config(tag, settings), update=update)


async def drop_foreign_work_consumers(client: NatsClient) -> list[str]:
    """Delete pyoco-server's per-tag work consumers from the work stream (see
    :data:`subjects.FOREIGN_WORK_DURABLE_PREFIX`); what every resource healing also does."""
    return await client.run("drop foreign work consumers", lambda: _drop_foreign_work_consumers(client.js))


async def _drop_foreign_work_consumers(js: Any) -> list[str]:  # noqa: ANN401 - nats-py's JetStreamContext
    """A consumer named ``pyoco_workers_<tag>`` on the work stream was left by a pyoco-es before
    the rename (upgrade) or made by a pyoco-server worker pointed at this NATS.  Either way it
    would hold the tag's work-queue filter, which our workers' consumer needs, and a pyoco-server
    worker on it would run our items and write run snapshots behind the projector's back."""
    try:
        infos = await js.consumers_info(subjects.WORK_STREAM)
    except nats.js.errors.NotFoundError:
        return []
    done = []
    for info in infos:
        if not info.name.startswith(subjects.FOREIGN_WORK_DURABLE_PREFIX):
            continue
        try:
            await js.delete_consumer(subjects.WORK_STREAM, info.name)
        except nats.js.errors.NotFoundError:
            continue
        log.warning(
            "deleted consumer %s on %s: pyoco-server's work consumer name (left by an older pyoco-es, or made by a "
            "pyoco-server worker pointed at this NATS, which cannot run pyoco-es work: docs/library.md); "
            "pyoco-es workers use %s<tag>",
            info.name, subjects.WORK_STREAM, subjects.WORK_DURABLE_PREFIX,
        )
        done.append(f"deleted consumer {info.name}")
    return done


def attrs_merge(have: api.StreamConfig, want: api.StreamConfig) -> api.StreamConfig:
    """``have`` with every field ``want`` sets (keeps server-assigned fields)."""
    data = have.as_dict()
    for k, v in want.as_dict().items():
        data[k] = v
    return api.StreamConfig.from_response(data)


async def recreate_bucket(client: NatsClient, bucket: str, cfg: ResourceConfig | None = None) -> None:
    """Drop ``bucket`` if it exists and create it empty (replay's fresh bucket)."""
    cfg = cfg or ResourceConfig()

    async def go() -> None:
        js = client.js
        try:
            await js.delete_stream(subjects.kv_stream(bucket))
        except nats.js.errors.NotFoundError:
            pass
        await js.add_stream(_kv_config(bucket, cfg, history=1))

    await client.run("recreate bucket", go)


async def delete_bucket(client: NatsClient, bucket: str) -> None:
    """Delete a bucket and its values (used by the replay test to wipe the live read model)."""

    async def go() -> None:
        try:
            await client.js.delete_stream(subjects.kv_stream(bucket))
        except nats.js.errors.NotFoundError:
            pass

    await client.run("delete bucket", go)
