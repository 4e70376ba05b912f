"""Answers people rely on (issue 11 item 7): what a retried submit reports, the form of run ids,
and what the queue gauge counts.  A real gateway, conductor and nats-server."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import trio

from pyoco_es.core import decide
from pyoco_es.core.events import Producer, RunSubmitted
from pyoco_es.gateway import submit as routes
from pyoco_es.service import RunStore
from test_gateway_support import (  # noqa: F401 - gw is a fixture
    HTTPX_STREAM_WARNINGS,
    GW,
    FakeWorker,
    gw,
    submit,
    wait_status,
    wait_until,
)

pytestmark = HTTPX_STREAM_WARNINGS

CANONICAL = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


async def test_a_retried_submit_answers_the_runs_current_status(gw: GW) -> None:
    """Replaying a submit with its Idempotency-Key after the run finished says COMPLETED, not PENDING."""
    with trio.fail_after(15):
        body = {"flow_name": "hello", "params": {"a": 1}}
        headers = {"Idempotency-Key": "order-7"}
        first = await gw.client.post("/runs", json=body, headers=headers)
        assert first.status_code == 200 and first.json()["status"] == "PENDING"
        run_id = first.json()["run_id"]
        worker = FakeWorker(gw.nats)
        await worker.claim(run_id)
        await worker.finish(run_id)
        await wait_status(gw.client, run_id, "COMPLETED")
        again = await gw.client.post("/runs", json=body, headers=headers)
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == {"run_id": run_id, "status": "COMPLETED", "bundle_hash": None}


async def test_new_run_ids_are_canonical_uuids_and_old_hex_ids_still_work(gw: GW) -> None:
    """pyoco-server hands out ``str(uuid4())``; runs stored with 32-hex ids stay readable."""
    with trio.fail_after(15):
        run_id = await submit(gw.client)
        assert CANONICAL.match(run_id), run_id
        keyed = (await gw.client.post("/runs", json={"flow_name": "hello"}, headers={"Idempotency-Key": "k1"})).json()["run_id"]
        assert str(uuid.UUID(keyed)) == keyed and uuid.UUID(keyed).version == 5
        # A run stored by an earlier version, under a 32-hex id.
        old = uuid.uuid4().hex
        event = RunSubmitted(flow_name="legacy", tag="default", params={}, tags=(), submitted_at=1.0)
        await RunStore(gw.nats).execute(old, lambda s: decide.submit_run(s, event, run_id=old), producer=Producer(kind="gateway", id="old"))
        doc = await wait_status(gw.client, old, "PENDING")
        assert doc["run_id"] == old
        assert (await gw.client.get(f"/runs/{old}/events")).json()["events"][0]["type"] == "run.submitted"
        assert (await gw.client.post(f"/runs/{old}/cancel")).json()["status"] == "CANCELLED"
        listed = {i["run_id"] for i in (await gw.client.get("/runs")).json()}
        assert {run_id, keyed, old} <= listed


async def test_a_key_first_used_before_the_id_change_keeps_its_run(gw: GW, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(15):
        body = {"flow_name": "hello", "params": {"b": 2}}
        # Submit as the earlier gateway did: the key mapped to the 32-hex form.
        with monkeypatch.context() as m:
            m.setattr(routes, "run_id_for_key", routes.legacy_run_id_for_key)
            old = (await gw.client.post("/runs", json=body, headers={"Idempotency-Key": "before"})).json()["run_id"]
        assert len(old) == 32
        again = await gw.client.post("/runs", json=body, headers={"Idempotency-Key": "before"})
        assert again.json()["run_id"] == old and again.headers["Idempotent-Replayed"] == "true"


async def test_the_queue_gauge_stops_counting_a_cancelled_pending_run(gw: GW) -> None:
    with trio.fail_after(15):
        a = await submit(gw.client)
        await submit(gw.client)

        async def depth(expected: str) -> str | None:
            text = (await gw.client.get("/metrics")).text
            return text if f'pyoco_queue_depth{{tag="default"}} {expected}' in text else None

        await wait_until(lambda: depth("2.0"), what="both runs queued")
        assert (await gw.client.post(f"/runs/{a}/cancel")).json()["status"] == "CANCELLED"
        text = await wait_until(lambda: depth("1.0"), what="the cancelled run to leave the queue")
        # The raw stream count is still there, under a name that does not claim to be the queue.
        assert 'pyoco_work_stream_messages{tag="default"} 2.0' in text


def test_replay_names_every_differing_field_status_first() -> None:
    """The diff was cut at 8 fields, silently, and the cut could drop ``status``."""
    from pyoco_es.conductor.replay import _first_difference

    live = {f"f{i:02d}": i for i in range(12)} | {"status": "PENDING", "zz": 1}
    replayed = {f"f{i:02d}": -i - 1 for i in range(12)} | {"status": "COMPLETED", "zz": 1}
    detail = _first_difference(json.dumps(live).encode(), json.dumps(replayed).encode())
    assert detail.startswith("status PENDING → COMPLETED; 13 field(s) differ: status, f00, f01")
    assert "f11" in detail and "zz" not in detail
