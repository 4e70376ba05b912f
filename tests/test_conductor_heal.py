"""The conductor under oversized runs and lost derived state, against a real nats-server.

Issue 11 §3: one oversized run must not wedge the projection (snapshots bounded by
construction; a run that still cannot be written is poisoned, the others go on) nor abort a
replay.  §6: work items, streams and buckets are derived state: purged or deleted, they come back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import trio

from pyoco_es.conductor.replay import replay
from pyoco_es.conductor.service import Conductor, run_conductor
from pyoco_es.config import Settings
from pyoco_es.core import decide
from pyoco_es.core.events import Producer, RunClaimed, RunCompleted, RunFailed, RunSubmitted, TaskCompleted
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient, open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.resources import ResourceConfig, ensure_resources
from pyoco_es.service import RunStore, new_run_id
from pyoco_es.testing.stack import open_stack

from test_gateway_support import wait_until

GW = Producer(kind="gateway", id="test")
W = Producer(kind="worker", id="w1", attempt=1)
FLOW = b"""\
flow:
  graph: a
tasks:
  a: {callable: "examples.tasks:add_one", inputs: {x: 1}}
"""


def submitted(tag: str = "default", params: dict | None = None) -> RunSubmitted:  # type: ignore[type-arg]
    return RunSubmitted(flow_name="main", params=params or {"n": 1}, tag=tag, tags=[tag], submitted_at=time.time(), workflow_yaml="flow: {graph: a}\n")


async def submit(store: RunStore, n: int, tag: str = "default") -> list[str]:
    ids = []
    for _ in range(n):
        run_id = new_run_id()
        ev = submitted(tag)
        await store.execute(run_id, lambda s, ev=ev, r=run_id: decide.submit_run(s, ev, run_id=r), producer=GW)
        ids.append(run_id)
    return ids


async def snapshot(nats: NatsClient, run_id: str) -> dict | None:  # type: ignore[type-arg]
    entry = await nats.kv_get(subjects.RUNS_BUCKET, run_id)
    return json.loads(entry.value) if entry is not None and entry.value else None


async def test_an_oversized_run_is_projected_bounded_and_does_not_stall_the_others(tmp_path: Path) -> None:
    """~1 MB of params, 200 tasks and a long error on a server with NATS's default 1 MB
    max_payload: every event fits, and so does the snapshot (before: the snapshot write failed
    forever, the run showed PENDING and every run after it was never projected)."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", max_payload=1024 * 1024)
    server.start()
    try:
        with trio.fail_after(60):
            async with open_nats(server.url, name="test") as nats, trio.open_nursery() as nursery:
                await ensure_resources(nats)
                store = RunStore(nats)
                conductor: Conductor = await nursery.start(run_conductor, nats, Settings())
                # Given a run with ~0.95 MB of params that ran 200 tasks and failed with a long error.
                run_id = new_run_id()
                big = submitted(params={"blob": "p" * 950_000})
                out = await store.execute(run_id, lambda s: decide.submit_run(s, big, run_id=run_id), producer=GW)
                tasks = tuple(f"task_{i:03d}_{'t' * 80}" for i in range(200))
                out = await store.execute(run_id, lambda s: [RunClaimed(worker_id="w1", attempt=1, lease_seconds=15.0, tasks=tasks)], producer=W, hint=out.snapshot)
                done: list = [TaskCompleted(attempt=1, task=t, ended_at=time.time(), inputs={"x": "i" * 2000}, output="o" * 2000) for t in tasks]  # type: ignore[type-arg]
                done.append(RunFailed(attempt=1, ended_at=time.time(), reason="error", error="e" * 200_000))
                await store.execute(run_id, lambda s: done, producer=W, hint=out.snapshot)
                # And ordinary runs submitted after it.
                others = await submit(store, 5)

                async def all_projected() -> bool:
                    docs = [await snapshot(nats, r) for r in [run_id, *others]]
                    return all(d is not None for d in docs) and docs[0]["status"] == "FAILED"  # type: ignore[index]

                await wait_until(all_projected, what="the oversized run and the ones after it to be projected", timeout=20)
                entry = await nats.kv_get(subjects.RUNS_BUCKET, run_id)
                assert entry is not None and entry.value is not None and len(entry.value) <= nats.max_message_bytes
                doc = json.loads(entry.value)
                assert "_truncated" in doc["params"] and doc["error"].endswith("bytes]")
                assert doc["version"] == 203 and doc["failure_reason"] == "error"
                assert conductor.projector.statistics().poisoned_runs == 0
                # The whole run is still in its events.
                first = (await nats.read_run(run_id))[0].event
                assert isinstance(first, RunSubmitted) and first.params == big.params
                # A replay folds it too, without aborting, and agrees with the live snapshot.
                report = await replay(nats)
                assert report.runs == 6
                assert [d for d in report.differences if d.run_id == run_id] == []
                nursery.cancel_scope.cancel()
    finally:
        server.stop()


