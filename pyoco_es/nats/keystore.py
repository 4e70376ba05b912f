"""The API key store over NATS KV (bucket ``pyoco_auth`` by default, as pyoco-server keeps it).

Thin: every rule about the key format lives in ``core/apikey.py``; this module reads and writes
records.  A record that does not parse is skipped by ``list_keys`` and treated as absent by
``get_key`` (as pyoco-server's admin CLI and gateway do).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from ..core import apikey
from ..core.apikey import ApiKeyFormatError, ApiKeyRecord
from ..ports import KVEntry
from . import audit, subjects
from .audit import append_audit
from .client import NatsClient

log = logging.getLogger(__name__)

AUTH_BUCKET: Final = subjects.AUTH_BUCKET
KEY_PREFIX: Final = subjects.API_KEY_PREFIX


def record_from_entry(entry: KVEntry | None) -> ApiKeyRecord | None:
    """The record in a KV entry, or None when it is absent, deleted or unreadable."""
    if entry is None or entry.value is None or not entry.key.startswith(KEY_PREFIX):
        return None
    try:
        return ApiKeyRecord.from_json_bytes(entry.value)
    except ApiKeyFormatError as exc:
        log.warning("api key record %s is unreadable: %s", entry.key, exc)
        return None


async def record_audit(client: NatsClient, action: str, record: ApiKeyRecord, *, actor: str, now: float) -> None:
    """Append ``api_key.<action>`` (who, when, which key; never a secret or hash) to the event stream."""
    doc = {"type": f"api_key.{action}", "key_id": record.key_id, "tenant_id": record.tenant_id, "actor": actor, "at": now}
    await append_audit(client, subjects.API_KEY_AUDIT_SUBJECT, doc)


async def read_audit(client: NatsClient) -> list[dict[str, Any]]:
    """Every key created/revoked through our tools, oldest first."""
    return await audit.read_audit(client, subjects.API_KEY_AUDIT_SUBJECT)


async def create_key(
    client: NatsClient, *, tenant_id: str, now: float, pepper: str | None, actor: str, bucket: str = AUTH_BUCKET
) -> tuple[str, ApiKeyRecord]:
    """Make and store a new key; the plaintext key is returned once and stored nowhere."""
    api_key, record = apikey.generate_api_key(tenant_id=tenant_id, now=now, pepper=pepper)
    await client.kv_update(bucket, apikey.kv_key(record.key_id), record.to_json_bytes(), last=0)
    await record_audit(client, "created", record, actor=actor, now=now)
    return api_key, record


async def get_key(client: NatsClient, key_id: str, *, bucket: str = AUTH_BUCKET) -> ApiKeyRecord | None:
    return record_from_entry(await client.kv_get(bucket, apikey.kv_key(key_id)))


async def list_keys(client: NatsClient, *, bucket: str = AUTH_BUCKET) -> list[ApiKeyRecord]:
    """Every readable record, newest first (as pyoco-server's ``api-key list``)."""
    keys = [k for k in await client.kv_keys(bucket) if k.startswith(KEY_PREFIX)]
    entries = await client.kv_get_many(bucket, keys) if keys else []
    records = [r for r in map(record_from_entry, entries) if r is not None]
    return sorted(records, key=lambda r: r.created_at, reverse=True)


async def revoke_key(
    client: NatsClient, key_id: str, *, now: float, actor: str, bucket: str = AUTH_BUCKET
) -> ApiKeyRecord | None:
    """Mark a key revoked (None when there is no such key).  Revoking twice keeps the first time."""
    kv_key = apikey.kv_key(key_id)
    entry = await client.kv_get(bucket, kv_key)
    record = record_from_entry(entry)
    if entry is None or record is None:
        return None
    revoked = record.revoke(now=now)
    if revoked is not record:
        await client.kv_update(bucket, kv_key, revoked.to_json_bytes(), last=entry.revision)
        await record_audit(client, "revoked", revoked, actor=actor, now=now)
    return revoked
