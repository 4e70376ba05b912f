"""pyoco-server's documented request shapes and e2e scenarios (contract §1, §9) against our gateway.

Each test is named after the pyoco-server test it mirrors and sends the requests its clients send
(``PyocoHttpClient``, ``pyoco-client``, the dashboard), checking the response shapes the contract
documents.  A fake worker appends real events where pyoco-server used a real worker, so the
scenarios do not depend on the worker implementation.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from pyoco_es.nats import subjects
from test_gateway_support import gw  # noqa: F401 - a fixture
from test_gateway_support import (
    GW,
    HTTPX_STREAM_WARNINGS,
    FakeWorker,
    events_last_seq,
    open_gateway,
    open_sse,
    put_worker,
    submit_yaml,
    wait_projected,
    wait_status,
    wait_until,
)

pytestmark = HTTPX_STREAM_WARNINGS

SUBMIT_KEYS = {"run_id", "status", "bundle_hash"}
SUMMARY_KEYS = {"run_id", "schedule_id", "flow_name", "tag", "tags", "tenant_id", "api_key_id", "status",
                "updated_at", "heartbeat_at", "worker_id", "error"}
SNAPSHOT_KEYS = {"run_id", "flow_name", "tag", "tags", "tenant_id", "api_key_id", "status", "params", "tasks",
                 "start_time", "end_time", "heartbeat_at", "updated_at", "error", "workflow_yaml_sha256",
                 "workflow_yaml_bytes", "schedule_id", "cancel_requested_at", "cancel_requested_by"}


async def test_http_gateway_default_allows_submit_without_api_key(gw: GW) -> None:
    """§1.2: PyocoHttpClient.submit_run's body; the response always has bundle_hash: null."""
    with trio.fail_after(10):
        r = await gw.client.post("/runs", json={"flow_name": "main", "params": {"x": 1}, "tag": "default", "tags": ["default"]})
        assert r.status_code == 200 and set(r.json()) == SUBMIT_KEYS
        assert r.json()["status"] == "PENDING" and r.json()["bundle_hash"] is None
        # tag null / empty → default routing tag; tags fall back to [tag]
        r = await gw.client.post("/runs", json={"flow_name": "main", "tag": None})
        snap = (await gw.client.get(f"/runs/{r.json()['run_id']}")).json()
        assert snap["tag"] == "default" and snap["tags"] == ["default"]
        r = await gw.client.post("/runs", json={"flow_name": "main", "tag": "gpu", "tags": []})
        snap = (await gw.client.get(f"/runs/{r.json()['run_id']}")).json()
        assert snap["tag"] == "gpu" and snap["tags"] == ["gpu"]


async def test_http_gateway_e2e_submit_list_and_task_status(gw: GW) -> None:
    """§9: HTTP submit; the list contains the run; task_records omitted by default; /tasks shape;
    include=records returns the records."""
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats)
        run_id = (await gw.client.post("/runs", json={"flow_name": "main", "params": {"x": 1}})).json()["run_id"]
        await worker.claim(run_id)
        await worker.task_done(run_id, "first", output=2)
        await worker.task_done(run_id, "second", output="2")
        await worker.finish(run_id)
        snap = await wait_status(gw.client, run_id, "COMPLETED")
        assert SNAPSHOT_KEYS <= set(snap) and "task_records" not in snap
        assert snap["tasks"] == {"first": "SUCCEEDED", "second": "SUCCEEDED"}
        listed = (await gw.client.get("/runs")).json()
        item = next(i for i in listed if i["run_id"] == run_id)
        assert SUMMARY_KEYS <= set(item) and "task_records" not in item and "params" not in item
        tasks = (await gw.client.get(f"/runs/{run_id}/tasks")).json()
        assert set(tasks) == {"run_id", "flow_name", "status", "tasks", "task_records", "task_records_truncated"}
        rec = tasks["task_records"]["first"]
        assert set(rec) >= {"state", "started_at", "ended_at", "duration_ms", "error", "traceback", "inputs", "output", "artifacts"}
        for include in ("records", "task_records", "full", "all"):
            full = (await gw.client.get(f"/runs/{run_id}", params={"include": include})).json()
            assert full["task_records"]["second"]["output"] == "2" and full["task_records_truncated"] is False


