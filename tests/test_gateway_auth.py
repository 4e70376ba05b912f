"""PYOCO_HTTP_AUTH_MODE=api_key (issue 13) against a real gateway and nats-server: every protected
route (taken from the app's own URL map) refuses a missing or wrong key as pyoco-server does, a
revocation takes effect within a second (an open SSE stream ends), and refusals are counted."""

from __future__ import annotations

import re
from json import loads as json_loads
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from pyoco_es.config import Settings
from pyoco_es.core import apikey
from pyoco_es.gateway.app import create_app
from pyoco_es.gateway.auth import PUBLIC_RULES
from pyoco_es.nats import keystore

from test_gateway_support import GW, open_gateway, submit_yaml, wait_until

PEPPER = "pep"
AUTH = Settings(
    sse_heartbeat_interval=0.2, nats_unavailable_wait=1.0, http_auth_mode="api_key", auth_pepper=PEPPER,
    http_auth_free_failures=10_000,  # the route sweep refuses many; the slow-down has its own test
)
RUN_ID = "0b7c3e9a-9d2f-4c1e-8a5f-6d7c8b9a0e1f"


@pytest.fixture
async def agw(tmp_path: Path) -> AsyncIterator[GW]:
    async with open_gateway(tmp_path, settings=AUTH) as g:
        yield g


async def _key(g: GW, tenant: str = "acme") -> tuple[str, str]:
    key, rec = await keystore.create_key(g.nats, tenant_id=tenant, now=1.0, pepper=PEPPER, actor="test")
    return key, rec.key_id


