"""The /wheels routes against a real NATS: pyoco-server's fields, statuses and details, the
registry's events and history, and every bad input refused with nothing stored."""

from __future__ import annotations

import hashlib
import os
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from pyoco_es.config import Settings
from pyoco_es.core import wheels
from pyoco_es.nats import keystore, subjects
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.wheelstore import WheelStore

from test_gateway_support import GW, open_gateway, wait_until
from wheelmaker import make_wheel

SMALL_MAX = 64 * 1024


@pytest.fixture
async def wgw(tmp_path: Path) -> AsyncIterator[GW]:
    settings = Settings(nats_unavailable_wait=1.0, wheel_max_bytes=SMALL_MAX)
    async with open_gateway(tmp_path, settings=settings, conductor=False) as g:
        yield g


async def upload(client: httpx.AsyncClient, name: str, data: bytes, **form: str) -> httpx.Response:
    return await client.post("/wheels", files={"wheel": (name, data, "application/octet-stream")}, data=form)


async def stored_names(g: GW) -> list[str]:
    return [o.name for o in await WheelStore(g.nats).list()]


async def test_upload_list_download_history_delete(wgw: GW) -> None:
    c = wgw.client
    name1, v1 = make_wheel("demo-pkg", "1.0.0")
    r = await upload(c, name1, v1, tags="cpu, gpu,cpu")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["name"] == name1 and doc["size_bytes"] == len(v1) and doc["tags"] == ["cpu", "gpu"]
    assert doc["sha256_hex"] == hashlib.sha256(v1).hexdigest()
    assert doc["digest"] == wheels.hex_to_digest(doc["sha256_hex"]) and doc["sha256_b64"] == doc["digest"][8:]
    assert doc["nuid"] and doc["mtime"]

    name2, v2 = make_wheel("demo-pkg", "2.0.0")
    assert (await upload(c, name2, v2)).status_code == 200
    listed = (await c.get("/wheels")).json()
    assert [w["name"] for w in listed] == [name1, name2]
    assert set(listed[0]) == {"name", "size_bytes", "digest", "sha256_b64", "mtime", "nuid", "tags"}
    assert listed[0]["tags"] == ["cpu", "gpu"] and listed[1]["tags"] == []

    got = await c.get(f"/wheels/{name1}")
    assert got.status_code == 200 and got.content == v1
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"] == f'attachment; filename="{name1}"'

    for older in ("1.0.0", "1.5", "2.0"):
        n, d = make_wheel("demo-pkg", older)
        r = await upload(c, n, d)
        assert r.status_code == 409
        expected = wheels.OLDER_VERSION if older == "1.5" else wheels.SAME_VERSION
        assert r.json() == {"detail": expected}

    r = await c.delete(f"/wheels/{name1}")
    assert r.status_code == 200 and r.json() == {"name": name1, "deleted": True}
    assert (await c.delete(f"/wheels/{name1}")).json() == {"detail": "wheel not found"}
    assert (await c.get(f"/wheels/{name1}")).status_code == 404
    assert await stored_names(wgw) == [name2]

    hist = (await c.get("/wheels/history")).json()
    assert [(h["action"], h["wheel_name"]) for h in hist] == [("delete", name1), ("upload", name2), ("upload", name1)]
    up1 = hist[2]
    assert up1["tags"] == ["cpu", "gpu"] and up1["size_bytes"] == len(v1) and up1["replace"] is True
    assert up1["sha256_hex"] == hashlib.sha256(v1).hexdigest() and up1["version"] == "1.0.0" and up1["package"] == "demo-pkg"
    assert up1["actor"] == {"tenant_id": None, "api_key_id": None} and up1["source"]["remote_addr"] == "127.0.0.1"
    assert hist[0]["replace"] is None and hist[0]["tags"] == ["cpu", "gpu"] and hist[0]["sha256_hex"] == up1["sha256_hex"]
    assert [h["action"] for h in (await c.get("/wheels/history", params={"action": "delete"})).json()] == ["delete"]
    assert len((await c.get("/wheels/history", params={"wheel_name": name2})).json()) == 1
    assert len((await c.get("/wheels/history", params={"limit": 1})).json()) == 1

    # The same entries are in pyoco-server's history KV (an upstream gateway sees them) and are events.
    kv = await WheelStore(wgw.nats).upstream_history()
    assert sorted(e["event_id"] for e in kv) == sorted(h["event_id"] for h in hist)
    events = await WheelStore(wgw.nats).events()
    assert [e["type"] for _, e in events] == ["wheel.uploaded", "wheel.uploaded", "wheel.deleted"]
    assert wheels.live_wheels(e for _, e in events).keys() == {name2}


