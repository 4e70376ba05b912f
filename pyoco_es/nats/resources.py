"""Idempotent bootstrap of the streams, buckets and consumers pyoco-es needs.

Unlike pyoco-server (which never updates an existing resource), a changed setting is applied to
the existing stream, and a setting that JetStream cannot change in place is reported loudly.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import attrs
import nats.js.errors
from nats.js import api

from ..config import Settings
from . import subjects
from .client import DEFAULT_MAX_MSG_SIZE, NatsClient
from .connection import NO_ROOM

log = logging.getLogger(__name__)

# Streams whose absence degrades a feature but must never stop a process from starting: task
# output (its max_bytes is reserved in JetStream's storage; when there is no room, task output
# is dropped and counted, and the runs go on).
OPTIONAL_STREAMS: Final = frozenset({subjects.LOGS_STREAM})


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
    logs_max_age: float = 604800.0
    logs_max_bytes: int = 256 * 1024 * 1024
    logs_max_msgs_per_run: int = 10000

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
            logs_max_age=settings.logs_max_age,
            logs_max_bytes=settings.logs_max_bytes,
            logs_max_msgs_per_run=settings.logs_max_msgs_per_run,
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
        # Task output: its own stream, so a chatty task never bloats the history.  Limits, not
        # interest: the oldest chunks (old runs first) make room; a run keeps at most
        # logs_max_msgs_per_run chunks (the worker stops one short and marks the drop).
        api.StreamConfig(
            name=subjects.LOGS_STREAM,
            subjects=[f"{subjects.LOGS_PREFIX}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=cfg.replicas,
            max_age=cfg.logs_max_age,
            max_bytes=cfg.logs_max_bytes,
            max_msgs_per_subject=cfg.logs_max_msgs_per_run,
            discard=api.DiscardPolicy.OLD,
            allow_direct=True,
            max_msg_size=cfg.max_msg_size,
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
                done += await _ensure_stream(js, want)
            except nats.js.errors.APIError as exc:
                if want.name not in OPTIONAL_STREAMS or exc.err_code not in NO_ROOM:
                    raise
                log.error(
                    "cannot create or update stream %s (%s): task output will be dropped (counted in "
                    "pyoco_log_lines_dropped) until there is room; lower PYOCO_LOGS_MAX_BYTES or give JetStream more storage",
                    want.name, exc.description,
                )
                done.append(f"skipped {want.name}: {exc.description}")
        return done

    return await client.run("ensure resources", go)


async def _ensure_stream(js: Any, want: api.StreamConfig) -> list[str]:  # noqa: ANN401 - nats-py's JetStream context
    try:
        info = await js.stream_info(want.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(want)
        return [f"created {want.name}"]
    diff = _diff(want, info.config)
    if not diff:
        return []
    log.warning("stream %s config changed, updating: %s", want.name, diff)
    await js.update_stream(attrs_merge(info.config, want))
    return [f"updated {want.name}: {sorted(diff)}"]


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
