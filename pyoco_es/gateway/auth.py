"""API-key auth (``PYOCO_HTTP_AUTH_MODE=api_key``): the gateway's key ring and the ASGI layer that
guards every protected route, in front of the fast path and Quart alike.

- **What is protected.** Every route of the app except :data:`PUBLIC_RULES` (``/health``,
  ``/ready``, ``/openapi.json`` and its pages ``/docs``/``/redoc``, the dashboard page and its
  static files) and, only when
  ``PYOCO_HTTP_METRICS_PUBLIC`` is on, ``/metrics``.  A route added later is protected unless it
  is named here.  Paths that match no route (404, 405, redirects) and CORS preflights go on to
  Quart, which answers them without data.
- **Answers** as pyoco-server's: no header → 401 ``api key required``; a malformed, unknown,
  unreadable, wrong or revoked key → 403 ``invalid api key``.  Each refusal is logged with the
  key id (never the secret) and counted in ``/metrics`` (``pyoco_http_requests_total`` by status).
- **Fast and fresh.** The ring holds every record of the auth bucket through a KV watch, so a
  lookup needs no I/O.  PBKDF2 runs once per key (in a thread) and the verified key is cached by
  its SHA-256; a wrong key is remembered too, so repeating it costs no PBKDF2.  A revocation
  (or a deleted or changed record) drops the key from the cache as soon as the watch delivers
  it, and cancels every request still open with it, so an open SSE stream ends.
- **Slowed down.** After ``PYOCO_HTTP_AUTH_FREE_FAILURES`` (10) refusals from one client address within
  :data:`FAILURE_WINDOW` seconds, each further refusal is answered later (0.1 s more each time, up
  to 2 s); valid requests from that address are not delayed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map

from ..logs import KEY_INVALID, KEY_MISSING, NATS_UNAVAILABLE, ids as log_ids
from ..core import apikey
from ..core.apikey import ApiKeyFormatError, ApiKeyRecord
from ..core.codec import dumps
from ..nats import subjects
from ..nats.client import NatsClient
from ..nats.keystore import record_from_entry
from ..ports import KVEntry
from ..watch import BucketFollower
from .guard import cors_headers

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

PUBLIC_RULES: Final = frozenset({"/health", "/ready", "/openapi.json", "/docs", "/redoc", "/", "/static/<path:filename>"})
METRICS_RULE: Final = "/metrics"


def public_rules(*, public_metrics: bool) -> frozenset[str]:
    """The rules served without a key (``/metrics`` only with ``PYOCO_HTTP_METRICS_PUBLIC``)."""
    return PUBLIC_RULES | ({METRICS_RULE} if public_metrics else frozenset())

PRINCIPAL_SCOPE_KEY: Final = "pyoco.principal"  # where the layer leaves the caller for the routes
REQUIRED: Final = "api key required"
INVALID: Final = "invalid api key"
CACHE_MAX: Final = 10_000  # verified keys held (only valid keys get in)
REFUSED_MAX: Final = 1_024  # wrong keys remembered (a flood of distinct ones just cycles)
FAILURE_WINDOW: Final = 60.0  # seconds
FAILURE_DELAY_STEP: Final = 0.1  # each refusal beyond the free ones waits this much longer ...
FAILURE_DELAY_MAX: Final = 2.0  # ... up to this
CLIENTS_TRACKED: Final = 10_000


@attrs.frozen
class Principal:
    """The caller of a request made with a valid key."""

    key_id: str
    tenant_id: str


@attrs.frozen
class Refusal:
    status: int
    detail: str
    reason: str
    key_id: str | None = None

    def log_extra(self) -> dict[str, Any]:
        """pyoco-server's ``err_id``/``msg_id`` for this refusal, and the key id (never the secret)."""
        number = {401: KEY_MISSING, 403: KEY_INVALID}.get(self.status, NATS_UNAVAILABLE)
        return log_ids(number, api_key_id=self.key_id) if self.key_id else log_ids(number)


