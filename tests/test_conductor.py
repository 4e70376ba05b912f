"""The conductor against a real nats-server: projection, dispatch, restarts, replay, reaper."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import attrs
import trio

from pyoco_es.conductor.projector import Projector, run_projector
from pyoco_es.conductor.reaper import run_reaper
from pyoco_es.conductor.service import run_conductor
from pyoco_es.config import Settings
from pyoco_es.core import decide
from pyoco_es.core.codec import encode_envelope, encode_snapshot
from pyoco_es.core.events import Producer, RunSubmitted, TaskStarted
from pyoco_es.core.fold import fold
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient
from pyoco_es.service import RunStore, new_run_id

GW = Producer(kind="gateway", id="test")


def submitted(tag: str = "default") -> RunSubmitted:
    return RunSubmitted(flow_name="main", params={"n": 1}, tag=tag, tags=[tag], submitted_at=time.time(), workflow_yaml="flow: {graph: a}\n")


async def submit(store: RunStore, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        run_id = new_run_id()
        ev = submitted()
        await store.execute(run_id, lambda s, ev=ev, r=run_id: decide.submit_run(s, ev, run_id=r), producer=GW)
        ids.append(run_id)
    return ids


async def wait_until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    with trio.move_on_after(timeout):
        while True:
            if await predicate():  # type: ignore[misc]
                return
            await trio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def snapshots_match_fold(nats: NatsClient, run_ids: list[str]) -> bool:
    entries = await nats.kv_get_many(subjects.RUNS_BUCKET, run_ids)
    for run_id, entry in zip(run_ids, entries, strict=True):
        expected = fold(None, await nats.read_run(run_id))
        if entry is None or expected is None or entry.value != encode_snapshot(expected):
            return False
    return True


async def work_count(nats: NatsClient) -> int:
    return (await nats.stream_info(subjects.WORK_STREAM))["messages"]


async def test_projector_writes_contract_snapshots_and_dispatches_work(nats: NatsClient, nursery: trio.Nursery) -> None:
    # Given a conductor.
    store = RunStore(nats)
    with trio.fail_after(20):
        await nursery.start(run_conductor, nats, Settings())
        # When runs are submitted, then each gets a snapshot equal to the fold and one work item.
        ids = await submit(store, 25)
        await wait_until(lambda: snapshots_match_fold(nats, ids), "snapshots")
        entry = await nats.kv_get(subjects.RUNS_BUCKET, ids[0])
        assert entry is not None
        doc = json.loads(entry.value or b"")
        assert doc["status"] == "PENDING" and doc["tasks"] == {} and doc["version"] == 1
        await wait_until(lambda: _eq(work_count(nats), 25), "work items")
        # A cancel of a PENDING run ends it at once.
        out = await store.execute(ids[0], lambda s: decide.request_cancel(s, run_id=ids[0], now=time.time()), producer=GW)
        assert out.snapshot is not None and out.snapshot.status.value == "CANCELLED"
        await wait_until(lambda: snapshots_match_fold(nats, ids[:1]), "cancelled snapshot")


async def _eq(coro: object, value: object) -> bool:
    return await coro == value  # type: ignore[misc]


async def test_restarted_conductor_loses_and_duplicates_nothing(nats: NatsClient) -> None:
    store = RunStore(nats)
    with trio.fail_after(30):
        ids = await submit(store, 40)
        # A conductor that is stopped part-way (cancelled mid-stream)...
        async with trio.open_nursery() as n:
            proj = await n.start(lambda task_status: run_projector(nats, batch=8, max_delay=0.0, ack_wait=1.0, task_status=task_status))
            await wait_until(lambda: _ge(proj.statistics().events_projected, 8), "some progress")
            n.cancel_scope.cancel()
        ids += await submit(store, 20)
        # ...and a fresh one (new cache, same durable consumer) finishes the job; the events the
        # first one held unacked come back after the consumer's ack wait.
        async with trio.open_nursery() as n:
            await n.start(lambda task_status: run_projector(nats, ack_wait=1.0, task_status=task_status))
            await wait_until(lambda: snapshots_match_fold(nats, ids), "all snapshots")
            await wait_until(lambda: _eq(work_count(nats), 60), "one work item per run")
            n.cancel_scope.cancel()
        assert await work_count(nats) == 60


async def _ge(value: int, bound: int) -> bool:
    return value >= bound


async def test_two_conductors_give_the_same_snapshots_as_one(nats: NatsClient, nursery: trio.Nursery) -> None:
    store = RunStore(nats)
    with trio.fail_after(30):
        for i in range(2):
            await nursery.start(lambda task_status, i=i: run_projector(nats, batch=4, max_delay=0.0, task_status=task_status))
        ids = await submit(store, 30)
        # Interleave more events per run so both projectors see parts of each history.
        for run_id in ids[:10]:
            await store.execute(run_id, lambda s, r=run_id: decide.claim_run(s, run_id=r, attempt=1, worker_id="w", lease_seconds=60, tasks=["a"]), producer=GW)
            await store.execute(run_id, lambda s, r=run_id: decide.worker_event(s, TaskStarted(attempt=1, task="a", started_at=1.0), run_id=r, attempt=1, worker_id="w"), producer=GW)
            await store.execute(run_id, lambda s, r=run_id: decide.finish_run(s, run_id=r, attempt=1, worker_id="w", outcome="COMPLETED", now=2.0), producer=GW)
        await wait_until(lambda: snapshots_match_fold(nats, ids), "converged snapshots")
        await wait_until(lambda: _eq(work_count(nats), 30), "work items")


async def test_corrupt_event_marks_its_run_only(nats: NatsClient, nursery: trio.Nursery) -> None:
    store = RunStore(nats)
    with trio.fail_after(20):
        projector: Projector = await nursery.start(run_projector, nats)
        good = await submit(store, 3)
        bad = new_run_id()
        await nats.publish(subjects.run_events_subject(bad), b"{not json", msg_id="junk-1")
        more = await submit(store, 3)
        await wait_until(lambda: snapshots_match_fold(nats, good + more), "good runs projected")

        async def marked() -> bool:
            e = await nats.kv_get(subjects.RUNS_BUCKET, bad)
            return e is not None and b"projection_error" in (e.value or b"")

        await wait_until(marked, "bad run marked")
        assert projector.statistics().corrupt_events == 1


async def test_reaper_retries_a_lost_attempt_then_fails_it(nats: NatsClient, nursery: trio.Nursery) -> None:
    settings = Settings(run_lease_seconds=0.5, max_attempts=2)
    store = RunStore(nats)
    with trio.fail_after(20):
        await nursery.start(run_projector, nats)
        await nursery.start(lambda task_status: run_reaper(nats, settings, interval=0.05, task_status=task_status))
        run_id = new_run_id()
        ev = RunSubmitted(flow_name="main", params={}, tag="t", tags=["t"], submitted_at=time.time(), max_attempts=2)
        await store.execute(run_id, lambda s: decide.submit_run(s, ev, run_id=run_id), producer=GW)
        # A worker that never heartbeats claims attempt 1, then attempt 2.
        for attempt in (1, 2):
            await store.execute(run_id, lambda s, a=attempt: decide.claim_run(s, run_id=run_id, attempt=a, worker_id="ghost", lease_seconds=0.5), producer=GW)

            async def status_is(want: str, attempt: int = attempt) -> bool:
                snap = await store.load(run_id)
                return snap is not None and snap.status.value == want and (want != "PENDING" or snap.attempt == attempt + 1)

            await wait_until(lambda a=attempt: status_is("PENDING" if a == 1 else "FAILED"), f"verdict on attempt {attempt}")
        snap = await store.load(run_id)
        assert snap is not None and snap.failure_reason == "worker_lost" and "giving up" in (snap.error or "")
        assert "worker_lost" not in (snap.error or ""), snap.error  # the reason is not repeated in the text
        # Attempt 2's work item was dispatched after the first loss.
        assert await work_count(nats) == 2


async def test_replay_rebuilds_byte_identical_snapshots(nats: NatsClient) -> None:
    from pyoco_es.conductor.replay import replay
    from pyoco_es.nats.resources import delete_bucket, ensure_resources

    store = RunStore(nats)
    with trio.fail_after(30):
        ids = await submit(store, 12)
        for run_id in ids[:4]:
            await store.execute(run_id, lambda s, r=run_id: decide.claim_run(s, run_id=r, attempt=1, worker_id="w", lease_seconds=60, tasks=["a"]), producer=GW)
            await store.execute(run_id, lambda s, r=run_id: decide.finish_run(s, run_id=r, attempt=1, worker_id="w", outcome="FAILED", now=3.0, error="x"), producer=GW)
        async with trio.open_nursery() as n:
            await n.start(run_projector, nats)
            await wait_until(lambda: snapshots_match_fold(nats, ids), "projection")
            n.cancel_scope.cancel()
        before = {e.key: e.value for e in await nats.kv_get_many(subjects.RUNS_BUCKET, ids) if e is not None}
        report = await replay(nats)
        assert report.ok and report.runs == 12 and report.events == 12 + 8
        # Wipe the live read model: replay reports every run missing, and --rebuild restores them.
        await delete_bucket(nats, subjects.RUNS_BUCKET)
        await ensure_resources(nats)
        report = await replay(nats, rebuild=True)
        assert {d.kind for d in report.differences} == {"missing"} and len(report.differences) == 12
        after = {e.key: e.value for e in await nats.kv_get_many(subjects.RUNS_BUCKET, ids) if e is not None}
        assert after == before
        assert (await replay(nats)).ok


async def test_replay_names_a_changed_snapshot_and_a_key_without_events(nats: NatsClient) -> None:
    """Replay's one pass over the live bucket: a snapshot edited by hand is "different" (status
    first, live → replayed), a key with no events is "extra", the rest match; --rebuild restores
    the edited one and leaves the extra key alone."""
    from pyoco_es.conductor.replay import replay

    store = RunStore(nats)
    with trio.fail_after(30):
        ids = await submit(store, 5)
        async with trio.open_nursery() as n:
            await n.start(run_projector, nats)
            await wait_until(lambda: snapshots_match_fold(nats, ids), "projection")
            n.cancel_scope.cancel()
        original = await nats.kv_get(subjects.RUNS_BUCKET, ids[2])
        assert original is not None and original.value is not None
        edited = {**json.loads(original.value), "status": "COMPLETED"}
        await nats.kv_put(subjects.RUNS_BUCKET, ids[2], json.dumps(edited).encode())
        await nats.kv_put(subjects.RUNS_BUCKET, "no-events-here", b'{"status": "PENDING"}')
        report = await replay(nats, rebuild=True)
        assert report.runs == 5
        assert [(d.run_id, d.kind) for d in report.differences] == [(ids[2], "different"), ("no-events-here", "extra")]
        assert report.differences[0].detail.startswith("status COMPLETED → PENDING")
        restored = await nats.kv_get(subjects.RUNS_BUCKET, ids[2])
        assert restored is not None and restored.value == original.value
        assert [d.kind for d in (await replay(nats)).differences] == ["extra"]


async def _claimed_run(nats: NatsClient, store: RunStore, worker_id: str, *, lease: float, max_attempts: int = 3) -> str:
    run_id = new_run_id()
    ev = RunSubmitted(flow_name="main", params={}, tag="t", tags=["t"], submitted_at=time.time(), max_attempts=max_attempts)
    await store.execute(run_id, lambda s: decide.submit_run(s, ev, run_id=run_id), producer=GW)
    await store.execute(run_id, lambda s: decide.claim_run(s, run_id=run_id, attempt=1, worker_id=worker_id, lease_seconds=lease), producer=GW)
    return run_id


async def _beat(nats: NatsClient, worker_id: str, run_id: str, *, offset: float) -> None:
    """A heartbeat as a worker whose clock is ``offset`` seconds off writes it."""
    stamp = time.time() + offset
    doc = {"worker_id": worker_id, "state": "RUNNING", "runs": {run_id: 1}, "last_heartbeat_at": stamp, "heartbeat_at": stamp}
    await nats.kv_put(subjects.WORKERS_BUCKET, worker_id, json.dumps(doc).encode())


async def _attempt(store: RunStore, run_id: str) -> tuple[str, int]:
    snap = await store.load(run_id)
    assert snap is not None
    return snap.status.value, snap.attempt


async def test_reaper_judges_leases_on_its_own_clock(nats: NatsClient, nursery: trio.Nursery) -> None:
    """Issue 11 #2: a worker 20 s behind keeps heartbeating, so its attempt is never lost (it was,
    at once); a worker 60 s ahead that goes silent is lost about one lease later (it took 60 s
    more).  Junk in both buckets does not stop the reaper."""
    lease = 1.0
    settings = Settings(run_lease_seconds=lease)
    store = RunStore(nats)
    with trio.fail_after(30):
        await nursery.start(run_projector, nats)
        await nursery.start(lambda task_status: run_reaper(nats, settings, interval=0.05, task_status=task_status))
        await nats.kv_put(subjects.WORKERS_BUCKET, "junk", b"\xff\xfe not json")
        await nats.kv_put(subjects.RUNS_BUCKET, "junk", b'{"status": "RUNNING", "attempt": "x"}')
        run_id = await _claimed_run(nats, store, "skewed", lease=lease)
        until = trio.current_time() + 3 * lease
        while trio.current_time() < until:
            await _beat(nats, "skewed", run_id, offset=-20.0)
            assert await _attempt(store, run_id) == ("RUNNING", 1)
            await trio.sleep(lease / 5)
        await _beat(nats, "skewed", run_id, offset=+60.0)
        silent = trio.current_time()
        await wait_until(lambda: _eq(_attempt(store, run_id), ("PENDING", 2)), "the verdict on the silent worker", timeout=10)
        assert trio.current_time() - silent < lease + 1.0


async def test_a_restarted_reaper_gives_every_attempt_a_full_lease(nats: NatsClient, nursery: trio.Nursery) -> None:
    """A reaper that starts (or restarts) has observed nothing yet: it gives each attempt a full
    lease from when it first sees it, so a healthy worker whose last heartbeat is older than the
    lease by any stamp is not condemned on sight; a worker that stays silent is lost a lease
    later."""
    lease = 1.0
    settings = Settings(run_lease_seconds=lease)
    store = RunStore(nats)
    with trio.fail_after(30):
        await nursery.start(run_projector, nats)
        run_id = await _claimed_run(nats, store, "quiet", lease=lease)
        await _beat(nats, "quiet", run_id, offset=-10 * lease)  # long ago, by the worker's stamp
        await wait_until(lambda: _eq(_attempt(store, run_id), ("RUNNING", 1)), "the claim projected")
        await nursery.start(lambda task_status: run_reaper(nats, settings, interval=0.05, task_status=task_status))
        started = trio.current_time()
        while trio.current_time() < started + 0.8 * lease:
            assert await _attempt(store, run_id) == ("RUNNING", 1)
            await trio.sleep(0.05)
        await wait_until(lambda: _eq(_attempt(store, run_id), ("PENDING", 2)), "the verdict a lease later", timeout=10)
        snap = await store.load(run_id)
        assert snap is not None and snap.error is None


async def test_undecodable_events_never_stop_the_conductor(nats: NatsClient, nursery: trio.Nursery) -> None:
    """Issue 10 #3: events nobody can decode (bad UTF-8, not an object, an unknown type, a
    known type of the wrong shape, NaN) are recorded against their run only; a valid event with a
    lone surrogate is projected and dispatched like any other; the whole conductor (projector,
    dispatcher, reaper) keeps serving the runs around them."""
    store = RunStore(nats)
    with trio.fail_after(30):
        await nursery.start(run_conductor, nats, Settings())
        junk = [b"\xff\xfe\xfd", b"[]", b'{"type": "run.bogus", "seq": 1}', b'{"type": "run.submitted", "seq": "x", "data": 5}',
                b'{"type": "run.submitted", "seq": 1, "data": {"params": NaN}}']
        bad_ids = []
        for i, raw in enumerate(junk):
            bad = new_run_id()
            bad_ids.append(bad)
            await nats.publish(subjects.run_events_subject(bad), raw, msg_id=f"junk-{i}")
        # Complete run.submitted events whose params hold what JSON cannot carry back out.
        good_first = new_run_id()
        template = (await store.execute(good_first, lambda s: decide.submit_run(s, submitted(), run_id=good_first), producer=GW)).appended[0]
        for i, number in enumerate((b"NaN", b"1e400", b"-Infinity")):
            bad = new_run_id()
            bad_ids.append(bad)
            raw = encode_envelope(attrs.evolve(template, run_id=bad)).replace(b'{"n":1}', b'{"n":' + number + b"}")
            assert number in raw
            await nats.publish(subjects.run_events_subject(bad), raw, msg_id=f"nan-{i}")
        odd = new_run_id()
        ev = attrs.evolve(submitted(), flow_name="\ud800", params={"s": "\udfff"})
        await store.execute(odd, lambda s: decide.submit_run(s, ev, run_id=odd), producer=GW)
        good = await submit(store, 3)
        await wait_until(lambda: snapshots_match_fold(nats, [good_first, odd, *good]), "good runs projected")
        await wait_until(lambda: _eq(work_count(nats), 5), "work items for the good runs")

        async def marked() -> bool:
            entries = await nats.kv_get_many(subjects.RUNS_BUCKET, bad_ids)
            return all(e is not None and b"projection_error" in (e.value or b"") for e in entries)

        await wait_until(marked, "every undecodable run marked")
        more = await submit(store, 2)
        await wait_until(lambda: snapshots_match_fold(nats, more), "later runs projected")