async def test_a_deleted_version_may_come_back_and_no_replace_refuses_an_existing_name(wgw: GW) -> None:
    c = wgw.client
    name, data = make_wheel("demo", "1.0")
    assert (await upload(c, name, data)).status_code == 200
    assert (await c.delete(f"/wheels/{name}")).status_code == 200
    assert (await upload(c, name, data, replace="false")).status_code == 200  # gone, so not "already exists"
    r = await upload(c, name, data, replace="maybe")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "replace"]


async def test_history_filters_are_checked(wgw: GW) -> None:
    c = wgw.client
    assert (await c.get("/wheels/history", params={"wheel_name": "../x.whl"})).json() == {"detail": "invalid wheel name"}
    assert (await c.get("/wheels/history", params={"action": "purge"})).json() == {"detail": "invalid action"}
    for bad in ("0", "501", "x"):
        assert (await c.get("/wheels/history", params={"limit": bad})).status_code == 422
    assert (await c.get("/wheels/history", params={"wheel_name": " ", "action": ""})).json() == []


def _bad_uploads() -> list[tuple[str, bytes, dict[str, str], int, str]]:
    ok_name, ok = make_wheel("demo", "1.0")
    cases = [
        ("not-a-wheel.txt", ok, {}, 422, "invalid wheel name"),
        ("../demo-1.0-py3-none-any.whl", ok, {}, 422, "invalid wheel name"),
        ("demo-1.0-py3-none-any.whl\x00.whl", ok, {}, 422, "invalid wheel name"),
        ("x" * 400 + "-1.0-py3-none-any.whl", ok, {}, 422, "invalid wheel name"),
        ("..-1.0-py3-none-any.whl", ok, {}, 422, "invalid wheel name"),
        ("demo-1.0.whl", ok, {}, 422, "invalid wheel filename"),
        ("demo-x!y-py3-none-any.whl".replace("!", "."), ok, {}, 422, "invalid wheel filename"),
        (ok_name, ok, {"tags": "a.b"}, 422, "invalid wheel tags"),
        (ok_name, ok, {"tags": "ok,not ok"}, 422, "invalid wheel tags"),
        (ok_name, b"this is not a zip", {}, 422, "invalid wheel archive: not a zip file"),
        (ok_name, make_wheel("demo", "1.0", extra_members={"../../etc/x": b"x"})[1], {}, 422, "escapes the archive"),
        (ok_name, make_wheel("demo", "1.0", extra_members={"/abs.py": b"x"})[1], {}, 422, "is an absolute path"),
        (ok_name, make_wheel("demo", "1.0", metadata_version="2.0")[1], {}, 422, "METADATA Version '2.0'"),
        (ok_name, make_wheel("other", "1.0")[1], {}, 422, "does not belong to package 'demo'"),
    ]
    return cases


async def test_bad_uploads_are_refused_and_store_nothing(wgw: GW) -> None:
    for name, data, form, status, detail in _bad_uploads():
        r = await upload(wgw.client, name, data, **form)
        assert r.status_code == status, (name[:40], r.text)
        assert detail in r.json()["detail"], (name[:40], r.text)
    assert await stored_names(wgw) == []
    assert await WheelStore(wgw.nats).events() == []
    assert await WheelStore(wgw.nats).upstream_history() == []
    info = await wgw.nats.stream_info(subjects.obj_stream(subjects.WHEELS_BUCKET))
    assert info["messages"] == 0  # no chunk, no meta: nothing partial left