class KeyRing:
    """Every API key record of the auth bucket, kept current by a watch (a broken or stalled one
    is restarted and re-reads every record: :class:`~pyoco_es.watch.BucketFollower`), and the
    verified keys."""

    def __init__(
        self, nats: NatsClient, *, bucket: str = subjects.AUTH_BUCKET, pepper: str | None = None, check_interval: float = 2.0
    ) -> None:
        self.nats = nats
        self.bucket = bucket
        self.pepper = pepper
        self.follower = BucketFollower(nats, bucket, self._on_entry, self._on_loaded, check_interval)
        self._records: dict[str, ApiKeyRecord] = {}
        self._verified: dict[bytes, str] = {}  # sha256(key) -> key_id
        self._refused: dict[bytes, str] = {}  # sha256(key) -> key_id (wrong secret for a known id)
        self._open: dict[str, set[trio.CancelScope]] = {}  # key_id -> requests in flight with it
        self._limiter = trio.CapacityLimiter(2)  # PBKDF2 threads
        self.pbkdf2_runs = 0

    @property
    def ready(self) -> trio.Event:
        return self.follower.ready

    async def run(self, *, task_status: trio.TaskStatus[KeyRing] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the bucket until cancelled; started once the records are loaded (or the first
        attempt failed: requests then get 503 until they are)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.follower.run)
            task_status.started(self)

    def _on_entry(self, entry: KVEntry) -> None:
        if entry.key.startswith(subjects.API_KEY_PREFIX):
            self._apply(entry.key[len(subjects.API_KEY_PREFIX):], record_from_entry(entry))

    def _on_loaded(self, present: set[str]) -> None:
        """After a (re)load: a record that is gone was deleted while the watch was away."""
        for key_id in list(self._records):
            if subjects.API_KEY_PREFIX + key_id not in present:
                self._apply(key_id, None)

    def _apply(self, key_id: str, record: ApiKeyRecord | None) -> None:
        old = self._records.get(key_id)
        if record is not None and not record.revoked:
            self._records[key_id] = record
            if old is None or old.hash_b64 == record.hash_b64 and old.salt_b64 == record.salt_b64:
                return
        else:
            self._records.pop(key_id, None)
        # revoked, deleted or re-keyed: forget what was verified and end what is open with it
        for cache in (self._verified, self._refused):
            for digest in [d for d, k in cache.items() if k == key_id]:
                del cache[digest]
        for scope in self._open.pop(key_id, ()):
            scope.cancel()
        if old is not None:
            log.info("api key %s (tenant %s) is no longer valid", key_id, old.tenant_id)

    async def authenticate(self, presented: str | None) -> Principal | Refusal:
        if not presented:
            return Refusal(401, REQUIRED, "missing")
        if not self.ready.is_set():
            return Refusal(503, f"api keys are still loading from NATS at {self.nats.url}", "keys not loaded")
        try:
            key_id, _ = apikey.parse_api_key(presented)
        except ApiKeyFormatError:
            return Refusal(403, INVALID, "malformed")
        record = self._records.get(key_id)
        if record is None:
            return Refusal(403, INVALID, "unknown or revoked", key_id)
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        cached = self._verified.get(digest)
        if cached is None:
            if self._refused.get(digest) == key_id:
                return Refusal(403, INVALID, "wrong secret", key_id)
            self.pbkdf2_runs += 1
            ok = await trio.to_thread.run_sync(
                lambda: apikey.verify_api_key(presented, record=record, pepper=self.pepper), limiter=self._limiter
            )
            if self._records.get(key_id) is not record:  # changed while we hashed
                return Refusal(403, INVALID, "revoked while verifying", key_id)
            cache = self._verified if ok else self._refused
            if len(cache) >= (CACHE_MAX if ok else REFUSED_MAX):
                cache.clear()
            cache[digest] = key_id
            if not ok:
                return Refusal(403, INVALID, "wrong secret", key_id)
        return Principal(key_id=record.key_id, tenant_id=record.tenant_id)

    def hold(self, principal: Principal, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the principal's key stops being valid (until ``release``)."""
        if principal.key_id not in self._records:
            scope.cancel()
        self._open.setdefault(principal.key_id, set()).add(scope)

    def release(self, principal: Principal, scope: trio.CancelScope) -> None:
        held = self._open.get(principal.key_id)
        if held is not None:
            held.discard(scope)
            if not held:
                del self._open[principal.key_id]


class AuthLayer:
    """The ASGI layer: authenticate protected requests, refuse the rest, end them on revocation."""

    def __init__(
        self,
        app: ASGIApp,
        url_map: Map,
        keys: KeyRing,
        *,
        header: str = "X-API-Key",
        public_metrics: bool = False,
        free_failures: int = 10,
        observe: Callable[[str, str, int, float], None] | None = None,
        allowed_origins: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.keys = keys
        self.allowed_origins = allowed_origins  # a listed origin's page must be able to read the refusal
        self.header = header.lower().encode("latin-1")
        self.public = public_rules(public_metrics=public_metrics)
        self.adapter = url_map.bind("localhost")
        self.observe = observe
        self.free_failures = free_failures
        self._failures: dict[str, tuple[float, int]] = {}  # client address -> (window start, refusals)

    def rule_of(self, method: str, path: str) -> str | None:
        """The protected rule a request would reach (None: public, or no route matches)."""
        if method == "OPTIONS":
            return None
        try:
            rule, _ = self.adapter.match(path, method, return_rule=True)
        except HTTPException:
            return None  # 404 / 405 / redirect: Quart answers without data
        return None if rule.rule in self.public else rule.rule

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = self.rule_of(scope["method"], scope["path"])
        if rule is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        presented = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == self.header), None)
        outcome = await self.keys.authenticate(presented)
        if isinstance(outcome, Refusal):
            await self._refuse(scope, send, rule, outcome, started)
            return
        with trio.CancelScope() as cancel:
            self.keys.hold(outcome, cancel)
            try:
                await self.app({**scope, PRINCIPAL_SCOPE_KEY: outcome}, receive, send)
            finally:
                self.keys.release(outcome, cancel)
        if cancel.cancelled_caught:
            log.info("%s %s ended: api key %s was revoked", scope["method"], scope["path"], outcome.key_id)

    async def _refuse(self, scope: dict[str, Any], send: Send, rule: str, refusal: Refusal, started: float) -> None:
        client = str((scope.get("client") or ("?", 0))[0])
        await trio.sleep(self._penalty(client))
        log.warning(
            "%s %s refused (%d, %s): key id %s from %s",
            scope["method"], rule, refusal.status, refusal.reason, refusal.key_id or "-", client, extra=refusal.log_extra(),
        )
        body = dumps({"detail": refusal.detail})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if scope["method"] in ("POST", "PUT", "PATCH"):
            headers.append((b"connection", b"close"))  # the unread body must not become the next request
        origin = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"origin"), None)
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in cors_headers(origin, self.allowed_origins, preflight=False).items()]
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if self.observe is not None:
            self.observe(scope["method"], rule, refusal.status, time.perf_counter() - started)


    def _penalty(self, client: str) -> float:
        """Seconds to hold this refusal: 0 for the first few from a client in a window."""
        now = trio.current_time()
        start, count = self._failures.get(client, (now, 0))
        if now - start > FAILURE_WINDOW:
            start, count = now, 0
        if len(self._failures) >= CLIENTS_TRACKED and client not in self._failures:
            self._failures.clear()
        self._failures[client] = (start, count + 1)
        return min(FAILURE_DELAY_MAX, FAILURE_DELAY_STEP * max(0, count + 1 - self.free_failures))


def principal_of(scope: dict[str, Any]) -> Principal | None:
    """The caller the layer authenticated for this request (None when auth is off)."""
    found = scope.get(PRINCIPAL_SCOPE_KEY)
    return found if isinstance(found, Principal) else None


__all__ = ["AuthLayer", "KeyRing", "Principal", "principal_of", "public_rules"]