async def test_a_purged_work_stream_is_refilled_by_the_reconcile(nats: NatsClient, nursery: trio.Nursery) -> None:
    """PENDING runs whose work items were purged get them back, once each (before: they stayed
    PENDING forever).  The purge is inside JetStream's duplicate window, where the ids are taken."""
    with trio.fail_after(30):
        store = RunStore(nats)
        conductor: Conductor = await nursery.start(run_conductor, nats, Settings(reconcile_interval=0.2))
        ids = await submit(store, 5, tag="later")

        async def items() -> list[tuple[str, int]]:
            return await nats.work_items(subjects.work_subject("later"))

        await wait_until(lambda: _eq(items(), 5), what="the first work items", timeout=20)
        await nats.run("purge", nats.js.purge_stream, subjects.WORK_STREAM)
        assert await items() == []
        await wait_until(lambda: _eq(items(), 5), what="the reconcile to publish them again", timeout=20)
        assert sorted(await items()) == sorted((r, 1) for r in ids)  # one item per run, for attempt 1
        assert conductor.reconciler.statistics().republished == 5
        for r in ids:
            doc = await snapshot(nats, r)
            assert doc is not None and doc["status"] == "PENDING"


async def _eq(coro, n: int) -> bool:  # type: ignore[no-untyped-def]
    return len(await coro) == n


async def test_a_deleted_work_stream_comes_back_and_runs_still_run(tmp_path: Path) -> None:
    """PYOCO_WORK deleted under a running stack (its consumers with it): the conductor recreates
    the stream, the worker its consumer, and a run submitted meanwhile completes (the gateway's
    fast hand-off was lost with the stream; the reconcile hands it over again)."""
    settings = Settings(reconcile_interval=0.3, worker_poll_timeout=0.2)
    with trio.fail_after(60):
        async with open_stack(tmp_path, settings=settings, worker=True, concurrency=1) as stack:
            async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
                await stack.nats.run("delete", stack.nats.js.delete_stream, subjects.WORK_STREAM)
                r = await client.post("/runs/yaml", files={"workflow": ("f.yaml", FLOW)}, data={"flow_name": "main", "tag": "default"})
                assert r.status_code == 200, r.text
                run_id = r.json()["run_id"]

                async def finished() -> dict | None:  # type: ignore[type-arg]
                    doc = (await client.get(f"/runs/{run_id}")).json()
                    return doc if doc.get("status") in ("COMPLETED", "FAILED", "CANCELLED") else None

                doc = await wait_until(finished, what="the run to finish", timeout=40)
                assert doc["status"] == "COMPLETED", doc
                history = (await client.get(f"/runs/{run_id}/events")).json()["events"]
                assert [e["type"] for e in history].count("run.claimed") == 1


async def test_ready_is_not_ready_while_jetstream_refuses_writes(tmp_path: Path) -> None:
    """A full disk (a tiny max_file_store, filled): JetStream refuses writes while the connection
    is fine.  /ready must say not ready, naming why (before: "ready")."""
    from pyoco_es.core.errors import InfraError
    from pyoco_es.gateway.server import run_gateway

    server = EmbeddedNats(data_dir=tmp_path / "nats", max_file_store=4 * 1024 * 1024)
    server.start()
    try:
        with trio.fail_after(60):
            async with open_nats(server.url, name="test") as nats, trio.open_nursery() as nursery:
                await ensure_resources(nats, ResourceConfig(dlq_max_bytes=1024 * 1024))  # the DLQ reserves its max_bytes
                host, port = await nursery.start(lambda task_status: run_gateway(nats, Settings(), host="127.0.0.1", port=0, task_status=task_status))
                async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
                    assert (await client.get("/ready")).status_code == 200
                    # Fill the store until JetStream refuses.
                    refused = None
                    for i in range(200):
                        try:
                            await nats.publish(subjects.run_events_subject("fill"), b"x" * 100_000, msg_id=f"fill-{i}")
                        except InfraError as exc:
                            refused = exc
                            break
                    assert refused is not None, "the store never filled"
                    r = await client.get("/ready")
                    assert r.status_code == 503, r.text
                    body = r.json()
                    assert body["status"] == "not_ready" and body["jetstream"]["writable"] is False
                    assert body["jetstream"]["last_write_refused"] or body["jetstream"].get("account_error")
                    # A submit now is a clear 503 "not applied", not a hang.
                    s = await client.post("/runs", json={"flow_name": "main"})
                    assert s.status_code == 503 and s.json()["outcome"] == "not_applied", s.text
                nursery.cancel_scope.cancel()
    finally:
        server.stop()


