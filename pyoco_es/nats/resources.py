"""Idempotent bootstrap of the streams, buckets and consumers pyoco-es needs.

Unlike pyoco-server (which never updates an existing resource), a changed setting is applied to
the existing stream, and a setting that JetStream cannot change in place is reported loudly.
"""

from __future__ import annotations

import asyncio

import logging
from typing import Any, Final

import attrs
import nats.js.errors
from nats.js import api

from ..config import Settings
from ..core.errors import PyocoError
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
    # None: create with 1 replica, never change an existing stream's count (see Settings).
    replicas: int | None = None
    duplicate_window: float = 120.0
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE
    work_prefix: str = subjects.WORK_PREFIX
    dlq_prefix: str = subjects.DLQ_PREFIX
    dlq_stream: str = subjects.DLQ_STREAM
    dlq_max_age: float = 604800.0
    dlq_max_msgs: int = 100000
    dlq_max_bytes: int = 536870912
    auth_bucket: str = subjects.AUTH_BUCKET
    # PYOCO_EVENTS_ALLOW_PURGE: create PYOCO_EVENTS without deny_purge (retention removes runs'
    # events); NATS cannot lift deny_purge from an existing stream, so it takes effect on creation
    allow_event_purge: bool = False
    logs_max_age: float = 604800.0
    logs_max_bytes: int = 256 * 1024 * 1024
    logs_max_msgs_per_run: int = 10000
    wheel_bucket: str = subjects.WHEELS_BUCKET
    wheel_max_bytes: int = 512 * 1024 * 1024  # the object store's total cap, as pyoco-server sets it (0: none)
    wheel_history_bucket: str = subjects.WHEEL_HISTORY_BUCKET
    wheel_history_ttl: float = 90 * 24 * 60 * 60

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
            allow_event_purge=settings.events_allow_purge,
            logs_max_age=settings.logs_max_age,
            logs_max_bytes=settings.logs_max_bytes,
            logs_max_msgs_per_run=settings.logs_max_msgs_per_run,
            wheel_bucket=settings.wheel_object_store_bucket,
            wheel_max_bytes=settings.wheel_max_bytes,
            wheel_history_bucket=settings.wheel_history_kv_bucket,
            wheel_history_ttl=settings.wheel_history_ttl_sec,
        )


