"""Hostile input over real HTTP (issue 10 items 3-5, issue 11 item 3): every field has a type,
a length limit and a character set; what the gateway cannot store faithfully is a 422 naming the
field, oversize is a 413 naming the limit, cross-site browser writes are a 403, bodies a route
does not take are a 415; nothing is appended for any of them, and the gateway keeps serving.

Each case goes through the real server (Hypercorn + the fast path in front of Quart), so both
paths are held to the same rules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from pyoco_es.cli.client_params import _TAG_RE
from pyoco_es.config import Settings
from pyoco_es.gateway.params import TAG_RE
from pyoco_es.gateway.server import run_gateway
from pyoco_es.nats import subjects
from pyoco_es.nats.client import open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.resources import ensure_resources
from test_gateway_support import FLOW_YAML, GW, events_last_seq, open_gateway, submit, submit_yaml

PARAMS_LIMIT = 4096


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[GW]:
    settings = Settings(sse_heartbeat_interval=0.2, max_params_bytes=PARAMS_LIMIT, http_allowed_origins=("https://dash.example:8443",))
    async with open_gateway(tmp_path, settings=settings) as g:
        yield g


async def _post_raw(gw: GW, body: bytes, **headers: str) -> httpx.Response:
    return await gw.client.post("/runs", content=body, headers={"Content-Type": "application/json", **headers})


def _loc(r: httpx.Response) -> list[object]:
    assert r.status_code == 422, r.text
    return list(r.json()["detail"][0]["loc"])


async def test_lone_surrogates_are_refused_naming_the_field(gw: GW) -> None:
    """`"\\ud800"` is valid JSON but not storable text: it crashed the worker (issue 10 #3)."""
    with trio.fail_after(10):
        before = await events_last_seq(gw.nats)
        cases = [
            (b'{"flow_name": "x\\ud800"}', ["body", "flow_name"]),
            (b'{"flow_name": "x", "params": {"v": "\\ud800"}}', ["body", "params", "v"]),
            (b'{"flow_name": "x", "params": {"v": [1, {"w": "a\\udfff"}]}}', ["body", "params", "v", 1, "w"]),
            (b'{"flow_name": "x", "params": {"\\ud800": 1}}', ["body", "params", "\\ud800"]),
            (b'{"flow_name": "x", "tags": ["ok", "\\ud800"]}', ["body", "tags", 1]),
            (b'{"flow_name": "x", "tag": "\\ud800"}', ["body", "tag"]),
        ]
        for body, loc in cases:
            r = await _post_raw(gw, body)
            assert _loc(r) == loc, (body, r.text)
        # a valid pair (an emoji written as two escapes) is real text and is accepted
        r = await _post_raw(gw, b'{"flow_name": "x", "params": {"v": "\\ud83d\\ude00"}}')
        assert r.status_code == 200, r.text
        assert await events_last_seq(gw.nats) == before + 1


async def test_numbers_that_cannot_round_trip_are_422_not_500(gw: GW) -> None:
    """1e400 (infinity), NaN/Infinity literals, a 5,000-digit integer: 500 before (issue 10 #5)."""
    with trio.fail_after(10):
        before = await events_last_seq(gw.nats)
        for literal, kind in ((b"1e400", "finite_number"), (b"-1e400", "finite_number"), (b"NaN", "finite_number"),
                              (b"Infinity", "finite_number"), (b"-Infinity", "finite_number"),
                              (b"9" * 5000, "int_too_large"), (b"-" + b"9" * 65, "int_too_large")):
            r = await _post_raw(gw, b'{"flow_name": "x", "params": {"a": {"n": ' + literal + b"}}}")
            assert _loc(r) == ["body", "params", "a", "n"], (literal, r.text)
            assert r.json()["detail"][0]["type"] == kind
        r = await _post_raw(gw, b'{"flow_name": "x", "params": {"n": ' + b"9" * 64 + b", \"f\": 1.5e300}}")
        assert r.status_code == 200, r.text
        assert await events_last_seq(gw.nats) == before + 1


async def test_deep_nesting_is_422_naming_the_limit(gw: GW) -> None:
    with trio.fail_after(10):
        before = await events_last_seq(gw.nats)
        for depth in (65, 970, 5000):
            r = await _post_raw(gw, b'{"flow_name": "x", "params": {"v": ' + b"[" * depth + b"]" * depth + b"}}")
            assert r.status_code == 422, (depth, r.text)
            assert "64 levels" in r.json()["detail"][0]["msg"], r.text
        r = await _post_raw(gw, b'{"flow_name": "x", "params": {"v": ' + b"[" * 60 + b"]" * 60 + b"}}")
        assert r.status_code == 200, r.text
        assert await events_last_seq(gw.nats) == before + 1


async def test_names_and_tags_have_a_length_and_a_character_set(gw: GW) -> None:
    """A 900 KB flow_name was accepted; tags items were not checked (`a.b c>` is a NATS wildcard)."""
    with trio.fail_after(10):
        before = await events_last_seq(gw.nats)
        cases: list[tuple[dict[str, object], list[object], str]] = [
            ({"flow_name": "x" * 900_000}, ["body", "flow_name"], "at most 256"),
            ({"flow_name": "a\nb"}, ["body", "flow_name"], "U+000A"),
            ({"flow_name": "a\x00b"}, ["body", "flow_name"], "U+0000"),
            ({"flow_name": "\x1b[31mred"}, ["body", "flow_name"], "U+001B"),
            ({"flow_name": "x", "tags": ["a.b c>"]}, ["body", "tags", 0], "^[A-Za-z0-9_-]+$"),
            ({"flow_name": "x", "tags": ["*"]}, ["body", "tags", 0], "wildcards"),
            ({"flow_name": "x", "tags": ["ok\n"]}, ["body", "tags", 0], "^[A-Za-z0-9_-]+$"),
            ({"flow_name": "x", "tags": [""]}, ["body", "tags", 0], "^[A-Za-z0-9_-]+$"),
            ({"flow_name": "x", "tags": ["t"] * 65}, ["body", "tags"], "at most 64"),
            ({"flow_name": "x", "tag": "gpu\n"}, ["body", "tag"], "^[A-Za-z0-9_-]+$"),
            ({"flow_name": "x", "tag": "g" * 129}, ["body", "tag"], "at most 128"),
        ]
        for body, loc, says in cases:
            r = await gw.client.post("/runs", json=body)
            assert _loc(r) == loc, (body, r.text)
            assert says in r.json()["detail"][0]["msg"], r.text
            assert len(r.content) < 2000  # the refusal does not echo a huge value back
        # what pyoco-server users send keeps working: unicode names, tags, a 256-char name
        for body in ({"flow_name": "日本語のフロー", "tags": ["a-b", "C_9"]}, {"flow_name": "n" * 256, "tag": "gpu"}):
            r = await gw.client.post("/runs", json=body)
            assert r.status_code == 200, r.text
        assert await events_last_seq(gw.nats) == before + 2


async def test_params_over_the_limit_are_413_naming_it(gw: GW) -> None:
    with trio.fail_after(10):
        before = await events_last_seq(gw.nats)
        r = await gw.client.post("/runs", json={"flow_name": "x", "params": {"blob": "a" * PARAMS_LIMIT}})
        assert r.status_code == 413 and "PYOCO_MAX_PARAMS_BYTES" in r.json()["detail"] and str(PARAMS_LIMIT) in r.json()["detail"]
        big_defaults = FLOW_YAML.replace(b"    label: demo\n", b"    label: " + b"b" * PARAMS_LIMIT + b"\n")
        r = await submit_yaml(gw.client, big_defaults)
        assert r.status_code == 413 and "PYOCO_MAX_PARAMS_BYTES" in r.json()["detail"], r.text
        assert await events_last_seq(gw.nats) == before


async def test_newline_terminated_ids_are_404_not_503(gw: GW) -> None:
    """`^...$` matched `id\\n`; the KV lookup then failed and the gateway answered a misleading 503."""
    with trio.fail_after(10):
        run_id = await submit(gw.client)
        for path in (f"/runs/{run_id}%0A", f"/runs/{run_id}%0A/tasks", f"/runs/{run_id}%0A/events",
                     f"/runs/{run_id}%0A/watch", f"/runs/{run_id}%0A?include=full", "/runs/%00"):
            r = await gw.client.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text)
        r = await gw.client.post(f"/runs/{run_id}%0A/cancel")
        assert r.status_code == 404, r.text
        r = await gw.client.patch("/workers/w1%0A", json={"hidden": True})
        assert r.status_code == 404, r.text
        assert (await gw.client.get(f"/runs/{run_id}")).status_code == 200
    # the same class everywhere a token or tag is checked
    for check in (subjects.is_token, lambda v: TAG_RE.fullmatch(v) is not None, lambda v: _TAG_RE.fullmatch(v) is not None):
        assert check("abc") and not check("abc\n") and not check("a.b") and not check("")


