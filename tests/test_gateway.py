"""The gateway over real HTTP (random port) against a real nats-server and conductor: every
route, submits with and without Idempotency-Key, read-your-writes, cancel, lists, workers,
metrics, dashboard files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from pyoco_es.config import Settings
from pyoco_es.nats import subjects
from pyoco_es.testing.stack import open_stack
from test_gateway_support import (  # noqa: F401 - gw is a fixture
    HTTPX_STREAM_WARNINGS,
    gw,
    GW,
    FakeWorker,
    events_last_seq,
    open_gateway,
    put_worker,
    submit,
    submit_yaml,
    wait_projected,
    wait_status,
    wait_until,
)

pytestmark = HTTPX_STREAM_WARNINGS


# -- health, readiness, OpenAPI -------------------------------------------------------------------


async def test_health_ready_and_openapi(gw: GW) -> None:
    with trio.fail_after(10):
        assert (await gw.client.get("/health")).json() == {"status": "ok"}
        r = await gw.client.get("/ready")
        assert r.status_code == 200
        assert r.json()["nats"]["connected"] is True and r.json()["run_index"]["ready"] is True
        doc = (await gw.client.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.")
        for path in ("/runs", "/runs/yaml", "/runs/{run_id}", "/runs/{run_id}/tasks", "/runs/{run_id}/watch",
                     "/runs/{run_id}/events", "/runs/{run_id}/cancel", "/workers", "/workers/{worker_id}", "/metrics"):
            assert path in doc["paths"], path


# -- submit and read-your-writes -----------------------------------------------------------------


async def test_submit_then_read_never_404s_and_history_is_audited(gw: GW) -> None:
    with trio.fail_after(10):
        r = await gw.client.post("/runs", json={"flow_name": "hello", "params": {"n": 3}, "tags": ["a", "b"]})
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "PENDING" and body["bundle_hash"] is None
        run_id = body["run_id"]
        # right after the 2xx: the snapshot, the list and the history all know the run
        snap = (await gw.client.get(f"/runs/{run_id}")).json()
        assert snap["status"] == "PENDING" and snap["params"] == {"n": 3}
        assert snap["tag"] == "default" and snap["tags"] == ["a", "b"]
        assert "task_records" not in snap
        listed = (await gw.client.get("/runs")).json()
        assert [i["run_id"] for i in listed] == [run_id]
        hist = (await gw.client.get(f"/runs/{run_id}/events")).json()
        assert hist["last_seq"] == 1
        (ev,) = hist["events"]
        assert ev["type"] == "run.submitted" and ev["seq"] == 1 and ev["stream_seq"] >= 1
        assert ev["producer"]["kind"] == "gateway" and ev["data"]["params"] == {"n": 3}
        tasks = (await gw.client.get(f"/runs/{run_id}/tasks")).json()
        assert tasks == {"run_id": run_id, "flow_name": "hello", "status": "PENDING", "tasks": {}, "task_records": {}, "task_records_truncated": False}


async def test_read_your_writes_without_a_projector(tmp_path: Path) -> None:
    """No conductor at all: the snapshot is folded from the run's events on the KV miss."""
    with trio.fail_after(10):
        async with open_gateway(tmp_path, conductor=False) as gw:
            run_id = await submit(gw.client, "solo")
            assert await gw.nats.kv_get(subjects.RUNS_BUCKET, run_id) is None
            r = await gw.client.get(f"/runs/{run_id}")
            assert r.status_code == 200 and r.json()["status"] == "PENDING" and r.json()["version"] == 1
            assert (await gw.client.get("/runs")).json()[0]["run_id"] == run_id
            r = await gw.client.post(f"/runs/{run_id}/cancel")
            assert r.json()["status"] == "CANCELLED"
            assert (await gw.client.get(f"/runs/{run_id}")).json()["status"] == "CANCELLED"