async def test_oversize_is_413_before_the_body_is_read(wgw: GW) -> None:
    name, _ = make_wheel("demo", "1.0")
    big = make_wheel("demo", "1.0", extra_members={"demo/blob.bin": b"y" * (SMALL_MAX + 10)})[1]  # stored, not deflated
    r = await upload(wgw.client, name, big)
    assert r.status_code == 413 and r.json() == {"detail": "wheel too large"}
    # Announced far larger than the limit (1 GB, of which 5 bytes are sent): answered from the
    # headers alone (the answer says the connection closes).
    host, port = wgw.url.removeprefix("http://").split(":")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                b"POST /wheels HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 1000000000\r\n\r\n--b\r\n"
            )
            answer = b""
            while not answer.endswith(b"}"):
                answer += await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 413") and answer.endswith(b'{"detail":"wheel too large"}'), answer
    assert b"connection: close" in answer.lower()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: cut off at the limit
        yield b"--b\r\nContent-Disposition: form-data; name=\"wheel\"; filename=\"demo-1.0-py3-none-any.whl\"\r\n\r\n"
        for _ in range(40):
            yield b"z" * 4096

    r = await wgw.client.post("/wheels", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json() == {"detail": "wheel too large"}
    assert await stored_names(wgw) == []


async def test_a_chunked_upload_is_stored_intact(wgw: GW) -> None:
    """No Content-Length (the body arrives in chunks of unknown total): the body grows as it
    comes and the wheel, cut out of it in place, is stored byte for byte (the form's fields and
    a second file around it do not leak into it)."""
    name, data = make_wheel("demo", "1.0", extra_members={"demo/blob.bin": os.urandom(20_000)})
    req = httpx.Request("POST", "http://x/wheels", files={"other": ("x.txt", b"x" * 5000), "wheel": (name, data)}, data={"tags": "a"})
    body = req.read()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 7000):
            yield body[i : i + 7000]

    r = await wgw.client.post("/wheels", content=chunks(), headers={"Content-Type": req.headers["Content-Type"]})
    assert r.status_code == 200, r.text
    assert r.json()["sha256_hex"] == hashlib.sha256(data).hexdigest() and r.json()["tags"] == ["a"]
    assert (await wgw.client.get(f"/wheels/{name}")).content == data


