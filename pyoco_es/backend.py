"""pyoco-server's worker-side library names over pyoco-es: ``NatsBackendConfig``,
``PyocoNatsWorker``, ``ensure_resources`` and ``configure_logging`` (docs/library.md).

A script written for pyoco-server (``await PyocoNatsWorker.connect(...)``, then
``await worker.run_once()`` in a loop, under ``asyncio.run``) runs with an import change.  The
worker itself is ours (:func:`~pyoco_es.worker.supervisor.run_worker`): it runs on its own Trio
loop in one thread of the caller's process, so the façade works from asyncio or Trio alike
(the async methods hand their blocking waits to a thread with anyio), and its runs execute in
child processes, so the flow resolver must be importable by name.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

import anyio.to_thread
import attrs
import trio

from .config import Settings
from .logs import configure_logging as _configure_logging
from .nats.client import open_nats
from .nats.resources import ResourceConfig
from .nats.resources import ensure_resources as _ensure_resources
from .worker.actor import WorkerActor
from .worker.supervisor import normalize_tags, resolver_spec, run_worker

__all__ = ["NatsBackendConfig", "PyocoNatsWorker", "WorkerStopped", "configure_logging", "ensure_resources"]

# upstream field -> the Settings field that honours it
_SETTINGS_FIELDS: Final = {
    "nats_url": "nats_url",
    "work_subject_prefix": "work_subject_prefix",
    "default_tag": "default_tag",
    "http_auth_mode": "http_auth_mode",
    "http_api_key_header": "api_key_header",
    "worker_heartbeat_interval_sec": "worker_heartbeat_interval",
    "worker_disconnect_timeout_sec": "worker_disconnect_timeout",
    "cancel_grace_period_sec": "cancel_grace_period",
    "ack_progress_interval_sec": "ack_progress_interval",
    "consumer_ack_wait_sec": "consumer_ack_wait",
    "consumer_max_deliver": "consumer_max_deliver",
    "consumer_max_ack_pending": "consumer_max_ack_pending",
    "dlq_publish_execution_error": "dlq_publish_execution_error",
    "max_run_snapshot_bytes": "max_run_snapshot_bytes",
    "workflow_yaml_max_bytes": "workflow_yaml_max_bytes",
    "dashboard_lang": "dashboard_lang",
    "wheel_object_store_bucket": "wheel_object_store_bucket",
    "wheel_sync_enabled": "wheel_sync_enabled",
    "wheel_sync_dir": "wheel_sync_dir",
    "wheel_sync_interval_sec": "wheel_sync_interval",
    "wheel_install_timeout_sec": "wheel_install_timeout",
}
# upstream field -> the ResourceConfig field that honours it
_RESOURCE_FIELDS: Final = {"dlq_max_age_sec": "dlq_max_age", "dlq_max_msgs": "dlq_max_msgs", "dlq_max_bytes": "dlq_max_bytes"}
# upstream fields pyoco-es cannot honour: any value but the default is refused, with the reason
_NOT_CARRIED: Final = {
    "work_stream": "stream names are fixed in pyoco-es",
    "consumer_prefix": "consumer names are fixed in pyoco-es",
    "runs_kv_bucket": "bucket names are fixed in pyoco-es (the conductor alone writes run snapshots)",
    "workers_kv_bucket": "bucket names are fixed in pyoco-es",
    "workers_kv_ttl_sec": "worker liveness is judged by the conductor's reaper, not by a KV TTL",
    "run_heartbeat_interval_sec": "runs have no KV heartbeat in pyoco-es (events are the history)",
    "dlq_stream": "stream names are fixed in pyoco-es",
    "dlq_subject_prefix": "the dead-letter subject prefix is fixed in pyoco-es",
    "auth_kv_bucket": "API keys are configured on the gateway (pyoco-server's key store does not carry over)",
    "auth_pepper": "API keys are configured on the gateway (pyoco-server's key store does not carry over)",
    "wheel_max_bytes": "pyoco-es has no wheel registry yet",
    "wheel_history_kv_bucket": "pyoco-es has no wheel registry yet",
    "wheel_history_ttl_sec": "pyoco-es has no wheel registry yet",
}


@attrs.frozen
class NatsBackendConfig:
    """pyoco-server's configuration object, field for field (same names and defaults).

    :meth:`to_settings` maps it onto pyoco-es's :class:`~pyoco_es.config.Settings`; a field
    pyoco-es cannot honour is refused there when it differs from its default, never ignored.
    """

    nats_url: str = "nats://127.0.0.1:4222"
    work_stream: str = "PYOCO_WORK"
    work_subject_prefix: str = "pyoco.work"
    default_tag: str = "default"
    consumer_prefix: str = "pyoco_workers"
    runs_kv_bucket: str = "pyoco_runs"
    workers_kv_bucket: str = "pyoco_workers"
    workers_kv_ttl_sec: float = 15.0
    http_auth_mode: str = "none"
    http_api_key_header: str = "X-API-Key"
    auth_kv_bucket: str = "pyoco_auth"
    auth_pepper: str | None = None
    run_heartbeat_interval_sec: float = 1.0
    worker_heartbeat_interval_sec: float = 5.0
    worker_disconnect_timeout_sec: float = 20.0
    cancel_grace_period_sec: float = 30.0
    ack_progress_interval_sec: float = 10.0
    consumer_ack_wait_sec: float = 30.0
    consumer_max_deliver: int = 20
    consumer_max_ack_pending: int = 200
    dlq_stream: str = "PYOCO_DLQ"
    dlq_subject_prefix: str = "pyoco.dlq"
    dlq_max_age_sec: float = 7 * 24 * 60 * 60
    dlq_max_msgs: int = 100_000
    dlq_max_bytes: int = 512 * 1024 * 1024
    dlq_publish_execution_error: bool = True
    max_run_snapshot_bytes: int = 256 * 1024
    wheel_object_store_bucket: str = "pyoco_wheels"
    wheel_sync_enabled: bool = False
    wheel_sync_dir: str = ".pyoco/wheels"
    wheel_sync_interval_sec: float = 10.0
    wheel_install_timeout_sec: float = 180.0
    wheel_max_bytes: int = 512 * 1024 * 1024
    wheel_history_kv_bucket: str = "pyoco_wheel_history"
    wheel_history_ttl_sec: float = 90 * 24 * 60 * 60
    workflow_yaml_max_bytes: int = 256 * 1024
    dashboard_lang: str = "auto"

    @classmethod
    def from_env(cls) -> NatsBackendConfig:
        """The fields pyoco-es reads from the environment (``Settings.from_env``), the rest default."""
        settings = Settings.from_env()
        values: dict[str, Any] = {theirs: getattr(settings, ours) for theirs, ours in _SETTINGS_FIELDS.items()}
        values["nats_url"] = settings.nats_url or NatsBackendConfig().nats_url
        return cls(**values)

    def not_carried(self) -> list[str]:
        """``field=value: why`` for each field set to what pyoco-es cannot honour."""
        defaults = NatsBackendConfig()
        return [
            f"{name}={getattr(self, name)!r}: {why}" for name, why in _NOT_CARRIED.items() if getattr(self, name) != getattr(defaults, name)
        ]

    def to_settings(self, base: Settings | None = None) -> Settings:
        """``base`` (default: ``Settings.from_env()``) with this config's honoured fields.

        Raises:
            ValueError: a field pyoco-es cannot honour is not at its default (each is named, with why).
        """
        refused = self.not_carried()
        if refused:
            raise ValueError("NatsBackendConfig fields pyoco-es cannot honour: " + "; ".join(refused))
        changes = {ours: getattr(self, theirs) for theirs, ours in _SETTINGS_FIELDS.items()}
        return attrs.evolve(base or Settings.from_env(), **changes)

    def resource_config(self, settings: Settings) -> ResourceConfig:
        extra = {ours: getattr(self, theirs) for theirs, ours in _RESOURCE_FIELDS.items()}
        return attrs.evolve(ResourceConfig.from_settings(settings), **extra)


async def ensure_resources(js: object = None, config: NatsBackendConfig | None = None) -> list[str]:
    """Create or update pyoco-es's streams and buckets at ``config.nats_url``.

    ``js`` (pyoco-server's JetStream context) is accepted so ``ensure_resources(js, config)``
    calls keep working, and is not used: pyoco-es opens its own connection.  Works under asyncio
    and Trio.  Returns what was created or updated.

    Raises:
        ValueError: ``config`` sets a field pyoco-es cannot honour.
        EventLogUnavailable: NATS cannot be reached.
    """
    if isinstance(js, NatsBackendConfig) and config is None:
        js, config = None, js
    cfg = config or NatsBackendConfig()
    settings = cfg.to_settings()

    async def _ensure() -> list[str]:
        async with open_nats(cfg.nats_url, name="pyoco-es-ensure-resources") as nats:
            return await _ensure_resources(nats, cfg.resource_config(settings))

    return await anyio.to_thread.run_sync(trio.run, _ensure)


def configure_logging(*, service: str = "pyoco-es", level: str | None = None) -> None:
    """pyoco-server's ``configure_logging(service=...)``: :func:`pyoco_es.logs.configure_logging`
    (PYOCO_LOG_LEVEL, PYOCO_LOG_FORMAT, PYOCO_LOG_UTC, PYOCO_LOG_INCLUDE_TRACEBACK), with
    ``level`` (a stdlib level name) overriding PYOCO_LOG_LEVEL when given."""
    _configure_logging(service=service)
    if level:
        logging.getLogger().setLevel(level.upper())


class WorkerStopped(RuntimeError):
    """The worker's loop ended (its error, if any, is the ``__cause__``)."""


_DONE: Final = object()


class PyocoNatsWorker:
    """pyoco-server's ``PyocoNatsWorker`` over pyoco-es's worker: a flow resolver in, runs out.

    From :meth:`connect` on, the worker takes and runs work by itself (``concurrency`` at a time,
    1 by default like pyoco-server) until :meth:`close`; :meth:`run_once` waits for the next run
    it finishes.  Runs are claimed, reported and ended through events (never KV writes).

    Raises (constructor, ``connect``):
        ValueError: a bad tag or worker id, a resolver that is not importable by name, or a config
            field pyoco-es cannot honour.
    """

    def __init__(
        self,
        *,
        config: NatsBackendConfig | None = None,
        flow_resolver: Callable[[str], Any] | str,
        worker_id: str = "worker",
        tags: Sequence[str] | None = None,
        concurrency: int = 1,
        allowed_modules: Sequence[str] = (),
    ) -> None:
        self.config = config or NatsBackendConfig()
        self.settings = self.config.to_settings()
        self.worker_id = worker_id
        self.tags = normalize_tags(tags or (), self.settings.default_tag)
        self._resolver = resolver_spec(flow_resolver)
        self._concurrency = concurrency
        self._allowed = tuple(allowed_modules)
        self._finished: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    async def connect(
        cls,
        *,
        config: NatsBackendConfig | None = None,
        flow_resolver: Callable[[str], Any] | str,
        worker_id: str = "worker",
        tags: Sequence[str] | None = None,
        concurrency: int = 1,
        allowed_modules: Sequence[str] = (),
    ) -> PyocoNatsWorker:
        """Start the worker and return once it is registered and polling.

        Raises:
            ValueError: as the constructor, or bad ``allowed_modules``.
            EventLogUnavailable: NATS cannot be reached.
        """
        self = cls(config=config, flow_resolver=flow_resolver, worker_id=worker_id, tags=tags, concurrency=concurrency, allowed_modules=allowed_modules)
        await anyio.to_thread.run_sync(self._start)
        return self

    def _start(self) -> None:
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), name=f"pyoco-es-worker:{self.worker_id}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    async def _serve(self) -> None:
        try:
            async with open_nats(self.config.nats_url, name=f"pyoco-es-worker:{self.worker_id}", unavailable_wait=self.settings.nats_unavailable_wait) as nats:
                await _ensure_resources(nats, self.config.resource_config(self.settings))
                self._stop = trio.Event()
                start = functools.partial(
                    run_worker,
                    nats,
                    self.settings,
                    worker_id=self.worker_id,
                    tags=self.tags,
                    concurrency=self._concurrency,
                    flow_resolver=self._resolver,
                    allowed_modules=self._allowed,
                    stop=self._stop,
                )
                async with trio.open_nursery() as nursery:
                    actor: WorkerActor = await nursery.start(start)
                    actor.registry.on_finished = self._finished.put
                    self._token = trio.lowlevel.current_trio_token()
                    self._ready.set()
        except Exception as exc:  # handed to the caller's thread: connect / run_once raise it
            self._error = exc
        finally:
            self._ready.set()
            self._finished.put(_DONE)

    def _next_finished(self, timeout: float) -> str | None:
        try:
            item = self._finished.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if item is _DONE:
            self._finished.put(_DONE)  # every later call sees it too
            raise WorkerStopped(f"worker {self.worker_id} is not running") from self._error
        return str(item)

    async def run_once(self, timeout: float = 1.0) -> str | None:
        """Wait up to ``timeout`` seconds for the worker to finish a run; return its run id or None.

        Raises:
            WorkerStopped: the worker was closed, or its loop failed (the failure is the cause).
        """
        return await anyio.to_thread.run_sync(self._next_finished, timeout)

    def _close(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join()

    async def close(self) -> None:
        """Stop taking work, let the runs in flight finish (``PYOCO_WORKER_DRAIN_TIMEOUT_SEC``),
        deregister, disconnect.  Safe to call twice."""
        await anyio.to_thread.run_sync(self._close)