async def test_idempotency_key_returns_the_same_run_and_appends_once(gw: GW) -> None:
    with trio.fail_after(10):
        headers = {"Idempotency-Key": "order-42"}
        r1 = await gw.client.post("/runs", json={"flow_name": "hello", "params": {"a": 1}}, headers=headers)
        seq = await events_last_seq(gw.nats)
        r2 = await gw.client.post("/runs", json={"flow_name": "hello", "params": {"a": 1}}, headers=headers)
        assert r1.status_code == r2.status_code == 200
        assert r1.json()["run_id"] == r2.json()["run_id"]
        assert r2.headers["Idempotent-Replayed"] == "true"
        # Every attempt stamps a fresh event id, so JetStream's dedupe window plays no part: the
        # retry is refused by the create-once append (expected last subject seq 0), at any age.
        assert await events_last_seq(gw.nats) == seq
        hist = (await gw.client.get(f"/runs/{r1.json()['run_id']}/events")).json()
        assert [e["type"] for e in hist["events"]] == ["run.submitted"]
        assert hist["events"][0]["data"]["idempotency_key"] == "order-42"
        assert len(hist["events"][0]["data"]["request_sha256"]) == 64
        # the same key for a different request is refused, naming the fix
        r3 = await gw.client.post("/runs", json={"flow_name": "hello", "params": {"a": 2}}, headers=headers)
        assert r3.status_code == 422
        assert "Idempotency-Key" in r3.json()["detail"] and "different request" in r3.json()["detail"]
        assert await events_last_seq(gw.nats) == seq
        # other keys are other runs
        r4 = await gw.client.post("/runs", json={"flow_name": "hello", "params": {"a": 1}}, headers={"Idempotency-Key": "order-43"})
        assert r4.json()["run_id"] != r1.json()["run_id"]


async def test_concurrent_submits_with_one_key_make_one_run(gw: GW) -> None:
    with trio.fail_after(15):
        before = await events_last_seq(gw.nats)
        results: list[tuple[int, str]] = []

        async def one() -> None:
            r = await gw.client.post("/runs", json={"flow_name": "race"}, headers={"Idempotency-Key": "same"})
            results.append((r.status_code, r.json()["run_id"]))

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(one)
        assert {s for s, _ in results} == {200}
        assert len({rid for _, rid in results}) == 1
        assert await events_last_seq(gw.nats) == before + 1
        runs = (await gw.client.get("/runs")).json()
        assert len(runs) == 1


async def test_yaml_submit_stores_text_and_uses_defaults(gw: GW) -> None:
    with trio.fail_after(10):
        r = await submit_yaml(gw.client, tag="gpu")
        assert r.status_code == 200, r.text
        run_id = r.json()["run_id"]
        snap = (await gw.client.get(f"/runs/{run_id}")).json()
        assert snap["flow_name"] == "main" and snap["tag"] == "gpu" and snap["tags"] == ["gpu"]
        assert snap["params"] == {"x": 1, "label": "demo"}
        assert len(snap["workflow_yaml_sha256"]) == 64 and snap["workflow_yaml_bytes"] > 0
        assert "workflow_yaml" not in snap  # the snapshot keeps only sha and size
        ev = (await gw.client.get(f"/runs/{run_id}/events")).json()["events"][0]
        assert ev["data"]["workflow_yaml"].startswith("version: 1")
        # idempotent YAML submits too
        again = await submit_yaml(gw.client, tag="gpu", headers={"Idempotency-Key": "y1"})
        again2 = await submit_yaml(gw.client, tag="gpu", headers={"Idempotency-Key": "y1"})
        assert again.json()["run_id"] == again2.json()["run_id"] != run_id


# -- cancel ---------------------------------------------------------------------------------------