async def test_malformed_forms_and_paths(wgw: GW) -> None:
    c = wgw.client
    r = await c.post("/wheels", data={"tags": "a"})
    assert r.status_code == 415  # a form without a file is not multipart
    r = await c.post("/wheels", files={"other": ("x.whl", b"x")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "wheel"]
    r = await c.post("/wheels", content=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 422
    for path in ("/wheels/%2e%2e", "/wheels/..%2fx.whl", "/wheels/a%00.whl", "/wheels/nope-1.0-py3-none-any.whl", "/wheels/" + "a" * 300 + ".whl"):
        assert (await c.get(path)).status_code == 404, path
        assert (await c.delete(path)).status_code == 404, path


async def test_objects_stored_the_upstream_way_are_served(wgw: GW) -> None:
    """An object written with nats-py's ObjectStore exactly as pyoco-server's upload writes it
    (same meta headers, no event of ours) is listed, downloadable and deletable; its upstream
    history entry shows in /wheels/history."""
    name, data = make_wheel("legacy", "0.3")
    sha = hashlib.sha256(data).hexdigest()
    store = WheelStore(wgw.nats)
    await store.put(name, data, {"content-type": "application/octet-stream", "sha256": sha, "x-pyoco-wheel-tags": "cpu"})
    entry = {"event_id": "f" * 32, "occurred_at": 1.0, "action": "upload", "wheel_name": name, "tags": ["cpu"],
             "size_bytes": len(data), "sha256_hex": sha, "replace": True, "actor": {"tenant_id": None, "api_key_id": None},
             "source": {"remote_addr": "10.0.0.1"}}
    await wgw.nats.kv_put(subjects.WHEEL_HISTORY_BUCKET, wheels.history_key(1.0, "f" * 32), json.dumps(entry).encode())
    listed = (await wgw.client.get("/wheels")).json()
    assert [(w["name"], w["tags"]) for w in listed] == [(name, ["cpu"])]
    assert (await wgw.client.get(f"/wheels/{name}")).content == data
    hist = (await wgw.client.get("/wheels/history")).json()
    assert hist == [entry]
    r = await upload(wgw.client, *make_wheel("legacy", "0.2"))
    assert r.json() == {"detail": wheels.OLDER_VERSION}
    assert (await wgw.client.delete(f"/wheels/{name}")).status_code == 200
    events = await store.events()
    assert [(e["type"], e["sha256_hex"], e["tags"]) for _, e in events] == [("wheel.deleted", sha, ["cpu"])]


async def test_with_api_keys_wheels_are_shared_and_history_names_the_key(tmp_path: Path) -> None:
    """api_key mode: every /wheels route needs a key; wheels are global (another tenant sees and
    may delete them, as pyoco-server); history and events record which key and tenant did it."""
    settings = Settings(nats_unavailable_wait=1.0, http_auth_mode="api_key", auth_pepper="p", wheel_max_bytes=SMALL_MAX)
    async with open_gateway(tmp_path, settings=settings, conductor=False) as g:
        key_a, rec_a = await keystore.create_key(g.nats, tenant_id="acme", now=1.0, pepper="p", actor="test")
        key_b, rec_b = await keystore.create_key(g.nats, tenant_id="other", now=1.0, pepper="p", actor="test")
        name, data = make_wheel("demo", "1.0")
        r = await upload(g.client, name, data)
        assert (r.status_code, r.json()) == (401, {"detail": "api key required"})
        r = await g.client.post("/wheels", files={"wheel": (name, data)}, headers={"X-API-Key": key_a, "X-Forwarded-For": "10.1.2.3"})
        assert r.status_code == 200, r.text
        listed = await g.client.get("/wheels", headers={"X-API-Key": key_b})
        assert [w["name"] for w in listed.json()] == [name]
        assert (await g.client.delete(f"/wheels/{name}", headers={"X-API-Key": key_b})).status_code == 200
        hist = (await g.client.get("/wheels/history", headers={"X-API-Key": key_a})).json()
        assert [(h["action"], h["actor"]) for h in hist] == [
            ("delete", {"tenant_id": "other", "api_key_id": rec_b.key_id}),
            ("upload", {"tenant_id": "acme", "api_key_id": rec_a.key_id}),
        ]
        assert hist[1]["source"]["x_forwarded_for"] == "10.1.2.3"


async def test_replay_reports_the_registry_against_the_object_store(wgw: GW) -> None:
    from pyoco_es.conductor.replay import replay, replay_wheels

    c, store = wgw.client, WheelStore(wgw.nats)
    kept, gone, tampered = make_wheel("kept", "1.0"), make_wheel("gone", "1.0"), make_wheel("tampered", "1.0")
    for name, data in (kept, gone, tampered):
        assert (await upload(c, name, data)).status_code == 200
    assert (await c.delete(f"/wheels/{gone[0]}")).status_code == 200
    report = await replay(wgw.nats)
    assert report.ok and (report.wheel_events, report.wheels) == (4, 2)

    # Behind the registry's back: an object removed, one replaced, one added without events.
    await store.delete(kept[0])
    await store.put(tampered[0], kept[1], {"sha256": hashlib.sha256(kept[1]).hexdigest()})
    await store.put(gone[0], gone[1], {})
    events, count, diffs = await replay_wheels(store)
    assert (events, count) == (4, 2)
    assert [(d.name, d.kind) for d in diffs] == [(gone[0], "extra"), (kept[0], "missing"), (tampered[0], "different")]


async def test_a_full_store_is_507_with_nothing_left_and_its_cap_never_shrinks(wgw: GW) -> None:
    from pyoco_es.nats.resources import ResourceConfig, ensure_resources

    stream = subjects.obj_stream(subjects.WHEELS_BUCKET)

    async def drop() -> None:
        await wgw.nats.js.delete_stream(stream)

    async def max_bytes() -> int:
        async def go() -> int:
            return int((await wgw.nats.js.stream_info(stream)).config.max_bytes)

        return await wgw.nats.run("stream info", go)

    await wgw.nats.run("drop the wheel store", drop)
    await ensure_resources(wgw.nats, ResourceConfig(wheel_max_bytes=48 * 1024))
    assert await max_bytes() == 48 * 1024
    first = make_wheel("big", "1.0", extra_members={"big/blob.bin": os.urandom(30 * 1024)})
    assert (await upload(wgw.client, *first)).status_code == 200
    before = (await wgw.nats.stream_info(stream))["messages"]
    r = await upload(wgw.client, *make_wheel("big", "2.0", extra_members={"big/blob.bin": os.urandom(30 * 1024)}))
    assert r.status_code == 507 and "PYOCO_WHEEL_MAX_BYTES" in r.json()["detail"]
    assert await stored_names(wgw) == [first[0]]
    assert (await wgw.nats.stream_info(stream))["messages"] == before  # the refused chunks were purged
    assert [e["wheel_name"] for _, e in await WheelStore(wgw.nats).events()] == [first[0]]

    await ensure_resources(wgw.nats, ResourceConfig(wheel_max_bytes=16 * 1024))  # would drop wheels: not applied
    assert await max_bytes() == 48 * 1024 and await stored_names(wgw) == [first[0]]
    await ensure_resources(wgw.nats, ResourceConfig(wheel_max_bytes=1024 * 1024))
    assert await max_bytes() == 1024 * 1024


def test_bad_wheel_bucket_names_are_refused_at_start() -> None:
    from pyoco_es.config import refused_settings

    out = refused_settings({"PYOCO_WHEEL_OBJECT_STORE_BUCKET": "a.b", "PYOCO_WHEEL_HISTORY_KV_BUCKET": "ok_name", "PYOCO_LOAD_DOTENV": "0"})
    assert out == ["PYOCO_WHEEL_OBJECT_STORE_BUCKET='a.b' is not a bucket name: use letters, digits, '_' and '-'"]


async def test_buckets_made_by_pyoco_server_are_taken_as_they_are(nats_server: EmbeddedNats) -> None:
    """pyoco-server creates the wheel store and history bucket with nats-py's defaults; our
    resources match that shape, so healing them changes nothing (no update, no lost wheels)."""
    from nats.js import api

    from pyoco_es.nats.client import open_nats
    from pyoco_es.nats.resources import ensure_resources

    async with open_nats(nats_server.url, name="test") as client:

        async def as_upstream() -> None:  # pyoco_server/resources.py, verbatim calls
            await client.js.create_object_store(bucket=subjects.WHEELS_BUCKET, max_bytes=512 * 1024 * 1024)
            await client.js.create_key_value(api.KeyValueConfig(bucket=subjects.WHEEL_HISTORY_BUCKET, history=1, ttl=7776000.0))

        await client.run("create as pyoco-server does", as_upstream)
        done = await ensure_resources(client)
        assert not [d for d in done if subjects.obj_stream(subjects.WHEELS_BUCKET) in d], done

        async def configs() -> tuple[Any, Any]:
            obj = await client.js.stream_info(subjects.obj_stream(subjects.WHEELS_BUCKET))
            kv = await client.js.stream_info(subjects.kv_stream(subjects.WHEEL_HISTORY_BUCKET))
            return obj.config, kv.config

        obj, kv = await client.run("stream info", configs)
        assert obj.max_bytes == 512 * 1024 * 1024 and obj.discard == api.DiscardPolicy.NEW and obj.allow_rollup_hdrs
        assert kv.max_age == 7776000.0 and kv.max_msgs_per_subject == 1


async def test_while_nats_is_away_bad_input_is_still_4xx_and_writes_503(wgw: GW) -> None:
    name, data = make_wheel("away", "1.0")
    port = int(wgw.stack.server.url.rsplit(":", 1)[1])
    wgw.stack.server.kill()
    try:
        with trio.fail_after(20):
            assert (await upload(wgw.client, "nope.zip", data)).json() == {"detail": "invalid wheel name"}
            assert (await upload(wgw.client, name, b"not a zip")).status_code == 422
            assert (await wgw.client.delete("/wheels/%2e%2e")).status_code == 404
            r = await upload(wgw.client, name, data)  # held for nats_unavailable_wait (1 s), then refused
            assert r.status_code == 503 and r.json()["outcome"] == "not_applied"
            assert (await wgw.client.get("/wheels")).status_code == 503
    finally:
        wgw.stack.server.port = port
        await trio.to_thread.run_sync(wgw.stack.server.start)

    async def back() -> bool:
        return (await wgw.client.get("/wheels")).status_code == 200

    await wait_until(back, timeout=20, what="NATS back")
    assert (await upload(wgw.client, name, data)).status_code == 200


async def test_list_and_history_fall_back_when_one_direct_get_is_not_enough(nats: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyoco_es.nats import wheelstore

    store = WheelStore(nats)
    names = []
    for v in ("1", "2", "3"):
        name, data = make_wheel("many", v)
        await store.put(name, data, {})
        names.append(name)
        await store.record({"event_id": v, "wheel_name": name}, {"event_id": v, "wheel_name": name}, wheels.history_key(float(v), v))
    await store.delete(names[0])
    fast = ([o.name for o in await store.list()], sorted(d["event_id"] for d in await store.upstream_history()))
    monkeypatch.setattr(wheelstore, "LIST_BATCH", 1)
    stream = subjects.obj_stream(subjects.WHEELS_BUCKET)
    assert await nats.run("direct get", wheelstore._last_per_subject, nats, stream, f"$O.{subjects.WHEELS_BUCKET}.M.>") is None
    slow = ([o.name for o in await store.list()], sorted(d["event_id"] for d in await store.upstream_history()))
    assert sorted(fast[0]) == sorted(slow[0]) == names[1:]
    assert fast[1] == slow[1] == ["1", "2", "3"]


async def test_no_room_for_the_wheel_store_does_not_keep_runs_from_starting(tmp_path: Path) -> None:
    """The object store reserves PYOCO_WHEEL_MAX_BYTES (512 MiB, as pyoco-server) of JetStream
    storage.  On a server without that room, resources are still made (runs work), the wheel
    store is skipped with a warning, and /wheels says why instead of failing obscurely."""
    from pyoco_es.gateway.server import run_gateway
    from pyoco_es.nats.client import open_nats
    from pyoco_es.nats.resources import ResourceConfig, ensure_resources

    server = EmbeddedNats(data_dir=tmp_path / "nats", max_file_store=8 * 1024 * 1024)
    server.start()
    try:
        with trio.fail_after(60):
            async with open_nats(server.url, name="test") as nats, trio.open_nursery() as nursery:
                done = await ensure_resources(nats, ResourceConfig(dlq_max_bytes=1024 * 1024))
                assert any(d.startswith("skipped OBJ_pyoco_wheels not created: JetStream has no room") for d in done), done
                assert "created PYOCO_EVENTS" in done and "created KV_pyoco_wheel_history" in done
                settings = Settings(nats_unavailable_wait=1.0)
                host, port = await nursery.start(lambda task_status: run_gateway(nats, settings, host="127.0.0.1", port=0, task_status=task_status))
                async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
                    assert (await client.get("/wheels")).json() == []
                    r = await upload(client, *make_wheel("roomless", "1.0"))
                    assert r.status_code == 503 and "OBJ_pyoco_wheels does not exist" in r.json()["detail"], r.text
                    r = await client.post("/runs", json={"flow_name": "main"})
                    assert r.status_code == 200, r.text
                nursery.cancel_scope.cancel()
    finally:
        server.stop()


async def test_an_upload_that_announces_a_size_holds_only_what_arrived(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The body is held as it arrives, never allocated from Content-Length: a client announcing
    the limit and sending a few bytes pins nothing (allocated from the announced size, five such
    stalled requests held 477 MiB of a gateway)."""
    import tracemalloc

    from pyoco_es.gateway import wheels as wheel_routes

    announced = 48 * 1024 * 1024
    entered = trio.Event()
    limit_of = wheel_routes.upload_body_limit

    def noting(settings: Settings) -> int | None:  # called as the route starts reading the body
        entered.set()
        return limit_of(settings)

    settings = Settings(nats_unavailable_wait=1.0, wheel_max_bytes=64 * 1024 * 1024)
    async with open_gateway(tmp_path, settings=settings, conductor=False) as g:
        monkeypatch.setattr(wheel_routes, "upload_body_limit", noting)
        host, port = g.url.removeprefix("http://").split(":")
        tracemalloc.start()
        try:
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream(host, int(port))
                async with stream:
                    await stream.send_all(
                        b"POST /wheels HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                        + f"Content-Length: {announced}\r\n\r\n--b\r\n".encode()
                    )
                    await entered.wait()
                    await trio.testing.wait_all_tasks_blocked(0.05)  # the route waits for more body
                    held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert held < announced // 8, held