async def test_http_gateway_cancel_run_transitions_to_cancelled_and_idempotent(gw: GW) -> None:
    """§9: cancel → CANCELLING or CANCELLED with cancel_requested_at; repeat is idempotent; final
    CANCELLED; cancelling after the terminal state returns CANCELLED.  (pyoco-es: a PENDING run is
    CANCELLED at once, reason not_started.)"""
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats)
        run_id = (await gw.client.post("/runs", json={"flow_name": "main"})).json()["run_id"]
        await worker.claim(run_id)
        r = await gw.client.post(f"/runs/{run_id}/cancel", json={})  # the dashboard sends {}
        assert r.status_code == 200 and r.json()["status"] in ("CANCELLING", "CANCELLED")
        assert r.json()["cancel_requested_at"] is not None and "task_records" not in r.json()
        r = await gw.client.post(f"/runs/{run_id}/cancel")
        assert r.json()["status"] in ("CANCELLING", "CANCELLED")
        await worker.finish(run_id, "CANCELLED")
        await wait_status(gw.client, run_id, "CANCELLED")
        r = await gw.client.post(f"/runs/{run_id}/cancel")
        assert r.json()["status"] == "CANCELLED"
        pending = (await gw.client.post("/runs", json={"flow_name": "main"})).json()["run_id"]
        r = await gw.client.post(f"/runs/{pending}/cancel")
        assert r.json()["status"] == "CANCELLED" and r.json()["cancel_requested_at"] is not None
        assert r.json()["cancel_reason"] == "not_started"


async def test_http_gateway_e2e_submit_yaml_and_run(gw: GW) -> None:
    """§9: multipart workflow + flow_name (+ tag); the run keeps flow_name as submitted and carries
    the YAML sha256 and size; params are flow.defaults."""
    with trio.fail_after(10):
        r = await submit_yaml(gw.client, flow_name="my_flow")
        assert r.status_code == 200 and set(r.json()) == SUBMIT_KEYS
        run_id = r.json()["run_id"]
        worker = FakeWorker(gw.nats)
        await worker.claim(run_id)
        await worker.finish(run_id)
        snap = await wait_status(gw.client, run_id, "COMPLETED")
        assert snap["flow_name"] == "my_flow" and snap["params"] == {"x": 1, "label": "demo"}
        assert isinstance(snap["workflow_yaml_sha256"], str) and snap["workflow_yaml_bytes"] > 0


async def test_http_gateway_vnext_list_cursor_filter_and_invalid_cursor(gw: GW) -> None:
    """§1.4/§9: limit=1 paging with next_cursor; workflow_yaml_sha256 filter with include=full; a
    bad cursor is a 422 'invalid list query'.  Cursor format: base64url of {"u","r"}."""
    with trio.fail_after(10):
        ids = [(await gw.client.post("/runs", json={"flow_name": "main"})).json()["run_id"] for _ in range(3)]
        yaml_run = (await submit_yaml(gw.client)).json()["run_id"]
        for rid in [*ids, yaml_run]:
            await wait_projected(gw.nats, rid, 1)
        page = (await gw.client.get("/runs", params={"limit": 1, "updated_after": 0})).json()
        assert set(page) == {"items", "next_cursor"} and len(page["items"]) == 1
        decoded = json.loads(base64.urlsafe_b64decode(page["next_cursor"] + "=" * (-len(page["next_cursor"]) % 4)))
        assert decoded == {"u": page["items"][0]["updated_at"], "r": page["items"][0]["run_id"]}
        page2 = (await gw.client.get("/runs", params={"limit": 1, "cursor": page["next_cursor"]})).json()
        assert page2["items"][0]["run_id"] != page["items"][0]["run_id"]
        sha = (await gw.client.get(f"/runs/{yaml_run}")).json()["workflow_yaml_sha256"]
        hit = (await gw.client.get("/runs", params={"workflow_yaml_sha256": sha, "include": "full"})).json()
        assert [i["run_id"] for i in hit["items"]] == [yaml_run] and "params" in hit["items"][0]
        bad = await gw.client.get("/runs", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("invalid list query")
        # the dashboard's initial load: updated_after=0, following next_cursor
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"updated_after": 0, "limit": 2}
            if cursor:
                params["cursor"] = cursor
            body = (await gw.client.get("/runs", params=params)).json()
            seen += [i["run_id"] for i in body["items"]]
            cursor = body["next_cursor"]
            if not cursor:
                break
        assert sorted(seen) == sorted([*ids, yaml_run])