async def test_cancel_pending_running_and_terminal(gw: GW) -> None:
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats)
        pending = await submit(gw.client)
        await wait_projected(gw.nats, pending, 1)
        r = await gw.client.post(f"/runs/{pending}/cancel", json={})
        assert r.status_code == 200
        assert r.json()["status"] == "CANCELLED"
        # read-your-writes: the next read never shows the older projected state
        assert (await gw.client.get(f"/runs/{pending}")).json()["status"] == "CANCELLED"
        assert (await gw.client.get("/runs", params={"status": "CANCELLED"})).json()[0]["run_id"] == pending
        assert "task_records" not in r.json()
        hist = (await gw.client.get(f"/runs/{pending}/events")).json()["events"]
        assert hist[-1]["type"] == "run.cancelled" and hist[-1]["data"]["reason"] == "not_started"

        running = await submit(gw.client)
        await worker.claim(running)
        r = await gw.client.post(f"/runs/{running}/cancel")
        assert r.json()["status"] == "CANCELLING" and r.json()["cancel_requested_at"] is not None
        r2 = await gw.client.post(f"/runs/{running}/cancel")  # idempotent: no second event
        assert r2.json()["status"] == "CANCELLING"
        types = [e["type"] for e in (await gw.client.get(f"/runs/{running}/events")).json()["events"]]
        assert types.count("run.cancel_requested") == 1
        await worker.finish(running, "CANCELLED")
        await wait_status(gw.client, running, "CANCELLED")

        done = await submit(gw.client)
        await worker.claim(done)
        await worker.finish(done)
        r = await gw.client.post(f"/runs/{done}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "COMPLETED"

        assert (await gw.client.post("/runs/nope/cancel")).json() == {"detail": "run not found"}
        assert (await gw.client.post("/runs/nope/cancel")).status_code == 404


# -- snapshots, tasks, worker liveness -------------------------------------------------------------


async def test_snapshot_records_and_worker_liveness(gw: GW) -> None:
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats, worker_id="w-live")
        run_id = await submit(gw.client)
        await worker.claim(run_id)
        await worker.task_done(run_id, "first", output=2)
        await wait_projected(gw.nats, run_id, 4)
        # no registry record: DISCONNECTED
        snap = (await gw.client.get(f"/runs/{run_id}")).json()
        assert snap["worker_id"] == "w-live"
        assert snap["worker_alive"] is False and snap["worker_state"] == "DISCONNECTED" and snap["worker_heartbeat_at"] is None
        await put_worker(gw.nats, "w-live", visible_on=gw.client, state="RUNNING", tags=["default", "gpu"])
        snap = (await gw.client.get(f"/runs/{run_id}")).json()
        assert snap["worker_alive"] is True and snap["worker_state"] == "RUNNING" and snap["worker_tags"] == ["default", "gpu"]
        stale = time.time() - 3600
        await put_worker(gw.nats, "w-live", visible_on=gw.client, state="RUNNING", last_seen_at=stale, last_heartbeat_at=stale, heartbeat_at=stale)
        snap = (await gw.client.get(f"/runs/{run_id}")).json()
        # stamps an hour old are the worker's clock, not its silence (silence: the test below)
        assert snap["worker_alive"] is True and snap["worker_state"] == "RUNNING" and snap["worker_heartbeat_at"] == stale
        # include=records
        assert "task_records" not in snap
        full = (await gw.client.get(f"/runs/{run_id}", params={"include": "records"})).json()
        assert full["task_records"]["first"]["state"] == "SUCCEEDED" and full["task_records"]["first"]["output"] == 2
        assert full["task_records_truncated"] is False
        tasks = (await gw.client.get(f"/runs/{run_id}/tasks")).json()
        assert tasks["tasks"] == {"first": "SUCCEEDED", "second": "PENDING"}
        assert tasks["task_records"]["first"]["output"] == 2
        # after_seq pages the history
        hist = (await gw.client.get(f"/runs/{run_id}/events", params={"after_seq": 2})).json()
        assert [e["seq"] for e in hist["events"]] == [3, 4] and hist["last_seq"] == 4
        assert (await gw.client.get("/runs/missing/events")).status_code == 404
        assert (await gw.client.get("/runs/missing/tasks")).status_code == 404