def _stream_configs(cfg: ResourceConfig) -> list[api.StreamConfig]:
    return [
        api.StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[f"{subjects.EVENTS_PREFIX}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=cfg.replicas or 1,
            duplicate_window=cfg.duplicate_window,
            deny_delete=True,
            deny_purge=not cfg.allow_event_purge,
            allow_direct=True,
            max_msg_size=cfg.max_msg_size,
        ),
        api.StreamConfig(
            name=subjects.WORK_STREAM,
            subjects=[f"{cfg.work_prefix}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=cfg.replicas or 1,
            duplicate_window=cfg.duplicate_window,
            allow_direct=True,  # the conductor's reconcile reads the waiting items
        ),
        api.StreamConfig(
            name=cfg.dlq_stream,
            subjects=[f"{cfg.dlq_prefix}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=cfg.replicas or 1,
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
            num_replicas=cfg.replicas or 1,
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
        _kv_config(subjects.ARCHIVED_BUCKET, cfg, history=1),
        _object_store_config(cfg),
        _kv_config(cfg.wheel_history_bucket, cfg, history=1, max_age=cfg.wheel_history_ttl),
    ]


def _object_store_config(cfg: ResourceConfig) -> api.StreamConfig:
    # The layout nats-py's create_object_store produces (pyoco-server creates the wheel store
    # with it), so either side's ObjectStore binds to a bucket the other created.
    return api.StreamConfig(
        name=subjects.obj_stream(cfg.wheel_bucket),
        subjects=subjects.obj_subjects(cfg.wheel_bucket),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=cfg.replicas or 1,
        max_bytes=cfg.wheel_max_bytes if cfg.wheel_max_bytes > 0 else -1,
        discard=api.DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        allow_direct=True,
        duplicate_window=120.0,  # the server's default, which nats-py's bucket gets
    )


def _kv_config(bucket: str, cfg: ResourceConfig, *, history: int, max_age: float | None = None) -> api.StreamConfig:
    # The layout nats-py's create_key_value produces, so its KeyValue API binds to it.
    return api.StreamConfig(
        max_age=max_age,
        name=subjects.kv_stream(bucket),
        subjects=[f"$KV.{bucket}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=cfg.replicas or 1,
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
    """Create what is missing and update what changed.  Returns a log of what it did.

    The replica count of an existing stream changes only when ``cfg.replicas`` is set: a process
    started without ``PYOCO_NATS_REPLICAS`` leaves a cluster's R3 streams R3.
    """
    cfg = cfg or ResourceConfig()
    client.stream_max_msg_size = cfg.max_msg_size

    optional = {subjects.obj_stream(cfg.wheel_bucket), subjects.kv_stream(cfg.wheel_history_bucket), *OPTIONAL_STREAMS}

    async def go() -> list[str]:
        js = client.js
        done: list[str] = []
        for want in _stream_configs(cfg):
            try:
                done += await _ensure_stream(js, want, cfg)
            except nats.js.errors.APIError as exc:
                if want.name not in optional or exc.err_code not in NO_ROOM:
                    raise
                done.append(_skip_optional(want, exc))
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
_SKIPPED_WARNED: set[str] = set()  # streams already warned about (reconcile retries every few seconds)


def _skip_optional(want: api.StreamConfig, exc: Any) -> str:  # noqa: ANN401 - nats-py's APIError
    """The wheel registry's streams (PYOCO_WHEEL_MAX_BYTES, 512 MiB as pyoco-server) and task output
    (PYOCO_LOGS_MAX_BYTES) reserve their max_bytes: a server without that much room must not keep
    runs from starting."""
    why = f"{want.name} not created: JetStream has no room for its max_bytes {want.max_bytes} ({exc.description})"
    if want.name not in _SKIPPED_WARNED:
        _SKIPPED_WARNED.add(want.name)
        if want.name in OPTIONAL_STREAMS:
            log.error("%s; task output is dropped (counted in pyoco_log_lines_dropped) until it exists "
                      "(lower PYOCO_LOGS_MAX_BYTES or give JetStream more storage)", why)
        else:
            log.warning("%s; the wheel registry answers 503 until it exists (lower PYOCO_WHEEL_MAX_BYTES or give JetStream more storage)", why)
    return f"skipped {why}"


def _shrinks_object_store(want: api.StreamConfig, diff: dict[str, tuple[Any, Any]]) -> bool:
    if not str(want.name).startswith("OBJ_") or "max_bytes" not in diff:
        return False
    have, wanted = diff["max_bytes"]
    return bool(wanted is not None and wanted >= 0 and (have is None or have < 0 or have > wanted))
async def _ensure_stream(js: Any, want: api.StreamConfig, cfg: ResourceConfig) -> list[str]:  # noqa: ANN401 - nats-py's JetStream context
    try:
        info = await js.stream_info(want.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(want)
        return [f"created {want.name}"]
    diff = _diff(want, info.config)
    if cfg.replicas is None:
        diff.pop("num_replicas", None)
        want.num_replicas = info.config.num_replicas
    if diff.get("deny_purge") == (True, False):  # NATS refuses to lift it (10052)
        del diff["deny_purge"]
        want.deny_purge = True
        log.warning("stream %s denies purge and NATS cannot lift that: retention cannot remove events from it", want.name)
    if _shrinks_object_store(want, diff):
        # Lowering an object store's max_bytes below its use would make JetStream drop
        # stored wheels; keep the larger cap and say so.
        log.warning("not lowering %s max_bytes %s -> %s: stored objects could be lost", want.name, *diff.pop("max_bytes"))
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
        # On a cluster a new stream answers writes once its leader is elected: wait for that
        # (a write before it finds no responder), up to 10 s; on one server it has one at once.
        for _ in range(100):
            info = await js.stream_info(subjects.kv_stream(bucket))
            if info.cluster is None or info.cluster.leader:
                return
            await asyncio.sleep(0.1)

    await client.run("recreate bucket", go)


async def delete_bucket(client: NatsClient, bucket: str) -> None:
    """Delete a bucket and its values (used by the replay test to wipe the live read model)."""

    async def go() -> None:
        try:
            await client.js.delete_stream(subjects.kv_stream(bucket))
        except nats.js.errors.NotFoundError:
            pass

    await client.run("delete bucket", go)
