"""Reading the wheel registry's object store (``pyoco_wheels``, pyoco-server's layout, contract
§2.4): list its wheels, download one.  The worker's wheel sync is the reader; the registry's
writer side (uploads, deletes) lives with the gateway."""

from __future__ import annotations

import nats.js.errors

from ..core.errors import InfraError
from ..core.wheelsync import StoredWheel
from .connection import NatsConnection


async def list_wheels(nats_client: NatsConnection, bucket: str) -> list[StoredWheel]:
    """Every live object of ``bucket`` (deleted ones skipped); a missing or empty bucket: [].

    Raises:
        InfraError: NATS failed.
    """

    async def go() -> list[StoredWheel]:
        try:
            store = await nats_client.js.object_store(bucket)
            infos = await store.list(ignore_deletes=True)
        except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
            return []
        return [
            StoredWheel(
                name=str(info.name or ""),
                nuid=str(info.nuid or ""),
                size=int(info.size or 0),
                digest=str(info.digest or ""),
                headers=dict(info.headers) if isinstance(info.headers, dict) else {},  # read by core/wheels.header_value
            )
            for info in infos
            if not info.deleted
        ]

    return await nats_client.run(f"list object store {bucket}", go)


async def store_position(nats_client: NatsConnection, bucket: str) -> int | None:
    """The object store's last stream sequence: it moves with every put and delete, so an
    unchanged value means an unchanged registry.  None when the bucket does not exist.

    Raises:
        InfraError: NATS failed.
    """

    async def go() -> int | None:
        try:
            info = await nats_client.js.stream_info(f"OBJ_{bucket}")
        except nats.js.errors.NotFoundError:
            return None
        return int(info.state.last_seq)

    return await nats_client.run(f"stream info of object store {bucket}", go)


async def get_wheel(nats_client: NatsConnection, bucket: str, name: str) -> bytes:
    """The bytes of object ``name`` (nats-py checks them against the object's digest).

    Raises:
        InfraError: NATS failed, the object is gone, or its chunks do not match its digest.
    """

    async def go() -> bytes:
        store = await nats_client.js.object_store(bucket)
        try:
            result = await store.get(name)
        except nats.js.errors.DigestMismatchError as exc:
            raise InfraError(f"{name}: the stored chunks do not match the object's digest") from exc
        return bytes(result.data or b"")

    return await nats_client.run(f"get {name} from {bucket}", go)


__all__ = ["get_wheel", "list_wheels", "store_position"]