async def test_run_reads_from_the_fast_path_equal_the_quart_route(tmp_path: Path, monkeypatch: Any) -> None:
    """``GET /runs/{id}`` of a cached run is answered in front of Quart (no I/O): same status,
    body and content type as the Quart route gives (reached here through a query string), worker
    liveness included, and counted in the request metrics; unknown runs still get Quart's 404."""
    layers = _record_fast_paths(monkeypatch)
    async with open_gateway(tmp_path) as g:
        with trio.fail_after(10):
            [layer] = layers
            worker = FakeWorker(g.nats, worker_id="w-fast")
            run_id = await submit(g.client)
            submits = layer.served  # POST /runs is answered here too
            await worker.claim(run_id)
            await worker.task_done(run_id, "first", output=2)
            await wait_projected(g.nats, run_id, 4)
            await put_worker(g.nats, "w-fast", visible_on=g.client, state="RUNNING", tags=["default"])

            async def cached() -> bool:
                before = layer.served
                r = await g.client.get(f"/runs/{run_id}")
                return layer.served == before + 1 and r.json()["version"] == 4

            await wait_until(cached, what="the run to be answered from the cache")
            served = layer.served
            fast = await g.client.get(f"/runs/{run_id}")
            slow = await g.client.get(f"/runs/{run_id}?via=quart")
            assert layer.served == served + 1  # the query string went to Quart
            assert fast.status_code == slow.status_code == 200
            assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
            assert fast.json() == slow.json() and fast.content == slow.content
            assert fast.json()["worker_alive"] is True and "task_records" not in fast.json()
            assert (await g.client.get("/runs/0123456789abcdef0123456789abcdef")).status_code == 404
            assert (await g.client.get("/runs/stream", params={"timeout_sec": 1})).status_code == 200
            metrics = (await g.client.get("/metrics")).text
            line = [m for m in metrics.splitlines() if m.startswith("pyoco_http_requests_total") and 'route="/runs/<run_id>"' in m and 'status="200"' in m]
            assert line and float(line[0].rsplit(" ", 1)[1]) >= served - submits + 2


async def test_yaml_submits_on_the_fast_path_and_errors_as_quart_words_them(tmp_path: Path, monkeypatch: Any) -> None:
    """``POST /runs/yaml`` is answered in front of Quart on the happy path, Idempotency-Key replays
    and conflicts included; a request with a problem goes to Quart with its body replayed
    (nothing appended), and gets Quart's answer."""
    layers = _record_fast_paths(monkeypatch)
    async with open_gateway(tmp_path) as g:
        with trio.fail_after(10):
            [layer] = layers
            before = layer.served
            r = await submit_yaml(g.client, headers={"Idempotency-Key": "fast-1"})
            assert r.status_code == 200 and r.json()["status"] == "PENDING" and layer.served == before + 1
            run_id = r.json()["run_id"]
            again = await submit_yaml(g.client, headers={"Idempotency-Key": "fast-1"})
            assert again.json()["run_id"] == run_id and again.headers["idempotent-replayed"] == "true"
            other = await submit_yaml(g.client, tag="elsewhere", headers={"Idempotency-Key": "fast-1"})
            assert other.status_code == 422 and "already used for a different request" in other.json()["detail"]
            assert layer.served == before + 3
            bad = await submit_yaml(g.client, b"flow: [unclosed", headers={"Idempotency-Key": "fast-2"})
            missing = await submit_yaml(g.client, flow_name=None)
            assert layer.served == before + 3  # both went to Quart
            assert bad.status_code == 422 and "invalid workflow yaml" in str(bad.json()["detail"])
            assert missing.status_code == 422 and "flow_name" in str(missing.json()["detail"])
            counts = await g.nats.subject_counts(subjects.EVENTS_STREAM, subjects.RUN_EVENTS_WILDCARD)
            assert counts == {subjects.run_events_subject(run_id): 1}  # one run, one event