async def test_http_gateway_watch_sse_stream_reaches_terminal(gw: GW) -> None:
    """§1.6/§9: GET /runs/{id}/watch?timeout_sec=60&since=<updated_at> (the dashboard's request);
    frames are ``event: snapshot`` with data {run_id, snapshot, ts}; a terminal status arrives."""
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats)
        run_id = (await gw.client.post("/runs", json={"flow_name": "main"})).json()["run_id"]
        since = (await gw.client.get(f"/runs/{run_id}")).json()["updated_at"]
        async with gw.client.stream("GET", f"/runs/{run_id}/watch", params={"timeout_sec": 60, "since": since}) as resp:
            assert resp.status_code == 200
            for header, value in (("cache-control", "no-cache"), ("x-accel-buffering", "no")):
                assert resp.headers[header] == value
            async with trio.open_nursery() as n:
                async def drive() -> None:
                    await worker.claim(run_id)
                    await worker.finish(run_id)

                n.start_soon(drive)
                statuses = []
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        data = json.loads(line[6:])
                        if "snapshot" in data:
                            assert set(data) == {"run_id", "snapshot", "ts"}
                            statuses.append(data["snapshot"]["status"])
        assert statuses[0] == "PENDING" and statuses[-1] == "COMPLETED"


async def test_http_gateway_metrics_and_workers_endpoints(gw: GW) -> None:
    """§1.9/§1.10/§9: /workers?scope=all has the worker with its tags and state (+ heartbeat_at
    alias, wheel_sync passed through); /metrics has pyoco-server's four families."""
    with trio.fail_after(10):
        await put_worker(gw.nats, "w1", visible_on=gw.client, tags=["default", "gpu"], wheel_sync={"enabled": False, "last_result": "disabled"})
        workers = (await gw.client.get("/workers", params={"scope": "all", "limit": 200})).json()
        (w,) = workers
        assert w["worker_id"] == "w1" and w["tags"] == ["default", "gpu"] and w["state"] == "IDLE"
        assert w["heartbeat_at"] == w["last_heartbeat_at"] and w["wheel_sync"]["last_result"] == "disabled"
        assert w["hidden"] is False and w["instance_id"] == "w1-i"
        text = (await gw.client.get("/metrics")).text
        for family in ("pyoco_runs_total", "pyoco_runs_today_total", "pyoco_workers_alive_total", "pyoco_dlq_messages_total"):
            assert f"# HELP {family} " in text and f"# TYPE {family} gauge" in text
        r = await gw.client.patch("/workers/w1", json={"hidden": True})
        assert set(r.json()) == {"worker_id", "hidden", "updated_at"}


async def test_http_gateway_workers_registry_normalisation(gw: GW) -> None:
    """§2.3: a legacy record (only heartbeat_at, no instance_id, odd state and tags) is normalised."""
    with trio.fail_after(10):
        now = time.time()
        legacy = {"worker_id": "old", "state": "WEIRD", "tags": "nope", "heartbeat_at": now}
        await gw.nats.kv_put("pyoco_workers", "old", json.dumps(legacy).encode())

        async def listed() -> list[dict[str, Any]]:
            return list((await gw.client.get("/workers", params={"scope": "all"})).json())

        (w,) = await wait_until(listed, what="the legacy record in the registry index")
        assert w["instance_id"] == "old" and w["state"] == "IDLE" and w["tags"] == []
        assert w["last_seen_at"] == w["last_heartbeat_at"] == w["heartbeat_at"] == now


