"""Nothing lost when NATS itself dies: a story with the whole stack.

A run is executing when nats-server is SIGKILLed; while it is down the gateway answers 503
(never a 2xx without a durable event); the server comes back on the same port with the same
store; the worker, conductor and gateway reconnect on their own, the run completes exactly once,
and every acknowledged submit is there, with a snapshot equal to the fold of its events.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from pyoco_es.config import Settings
from pyoco_es.core.codec import encode_snapshot
from pyoco_es.core.fold import fold
from pyoco_es.nats import subjects
from pyoco_es.testing.stack import open_stack

GATED = """\
flow:
  graph: mark >> hold
tasks:
  mark: {{callable: "examples.tasks:record", inputs: {{marker_dir: "{markers}", label: "mark"}}}}
  hold: {{callable: "examples.tasks:wait_for_file", inputs: {{path: "{gate}", seconds: 60}}}}
"""


async def poll(fn, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = trio.current_time() + timeout
    while True:
        try:
            value = await fn()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await trio.sleep(0.02)


async def test_a_run_survives_a_nats_crash(tmp_path: Path) -> None:
    markers, gate = tmp_path / "markers", tmp_path / "gate"
    markers.mkdir()
    # A write holds up to nats_unavailable_wait for NATS to come back, then answers 503.
    settings = Settings(worker_heartbeat_interval=0.5, run_lease_seconds=30.0, nats_unavailable_wait=1.0)
    with trio.fail_after(90):
        async with open_stack(tmp_path, settings=settings, worker=True, concurrency=1) as stack:
            async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
                # Given a run that is executing (its first task has run, the second waits).
                flow = GATED.format(markers=markers, gate=gate).encode()
                r = await client.post("/runs/yaml", files={"workflow": ("f.yaml", flow)}, data={"flow_name": "main", "tag": "default"})
                assert r.status_code == 200
                run_id = r.json()["run_id"]

                async def marked() -> bool:
                    return any(markers.iterdir())

                await poll(marked, "the first task to run")
                # When nats-server dies hard...
                port = int(stack.server.url.rsplit(":", 1)[1])
                stack.server.kill()

                async def refused() -> httpx.Response | None:
                    resp = await client.post("/runs", json={"flow_name": "main", "tag": "nobody"})
                    return resp if resp.status_code == 503 else None

                # ...a submit is refused (503 with a hint), never accepted without a durable event.
                resp = await poll(refused, "a 503 while NATS is down")
                assert "NATS" in resp.json()["detail"]
                assert resp.json()["outcome"] == "not_applied"  # it was held, then refused: nothing sent
                # Then it comes back on the same port with the same store.
                stack.server.port = port
                await trio.to_thread.run_sync(stack.server.start)
                assert stack.server.url.endswith(f":{port}")

                async def accepted() -> str | None:
                    resp = await client.post("/runs", json={"flow_name": "main", "tag": "nobody"})
                    return resp.json()["run_id"] if resp.status_code == 200 else None

                queued = await poll(accepted, "submits to work again")
                gate.write_text("go")

                async def finished() -> dict[str, object] | None:
                    doc = (await client.get(f"/runs/{run_id}")).json()
                    return doc if doc.get("status") in ("COMPLETED", "FAILED", "CANCELLED") else None

                doc = await poll(finished, "the run to finish", timeout=40)
                # The run completed exactly once, in its first attempt.
                assert doc["status"] == "COMPLETED" and doc["attempt"] == 1, doc
                assert len(list(markers.iterdir())) == 1
                history = (await client.get(f"/runs/{run_id}/events")).json()
                types = [e["type"] for e in (history["events"] if isinstance(history, dict) else history)]
                assert types.count("run.completed") == 1 and types.count("run.claimed") == 1
                # Every acknowledged run is stored and projected as the fold of its events.
                for rid in (run_id, queued):

                    async def projected(rid: str = rid) -> bool:
                        entry = await stack.nats.kv_get(subjects.RUNS_BUCKET, rid)
                        snap = fold(None, await stack.nats.read_run(rid))
                        return entry is not None and snap is not None and entry.value == encode_snapshot(snap)

                    await poll(projected, f"run {rid} to be projected")