async def test_named_submits_on_the_fast_path_and_errors_as_quart_words_them(tmp_path: Path, monkeypatch: Any) -> None:
    """``POST /runs`` (a named flow) likewise: answered in front of Quart on the happy path; bad
    JSON, a bad field, a wrong content type or a cross-site origin get Quart's answer, and
    nothing is appended for them."""
    layers = _record_fast_paths(monkeypatch)
    async with open_gateway(tmp_path) as g:
        with trio.fail_after(10):
            [layer] = layers
            before = layer.served
            body = {"flow_name": "main", "params": {"x": 1}, "tag": "t1", "timeout_sec": 30}
            r = await g.client.post("/runs", json=body, headers={"Idempotency-Key": "named-1"})
            assert r.status_code == 200 and r.json()["status"] == "PENDING" and layer.served == before + 1
            run_id = r.json()["run_id"]
            again = await g.client.post("/runs", json=body, headers={"Idempotency-Key": "named-1"})
            assert again.json()["run_id"] == run_id and again.headers["idempotent-replayed"] == "true"
            other = await g.client.post("/runs", json={**body, "params": {"x": 2}}, headers={"Idempotency-Key": "named-1"})
            assert other.status_code == 422 and "already used for a different request" in other.json()["detail"]
            assert layer.served == before + 3
            broken = await g.client.post("/runs", content=b"{not json", headers={"Content-Type": "application/json"})
            no_flow = await g.client.post("/runs", json={"params": {}})
            bad_tag = await g.client.post("/runs", json={"flow_name": "main", "tag": "a.b"})
            wrong_type = await g.client.post("/runs", content=b"flow_name=main", headers={"Content-Type": "text/plain"})
            cross = await g.client.post("/runs", json=body, headers={"Origin": "https://evil.example"})
            assert layer.served == before + 3  # all went to Quart
            assert broken.status_code == 422 and "json" in str(broken.json()["detail"]).lower()
            assert no_flow.status_code == 422 and "flow_name" in str(no_flow.json()["detail"])
            assert bad_tag.status_code == 422 and "tag" in str(bad_tag.json()["detail"])
            assert wrong_type.status_code == 415 and cross.status_code == 403
            counts = await g.nats.subject_counts(subjects.EVENTS_STREAM, subjects.RUN_EVENTS_WILDCARD)
            assert counts == {subjects.run_events_subject(run_id): 1}
            snap = (await g.client.get(f"/runs/{run_id}")).json()
            assert snap["params"] == {"x": 1} and snap["tag"] == "t1"


def _record_fast_paths(monkeypatch: Any) -> list[Any]:
    from pyoco_es.gateway import fastpath

    layers: list[fastpath.FastPath] = []
    real_init = fastpath.FastPath.__init__

    def recording_init(self: fastpath.FastPath, *args: Any) -> None:
        real_init(self, *args)
        layers.append(self)

    monkeypatch.setattr(fastpath.FastPath, "__init__", recording_init)
    return layers

# -- lists ----------------------------------------------------------------------------------------


async def test_list_empty_bucket_is_empty_not_503(gw: GW) -> None:
    with trio.fail_after(10):
        assert (await gw.client.get("/runs")).json() == []
        assert (await gw.client.get("/runs", params={"updated_after": 0})).json() == {"items": [], "next_cursor": None}
        assert (await gw.client.get("/workers")).json() == []
        assert (await gw.client.get("/metrics")).status_code == 200


