"""Bulk operations (issue 18) over real HTTP against a real stack: ``POST /runs/batch`` stores the
good items and refuses the bad ones (never stored), keeps idempotency within a batch and across
batch and single submits, and refuses more than 1000 items; ``POST /runs/cancel`` by ids and by
filter goes through the normal cancel decision, so runs racing to completion end exactly once."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from pyoco_es.config import Settings
from pyoco_es.nats import keystore
from pyoco_es.testing.stack import open_stack
from test_gateway_support import FLOW_YAML, GW, gw, open_gateway, wait_until  # noqa: F401 - gw is a fixture

TERMINAL_EVENTS = {"run.completed", "run.failed", "run.cancelled"}


async def test_batch_stores_good_items_and_refuses_bad_ones(gw: GW) -> None:  # noqa: F811
    with trio.fail_after(20):
        items = [
            {"flow_name": "hello", "params": {"n": 1}},
            {"flow_name": "hello", "params": "not an object"},
            {"flow_name": "main", "workflow_yaml": FLOW_YAML.decode(), "tag": "default"},
            {"workflow_yaml": "version: 1\nflow: [", "flow_name": "broken"},
            {"flow_name": "bad tag", "tag": "a.b"},
            "not an object",
            {"flow_name": "keyed", "idempotency_key": "k-1"},
            {"flow_name": "keyed", "idempotency_key": "k-1"},  # the same request again: a duplicate
            {"flow_name": "other", "idempotency_key": "k-1"},  # the key for another request: refused
        ]
        r = await gw.client.post("/runs/batch", json={"items": items})
        assert r.status_code == 200, r.text
        body = r.json()
        results = body["results"]
        assert [x["index"] for x in results] == list(range(len(items)))
        assert [x["status"] for x in results] == [
            "accepted", "refused", "accepted", "refused", "refused", "refused", "accepted", "duplicate", "refused"]
        assert (body["accepted"], body["duplicate"], body["refused"]) == (3, 1, 5)
        assert "params" in results[1]["error"] and "yaml" in results[3]["error"].lower() and "tag" in results[4]["error"]
        assert "already used for a different request" in results[8]["error"]
        assert results[7]["run_id"] == results[6]["run_id"]
        stored = {x["run_id"] for x in results if x["status"] == "accepted"}
        listed = {i["run_id"] for i in (await gw.client.get("/runs")).json()}
        assert listed == stored  # nothing of a refused item was stored
        yaml_run = (await gw.client.get(f"/runs/{results[2]['run_id']}")).json()
        assert yaml_run["flow_name"] == "main" and yaml_run["params"] == {"x": 1, "label": "demo"}

        # Across batch and single submit: the key maps to the same run both ways.
        single = await gw.client.post("/runs", json={"flow_name": "keyed"}, headers={"Idempotency-Key": "k-1"})
        assert single.json()["run_id"] == results[6]["run_id"] and single.headers["Idempotent-Replayed"] == "true"
        first = await gw.client.post("/runs", json={"flow_name": "solo"}, headers={"Idempotency-Key": "k-2"})
        again = (await gw.client.post("/runs/batch", json={"items": [{"flow_name": "solo", "idempotency_key": "k-2"}]})).json()
        assert again["results"] == [{"index": 0, "status": "duplicate", "run_id": first.json()["run_id"]}]
        # A retried batch of keyed items (the answer was lost): every item is a replay of its run.
        keyed = [{"flow_name": "retry", "params": {"n": n}, "idempotency_key": f"r-{n}"} for n in range(50)]
        sent = (await gw.client.post("/runs/batch", json={"items": keyed})).json()["results"]
        resent = (await gw.client.post("/runs/batch", json={"items": keyed})).json()
        assert resent["duplicate"] == 50 and [x["run_id"] for x in resent["results"]] == [x["run_id"] for x in sent]


async def test_batch_limits_and_malformed_bodies(gw: GW) -> None:  # noqa: F811
    with trio.fail_after(20):
        r = await gw.client.post("/runs/batch", json={"items": [{"flow_name": "x"}] * 1001})
        assert r.status_code == 413 and "1000" in r.json()["detail"]
        assert (await gw.client.get("/runs")).json() == []
        for bad in ([], {"items": "x"}, {"items": None}, {}):
            assert (await gw.client.post("/runs/batch", json=bad)).status_code == 422
        assert (await gw.client.post("/runs/batch", content=b"{", headers={"Content-Type": "application/json"})).status_code == 422
        assert (await gw.client.post("/runs/batch", content=b"{}", headers={"Content-Type": "text/plain"})).status_code == 415
        r = await gw.client.post("/runs/batch", json={"items": [{"flow_name": "x", "idempotency_key": 5}, {"flow_name": "x", "idempotency_key": " "}]})
        assert [x["status"] for x in r.json()["results"]] == ["refused", "refused"]
        r = await gw.client.post("/runs/batch", json={"items": [{"flow_name": "x", "workflow_yaml": "a", "params": {}}]})
        assert "params" in r.json()["results"][0]["error"]
        # cancel: exactly one of run_ids / filter, a filter naming something, at most 1000 ids
        for bad in ({}, {"run_ids": [], "filter": {"status": "PENDING"}}, {"filter": {}}, {"filter": {"color": "red"}},
                    {"filter": {"status": 5}}, {"run_ids": "x"}, {"run_ids": [1]}, {"filter": "PENDING"}):
            r = await gw.client.post("/runs/cancel", json=bad)
            assert r.status_code == 422, (bad, r.text)
        assert (await gw.client.post("/runs/cancel", json={"run_ids": ["x"] * 1001})).status_code == 413


async def test_cancel_by_ids_reports_each_run(gw: GW) -> None:  # noqa: F811
    with trio.fail_after(20):
        results = (await gw.client.post("/runs/batch", json={"items": [{"flow_name": "a"}, {"flow_name": "b"}]})).json()["results"]
        a, b = (x["run_id"] for x in results)
        r = await gw.client.post("/runs/cancel", json={"run_ids": [a, "0b7c3e9a-9d2f-4c1e-8a5f-6d7c8b9a0e1f", "bad id\n", a]})
        assert r.status_code == 200, r.text
        assert r.json() == {"cancel_requested": [a], "already_cancelling": [], "already_terminal": [],
                            "not_found": ["0b7c3e9a-9d2f-4c1e-8a5f-6d7c8b9a0e1f", "bad id\n"], "more": False}
        r = await gw.client.post("/runs/cancel", json={"run_ids": [a, b]})
        assert r.json()["already_terminal"] == [a] and r.json()["cancel_requested"] == [b]
        events = (await gw.client.get(f"/runs/{a}/events")).json()["events"]
        assert [e["type"] for e in events] == ["run.submitted", "run.cancelled"]


# Each run lasts ~0.3 s (a cooperative task): with 4 run processes, 80 runs take ~6 s, so the
# filter cancel always meets runs still active while others complete (trivial runs could all
# finish before the first cancel on a fast machine: the test then asked to cancel nothing).
RACE_YAML = b"""\
version: 1
flow:
  graph: wait_for_cancel