async def test_headers_queries_and_form_fields_are_checked_too(gw: GW) -> None:
    with trio.fail_after(10):
        before = await events_last_seq(gw.nats)
        r = await gw.client.post("/runs", json={"flow_name": "x"}, headers={"Idempotency-Key": "k\u00e9y".encode()})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"], r.text
        r = await gw.client.get("/runs", params={"flow": "a\x00b"})
        assert _loc(r) == ["query", "flow"]
        r = await gw.client.get("/runs", params={"status": "x" * 300})
        assert _loc(r) == ["query", "status"]
        r = await gw.client.get("/runs/stream", params={"tag": "a\nb"})
        assert _loc(r) == ["query", "tag"]
        r = await submit_yaml(gw.client, flow_name="main\r\nX-Injected: 1")
        assert _loc(r) == ["body", "flow_name"]
        r = await submit_yaml(gw.client, flow_name="m" * 257)
        assert _loc(r) == ["body", "flow_name"]
        huge_int = FLOW_YAML.replace(b"    x: 1\n", b"    x: " + b"1" * 5000 + b"\n")
        r = await submit_yaml(gw.client, huge_int)
        assert r.status_code == 422 and r.json()["detail"].startswith("invalid workflow yaml"), r.text
        long_int = FLOW_YAML.replace(b"    x: 1\n", b"    x: " + b"1" * 70 + b"\n")
        r = await submit_yaml(gw.client, long_int)
        assert _loc(r) == ["body", "workflow", "flow", "defaults", "x"]
        assert await events_last_seq(gw.nats) == before
        assert (await submit_yaml(gw.client)).status_code == 200