async def test_list_plain_delta_cursor_and_filters(gw: GW) -> None:
    with trio.fail_after(15):
        worker = FakeWorker(gw.nats)
        ids = [await submit(gw.client, "alpha" if i % 2 else "beta", tag="t1" if i < 3 else "t2") for i in range(6)]
        await worker.claim(ids[0])
        for rid in ids:
            await wait_projected(gw.nats, rid, 2 if rid == ids[0] else 1)

        async def listed(**params: Any) -> Any:
            r = await gw.client.get("/runs", params=params)
            assert r.status_code == 200, r.text
            return r.json()

        await wait_until(lambda: _count(gw, 6), what="6 runs in the index")
        plain = await listed()
        assert isinstance(plain, list) and len(plain) == 6
        keys = [(i["updated_at"], i["run_id"]) for i in plain]
        assert keys == sorted(keys, reverse=True)
        assert set(plain[0]) <= {"run_id", "schedule_id", "flow_name", "tag", "tags", "tenant_id", "api_key_id", "status",
                                 "updated_at", "heartbeat_at", "worker_id", "error", "start_time", "end_time", "version",
                                 "attempt", "max_attempts", "failure_reason", "projection_error"}
        assert len(await listed(limit=2)) == 2
        assert {i["run_id"] for i in await listed(status="RUNNING")} == {ids[0]}
        assert {i["run_id"] for i in await listed(flow="alpha")} == {ids[1], ids[3], ids[5]}
        assert {i["run_id"] for i in await listed(tag="t1")} == set(ids[:3])
        # delta paging: limit=1 with next_cursor visits every run once, in order
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 1, "updated_after": 0}
            if cursor:
                params["cursor"] = cursor
            page = await listed(**params)
            assert isinstance(page, dict)
            seen += [i["run_id"] for i in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [i["run_id"] for i in plain]
        # updated_after is strict
        newest = plain[0]["updated_at"]
        assert (await listed(updated_after=newest))["items"] == []
        assert [i["run_id"] for i in (await listed(updated_after=plain[1]["updated_at"]))["items"]] == [plain[0]["run_id"]]
        # include=full returns whole snapshots
        full = await listed(include="full", limit=1)
        assert "params" in full[0] and "task_records" in full[0]


async def _count(gw: GW, n: int) -> bool:
    r = await gw.client.get("/runs", params={"limit": 200})
    return len(r.json()) == n


async def test_list_by_workflow_sha_is_delta_mode(gw: GW) -> None:
    with trio.fail_after(10):
        r = await submit_yaml(gw.client)
        sha = (await gw.client.get(f"/runs/{r.json()['run_id']}")).json()["workflow_yaml_sha256"]
        await submit(gw.client)
        await wait_projected(gw.nats, r.json()["run_id"], 1)
        page = (await gw.client.get("/runs", params={"workflow_yaml_sha256": sha, "include": "full"})).json()
        assert [i["run_id"] for i in page["items"]] == [r.json()["run_id"]] and page["next_cursor"] is None
        assert page["items"][0]["workflow_yaml_sha256"] == sha


# -- workers --------------------------------------------------------------------------------------


async def test_workers_filters_hide_and_disconnected(tmp_path: Path) -> None:
    settings = Settings(sse_heartbeat_interval=0.2, nats_unavailable_wait=1.0, worker_disconnect_timeout=3.0)
    async with open_gateway(tmp_path, settings=settings) as gw:
        await _workers_filters_hide_and_disconnected(gw)


async def _workers_filters_hide_and_disconnected(gw: GW) -> None:
    with trio.fail_after(20):
        # lost1 wrote once and fell silent: DISCONNECTED once the gateway has not seen it change
        # for the disconnect timeout (its stamps are not what decides)
        await put_worker(gw.nats, "lost1", visible_on=gw.client)

        async def lost() -> bool:
            r = await gw.client.get("/workers", params={"scope": "all", "state": "DISCONNECTED"})
            return [w["worker_id"] for w in r.json()] == ["lost1"]

        await wait_until(lost, timeout=10, what="lost1 to be DISCONNECTED")
        await put_worker(gw.nats, "idle1", visible_on=gw.client)
        await put_worker(gw.nats, "busy1", visible_on=gw.client, state="RUNNING", current_run_id="r1")
        await put_worker(gw.nats, "hidden1", visible_on=gw.client, hidden=True)
        await put_worker(gw.nats, "stopped1", visible_on=gw.client, state="STOPPED_GRACEFUL", stop_reason="graceful_shutdown")

        async def ids(**params: Any) -> set[str]:
            r = await gw.client.get("/workers", params=params)
            assert r.status_code == 200, r.text
            return {w["worker_id"] for w in r.json()}

        assert await ids() == {"idle1", "busy1"}
        assert await ids(scope="all") == {"idle1", "busy1", "stopped1", "lost1"}
        assert await ids(scope="all", include_hidden="true") == {"idle1", "busy1", "stopped1", "lost1", "hidden1"}
        assert await ids(scope="all", state="disconnected") == {"lost1"}
        assert await ids(scope="all", state="STOPPED_GRACEFUL") == {"stopped1"}
        assert len(await ids(scope="all", limit=1)) == 1
        items = (await gw.client.get("/workers", params={"scope": "all"})).json()
        lost = next(w for w in items if w["worker_id"] == "lost1")
        assert lost["state"] == "DISCONNECTED" and lost["heartbeat_at"] == lost["last_heartbeat_at"]
        r = await gw.client.patch("/workers/idle1", json={"hidden": True})
        assert r.status_code == 200 and r.json()["hidden"] is True and r.json()["worker_id"] == "idle1"
        assert await ids() == {"busy1"}
        r = await gw.client.patch("/workers/idle1", json={"hidden": False})
        assert await ids() == {"idle1", "busy1"}
        assert (await gw.client.patch("/workers/ghost", json={"hidden": True})).json() == {"detail": "worker not found"}
        bad = await gw.client.get("/workers", params={"scope": "everything"})
        assert bad.status_code == 422 and "scope" in bad.json()["detail"]
        bad = await gw.client.get("/workers", params={"state": "SLEEPING"})
        assert bad.status_code == 422 and "state must be one of" in bad.json()["detail"]
        bad = await gw.client.patch("/workers/idle1", json={"hidden": "maybe"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "hidden"]
        bad = await gw.client.patch("/workers/idle1", json={})
        assert bad.status_code == 422 and bad.json()["detail"][0]["type"] == "missing"


async def test_a_worker_clock_behind_is_alive_and_silence_disconnects(tmp_path: Path) -> None:
    """GET /workers and GET /runs/{id} judge a worker the way the reaper does: alive while the
    gateway sees its registry record change, on the gateway's own clock.  A worker whose clock
    is 20 s behind is IDLE (it used to show DISCONNECTED), and a worker whose record stops
    changing is DISCONNECTED once the timeout has passed, whatever its stamps say."""
    settings = Settings(
        sse_heartbeat_interval=0.2, nats_unavailable_wait=1.0, worker_clock_offset=-20.0,
        worker_heartbeat_interval=0.2, worker_disconnect_timeout=3.0,
    )
    async with open_stack(tmp_path, settings=settings, worker=True, worker_id="behind") as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=10.0) as client:
            with trio.fail_after(30):

                async def behind() -> dict[str, Any] | None:
                    items = (await client.get("/workers", params={"scope": "all"})).json()
                    return next((w for w in items if w["worker_id"] == "behind"), None)

                seen = await wait_until(behind, what="the skewed worker in GET /workers")
                assert seen["last_heartbeat_at"] < time.time() - 15  # its clock is behind...
                for _ in range(5):  # ...and it stays alive, heartbeat after heartbeat
                    view = await behind()
                    assert view is not None and view["state"] == "IDLE", view
                    await trio.sleep(0.3)

                worker = FakeWorker(stack.nats, worker_id="quiet")
                run_id = await submit(client, tag="nobody")  # no worker serves it: only ours claims it
                await worker.claim(run_id)
                await wait_projected(stack.nats, run_id, 2)
                await put_worker(stack.nats, "quiet", visible_on=client, state="RUNNING")  # then silence
                assert (await client.get(f"/runs/{run_id}")).json()["worker_state"] == "RUNNING"

                async def disconnected() -> bool:
                    snap = (await client.get(f"/runs/{run_id}")).json()
                    return snap["worker_state"] == "DISCONNECTED" and snap["worker_alive"] is False

                await wait_until(disconnected, timeout=10, what="the silent worker to be DISCONNECTED")
                items = (await client.get("/workers", params={"scope": "all", "state": "DISCONNECTED"})).json()
                assert [w["worker_id"] for w in items] == ["quiet"]


async def test_hide_never_loses_a_concurrent_heartbeat(gw: GW) -> None:
    """PATCH is a compare-and-swap: racing heartbeat writes do not undo it, and it keeps theirs."""
    with trio.fail_after(15):
        await put_worker(gw.nats, "hb", visible_on=gw.client)

        async def heartbeats() -> None:
            for i in range(50):
                entry = await gw.nats.kv_get(subjects.WORKERS_BUCKET, "hb")
                assert entry is not None
                rec = json.loads(entry.value or b"{}")
                rec["beats"] = i
                try:
                    await gw.nats.kv_update(subjects.WORKERS_BUCKET, "hb", json.dumps(rec).encode(), last=entry.revision)
                except Exception:  # noqa: BLE001 - a lost CAS is what a real worker retries
                    pass

        async with trio.open_nursery() as n:
            n.start_soon(heartbeats)
            r = await gw.client.patch("/workers/hb", json={"hidden": True})
            assert r.status_code == 200
        entry = await gw.nats.kv_get(subjects.WORKERS_BUCKET, "hb")
        assert entry is not None and entry.value is not None
        rec = json.loads(entry.value)
        assert rec["hidden"] is True


# -- metrics --------------------------------------------------------------------------------------


async def test_metrics_families(gw: GW) -> None:
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats)
        a = await submit(gw.client)
        await submit(gw.client)
        await worker.claim(a)
        await put_worker(gw.nats, "m1", visible_on=gw.client)
        await wait_projected(gw.nats, a, 2)

        async def scraped() -> str | None:
            text = (await gw.client.get("/metrics")).text
            return text if 'pyoco_runs_total{status="RUNNING"} 1.0' in text else None

        text = await wait_until(scraped, what="metrics to show the RUNNING run")
        r = await gw.client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        for family in ("pyoco_runs_total", "pyoco_runs_today_total", "pyoco_workers_alive_total", "pyoco_dlq_messages_total",
                       "pyoco_projector_lag", "pyoco_events_appended_total"):
            assert f"# TYPE {family} gauge" in text
        assert 'pyoco_runs_total{status="PENDING"} 1.0' in text
        assert 'pyoco_runs_today_total{status="RUNNING"} 1.0' in text
        assert "pyoco_workers_alive_total 1.0" in text
        assert "pyoco_dlq_messages_total 0.0" in text
        assert "pyoco_events_appended_total 3.0" in text
        assert 'pyoco_queue_depth{tag="default"} 1.0' in text  # the PENDING run; the other is RUNNING
        assert 'pyoco_work_stream_messages{tag="default"} 2.0' in text  # both dispatched, nobody consumed them
        assert "pyoco_runs_unprojectable_total 0.0" in text
        # A corrupt event marks its run as not projectable: visible in the metric and the list.
        bad = "c0ffee" * 5 + "00"
        await gw.nats.publish(subjects.run_events_subject(bad), b"{not json", msg_id="junk")

        async def flagged() -> str | None:
            text = (await gw.client.get("/metrics")).text
            return text if "pyoco_runs_unprojectable_total 1.0" in text else None

        await wait_until(flagged, what="the corrupt run to be counted")
        [item] = [i for i in (await gw.client.get("/runs")).json() if i["run_id"] == bad]
        assert "not JSON" in item["projection_error"]
        # request metrics by route template (bounded labels), not by raw path
        assert 'pyoco_http_requests_total{method="POST",route="/runs",status="200"} 2.0' in text
        assert a not in text  # run ids never become label values
        assert "pyoco_http_request_duration_seconds_bucket" in text


# -- dashboard files ------------------------------------------------------------------------------


async def test_dashboard_index_lang_and_static_files(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_gateway(tmp_path, settings=Settings(dashboard_lang="ja")) as gw:
            r = await gw.client.get("/")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "__PYOCO_DASHBOARD_LANG_VALUE__" not in r.text
            assert 'data-server-lang="ja"' in r.text
            assert (await gw.client.get("/static/app.js")).status_code == 200
            for bad in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/nope.js",
                        "/static/%2e%2e/%2e%2e/config.py", "/static/"):
                r = await gw.client.get(bad)
                assert r.status_code == 404, bad
                assert r.json() == {"detail": "Not Found"}, bad


def test_dashboard_lang_resolution() -> None:
    from pyoco_es.gateway.dashboard import resolve_dashboard_lang

    assert resolve_dashboard_lang("ja_JP") == "ja"
    assert resolve_dashboard_lang("en-US") == "en"
    assert resolve_dashboard_lang("auto", {"LANG": "ja_JP.UTF-8"}) == "ja"
    assert resolve_dashboard_lang("server", {"LC_ALL": "en_GB.UTF-8", "LANG": "ja_JP.UTF-8"}) == "en"
