"""The wheel registry without HTTP: upload, delete and history over :class:`~pyoco_es.nats.
wheelstore.WheelStore`, with pyoco-server 0.5.1's checks and answers (contract §1.12).

- **Upload**: the name (422 ``invalid wheel name`` / ``invalid wheel filename``), the tags (422
  ``invalid wheel tags``), the size (413 ``wheel too large``), then our archive checks (422
  ``invalid wheel archive: ...``), then upstream's version policy against the stored wheels of
  the same package (409), then the object, then the event.  Nothing is stored before every
  check passed; a failed event append deletes the object again, so a 5xx leaves nothing behind.
- **Events**: every upload and delete appends ``wheel.uploaded`` / ``wheel.deleted`` to
  ``pyoco.evt.audit.wheel`` (who, from where, sha256, size, version, tags) and mirrors upstream's
  history entry into ``pyoco_wheel_history``, so an upstream gateway on the same NATS sees it.
- **History** is our events plus upstream's history KV (entries an upstream gateway wrote),
  merged by ``event_id``.
- Changes are serialised per gateway (a lock), so two uploads of one package through the same
  gateway cannot both pass the version check; across gateways the check is pyoco-server's (a
  race can store both).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import trio
import uuid6

from ..core import wheels
from ..core.errors import TRANSIENT_ERRORS, PayloadTooLarge, PyocoError
from ..core.wheels import InvalidWheel, WheelConflict, WheelName, WheelNotFound
from ..nats.wheelstore import WheelObject, WheelStore
from .auth import Principal

log = logging.getLogger(__name__)

RECORD_ATTEMPTS: Final = 3  # an event append that got no answer is sent again (same id) this many times
RECORD_BACKOFF: Final = 0.25  # seconds, times the attempt number
SOURCE_VALUE_MAX: Final = 256  # request headers copied into history are cut to this
CONTENT_TYPE_RE: Final = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")


@attrs.frozen(kw_only=True)
class Actor:
    """Who changed the registry and from where (upstream's ``actor`` and ``source``)."""

    principal: Principal | None = None
    source: Mapping[str, str | None] = attrs.field(factory=dict)


def request_source(
    *, remote_addr: str | None, headers: Mapping[str, str], scheme: str | None
) -> dict[str, str | None]:
    """Upstream's ``source`` fields, each cut to ``SOURCE_VALUE_MAX`` characters."""

    def cut(value: str | None) -> str | None:
        return value[:SOURCE_VALUE_MAX] if value else None

    return {
        "remote_addr": cut(remote_addr),
        "x_forwarded_for": cut(headers.get("x-forwarded-for")),
        "x_real_ip": cut(headers.get("x-real-ip")),
        "user_agent": cut(headers.get("user-agent")),
        "host": cut(headers.get("host")),
        "scheme": cut(scheme),
    }


@attrs.frozen(kw_only=True)
class Upload:
    """An upload that passed every check not needing NATS."""

    wheel: WheelName
    data: bytes | bytearray = attrs.field(repr=False)  # a bytearray: the request body, cut down to the file
    tags: tuple[str, ...]
    replace: bool
    sha256_hex: str
    content_type: str | None


@attrs.define(eq=False)
class WheelRegistry:
    """One gateway's registry: the store, a lock for changes, and the events read so far."""

    store: WheelStore
    max_bytes: int
    producer: str
    clock: Callable[[], float]
    _lock: trio.Lock = attrs.Factory(trio.Lock)
    _reading: trio.Lock = attrs.Factory(trio.Lock)
    _events: list[dict[str, Any]] = attrs.Factory(list)
    _after: int = 0

    async def list(self) -> list[dict[str, object]]:
        """``GET /wheels``: live objects with valid wheel names, by name."""
        items = [o.to_http() for o in await self.store.list() if wheels.is_valid_name(o.name)]
        return sorted(items, key=lambda x: str(x["name"]))

    async def check(
        self, *, filename: str, data: bytes | bytearray, tags: str | None, replace: bool, content_type: str | None
    ) -> Upload:
        """The checks an upload passes before NATS is involved (in upstream's order, then ours).
        Hashing and reading the archive run in a worker thread: a large wheel does not stall
        the gateway.

        Raises:
            InvalidWheel, PayloadTooLarge: the name, tags, size or archive is refused.
        """
        wheel = wheels.parse_name(filename)
        tag_list = wheels.parse_tags(tags)
        if 0 < self.max_bytes < len(data):
            raise PayloadTooLarge(wheels.TOO_LARGE)

        def digest() -> str:
            wheels.inspect_archive(data, wheel)
            return hashlib.sha256(data).hexdigest()

        sha256_hex = await trio.to_thread.run_sync(digest)
        ctype = content_type if content_type and CONTENT_TYPE_RE.fullmatch(content_type) else None
        return Upload(wheel=wheel, data=data, tags=tag_list, replace=replace, sha256_hex=sha256_hex, content_type=ctype)

    async def upload(self, upload: Upload, *, actor: Actor) -> dict[str, object]:
        """``POST /wheels`` once ``check`` passed: the version policy, the object, the event.

        Raises:
            WheelConflict: as upstream (409).
            WheelStoreFull, InfraError: NATS refused or was away; nothing is left stored.
        """
        wheel, data, tag_list, replace, sha256_hex, ctype = (
            upload.wheel, upload.data, upload.tags, upload.replace, upload.sha256_hex, upload.content_type
        )
        async with self._lock:
            stored = await self.store.list()
            wheels.check_new_version(wheel, [o.name for o in stored])
            if not replace and any(o.name == wheel.filename for o in stored):
                raise WheelConflict(wheels.ALREADY_EXISTS)
            # Shielded: a client that goes away mid-upload must not leave chunks without their
            # object, nor an object without its event (NATS's own timeouts bound the wait).
            with trio.CancelScope(shield=True):
                headers = wheels.object_headers(sha256_hex=sha256_hex, tags=tag_list, content_type=ctype)
                obj = await self.store.put(wheel.filename, data, headers)
                try:
                    await self._record("upload", wheel, obj, actor, tags=tag_list, size=len(data), sha256_hex=sha256_hex, replace=replace)
                except PyocoError:
                    await self._undo_put(wheel.filename)
                    raise
        out = obj.to_http()
        out["sha256_hex"] = sha256_hex
        out["tags"] = list(tag_list)
        return out

    async def _undo_put(self, name: str) -> None:
        try:
            await self.store.delete(name)
        except PyocoError as exc:
            log.error("wheel %s is stored but its upload event is not, and deleting it failed: %s", name, exc.message)

    async def delete(self, raw_name: str, *, actor: Actor) -> dict[str, object]:
        """``DELETE /wheels/{name}``.

        Raises:
            WheelNotFound: an invalid name or no such wheel (upstream answers both with 404).
        """
        name = name_or_not_found(raw_name)
        async with self._lock:
            obj = await self.store.info(name)
            if obj is None:
                raise WheelNotFound()
            with trio.CancelScope(shield=True):  # the delete and its event, or neither (see upload)
                if not await self.store.delete(name):
                    raise WheelNotFound()
                wheel = wheels.try_parse_name(name)
                await self._record(
                    "delete", wheel, obj, actor, tags=obj.tags, size=obj.size, sha256_hex=obj.sha256_hex, replace=None
                )
        return {"name": name, "deleted": True}

    async def read(self, raw_name: str) -> tuple[WheelObject, bytes]:
        """``GET /wheels/{name}``: the bytes.  Raises WheelNotFound (invalid name or absent)."""
        found = await self.store.read(name_or_not_found(raw_name))
        if found is None:
            raise WheelNotFound()
        return found

    async def _record(
        self,
        action: str,
        wheel: WheelName | None,
        obj: WheelObject,
        actor: Actor,
        *,
        tags: tuple[str, ...],
        size: int | None,
        sha256_hex: str | None,
        replace: bool | None,
    ) -> None:
        who = actor.principal
        occurred_at = float(self.clock())
        event_id = uuid6.uuid7().hex
        history = wheels.history_document(
            event_id=event_id,
            occurred_at=occurred_at,
            action=action,
            wheel_name=obj.name,
            tags=tags,
            size_bytes=size,
            sha256_hex=sha256_hex,
            replace=replace,
            tenant_id=who.tenant_id if who else None,
            api_key_id=who.key_id if who else None,
            source=actor.source,
        )
        if wheel is None:  # deleting an object whose name is not PEP 427 (stored by someone else)
            event: dict[str, object] = {"type": wheels.EVENT_TYPES[action], "type_version": wheels.EVENT_TYPE_VERSION, **history}
        else:
            event = wheels.event_document(history, wheel=wheel, nuid=obj.nuid, producer=self.producer)
        key = wheels.history_key(occurred_at, event_id)
        for attempt in itertools.count(1):
            try:
                await self.store.record(event, history, key)  # deduplicated by event_id: safe to repeat
                break
            except TRANSIENT_ERRORS:
                if attempt >= RECORD_ATTEMPTS:
                    raise
                await trio.sleep(RECORD_BACKOFF * attempt)
        log.info(
            "wheel %s: %s", action, obj.name,
            extra={"wheel_name": obj.name, "action": action, "api_key_id": who.key_id if who else None, "sha256": sha256_hex},
        )

    async def history(self, *, limit: int, wheel_name: str | None, action: str | None) -> list[dict[str, object]]:
        """``GET /wheels/history``: newest first, filtered.

        Raises:
            InvalidWheel: ``invalid wheel name`` / ``invalid action`` for a bad filter.
        """
        name = wheels.normalize_name(wheel_name) if wheel_name is not None and wheel_name.strip() else None
        act = wheels.parse_action(action)
        await self._catch_up()
        merged: dict[str, dict[str, object]] = {}
        for event in self._events:
            item = wheels.history_from_event(event)
            if item is not None:
                merged[str(item.get("event_id"))] = item
        for doc in await self.store.upstream_history():
            merged.setdefault(str(doc.get("event_id")), doc)
        items = [
            i for i in merged.values()
            if (name is None or i.get("wheel_name") == name) and (act is None or str(i.get("action") or "").lower() == act)
        ]
        items.sort(key=wheels.history_sort_key, reverse=True)
        return items[:limit]

    async def _catch_up(self) -> None:
        async with self._reading:  # two readers must not both append the same events
            for seq, event in await self.store.events(after=self._after):
                self._events.append(event)
                self._after = seq

    async def events(self) -> list[dict[str, Any]]:
        """Every registry event so far, oldest first (for replay's report)."""
        await self._catch_up()
        return list(self._events)


def name_or_not_found(raw: str) -> str:
    """A valid wheel name, or WheelNotFound (404, as upstream answers an invalid name)."""
    try:
        return wheels.normalize_name(raw)
    except InvalidWheel:
        raise WheelNotFound() from None