async def test_cross_site_writes_are_refused(gw: GW) -> None:
    """Any page the operator visits could POST a run (text/plain JSON, or a multipart form)."""
    with trio.fail_after(10):
        before = await events_last_seq(gw.nats)
        evil = {"Origin": "http://evil.example"}
        r = await gw.client.post("/runs", json={"flow_name": "x"}, headers=evil)
        assert r.status_code == 403 and "PYOCO_HTTP_ALLOWED_ORIGINS" in r.json()["detail"], r.text
        r = await submit_yaml(gw.client, headers=evil)  # the fast path's route
        assert r.status_code == 403 and "PYOCO_HTTP_ALLOWED_ORIGINS" in r.json()["detail"], r.text
        r = await submit_yaml(gw.client, headers={"Origin": "null"})
        assert r.status_code == 403
        r = await gw.client.post("/runs", json={"flow_name": "x"}, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403
        run_id = await submit(gw.client)
        r = await gw.client.post(f"/runs/{run_id}/cancel", headers=evil)
        assert r.status_code == 403
        r = await gw.client.patch("/workers/w1", json={"hidden": True}, headers=evil)
        assert r.status_code == 403
        # a port of the same host is another origin
        host = gw.url.split("://", 1)[1]
        r = await gw.client.post("/runs", json={"flow_name": "x"}, headers={"Origin": f"http://{host.rsplit(':', 1)[0]}:1"})
        assert r.status_code == 403
        assert await events_last_seq(gw.nats) == before + 1
        # reads stay open to everyone (no state change), like pyoco-server
        assert (await gw.client.get(f"/runs/{run_id}", headers=evil)).status_code == 200
        # the gateway's own origin (the dashboard), a listed origin, and no origin at all (curl, CLIs)
        for headers in ({"Origin": gw.url, "Sec-Fetch-Site": "same-origin"}, {"Origin": "https://dash.example:8443"}, {}):
            r = await gw.client.post("/runs", json={"flow_name": "x"}, headers=headers)
            assert r.status_code == 200, (headers, r.text)
            r = await submit_yaml(gw.client, headers=headers)
            assert r.status_code == 200, (headers, r.text)
        listed = {"Origin": "https://dash.example:8443"}
        r = await gw.client.post("/runs", json={"flow_name": "x"}, headers=listed)
        assert r.headers["Access-Control-Allow-Origin"] == "https://dash.example:8443"
        # the same on the routes also answered in front of Quart (the fast path)
        r = await submit_yaml(gw.client, headers=listed)
        assert r.headers["Access-Control-Allow-Origin"] == "https://dash.example:8443"
        r = await gw.client.get(f"/runs/{r.json()['run_id']}", headers=listed)
        assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://dash.example:8443"
        r = await gw.client.options("/runs", headers={"Origin": "https://dash.example:8443", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and "Idempotency-Key" in r.headers["Access-Control-Allow-Headers"]
        r = await gw.client.options("/runs", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_bodies_a_route_does_not_take_are_415(gw: GW) -> None:
    with trio.fail_after(10):
        before = await events_last_seq(gw.nats)
        body = json.dumps({"flow_name": "x"}).encode()
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": ctype} if ctype else {}
            r = await gw.client.post("/runs", content=body, headers=headers)
            assert r.status_code == 415 and "application/json" in r.json()["detail"], (ctype, r.text)
            r = await gw.client.patch("/workers/w1", content=b'{"hidden": true}', headers=headers)
            assert r.status_code == 415, (ctype, r.text)
        r = await gw.client.post("/runs/yaml", content=FLOW_YAML, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
        assert await events_last_seq(gw.nats) == before
        # a charset parameter is fine; pyoco-server 0.5.1's client sends exactly these shapes
        r = await _post_raw(gw, body, **{"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200, r.text
        r = await gw.client.post("/runs", json={"flow_name": "main", "params": {}, "tag": "default", "tags": ["a"]})
        assert r.status_code == 200, r.text
        r = await gw.client.post("/runs/yaml", files={"workflow": ("flow.yaml", FLOW_YAML, "application/x-yaml")},
                                 data={"flow_name": "main", "tag": "default"})
        assert r.status_code == 200, r.text
        r = await gw.client.post(f"/runs/{r.json()['run_id']}/cancel")  # no body, no content type
        assert r.status_code == 200, r.text


async def test_a_submit_over_nats_max_payload_is_413_naming_it(tmp_path: Path) -> None:
    """The limit is what the server told the client at connect, not a hard-coded 1 MB (issue 11 #3)."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", max_payload=64 * 1024)
    server.start()
    try:
        async with open_nats(server.url, name="t") as nats, trio.open_nursery() as nursery:
            await ensure_resources(nats)
            host, port = await nursery.start(lambda task_status: run_gateway(nats, Settings(), host="127.0.0.1", port=0, task_status=task_status))
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
                with trio.fail_after(10):
                    before = await events_last_seq(nats)
                    r = await client.post("/runs", json={"flow_name": "x", "params": {"blob": "a" * 70_000}})
                    assert r.status_code == 413 and "max_payload of 65536" in r.json()["detail"], r.text
                    r = await submit_yaml(client, FLOW_YAML + b"# " + b"c" * 70_000 + b"\n")
                    assert r.status_code == 413 and "max_payload of 65536" in r.json()["detail"], r.text
                    assert await events_last_seq(nats) == before
                    r = await client.post("/runs", json={"flow_name": "x", "params": {"blob": "a" * 50_000}})
                    assert r.status_code == 200, r.text
            nursery.cancel_scope.cancel()
    finally:
        server.stop()


async def test_what_the_fuzzer_found_stays_fixed(gw: GW) -> None:
    """tests/test_fuzz_api.py found these 500s: a 422 echoing a NaN or a huge integer it refused
    (the answer itself could not be encoded), and a static file name too long for the disk."""
    with trio.fail_after(10):
        for body in (b"[NaN]", b'{"flow_name": 1e400}', b'{"flow_name": ' + b"9" * 5000 + b"}", b'{"flow_name": "x", "tags": [Infinity]}'):
            r = await _post_raw(gw, body)
            assert r.status_code == 422, (body[:40], r.text)
        r = await _post_raw(gw, b'{"flow_name": "' + b"x" * 300_000 + b'"}')
        assert r.status_code == 422 and len(r.content) < 2000
        r = await gw.client.get("/static/" + "\u00c6" * 200)
        assert r.status_code == 404, r.text


async def test_a_loopback_gateway_answers_only_to_local_host_names(gw: GW) -> None:
    """DNS rebinding: a page at http://evil.example:PORT whose name resolves to 127.0.0.1 is
    "same-origin" by Origin == Host; a loopback-bound gateway serves local names only."""
    with trio.fail_after(10):
        before = await events_last_seq(gw.nats)
        port = gw.url.rsplit(":", 1)[1]
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        r = await gw.client.post("/runs", json={"flow_name": "x"}, headers=rebound)
        assert r.status_code == 403 and "PYOCO_HTTP_ALLOWED_HOSTS" in r.json()["detail"], r.text
        r = await submit_yaml(gw.client, headers=rebound)  # the fast path's route
        assert r.status_code == 403, r.text
        run_id = await submit(gw.client)
        for path in (f"/runs/{run_id}", "/runs", "/"):  # reads too (the fast path serves the first)
            r = await gw.client.get(path, headers={"Host": f"evil.example:{port}"})
            assert r.status_code == 403, (path, r.text)
        assert await events_last_seq(gw.nats) == before + 1
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"127.0.0.2:{port}", "dash.example"):  # the last: a listed origin's host
            r = await gw.client.get(f"/runs/{run_id}", headers={"Host": host})
            assert r.status_code == 200, (host, r.text)


def test_which_host_names_a_gateway_serves() -> None:
    from pyoco_es.gateway.guard import allowed_hosts, check_host, CrossSiteRefused

    assert allowed_hosts((), frozenset(), bind_host="0.0.0.0") is None  # exposed on purpose: any name
    assert allowed_hosts(("*",), frozenset(), bind_host="127.0.0.1") is None
    exposed = allowed_hosts(("runs.example",), frozenset(), bind_host="0.0.0.0")
    assert exposed == frozenset({"runs.example"})
    check_host("runs.example:8000", exposed)
    with pytest.raises(CrossSiteRefused):
        check_host("other.example", exposed)
    local = allowed_hosts((), frozenset({"https://dash.example:8443"}), bind_host="::1")
    assert local is not None and {"localhost", "dash.example"} <= local
    for bad in (None, "", "evil.example", "localhost.evil.example", "127.0.0.1.evil.example", "a b"):
        with pytest.raises(CrossSiteRefused):
            check_host(bad, local)
