"""The wheel registry's storage: the JetStream object store (``pyoco_wheels``), the registry's
events (``pyoco.evt.audit.wheel`` in ``PYOCO_EVENTS``) and pyoco-server's history KV
(``pyoco_wheel_history``), all in pyoco-server 0.5.1's layout (contract §2.4–2.5).

Thin: the rules (names, tags, versions, archives, history documents) are ``core/wheels.py``.
Objects are written and read with nats-py's ObjectStore, the same code pyoco-server uses, so a
wheel either side stored is listed, downloaded and synced by the other.  Links (objects pointing
into another bucket) are never followed: a link is "not found".
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.object_store import ObjectStore

from ..core import wheels
from ..core.bufferfile import BufferFile
from ..core.errors import InfraError, PyocoError, WritesRefused
from . import subjects
from .audit import read_audit_after
from .client import NatsClient
from .connection import NO_ROOM

log = logging.getLogger(__name__)

STREAM_NOT_FOUND = 10059  # JetStream's err_code
LIST_BATCH = 10_000  # objects listed by one direct get; a larger store falls back to nats-py's list


class WheelStoreFull(PyocoError):
    """JetStream refused a wheel for lack of room: the bucket's total cap (PYOCO_WHEEL_MAX_BYTES)
    or the server's storage is full.  Nothing was stored."""

    http_status: ClassVar[int] = 507


@attrs.frozen(kw_only=True)
class WheelObject:
    """One live object's meta information, as the object store keeps it."""

    name: str
    size: int
    digest: str
    mtime: str
    nuid: str
    headers: Mapping[str, object] = attrs.field(factory=dict)

    @property
    def tags(self) -> tuple[str, ...]:
        return wheels.tags_from_headers(self.headers)

    @property
    def sha256_hex(self) -> str | None:
        """The ``sha256`` header, else the hex of the store's own digest."""
        return wheels.sha256_from_headers(self.headers) or wheels.digest_to_hex(self.digest)

    def to_http(self) -> dict[str, object]:
        """The ``GET /wheels`` item, field for field as pyoco-server (contract §1.12)."""
        digest = self.digest
        return {
            "name": self.name,
            "size_bytes": self.size,
            "digest": digest,
            "sha256_b64": digest.split("=", 1)[1] if digest.startswith(wheels.DIGEST_PREFIX) else None,
            "mtime": self.mtime,
            "nuid": self.nuid,
            "tags": list(self.tags),
        }


def _object(info: Any) -> WheelObject:  # noqa: ANN401 - nats-py's ObjectInfo
    return WheelObject(
        name=str(info.name or ""),
        size=int(info.size or 0),
        digest=str(info.digest or ""),
        mtime=str(info.mtime or ""),
        nuid=str(info.nuid or ""),
        headers=dict(info.headers) if isinstance(info.headers, dict) else {},
    )