def _protected_requests(g: GW) -> list[tuple[str, str]]:
    """(method, concrete path) for every rule of the app that is not public."""
    app = create_app(g.nats, Settings())
    out = []
    for rule in app.url_map.iter_rules():
        if rule.rule in PUBLIC_RULES:
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: {"run_id": RUN_ID, "worker_id": "w1", "dlq_id": "1", "wheel_name": "demo-1.0-py3-none-any.whl"}[m.group(1)], rule.rule)
        out += [(method, path) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    assert len(out) >= 12 and ("GET", "/metrics") in out and ("PATCH", "/workers/w1") in out
    return out


async def test_every_protected_route_needs_a_valid_key(agw: GW) -> None:
    key, _ = await _key(agw)
    wrong = key[:-2] + ("AA" if not key.endswith("AA") else "BB")
    for method, path in _protected_requests(agw):
        r = await agw.client.request(method, path)
        assert (r.status_code, r.json()) == (401, {"detail": "api key required"}), (method, path)
        for bad in (wrong, "nonsense", "pyoco_0123456789abcdef.secretsecretsecretsecret"):
            r = await agw.client.request(method, path, headers={"X-API-Key": bad})
            assert (r.status_code, r.json()) == (403, {"detail": "invalid api key"}), (method, path, bad)
        if path.endswith(("/watch", "/stream")):
            continue  # streams are read below
        r = await agw.client.request(method, path, headers={"X-API-Key": key})
        assert r.status_code not in (401, 403), (method, path, r.text)
    for path in ("/health", "/openapi.json", "/", "/static/app.js"):
        assert (await agw.client.get(path)).status_code == 200, path


async def _openapi_matches_the_gateway(g: GW) -> dict[str, object]:
    """``/openapi.json`` (public) against what the gateway does: an operation carries the ApiKey
    requirement exactly when a request to it without a key gets 401; the scheme names the header."""
    r = await g.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["components"]["securitySchemes"] == {"ApiKey": {**doc["components"]["securitySchemes"]["ApiKey"],
                                                               "type": "apiKey", "in": "header", "name": "X-API-Key"}}  # fmt: skip
    guarded = {}
    for path, methods in doc["paths"].items():
        concrete = re.sub(r"\{(\w+)\}", lambda m: {"run_id": RUN_ID, "worker_id": "w1", "dlq_id": "1", "wheel_name": "demo-1.0-py3-none-any.whl", "filename": "app.js"}[m.group(1)], path)
        for method, op in methods.items():
            status = (await g.client.request(method.upper(), concrete)).status_code
            assert ("security" in op) == (status == 401), (method, path, status)
            if "security" in op:
                assert op["security"] == [{"ApiKey": []}] and {"401", "403"} <= set(op["responses"]), (method, path)
            guarded[f"{method.upper()} {path}"] = "security" in op
    return guarded


async def test_openapi_declares_the_api_key_on_exactly_the_protected_routes(agw: GW) -> None:
    guarded = await _openapi_matches_the_gateway(agw)
    assert not any(guarded[f"GET {p}"] for p in ("/health", "/ready", "/openapi.json", "/docs", "/redoc", "/", "/static/{filename}"))
    assert all(guarded[k] for k in ("GET /runs", "POST /runs", "GET /metrics", "POST /dlq/{dlq_id}/resubmit", "DELETE /wheels/{wheel_name}"))
    import schemathesis  # the fuzz test's reader takes the document with its scheme

    schema = schemathesis.openapi.from_dict((await agw.client.get("/openapi.json")).json())
    assert len([result.ok() for result in schema.get_all_operations()]) == len(guarded)


async def test_valid_key_submits_and_reads_also_on_the_fast_path(agw: GW) -> None:
    key, _ = await _key(agw)
    keyed = {"X-API-Key": key}
    r = await submit_yaml(agw.client, headers=keyed)  # the fast path's route
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    assert (await agw.client.post("/runs/yaml", files={"workflow": ("f.yaml", b"x")})).status_code == 401

    async def cached() -> bool:
        return (await agw.client.get(f"/runs/{run_id}", headers=keyed)).status_code == 200

    await wait_until(cached, what="run readable with the key")
    r = await agw.client.get(f"/runs/{run_id}")  # answered from the watch cache when keyed
    assert (r.status_code, r.json()) == (401, {"detail": "api key required"})
    r = await agw.client.post("/runs", json={"flow_name": "hello"}, headers={**keyed, "Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["detail"] != "invalid api key"  # a valid key does not lift the Origin check


async def test_key_made_by_pyoco_server_format_is_accepted(agw: GW) -> None:
    # A record written to pyoco-server 0.5's documented format (its own code: test_apikey.py).
    key, rec = apikey.generate_api_key(tenant_id="old", now=1.0, pepper=PEPPER)
    await agw.nats.kv_put(keystore.AUTH_BUCKET, apikey.kv_key(rec.key_id), rec.to_json_bytes())

    async def accepted() -> bool:
        return (await agw.client.get("/runs", headers={"X-API-Key": key})).status_code == 200

    await wait_until(accepted, what="a key stored directly in the bucket to be accepted")


async def test_revocation_refuses_within_a_second_and_ends_open_streams(agw: GW) -> None:
    key, key_id = await _key(agw)
    keyed = {"X-API-Key": key}
    r = await agw.client.post("/runs", json={"flow_name": "hello"}, headers=keyed)
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    ended = trio.Event()
    got_first = trio.Event()

    async def watch() -> None:
        async with agw.client.stream("GET", f"/runs/{run_id}/watch", headers=keyed, timeout=30) as resp:
            assert resp.status_code == 200
            try:
                async for _ in resp.aiter_bytes():
                    got_first.set()
            except httpx.HTTPError:
                pass  # the server ended the stream mid-response
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await got_first.wait()
        revoked_at = trio.current_time()
        assert await keystore.revoke_key(agw.nats, key_id, now=2.0, actor="test") is not None
        with trio.fail_after(1.0):
            await ended.wait()

        async def refused() -> bool:
            return (await agw.client.get("/runs", headers=keyed)).status_code == 403

        await wait_until(refused, timeout=1.0, what="the revoked key to be refused")
        assert trio.current_time() - revoked_at < 1.0


async def test_refusals_are_counted_in_metrics(agw: GW) -> None:
    key, _ = await _key(agw)
    for _ in range(3):
        assert (await agw.client.get("/workers")).status_code == 401
        assert (await agw.client.get("/workers", headers={"X-API-Key": "pyoco_0123456789abcdef.secretsecretsecretsecret"})).status_code == 403
        assert (await agw.client.get("/runs", headers={"X-API-Key": key})).status_code == 200
    text = (await agw.client.get("/metrics", headers={"X-API-Key": key})).text
    assert re.search(r'pyoco_http_requests_total\{method="GET",route="/workers",status="401"\} 3', text), text
    assert re.search(r'pyoco_http_requests_total\{method="GET",route="/workers",status="403"\} 3', text)
    assert (await agw.client.get("/metrics")).status_code == 401


async def test_metrics_public_is_an_explicit_opt_in(tmp_path: Path) -> None:
    import attrs

    async with open_gateway(tmp_path, settings=attrs.evolve(AUTH, http_metrics_public=True)) as g:
        assert (await g.client.get("/metrics")).status_code == 200
        assert (await g.client.get("/workers")).status_code == 401
        guarded = await _openapi_matches_the_gateway(g)  # the document follows the same switch
        assert not guarded["GET /metrics"] and guarded["GET /workers"]


async def test_a_listed_origins_page_can_read_a_refusal(tmp_path: Path) -> None:
    """A dashboard served from a listed origin (PYOCO_HTTP_ALLOWED_ORIGINS) sent without a key or
    with a wrong one gets the 401/403 with its CORS header, so the page can show "API key
    required" instead of a bare network error; another origin gets no CORS header."""
    import attrs

    listed = "https://dash.example:8443"
    async with open_gateway(tmp_path, settings=attrs.evolve(AUTH, http_allowed_origins=(listed,))) as g:
        with trio.fail_after(10):
            r = await g.client.get("/runs", headers={"Origin": listed})
            assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == listed
            r = await g.client.post("/runs", json={"flow_name": "x"}, headers={"Origin": listed, "X-API-Key": "pyoco_nope"})
            assert r.status_code in (401, 403) and r.headers["Access-Control-Allow-Origin"] == listed
            r = await g.client.get("/runs", headers={"Origin": "https://evil.example"})
            assert r.status_code == 401 and "Access-Control-Allow-Origin" not in r.headers
            key, _ = await _key(g)
            r = await g.client.get("/runs", headers={"Origin": listed, "X-API-Key": key})
            assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == listed


def test_unknown_auth_mode_refused_at_start() -> None:
    from pyoco_es.core.errors import ValidationError

    with pytest.raises(ValidationError, match="not a mode"):
        create_app(None, Settings(http_auth_mode="basic"))  # type: ignore[arg-type]


# -- tenants ------------------------------------------------------------------------------------


async def test_tenant_never_sees_or_cancels_another_tenants_run(agw: GW) -> None:
    a_key, a_id = await _key(agw, "team-a")
    b_key, _ = await _key(agw, "team-b")
    a, b = {"X-API-Key": a_key}, {"X-API-Key": b_key}
    r = await agw.client.post("/runs", json={"flow_name": "hello"}, headers=a)
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    r = await submit_yaml(agw.client, headers=a)  # the fast path's submit
    assert r.status_code == 200, r.text
    yaml_run = r.json()["run_id"]

    async def owned() -> dict | None:
        r = await agw.client.get(f"/runs/{yaml_run}", headers=a)
        return r.json() if r.status_code == 200 else None

    doc = await wait_until(owned, what="tenant A reads its run")
    assert (doc["tenant_id"], doc["api_key_id"]) == ("team-a", a_id)

    for rid in (run_id, yaml_run):
        for method, path in (("GET", f"/runs/{rid}"), ("GET", f"/runs/{rid}/tasks"), ("GET", f"/runs/{rid}/events"),
                             ("GET", f"/runs/{rid}/watch"), ("POST", f"/runs/{rid}/cancel")):
            r = await agw.client.request(method, path, headers=b)
            assert (r.status_code, r.json()) == (404, {"detail": "run not found"}), (method, path)
    assert (await agw.client.get("/runs", headers=b)).json() == []
    assert (await agw.client.get("/runs", params={"updated_after": 0}, headers=b)).json()["items"] == []
    r = await agw.client.get("/runs/stream", params={"timeout_sec": 1}, headers=b)
    assert r.status_code == 200 and '"runs":0' in r.text  # not even the count of others' runs
    r = await agw.client.get("/runs/stream", params={"timeout_sec": 1, "after": 0}, headers=b)
    assert r.status_code == 200 and run_id not in r.text and yaml_run not in r.text
    r = await agw.client.get("/runs/stream", params={"timeout_sec": 1, "after": 0}, headers=a)
    assert run_id in r.text and yaml_run in r.text
    assert {i["run_id"] for i in (await agw.client.get("/runs", headers=a)).json()} == {run_id, yaml_run}

    r = await agw.client.post(f"/runs/{run_id}/cancel", headers=a)
    assert r.status_code == 200, r.text
    assert r.json()["cancel_requested_by"] == f"api_key:{a_id}" and r.json()["status"] == "CANCELLED"
    events = (await agw.client.get(f"/runs/{run_id}/events", headers=a)).json()["events"]
    assert events[0]["data"]["tenant_id"] == "team-a" and events[0]["data"]["api_key_id"] == a_id


async def test_pyoco_client_with_and_without_key(agw: GW) -> None:
    import os
    import sys

    key, _ = await _key(agw)
    client = str(Path(sys.executable).with_name("pyoco-client"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYOCO_API_KEY", "PYOCO_HTTP_API_KEY_HEADER")}
    env["PYOCO_LOAD_DOTENV"] = "0"
    missing = await trio.run_process([client, "--server", agw.url, "list"], capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert missing.returncode != 0 and b"requires an API key" in missing.stderr and key.encode() not in missing.stderr
    wrong = await trio.run_process([client, "--server", agw.url, "--api-key", key[:-3] + "zzz", "list"], capture_stderr=True, check=False, env=env)
    assert wrong.returncode != 0 and b"API key was refused" in wrong.stderr
    ok = await trio.run_process([client, "--server", agw.url, "list"], capture_stdout=True, capture_stderr=True, check=False,
                                env={**env, "PYOCO_API_KEY": key})
    assert ok.returncode == 0, ok.stderr


async def test_repeated_failures_from_one_client_are_slowed_down(tmp_path: Path) -> None:
    import attrs

    async with open_gateway(tmp_path, settings=attrs.evolve(AUTH, http_auth_free_failures=10)) as g:
        await _slowed_down(g, free=10)


async def _slowed_down(agw: GW, *, free: int) -> None:
    key, _ = await _key(agw)
    assert (await agw.client.get("/runs", headers={"X-API-Key": key})).status_code == 200  # PBKDF2 once
    bad = {"X-API-Key": "pyoco_0123456789abcdef.secretsecretsecretsecret"}
    for _ in range(free):
        started = trio.current_time()
        assert (await agw.client.get("/runs", headers=bad)).status_code == 403
        assert trio.current_time() - started < 0.1  # the first few are answered at once
    for extra in (1, 2, 3):
        started = trio.current_time()
        assert (await agw.client.get("/runs", headers=bad)).status_code == 403
        assert trio.current_time() - started >= 0.1 * extra  # each one later
    started = trio.current_time()
    assert (await agw.client.get("/runs", headers={"X-API-Key": key})).status_code == 200
    assert trio.current_time() - started < 0.1  # a valid key from the same client is not held


async def test_key_ring_answers_503_until_loaded_and_forgets_deleted_records() -> None:
    from types import SimpleNamespace

    from pyoco_es.gateway.auth import KeyRing, Principal, Refusal
    from pyoco_es.ports import KVEntry

    ring = KeyRing(SimpleNamespace(url="nats://x"))  # type: ignore[arg-type]
    key, rec = apikey.generate_api_key(tenant_id="t", now=1.0, iterations=1000)
    refused = await ring.authenticate(key)
    assert isinstance(refused, Refusal) and refused.status == 503 and "still loading" in refused.detail
    ring._on_entry(KVEntry(key=apikey.kv_key(rec.key_id), value=rec.to_json_bytes(), revision=1))
    ring._on_loaded({apikey.kv_key(rec.key_id)})
    ring.ready.set()
    assert await ring.authenticate(key) == Principal(key_id=rec.key_id, tenant_id="t")
    ring._on_loaded(set())  # a reload after the record was deleted while the watch was away
    gone = await ring.authenticate(key)
    assert isinstance(gone, Refusal) and gone.status == 403


async def test_key_from_pyoco_server_admin_works_on_our_gateway(agw: GW) -> None:
    import os

    from test_apikey import upstream_python

    env = {**os.environ, "PYOCO_AUTH_PEPPER": PEPPER, "PYOCO_LOAD_DOTENV": "0"}
    cmd = [str(upstream_python()), "-m", "pyoco_server.admin_cli", "--nats-url", agw.stack.nats_url, "api-key"]
    made = await trio.run_process([*cmd, "create", "--tenant", "legacy"], capture_stdout=True, capture_stderr=True, env=env)
    key = json_loads(made.stdout)["api_key"]

    async def accepted() -> bool:
        return (await agw.client.get("/runs", headers={"X-API-Key": key})).status_code == 200

    await wait_until(accepted, what="pyoco-server-admin's key accepted")
    r = await agw.client.post("/runs", json={"flow_name": "hello"}, headers={"X-API-Key": key})
    assert r.status_code == 200
    await trio.run_process([*cmd, "revoke", "--key-id", key.split(".")[0][len("pyoco_"):]], capture_stdout=True, env=env)

    async def refused() -> bool:
        return (await agw.client.get("/runs", headers={"X-API-Key": key})).status_code == 403

    await wait_until(refused, timeout=1.0, what="revoked by pyoco-server-admin, refused here")


# -- who am I ----------------------------------------------------------------------------------


async def test_whoami_names_the_keys_tenant_and_needs_a_key(agw: GW) -> None:
    key, key_id = await _key(agw, "team-w")
    r = await agw.client.get("/auth/whoami")
    assert (r.status_code, r.json()) == (401, {"detail": "api key required"})
    r = await agw.client.get("/auth/whoami", headers={"X-API-Key": key[:-2] + ("AA" if not key.endswith("AA") else "BB")})
    assert (r.status_code, r.json()) == (403, {"detail": "invalid api key"})
    r = await agw.client.get("/auth/whoami", headers={"X-API-Key": key})
    assert (r.status_code, r.json()) == (200, {"auth_mode": "api_key", "tenant_id": "team-w", "api_key_id": key_id})


async def test_whoami_with_auth_off_answers_without_a_key(tmp_path: Path) -> None:
    async with open_gateway(tmp_path) as g:
        for headers in ({}, {"X-API-Key": "anything"}):
            r = await g.client.get("/auth/whoami", headers=headers)
            assert (r.status_code, r.json()) == (200, {"auth_mode": "none", "tenant_id": None, "api_key_id": None})


async def test_hiding_a_worker_records_which_key_did_it(agw: GW) -> None:
    from pyoco_es.nats import subjects
    from pyoco_es.nats.audit import read_audit

    key, key_id = await _key(agw, "ops")
    await agw.nats.kv_put(subjects.WORKERS_BUCKET, "w-audit", b'{"worker_id": "w-audit", "state": "IDLE"}')
    keyed = {"X-API-Key": key}
    assert (await agw.client.patch("/workers/w-audit", json={"hidden": True})).status_code == 401
    for hidden in (True, False):
        r = await agw.client.patch("/workers/w-audit", json={"hidden": hidden}, headers=keyed)
        assert r.status_code == 200, r.text
    assert (await agw.client.patch("/workers/no-such", json={"hidden": True}, headers=keyed)).status_code == 404
    entries = await read_audit(agw.nats, subjects.WORKER_AUDIT_SUBJECT)
    assert [(e["type"], e["worker_id"], e["hidden"]) for e in entries] == [
        ("worker.hidden", "w-audit", True), ("worker.unhidden", "w-audit", False)]  # refused and missing ones: none
    for e in entries:
        assert (e["actor"], e["tenant_id"], e["api_key_id"]) == (f"api_key:{key_id}", "ops", key_id)
        assert e["at"] > 0 and e["gateway"]
    assert key.split(".", 1)[1] not in str(entries)


async def test_hiding_a_worker_with_auth_off_is_recorded_as_anonymous(tmp_path: Path) -> None:
    from pyoco_es.nats import subjects
    from pyoco_es.nats.audit import read_audit

    async with open_gateway(tmp_path) as g:
        await g.nats.kv_put(subjects.WORKERS_BUCKET, "w-anon", b'{"worker_id": "w-anon", "state": "IDLE"}')
        assert (await g.client.patch("/workers/w-anon", json={"hidden": True})).status_code == 200
        entries = await read_audit(g.nats, subjects.WORKER_AUDIT_SUBJECT)
        assert [(e["type"], e["actor"], e["tenant_id"], e["api_key_id"]) for e in entries] == [
            ("worker.hidden", "anonymous", None, None)]


# -- defence in depth: the app's own check, without the ASGI layer --------------------------------


async def test_the_app_refuses_without_a_key_even_without_the_layer() -> None:
    """An app served without the AuthLayer (another ASGI server, a test client) and a route added
    to it later still refuse a request without a valid key; a valid one gets its tenant."""
    from types import SimpleNamespace

    from pyoco_es.gateway.auth import KeyRing
    from pyoco_es.gateway.context import caller
    from pyoco_es.ports import KVEntry

    ring = KeyRing(SimpleNamespace(url="nats://x"), pepper=PEPPER)  # type: ignore[arg-type]
    key, rec = apikey.generate_api_key(tenant_id="deep", now=1.0, pepper=PEPPER, iterations=1000)
    ring._on_entry(KVEntry(key=apikey.kv_key(rec.key_id), value=rec.to_json_bytes(), revision=1))
    ring.ready.set()
    app = create_app(None, AUTH, keys=ring)  # type: ignore[arg-type]  # these routes touch no NATS

    @app.get("/added-later")
    async def added_later() -> dict[str, str | None]:
        who = caller()
        return {"tenant": who.tenant_id if who else None}

    client = app.test_client()
    for path in ("/auth/whoami", "/added-later"):
        r = await client.get(path)
        assert (r.status_code, await r.get_json()) == (401, {"detail": "api key required"}), path
        r = await client.get(path, headers={"X-API-Key": key[:-2] + ("AA" if not key.endswith("AA") else "BB")})
        assert (r.status_code, await r.get_json()) == (403, {"detail": "invalid api key"}), path
    r = await client.get("/auth/whoami", headers={"X-API-Key": key})
    assert await r.get_json() == {"auth_mode": "api_key", "tenant_id": "deep", "api_key_id": rec.key_id}
    r = await client.get("/added-later", headers={"X-API-Key": key})
    assert (r.status_code, await r.get_json()) == (200, {"tenant": "deep"})
    assert ring.pbkdf2_runs == 2  # the right key and the wrong one, once each: then cached
    r = await client.patch("/workers/w1", json={"hidden": True})
    assert r.status_code == 401  # refused before the handler touches NATS
    assert (await client.get("/health")).status_code == 200  # public routes stay public


async def test_the_fast_path_without_the_layer_leaves_refusal_to_the_app() -> None:
    from types import SimpleNamespace

    from pyoco_es.gateway.app import gateway_of
    from pyoco_es.gateway.auth import KeyRing
    from pyoco_es.gateway.fastpath import FastPath

    ring = KeyRing(SimpleNamespace(url="nats://x"))  # type: ignore[arg-type]
    ring.ready.set()
    app = create_app(None, AUTH, keys=ring)  # type: ignore[arg-type]
    gw = gateway_of(app)
    gw.index.doc_of = lambda run_id: {"run_id": run_id, "tenant_id": "someone", "status": "PENDING"}  # type: ignore[method-assign]
    gw.nats = SimpleNamespace(is_connected=True, url="nats://x")  # type: ignore[assignment]
    sent: list[dict] = []
    done = trio.Event()
    requested = False

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": f"/runs/{RUN_ID}", "raw_path": f"/runs/{RUN_ID}".encode(),
             "query_string": b"", "headers": [(b"host", b"localhost")], "scheme": "http", "http_version": "1.1",
             "root_path": "", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234)}
    with trio.fail_after(5):
        await FastPath(app, gw)(scope, receive, send)
    assert sent[0]["status"] == 401 and b"api key required" in b"".join(m.get("body", b"") for m in sent)
