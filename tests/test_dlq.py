"""Dead letters (issue 15) against a real stack (nats-server, conductor, gateway, worker): a run
whose task fails is dead-lettered (``execution_error``), an unreadable work item too
(``invalid_job``); they are listed, shown safely, re-submitted as a new run that completes, and
dropped, each action recorded in the audit history; bad ids are 404s."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from pyoco_es.config import Settings
from pyoco_es.gateway import dlq
from pyoco_es.nats import deadletter, keystore, subjects
from pyoco_es.nats.audit import append_audit
from pyoco_es.testing.stack import Stack, open_stack
from test_gateway_support import wait_status, wait_until

PEPPER = "pep"


def gated_flow(path: Path) -> bytes:
    return f"""\
version: 1
flow:
  graph: |
    gate
  defaults:
    path: "{path}"
tasks:
  gate:
    callable: tests.tasks:fail_unless_file
""".encode()


def _settings(**kw: object) -> Settings:
    return Settings(sse_heartbeat_interval=0.2, nats_unavailable_wait=1.0, max_attempts=1, **kw)  # type: ignore[arg-type]


async def _open(tmp_path: Path, settings: Settings) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    async with open_stack(tmp_path, settings=settings, worker=True, allowed_modules=("examples", "tests.tasks")) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=10.0) as client:
            yield stack, client


@pytest.fixture
async def dlq_stack(tmp_path: Path) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    async for pair in _open(tmp_path, _settings()):
        yield pair


async def _dead_letters(client: httpx.AsyncClient, n: int, headers: dict[str, str] | None = None) -> list[dict[str, object]]:
    async def check() -> list[dict[str, object]] | None:
        r = await client.get("/dlq", headers=headers)
        items = r.json()["items"] if r.status_code == 200 else []
        return items if len(items) >= n else None

    return await wait_until(check, timeout=20, what=f"{n} dead letter(s)")


async def _fail_a_run(client: httpx.AsyncClient, gate: Path, headers: dict[str, str] | None = None) -> str:
    r = await client.post("/runs/yaml", files={"workflow": ("flow.yaml", gated_flow(gate), "application/x-yaml")},
                          data={"flow_name": "gated"}, headers=headers)
    assert r.status_code == 200, r.text
    run_id = str(r.json()["run_id"])
    failed = await wait_status(client, run_id, "FAILED", timeout=20) if headers is None else None
    assert failed is None or "not ready" in str(failed.get("error"))
    return run_id


async def test_dead_letter_list_show_resubmit_drop_and_audit(dlq_stack: tuple[Stack, httpx.AsyncClient], tmp_path: Path) -> None:
    stack, client = dlq_stack
    with trio.fail_after(60):
        gate = tmp_path / "gate"
        run_id = await _fail_a_run(client, gate)
        # A poison work item: not JSON at all, so the worker terms and dead-letters it.
        await stack.nats.publish(subjects.work_subject("default"), b"\xff<script>alert(1)</script>\x00")
        items = await _dead_letters(client, 2)
        by_reason = {str(i["reason"]): i for i in items}
        assert set(by_reason) == {"execution_error", "invalid_job"}
        dead = by_reason["execution_error"]
        assert dead["run_id"] == run_id and dead["flow_name"] == "gated" and "not ready" in str(dead["error"])
        assert isinstance(dead["size"], int) and dead["size"] > 0 and isinstance(dead["stored_at"], float)
        assert items[0]["id"] > items[1]["id"]  # newest first

        # Paging: one per page, the cursor leads to the other.
        page = (await client.get("/dlq", params={"limit": 1})).json()
        assert len(page["items"]) == 1 and page["next_cursor"] == page["items"][0]["id"]
        rest = (await client.get("/dlq", params={"limit": 1, "before": page["next_cursor"]})).json()
        assert [i["id"] for i in rest["items"]] == [items[1]["id"]]

        # Show: the poison payload comes back as inert text inside JSON.
        poison = (await client.get(f"/dlq/{by_reason['invalid_job']['id']}")).json()
        assert "<script>" in poison["body"]["payload"] and "\ufffd" in poison["body"]["payload"]
        assert "run_id" not in poison
        r = await client.post(f"/dlq/{poison['id']}/resubmit")
        assert r.status_code == 409 and "names no run" in r.json()["detail"]

        # Resubmit: a NEW run from the dead run's request; once the gate exists it completes.
        assert [i["resubmitted"] for i in (await client.get("/dlq")).json()["items"]] == [[], []]  # read before: the catch-up starts
        await append_audit(stack.nats, subjects.DLQ_AUDIT_SUBJECT, ["not", "an", "object"])  # type: ignore[arg-type] - skipped
        gate.write_text("open")
        r = await client.post(f"/dlq/{dead['id']}/resubmit")
        assert r.status_code == 200, r.text
        new_id = r.json()["run_id"]
        assert new_id != run_id and r.json()["resubmitted_from"] == run_id
        done = await wait_status(client, new_id, "COMPLETED", timeout=20)
        assert done["flow_name"] == "gated"
        first = (await client.get(f"/runs/{new_id}/events")).json()["events"][0]
        assert first["type"] == "run.submitted" and first["correlation_id"] == f"dlq:{dead['id']}"

        # Marked: show and list name the new run, when and (auth off) no key; again adds a second
        # entry, an idempotent replay none; the other dead letter has none.
        shown = (await client.get(f"/dlq/{dead['id']}")).json()["resubmitted"]
        assert [(m["run_id"], m["key_id"]) for m in shown] == [(new_id, None)] and isinstance(shown[0]["at"], float)
        again = [(await client.post(f"/dlq/{dead['id']}/resubmit", headers={"Idempotency-Key": "k1"})).json()["run_id"] for _ in range(2)]
        assert again[0] == again[1] != new_id
        listed = {i["id"]: i["resubmitted"] for i in (await client.get("/dlq")).json()["items"]}
        assert [m["run_id"] for m in listed[dead["id"]]] == [new_id, again[0]] and listed[poison["id"]] == []
        assert listed[dead["id"]][0]["at"] <= listed[dead["id"]][1]["at"]

        # Drop: gone from the list and from show; a second drop is a 404.
        assert (await client.delete(f"/dlq/{dead['id']}")).json() == {"id": dead["id"], "dropped": True}
        assert (await client.get(f"/dlq/{dead['id']}")).status_code == 404
        assert (await client.delete(f"/dlq/{dead['id']}")).status_code == 404
        remaining = (await client.get("/dlq")).json()["items"]
        assert dead["id"] not in [i["id"] for i in remaining]

        audit = await deadletter.read_dlq_audit(stack.nats)
        assert [(a["type"], a["dlq_id"]) for a in audit] == [("dlq.resubmitted", dead["id"])] * 2 + [("dlq.dropped", dead["id"])]
        assert audit[0]["new_run_id"] == new_id and audit[0]["run_id"] == run_id and audit[1]["actor"] == "http"

        # Bad ids: 404 (never 5xx), bad paging: 422.
        for path in ("/dlq/0", "/dlq/999999", "/dlq/abc", "/dlq/-1", f"/dlq/{2**70}"):
            assert (await client.get(path)).status_code == 404, path
            assert (await client.post(f"{path}/resubmit")).status_code == 404, path
            assert (await client.delete(path)).status_code == 404, path
        assert (await client.get("/dlq", params={"limit": 0})).status_code == 422
        assert (await client.get("/dlq", params={"before": "x"})).status_code == 422


async def test_tenant_sees_only_its_dead_letters(tmp_path: Path) -> None:
    async for stack, client in _open(tmp_path, _settings(http_auth_mode="api_key", auth_pepper=PEPPER, http_auth_free_failures=10_000)):
        with trio.fail_after(60):
            acme, acme_rec = await keystore.create_key(stack.nats, tenant_id="acme", now=1.0, pepper=PEPPER, actor="test")
            acme_id = acme_rec.key_id
            other, _ = await keystore.create_key(stack.nats, tenant_id="other", now=1.0, pepper=PEPPER, actor="test")
            assert (await client.get("/dlq")).status_code == 401
            mine = {"X-API-Key": acme}
            run_id = await _fail_a_run(client, tmp_path / "never", headers=mine)
            await stack.nats.publish(subjects.work_subject("default"), b"not json")  # no tenant: seen by no key
            (item,) = await _dead_letters(client, 1, headers=mine)
            assert item["run_id"] == run_id and item["tenant_id"] == "acme"
            await wait_until(lambda: _count(stack), timeout=20, what="both dead letters stored")
            theirs = {"X-API-Key": other}
            assert (await client.get("/dlq", headers=theirs)).json()["items"] == []
            assert (await client.get(f"/dlq/{item['id']}", headers=theirs)).status_code == 404
            assert (await client.post(f"/dlq/{item['id']}/resubmit", headers=theirs)).status_code == 404
            assert (await client.delete(f"/dlq/{item['id']}", headers=theirs)).status_code == 404
            r = await client.post(f"/dlq/{item['id']}/resubmit", headers=mine)
            assert r.status_code == 200, r.text
            assert (await client.get(f"/runs/{r.json()['run_id']}", headers=mine)).json()["tenant_id"] == "acme"
            audit = await deadletter.read_dlq_audit(stack.nats)
            assert audit[-1]["actor"].startswith("api_key:") and audit[-1]["tenant_id"] == "acme"
            marks = (await client.get(f"/dlq/{item['id']}", headers=mine)).json()["resubmitted"]
            assert [(m["run_id"], m["key_id"]) for m in marks] == [(r.json()["run_id"], acme_id)]


async def _count(stack: Stack) -> bool:
    return (await stack.nats.stream_info(subjects.DLQ_STREAM))["messages"] >= 2


def test_resubmissions_come_from_the_audit_and_skip_what_does_not_fit() -> None:
    audit = [
        {"type": "dlq.resubmitted", "dlq_id": 3, "run_id": "r1", "new_run_id": "n1", "actor": "http", "at": 1.5},
        {"type": "dlq.dropped", "dlq_id": 3, "run_id": "r1", "actor": "http", "at": 2.0},
        {"type": "dlq.resubmitted", "dlq_id": 3, "run_id": "r1", "new_run_id": "n2", "actor": "api_key:k9", "at": 3},
        {"type": "dlq.resubmitted", "dlq_id": 3, "run_id": "r0", "new_run_id": "old", "actor": "http", "at": 0.5},  # a reused id
        {"type": "dlq.resubmitted", "dlq_id": True, "run_id": "r1", "new_run_id": "x"},
        {"type": "dlq.resubmitted", "dlq_id": 4, "run_id": "r4", "new_run_id": None},
        {"type": "dlq.resubmitted", "dlq_id": 5, "run_id": "r5", "new_run_id": "n5", "at": "later", "actor": ["api_key:x"]},
    ]
    assert dlq.resubmissions(audit) == {
        (3, "r1"): [{"run_id": "n1", "at": 1.5, "key_id": None}, {"run_id": "n2", "at": 3, "key_id": "k9"}],
        (3, "r0"): [{"run_id": "old", "at": 0.5, "key_id": None}],
        (5, "r5"): [{"run_id": "n5", "at": None, "key_id": None}],
    }
