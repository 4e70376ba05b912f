"""What every handler has at hand: the :class:`Gateway` (NATS, the run store and indexes,
settings, counters) and the parts of a request that several resources read the same way.

Handlers are module-level functions (one module per resource); they find the gateway with
:func:`current_gateway`, and the fast path (:mod:`.fastpath`) holds it directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio
from quart import current_app, request

from ..config import Settings
from ..core.errors import InfraError, RunNotFound
from ..core.events import JSONObject, Producer
from ..nats.client import NatsClient
from ..service import RunStore
from . import sse
from .auth import KeyRing, Principal, principal_of
from .index import WorkerIndex
from .runindex import RunIndex
from .metrics import HttpMetrics
from .params import idempotency_key, invalid
from .registry import worker_view

STATIC_DIR: Final = Path(__file__).with_name("static")
JSON_BODY_MAX: Final = 1024 * 1024  # POST /runs bodies; NATS max_payload bounds the event anyway
MULTIPART_SLACK: Final = 64 * 1024  # form fields and multipart boundaries around the YAML file
READY_WAIT: Final = 5.0  # seconds a request waits for an index still loading before a 503


@attrs.define(eq=False, kw_only=True)
class Gateway:
    """What the routes share: NATS, the run store and index, settings and a few counters."""

    nats: NatsClient
    settings: Settings
    index: RunIndex
    workers: WorkerIndex
    store: RunStore
    producer: Producer
    clock: Callable[[], float] = time.time
    heartbeat_interval: float = 5.0
    static_dir: Path = STATIC_DIR
    sse_streams: int = 0
    http: HttpMetrics = attrs.Factory(HttpMetrics)
    parse_limiter: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(1))  # YAML parses in a thread
    allowed_origins: frozenset[str] = frozenset()  # PYOCO_HTTP_ALLOWED_ORIGINS, normalised (see .guard)
    allowed_hosts: frozenset[str] | None = None  # Host names served; None: any (set by run_gateway on a loopback bind)
    keys: KeyRing | None = None  # API keys (PYOCO_HTTP_AUTH_MODE=api_key); None: auth off
    work_queues: set[str] = attrs.Factory(set)  # tags whose work consumer exists (.submit.ensure_work_queue)

    def require_nats(self) -> None:
        """Fail fast (503) instead of waiting for a publish timeout while NATS is down."""
        if not self.nats.is_connected:
            raise InfraError(f"not connected to NATS at {self.nats.url} (reconnecting)")

    async def await_nats(self) -> None:
        """For writes: hold the request while NATS reconnects (a restart, a short freeze), up to
        ``PYOCO_NATS_UNAVAILABLE_WAIT_SEC``, then 503 (nothing was sent)."""
        if self.nats.is_connected:
            return
        if not await self.nats.wait_connected(self.settings.nats_unavailable_wait):
            raise InfraError(
                f"not connected to NATS at {self.nats.url} (still reconnecting after {self.settings.nats_unavailable_wait:g}s)"
            )

    async def wait_index_ready(self) -> None:
        """Wait (briefly) for the run index's first load.

        Raises:
            InfraError: still loading after ``READY_WAIT`` seconds.
        """
        await _wait_ready(self.index.ready, f"the run index is still loading from NATS at {self.nats.url}")

    async def worker_views(self) -> list[JSONObject]:
        """Every worker in the registry index as the API shows it, with its effective state
        (served also while NATS is away).

        Raises:
            InfraError: the registry index is still loading after ``READY_WAIT`` seconds.
        """
        await _wait_ready(self.workers.ready, f"the worker registry is still loading from NATS at {self.nats.url}")
        timeout = self.settings.worker_disconnect_timeout
        return [
            worker_view(record, key=key, silent=self.workers.silence(key), disconnect_timeout=timeout)
            for key, record in self.workers.records()
        ]


async def _wait_ready(ready: trio.Event, what: str) -> None:
    if ready.is_set():
        return
    with trio.move_on_after(READY_WAIT):
        await ready.wait()
    if not ready.is_set():
        raise InfraError(what)


def gateway_of(app: Any) -> Gateway:  # noqa: ANN401 - a QuartTrio app
    return app.extensions["pyoco"]  # type: ignore[no-any-return]


def current_gateway() -> Gateway:
    """The gateway of the app handling the current request."""
    return gateway_of(current_app)


# -- the request's common parts ------------------------------------------------------------------


def caller() -> Principal | None:
    """Who made the request (the API key's tenant and id); None when auth is off."""
    return principal_of(request.scope)


def tenant_filter() -> dict[str, str]:
    """The list filter that keeps a caller to its tenant's runs ({} when auth is off)."""
    who = caller()
    return {} if who is None else {"tenant_id": who.tenant_id}


def check_tenant(doc: JSONObject, run_id: str) -> None:
    """Another tenant's run (or one made with auth off) is not found, as if it did not exist.

    Raises:
        RunNotFound: the caller's tenant is not the run's.
    """
    who = caller()
    if who is not None and doc.get("tenant_id") != who.tenant_id:
        raise RunNotFound(run_id)


def includes() -> set[str]:
    """The ``include`` query values (repeated or comma-separated), lower-cased."""
    out: set[str] = set()
    for value in request.args.getlist("include"):
        out.update(v.strip().lower() for v in value.split(",") if v.strip())
    return out


def request_idempotency_key() -> str | None:
    return idempotency_key(request.headers.get("Idempotency-Key"))


def last_event_id() -> int | None:
    """The SSE resume position: ``Last-Event-ID``, else the ``last_event_id`` query parameter.

    Raises:
        RequestInvalid: not a non-negative integer.
    """
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.args.get("last_event_id")
    try:
        return sse.parse_last_event_id(raw)
    except ValueError as exc:
        raise invalid("int_parsing", ("header", "Last-Event-ID"), str(exc), raw) from None


async def request_body() -> bytes:
    raw = await request.get_data(cache=False)
    return raw if isinstance(raw, bytes) else raw.encode("utf-8")