async def test_a_run_that_cannot_be_written_is_poisoned_and_the_others_go_on(nats: NatsClient) -> None:
    """A snapshot the bucket refuses (here: a bucket whose max_msg_size is below it) poisons that
    run only: it is recorded, and every other run is projected (before: the projector retried the
    whole batch every few seconds, forever, and projected nothing)."""
    from pyoco_es.conductor.projector import Projector, run_projector
    from pyoco_es.nats.resources import recreate_bucket

    with trio.fail_after(30):
        await recreate_bucket(nats, "pyoco_small", ResourceConfig(max_msg_size=4000))
        store = RunStore(nats)
        big_id = new_run_id()
        big = submitted(params={"blob": "b" * 6000})
        await store.execute(big_id, lambda s: decide.submit_run(s, big, run_id=big_id), producer=GW)
        small = await submit(store, 3)
        async with trio.open_nursery() as nursery:
            proj = await nursery.start(lambda task_status: run_projector(nats, projector=Projector(nats, bucket="pyoco_small"), task_status=task_status))

            async def small_projected() -> bool:
                entries = await nats.kv_get_many("pyoco_small", small)
                return all(e is not None for e in entries)

            await wait_until(small_projected, what="the other runs to be projected", timeout=20)
            assert big_id in proj.poisoned and proj.statistics().poisoned_runs == 1
            # The projector keeps going: a later event of another run is projected too.
            out = await store.execute(small[0], lambda s: decide.request_cancel(s, run_id=small[0], now=time.time()), producer=GW)
            assert out.snapshot is not None

            async def cancelled() -> bool:
                entry = await nats.kv_get("pyoco_small", small[0])
                return entry is not None and json.loads(entry.value or b"{}").get("status") == "CANCELLED"

            await wait_until(cancelled, what="a later event to be projected", timeout=20)

            # And the poisoned run's events are acknowledged, not redelivered and retried forever.
            async def all_acked() -> bool:
                state = await nats.consumer_pending(subjects.EVENTS_STREAM, subjects.PROJECTOR_DURABLE)
                return state["num_pending"] == 0 and state["num_ack_pending"] == 0

            await wait_until(all_acked, what="every event to be acknowledged", timeout=5)
            nursery.cancel_scope.cancel()


async def test_a_conductor_started_after_a_purge_restores_the_work_items(nats: NatsClient) -> None:
    """The on-start reconcile: runs projected by an earlier conductor, their items purged while
    no conductor ran.  The new conductor's projector sees no new event for them; its start-up
    pass (the PENDING snapshots in pyoco_runs) publishes their items again."""
    with trio.fail_after(30):
        store = RunStore(nats)

        async def items() -> list[tuple[str, int]]:
            return await nats.work_items(subjects.work_subject("later"))

        async with trio.open_nursery() as nursery:
            await nursery.start(run_conductor, nats, Settings(reconcile_interval=60.0))
            ids = await submit(store, 4, tag="later")
            await wait_until(lambda: _eq(items(), 4), what="the first work items", timeout=20)

            async def projected() -> bool:
                docs = [await snapshot(nats, r) for r in ids]
                return all(d is not None and d["status"] == "PENDING" for d in docs)

            await wait_until(projected, what="the runs to be projected", timeout=20)
            nursery.cancel_scope.cancel()
        await nats.run("purge", nats.js.purge_stream, subjects.WORK_STREAM)
        async with trio.open_nursery() as nursery:
            conductor: Conductor = await nursery.start(run_conductor, nats, Settings(reconcile_interval=0.2))
            await wait_until(lambda: _eq(items(), 4), what="the start-up reconcile to publish them again", timeout=20)
            assert sorted(await items()) == sorted((r, 1) for r in ids)
            assert conductor.projector.statistics().events_projected == 0  # it was not the projector
            nursery.cancel_scope.cancel()


async def test_a_run_whose_work_item_cannot_be_published_ends_failed_naming_the_limit(nats: NatsClient) -> None:
    """A work item the work stream refuses for its size is poison: its run ends FAILED with a
    reason that names the limit (before: the run stayed PENDING forever), and the others go on."""
    from pyoco_es.conductor.projector import run_projector

    async def shrink_work_stream() -> None:
        info = await nats.js.stream_info(subjects.WORK_STREAM)
        info.config.max_msg_size = 4000
        await nats.js.update_stream(info.config)

    with trio.fail_after(30):
        await nats.run("shrink the work stream", shrink_work_stream)
        store = RunStore(nats)
        big_id = new_run_id()
        big = submitted(params={"blob": "b" * 6000})
        await store.execute(big_id, lambda s: decide.submit_run(s, big, run_id=big_id), producer=GW)
        small = await submit(store, 2)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_projector(nats, task_status=task_status))

            async def big_failed() -> bool:
                doc = await snapshot(nats, big_id)
                return doc is not None and doc.get("status") == "FAILED"

            await wait_until(big_failed, what="the run whose item is too large to end FAILED", timeout=20)
            doc = await snapshot(nats, big_id)
            assert doc is not None and "max_msg_size" in str(doc.get("error")), doc
            for run_id in small:
                other = await snapshot(nats, run_id)
                assert other is not None and other["status"] == "PENDING"
            nursery.cancel_scope.cancel()