tasks:
  wait_for_cancel: {callable: "examples.tasks:wait_for_cancel", inputs: {seconds: 0.3}}
"""


async def test_bulk_cancel_over_a_filter_while_runs_complete_ends_each_run_once(tmp_path: Path) -> None:
    settings = Settings(sse_heartbeat_interval=0.2, nats_unavailable_wait=1.0)
    async with open_stack(tmp_path, settings=settings, worker=True, concurrency=4) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=20.0) as client:
            with trio.fail_after(60):
                items = [{"flow_name": "race", "workflow_yaml": RACE_YAML.decode()} for _ in range(80)]
                items += [{"flow_name": "keep", "workflow_yaml": FLOW_YAML.decode()} for _ in range(5)]
                results = (await client.post("/runs/batch", json={"items": items})).json()["results"]
                race = [x["run_id"] for x in results[:80]]
                keep = [x["run_id"] for x in results[80:]]
                asked: list[str] = []
                while True:  # the worker is completing runs meanwhile
                    r = await client.post("/runs/cancel", json={"filter": {"flow_name": "race"}})
                    assert r.status_code == 200, r.text
                    asked += r.json()["cancel_requested"]
                    if not r.json()["more"]:
                        break
                assert asked and set(asked) <= set(race)

                async def all_ended() -> bool:
                    docs = (await client.get("/runs", params={"limit": 200})).json()
                    return sum(1 for d in docs if d["status"] in ("COMPLETED", "FAILED", "CANCELLED")) == len(items)

                await wait_until(all_ended, timeout=40, what="every run to end")
                cancelled = 0
                for run_id in race + keep:
                    events = (await client.get(f"/runs/{run_id}/events")).json()["events"]
                    ends = [e["type"] for e in events if e["type"] in TERMINAL_EVENTS]
                    assert len(ends) == 1, (run_id, [e["type"] for e in events])
                    cancelled += ends == ["run.cancelled"]
                    if run_id in keep:
                        assert ends == ["run.completed"]
                assert cancelled >= 1


async def test_tenants_batch_and_bulk_cancel_stay_in_their_tenant(tmp_path: Path) -> None:
    auth = Settings(sse_heartbeat_interval=0.2, nats_unavailable_wait=1.0, http_auth_mode="api_key", auth_pepper="p",
                    http_auth_free_failures=10_000)
    async with open_gateway(tmp_path, settings=auth) as g:
        with trio.fail_after(20):
            acme, _ = await keystore.create_key(g.nats, tenant_id="acme", now=1.0, pepper="p", actor="t")
            other, _ = await keystore.create_key(g.nats, tenant_id="other", now=1.0, pepper="p", actor="t")
            assert (await g.client.post("/runs/batch", json={"items": []})).status_code == 401
            mine = (await g.client.post("/runs/batch", json={"items": [{"flow_name": "f"}]}, headers={"X-API-Key": acme})).json()
            theirs = (await g.client.post("/runs/batch", json={"items": [{"flow_name": "f"}]}, headers={"X-API-Key": other})).json()
            mine_id, their_id = mine["results"][0]["run_id"], theirs["results"][0]["run_id"]
            doc = (await g.client.get(f"/runs/{mine_id}", headers={"X-API-Key": acme})).json()
            assert doc["tenant_id"] == "acme"
            r = (await g.client.post("/runs/cancel", json={"filter": {"flow_name": "f"}}, headers={"X-API-Key": acme})).json()
            assert r["cancel_requested"] == [mine_id]
            r = (await g.client.post("/runs/cancel", json={"run_ids": [their_id]}, headers={"X-API-Key": acme})).json()
            assert r["not_found"] == [their_id]
            still = (await g.client.get(f"/runs/{their_id}", headers={"X-API-Key": other})).json()
            assert still["status"] == "PENDING"
