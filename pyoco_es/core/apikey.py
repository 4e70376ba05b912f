"""API keys in pyoco-server 0.5's format (contract §2.8): parsing, hashing, verifying, records.

Pure: no I/O and no clock.  The randomness a new key needs is passed in (``token_bytes``), so a
test can fix it; the NATS store is ``nats/keystore.py``.

A key is ``pyoco_<key_id>.<secret>``.  Its record (KV ``pyoco_auth``, key ``api_keys.<key_id>``)
holds PBKDF2-HMAC-SHA256 of ``secret + pepper`` with the record's own salt and iterations, never
the secret; a key made by either pyoco-server's admin CLI or ours verifies on either gateway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable
from typing import Any, Final

import attrs

PREFIX: Final = "pyoco_"
SEPARATOR: Final = "."
KDF: Final = "pbkdf2_hmac_sha256"
DEFAULT_ITERATIONS: Final = 200_000
SALT_BYTES: Final = 16
SECRET_BYTES: Final = 32
KEY_ID_BYTES: Final = 12
MAX_ITERATIONS: Final = 10_000_000  # a record asking for more is refused, not computed for minutes

TENANT_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
SECRET_RE: Final = re.compile(r"[A-Za-z0-9_-]{16,256}")


class ApiKeyFormatError(ValueError):
    """A presented key, a key id, a tenant or a stored record is not in the expected form."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ApiKeyFormatError("record field is not base64url") from exc


@attrs.frozen(kw_only=True)
class ApiKeyRecord:
    """The stored record, field for field as pyoco-server writes it (no secret in it)."""

    key_id: str
    tenant_id: str
    kdf: str = KDF
    iterations: int = DEFAULT_ITERATIONS
    salt_b64: str
    hash_b64: str
    created_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json_bytes(self) -> bytes:
        return json.dumps(
            {
                "key_id": self.key_id,
                "tenant_id": self.tenant_id,
                "kdf": self.kdf,
                "iterations": int(self.iterations),
                "salt_b64": self.salt_b64,
                "hash_b64": self.hash_b64,
                "created_at": float(self.created_at),
                "revoked_at": None if self.revoked_at is None else float(self.revoked_at),
            },
            ensure_ascii=True,
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> ApiKeyRecord:
        """Read a stored record; anything malformed raises ApiKeyFormatError (never KeyError etc.)."""
        try:
            data: Any = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiKeyFormatError("api key record is not JSON") from exc
        if not isinstance(data, dict):
            raise ApiKeyFormatError("api key record is not a JSON object")
        try:
            revoked = data.get("revoked_at")
            record = cls(
                key_id=str(data["key_id"]),
                tenant_id=str(data["tenant_id"]),
                kdf=str(data.get("kdf") or KDF),
                iterations=int(data.get("iterations") or DEFAULT_ITERATIONS),
                salt_b64=str(data["salt_b64"]),
                hash_b64=str(data["hash_b64"]),
                created_at=float(data.get("created_at") or 0.0),
                revoked_at=None if revoked is None else float(revoked),
            )
        except KeyError as exc:
            raise ApiKeyFormatError(f"api key record lacks {exc.args[0]!r}") from exc
        except (TypeError, ValueError, OverflowError) as exc:
            raise ApiKeyFormatError(f"api key record has a bad field: {exc}") from exc
        if record.kdf != KDF or not 1 <= record.iterations <= MAX_ITERATIONS:
            raise ApiKeyFormatError(f"api key record uses an unsupported kdf {record.kdf!r}/{record.iterations}")
        return record

    def revoke(self, *, now: float) -> ApiKeyRecord:
        """The same record, revoked at ``now`` (a revoked key stays revoked at its first time)."""
        return self if self.revoked else attrs.evolve(self, revoked_at=float(now))

    def summary(self) -> dict[str, Any]:
        """What ``api-key list`` shows: no salt, no hash."""
        return {
            "key_id": self.key_id,
            "tenant_id": self.tenant_id,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


def kv_key(key_id: str) -> str:
    """The record's key in the auth bucket (as pyoco-server names it)."""
    return "api_keys." + check_key_id(key_id)


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or KEY_ID_RE.fullmatch(key_id) is None:
        raise ApiKeyFormatError("invalid key id (expected [A-Za-z0-9_-]{8,64})")
    return key_id


def check_tenant(tenant_id: str) -> str:
    if not isinstance(tenant_id, str) or TENANT_RE.fullmatch(tenant_id) is None:
        raise ApiKeyFormatError("invalid tenant_id (expected [A-Za-z0-9_-]{1,64})")
    return tenant_id


def parse_api_key(api_key: str) -> tuple[str, str]:
    """``pyoco_<key_id>.<secret>`` → (key_id, secret); anything else raises ApiKeyFormatError."""
    if not isinstance(api_key, str) or not api_key.startswith(PREFIX) or SEPARATOR not in api_key:
        raise ApiKeyFormatError("invalid api key format")
    head, secret = api_key.split(SEPARATOR, 1)
    key_id = head[len(PREFIX):]
    if KEY_ID_RE.fullmatch(key_id) is None or SECRET_RE.fullmatch(secret) is None:
        raise ApiKeyFormatError("invalid api key format")
    return key_id, secret


def derive_hash(secret: str, *, salt: bytes, iterations: int, pepper: str | None) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", (secret + (pepper or "")).encode("utf-8"), salt, int(iterations), dklen=32)


def generate_api_key(
    *,
    tenant_id: str,
    now: float,
    pepper: str | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    token_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> tuple[str, ApiKeyRecord]:
    """A new key (shown once, never stored) and the record to store for it."""
    check_tenant(tenant_id)
    key_id = token_bytes(KEY_ID_BYTES).hex()  # 24 hex characters: never starts with '-'
    secret = _b64(token_bytes(SECRET_BYTES))  # 43 characters
    salt = token_bytes(SALT_BYTES)
    record = ApiKeyRecord(
        key_id=key_id,
        tenant_id=tenant_id,
        iterations=iterations,
        salt_b64=_b64(salt),
        hash_b64=_b64(derive_hash(secret, salt=salt, iterations=iterations, pepper=pepper)),
        created_at=float(now),
    )
    return f"{PREFIX}{key_id}{SEPARATOR}{secret}", record


def verify_api_key(api_key: str, *, record: ApiKeyRecord, pepper: str | None) -> bool:
    """True when ``api_key`` is the live key ``record`` was made for (constant-time compare)."""
    if record.revoked:
        return False
    try:
        key_id, secret = parse_api_key(api_key)
        salt, expected = _unb64(record.salt_b64), _unb64(record.hash_b64)
    except ApiKeyFormatError:
        return False
    if key_id != record.key_id:
        return False
    actual = derive_hash(secret, salt=salt, iterations=record.iterations, pepper=pepper)
    return hmac.compare_digest(actual, expected)