async def test_http_submit_publish_failure_leaves_no_orphan_run(gw: GW) -> None:
    """§9: NATS failing during a submit → 503 and nothing stored (pyoco-server deleted its KV
    write best-effort; pyoco-es writes nothing before the event is acknowledged)."""
    with trio.fail_after(10):
        await gw.client.post("/runs", json={"flow_name": "main"})
        before_seq = await events_last_seq(gw.nats)
        before = (await gw.client.get("/runs")).json()
        gw.stack.server.kill()
        while gw.nats.is_connected:
            await trio.sleep(0.005)
        r = await gw.client.post("/runs", json={"flow_name": "main"})
        assert r.status_code == 503 and r.json()["detail"].startswith("nats unavailable")
        assert r.json()["outcome"] == "not_applied"
        assert (await gw.client.get("/runs")).json() == before
        assert before_seq == 1


async def test_http_gateway_dashboard_static_assets_served(gw: GW) -> None:
    """§9: / is the dashboard HTML with a viewport meta tag; /static/app.js and the CSS exist."""
    with trio.fail_after(10):
        r = await gw.client.get("/")
        assert r.status_code == 200 and "<html" in r.text.lower() and 'name="viewport"' in r.text
        assert "__PYOCO_DASHBOARD_LANG_VALUE__" not in r.text
        for asset in ("/static/app.js", "/static/index.html"):
            assert (await gw.client.get(asset)).status_code == 200, asset


async def test_http_gateway_e2e_yaml_run_on_a_real_worker(tmp_path: Path) -> None:
    """§9 e2e_submit_yaml_and_run with the real worker: submit over HTTP, watch over SSE until
    the end frame, then the snapshot, tasks and audit history agree."""
    from pyoco_es.config import Settings
    from pyoco_es.testing.stack import open_stack

    with trio.fail_after(45):
        async with open_stack(tmp_path, settings=Settings(sse_heartbeat_interval=0.5), worker=True) as stack:
            async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
                r = await submit_yaml(client, flow_name="main")
                assert r.status_code == 200, r.text
                run_id = r.json()["run_id"]
                async with open_sse(client, f"/runs/{run_id}/watch?include=records") as sse:
                    frames = await sse.rest()
                assert frames[-1].event == "end" and frames[-1].data["status"] == "COMPLETED", frames[-3:]
                last = [f for f in frames if f.event == "snapshot"][-1].data["snapshot"]
                assert last["tasks"] == {"first": "SUCCEEDED", "second": "SUCCEEDED"}
                snap = (await client.get(f"/runs/{run_id}", params={"include": "records"})).json()
                assert snap["status"] == "COMPLETED" and snap["task_records"]["first"]["output"] == 2
                assert snap["worker_id"] and "worker_state" in snap
                history = (await client.get(f"/runs/{run_id}/events")).json()["events"]
                types = [e["type"] for e in history]
                assert types[0] == "run.submitted" and types[-1] == "run.completed" and "run.claimed" in types
                assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
            stack.nursery.cancel_scope.cancel()


async def test_a_fresh_submit_is_dispatched_by_the_gateway_without_the_conductor(tmp_path: Path) -> None:
    """Fast path: the gateway publishes attempt 1's work item right after the PubAck (with the
    run's position, so a worker can claim without reading); the conductor would publish the same
    item later, deduplicated by its Msg-Id."""
    async with open_gateway(tmp_path, conductor=False) as g:
        with trio.fail_after(10):
            r = await g.client.post("/runs", json={"flow_name": "main", "params": {"x": 1}, "tag": "fast"})
            run_id = r.json()["run_id"]

            async def queued() -> dict[str, int] | None:
                counts = await g.nats.subject_counts(subjects.WORK_STREAM, "pyoco.work.fast")
                return counts or None

            assert await wait_until(queued, what="the work item") == {"pyoco.work.fast": 1}
            entries = await g.nats.read_events(subjects.RUN_EVENTS_WILDCARD, after_stream_seq=0, limit=10)
            [(stream_seq, _)] = entries
            # The same item from the conductor's side is a duplicate.
            from pyoco_es.core.work import WorkItem
            from pyoco_es.core.events import RunSubmitted

            ev = RunSubmitted(flow_name="main", params={"x": 1}, tag="fast", tags=["fast"], submitted_at=0.0)
            ack = await g.nats.publish("pyoco.work.fast", WorkItem.for_attempt(ev, run_id=run_id, attempt=1).to_json(), msg_id=f"{run_id}:1")
            assert ack.duplicate
            assert stream_seq == 1