@attrs.define(eq=False)
class WheelStore:
    """The registry's NATS side; every method crosses the bridge once."""

    client: NatsClient
    bucket: str = subjects.WHEELS_BUCKET
    history_bucket: str = subjects.WHEEL_HISTORY_BUCKET

    def _store(self) -> ObjectStore:  # on the asyncio side; no lookup round trip
        return ObjectStore(name=self.bucket, stream=subjects.obj_stream(self.bucket), js=self.client.js)

    async def list(self) -> list[WheelObject]:
        """Every live object (deleted ones and links left out), in the store's order.

        One direct-get request for the last meta message of every object (``multi_last``),
        instead of nats-py's list, which makes and drops a consumer each time (~5x slower);
        nats-py's list is the fallback when the server does not answer that request whole.
        """

        async def go() -> list[WheelObject]:
            infos = await self._last_metas()
            if infos is None:
                try:
                    infos = await self._store().list(ignore_deletes=True)
                except nats.js.errors.NotFoundError:  # nats-py's answer for an empty store
                    return []
            return [_object(i) for i in infos if not i.deleted and not i.is_link()]

        return await self.client.run("list wheels", go)

    async def _last_metas(self) -> list[Any] | None:  # on the asyncio side
        found = await _last_per_subject(self.client, subjects.obj_stream(self.bucket), f"$O.{self.bucket}.M.>")
        if found is None:
            return None
        out: list[Any] = []
        for hdrs, data in found:
            try:
                out.append(api.ObjectInfo.from_response(json.loads(data)))
            except (ValueError, TypeError, KeyError):
                log.warning("wheel store meta %s is unreadable; skipped", hdrs.get("Nats-Subject"))
        return out

    async def info(self, name: str) -> WheelObject | None:
        async def go() -> WheelObject | None:
            try:
                info = await self._store().get_info(name)
            except nats.js.errors.NotFoundError:
                return None
            return None if info.is_link() else _object(info)

        return await self.client.run("wheel info", go)

    async def read(self, name: str) -> tuple[WheelObject, bytes] | None:
        """The object's bytes (checked against its digest by nats-py), or None when absent.

        Raises:
            InfraError: the stored chunks do not match the object's digest (a corrupt store).
        """

        async def go() -> tuple[WheelObject, bytes] | None:
            store = self._store()
            try:
                info = await store.get_info(name)
                if info.is_link():
                    return None
                buf = io.BytesIO()
                await store.get(name, writeinto=buf)
            except nats.js.errors.NotFoundError:
                return None
            except (nats.js.errors.DigestMismatchError, nats.js.errors.BadObjectMetaError) as exc:
                raise InfraError(f"stored wheel {name!r} is corrupt ({type(exc).__name__})") from exc
            return _object(info), buf.getvalue()

        return await self.client.run("read wheel", go)

    async def put(self, name: str, data: bytes | bytearray, headers: Mapping[str, str]) -> WheelObject:
        """Store ``data`` as ``name`` with pyoco-server's meta headers.  On a failure nats-py
        purges the chunks already sent, so no partial object is left.  A bytearray is read in
        place (nats-py would copy it: it takes ``bytes`` or a file).

        Raises:
            WheelStoreFull: JetStream refused the bytes for lack of room.
        """

        def full(why: str) -> WheelStoreFull:
            return WheelStoreFull(
                f"the wheel store refused {len(data)} bytes ({why}); delete old wheels or raise "
                "PYOCO_WHEEL_MAX_BYTES (the store's total cap)"
            )

        def missing() -> InfraError:
            return InfraError(
                f"the wheel store {subjects.obj_stream(self.bucket)} does not exist (the log says why it could not be "
                "created: too little JetStream storage for PYOCO_WHEEL_MAX_BYTES?)"
            )

        async def go() -> WheelObject:
            meta = api.ObjectMeta(name=name, headers=dict(headers))
            try:
                if isinstance(data, bytes):
                    return _object(await self._store().put(name, data, meta=meta))
                with BufferFile(data) as source:
                    return _object(await self._store().put(name, source, meta=meta))
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError) as exc:
                raise missing() from exc
            except nats.js.errors.APIError as exc:
                if exc.err_code == STREAM_NOT_FOUND:
                    raise missing() from exc
                # JetStream answers "maximum bytes exceeded" with code 503, which nats-py raises
                # as ServiceUnavailableError: a refusal, not an outage.
                if exc.err_code in NO_ROOM:
                    raise full(f"JetStream error {exc.err_code}: {exc.description}") from exc
                raise

        try:
            return await self.client.run("store wheel", go)
        except WritesRefused as exc:
            raise full(exc.message) from exc

    async def delete(self, name: str) -> bool:
        """Delete ``name`` (its chunks are purged); False when there was no such object."""

        async def go() -> bool:
            try:
                await self._store().delete(name)
            except nats.js.errors.NotFoundError:
                return False
            return True

        return await self.client.run("delete wheel", go)

    # -- the registry's history ------------------------------------------------------------------

    async def record(self, event: Mapping[str, object], history: Mapping[str, object], key: str) -> int:
        """Append a registry event (deduplicated by its ``event_id``), then mirror ``history``
        into pyoco-server's history KV under ``key`` (best effort: a failure is logged).
        Returns the event's stream sequence."""
        body = json.dumps(event, ensure_ascii=True, separators=(",", ":")).encode()
        ack = await self.client.publish(subjects.WHEEL_AUDIT_SUBJECT, body, msg_id=str(event["event_id"]))
        try:
            await self.client.kv_put(self.history_bucket, key, json.dumps(history, ensure_ascii=True, separators=(",", ":")).encode())
        except PyocoError as exc:
            log.warning("wheel history KV mirror failed for %s: %s", key, exc.message, extra={"wheel_name": event.get("wheel_name")})
        return ack.seq

    async def events(self, *, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """Registry events after stream sequence ``after``, oldest first (unreadable ones skipped)."""
        return await read_audit_after(self.client, subjects.WHEEL_AUDIT_SUBJECT, after)

    async def upstream_history(self) -> list[dict[str, Any]]:
        """Every readable entry of pyoco-server's history KV (written by either gateway): one
        direct get of every key's last value, else (a huge bucket) the keys and then the values."""
        stream = subjects.kv_stream(self.history_bucket)
        found = await self.client.run(
            "wheel history", _last_per_subject, self.client, stream, subjects.kv_subject(self.history_bucket, ">")
        )
        if found is not None:
            values = [data for hdrs, data in found if hdrs.get("KV-Operation") not in ("DEL", "PURGE")]
        else:
            keys = await self.client.kv_keys(self.history_bucket)
            entries = await self.client.kv_get_many(self.history_bucket, keys) if keys else []
            values = [e.value for e in entries if e is not None and e.value is not None]
        out: list[dict[str, Any]] = []
        for value in values:
            try:
                doc = json.loads(value)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out


async def _last_per_subject(client: NatsClient, stream: str, subject_filter: str) -> list[tuple[dict[str, str], bytes]] | None:
    """The last message of every subject matching ``subject_filter`` (headers, data), in one
    direct-get request (``multi_last``); [] when there is none; None when the server did not
    answer it whole (more than ``LIST_BATCH`` subjects, or an older server): use another way.
    On the asyncio side."""
    nc = client.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out: list[tuple[dict[str, str], bytes]] = []
    try:
        req = {"multi_last": [subject_filter], "batch": LIST_BATCH}
        await nc.publish(subjects.direct_get_subject(stream), json.dumps(req).encode(), reply=inbox)
        while True:
            msg = await sub.next_msg(timeout=client.op_timeout)
            hdrs = dict(msg.headers or {})
            status = hdrs.get("Status")
            if status == "404":
                return []
            if status is not None:  # 204 EOB: complete only when nothing is left
                return out if status == "204" and hdrs.get("Nats-Num-Pending", "0") == "0" else None
            out.append((hdrs, msg.data))
    finally:
        await sub.unsubscribe()
