"""The NATS adapter's own behaviour against a real server (and against none)."""

from __future__ import annotations

import socket

import attrs
import pytest
import trio

from pyoco_es.core.errors import ConcurrencyConflict, EventLogUnavailable
from pyoco_es.core.events import Envelope, Producer, RunSubmitted
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient, open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.testing.faults import frozen, process_state

from test_gateway_support import wait_until


async def test_an_unreachable_server_is_a_clear_error_not_a_hang() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nobody listens there
    with trio.fail_after(10):
        with pytest.raises(EventLogUnavailable, match="cannot connect to NATS at .*pyoco-server up"):
            async with open_nats(f"nats://127.0.0.1:{port}", connect_timeout=0.5):
                pass


async def test_kv_compare_and_swap_and_batched_reads(nats: NatsClient) -> None:
    with trio.fail_after(10):
        rev = await nats.kv_update(subjects.RUNS_BUCKET, "k1", b"one", last=0)
        with pytest.raises(ConcurrencyConflict):
            await nats.kv_update(subjects.RUNS_BUCKET, "k1", b"two", last=0)
        await nats.kv_update(subjects.RUNS_BUCKET, "k1", b"two", last=rev)
        got = await nats.kv_get_many(subjects.RUNS_BUCKET, ["k1", "missing"])
        assert got[0] is not None and got[0].value == b"two" and got[1] is None
        assert await nats.kv_keys(subjects.WORKERS_BUCKET) == []  # empty bucket: [] (not an error)


async def test_cancelling_a_call_cancels_it_on_the_asyncio_side(nats: NatsClient) -> None:
    """A Trio cancel reaches the bridged call: a long fetch returns at once, the client stays usable."""
    await nats.ensure_pull_consumer(subjects.WORK_STREAM, "idle", {"filter_subject": "pyoco.work.idle", "ack_policy": "explicit"})
    async with nats.pull_subscription(subjects.WORK_STREAM, "idle") as sub:
        with trio.fail_after(5):
            with trio.move_on_after(0.2) as scope:
                await sub.fetch(1, timeout=30)
            assert scope.cancelled_caught
            assert await nats.kv_keys(subjects.WORKERS_BUCKET) == []


async def test_an_append_hook_runs_on_the_nats_thread_before_the_caller_resumes(nats: NatsClient) -> None:
    """``on_stored`` sees the stored seqs before ``append`` returns; ``publish_unacked_soon`` from
    it publishes (deduplicated by its Msg-Id); a hook that fails does not undo the append; no hook
    runs for an append that conflicted."""
    import threading
    import time

    from pyoco_es.core.decide import stamp
    from pyoco_es.core.events import Producer, RunSubmitted

    seen: list[tuple[list[int], bool]] = []
    envs = stamp(
        None,
        [RunSubmitted(flow_name="main", params={}, tag="hook", tags=["hook"], submitted_at=time.time())],
        run_id="hookrun",
        producer=Producer(kind="gateway", id="t"),
        now=time.time(),
        new_id=lambda: "e1",
    )

    def hook(seqs: list[int]) -> None:
        seen.append((list(seqs), threading.current_thread() is threading.main_thread()))
        nats.publish_unacked_soon("pyoco.work.hook", b"{}", "hookrun:1")
        raise RuntimeError("a broken follow-up")

    with trio.fail_after(10):
        seqs = await nats.append("hookrun", envs, expected_last=0, on_stored=hook)
        assert seen == [(seqs, False)]  # ran before append returned, not on the Trio thread

        async def queued() -> dict[str, int] | None:
            return await nats.subject_counts(subjects.WORK_STREAM, "pyoco.work.hook") or None

        assert await wait_until(queued, what="the hook's work item") == {"pyoco.work.hook": 1}
        again = [attrs.evolve(envs[0], event_id="e2")]
        with pytest.raises(ConcurrencyConflict):
            await nats.append("hookrun", again, expected_last=0, on_stored=hook)
        assert len(seen) == 1


def _first(run_id: str, event_id: str | None = None) -> Envelope:
    """A run's first event (``run.submitted``), event id ``e-<run_id>`` unless given."""
    event = RunSubmitted(flow_name="f", params={}, tag="t", tags=("t",), submitted_at=1.0)
    return Envelope(event_id=event_id or f"e-{run_id}", run_id=run_id, seq=1, occurred_at=1.0, producer=Producer(kind="gateway", id="g"), event=event)


async def test_first_appends_pipelined_across_a_freeze_are_stored_once(nats_server: EmbeddedNats, nats: NatsClient) -> None:
    """``append_first_many`` (the batch submit's append): nats-server frozen longer than the
    PubAck timeout while the events are in flight; afterwards every event is reported stored
    with its real stream seq, each run holds exactly that one event, and a run that already had
    events is a conflict (never a second first event).  Only the appends use the short timeout
    (``nats``, the fixture's client, created the streams and reads the runs back)."""
    assert nats_server.proc is not None
    with trio.fail_after(30):
        async with open_nats(nats_server.url, name="t", op_timeout=0.5, unavailable_wait=8.0) as client:
            assert await client.append_first_many([(_first("taken"), None)]) == [[1]]
            hooked: list[list[int]] = []
            envs = [(_first(f"r{i}"), hooked.append) for i in range(40)] + [(_first("taken", "another"), None)]
            results: list[object] = []

            async def go() -> None:
                results.extend(await client.append_first_many(envs))

            async with trio.open_nursery() as nursery:
                with frozen(nats_server.proc.pid):
                    nursery.start_soon(go)
                    await trio.sleep(1.5)  # the fault itself: three PubAck timeouts
            assert isinstance(results[-1], ConcurrencyConflict), results[-1]
            for i, res in enumerate(results[:-1]):
                assert isinstance(res, list), (i, res)
                stored = await nats.read_run(f"r{i}")
                assert [(e.event_id, e.stream_seq) for e in stored] == [(f"e-r{i}", res[0])]
            assert sorted(hooked) == sorted(results[:-1])  # each follow-up ran once, with the seq


async def test_an_append_whose_read_back_meets_a_stall_is_reported_stored(nats_server: EmbeddedNats, nats: NatsClient) -> None:
    """The first send of a batch item goes unanswered (a freeze), its re-send is refused as
    'wrong last sequence', and the server stalls again just as the append reads the run back to
    see whether the stored event is its own: the read is tried again within ``unavailable_wait``
    and the event is reported stored, once (it failed 'NATS unavailable (TimeoutError)', for an
    event that was stored, when a busy machine stalled nats-server past the 0.5 s timeout)."""
    import asyncio
    import os
    import signal
    import time

    proc = nats_server.proc
    assert proc is not None
    stalls: list[float] = []
    with trio.fail_after(30):
        async with open_nats(nats_server.url, name="t", op_timeout=0.5, unavailable_wait=8.0) as client:
            read_subject = client._read_subject

            async def stalled_read(*args: object) -> list[tuple[int, bytes]]:  # on the NATS thread
                if not stalls:  # the first read back: stop the server for 1.2 s first
                    os.kill(proc.pid, signal.SIGSTOP)
                    deadline = time.monotonic() + 5
                    while process_state(proc.pid) != "T" and time.monotonic() < deadline:
                        pass  # signal delivery is asynchronous: wait until it is really stopped
                    stalls.append(asyncio.get_running_loop().time())
                    asyncio.get_running_loop().call_later(1.2, os.kill, proc.pid, signal.SIGCONT)
                return await read_subject(*args)  # type: ignore[arg-type]

            client._read_subject = stalled_read  # type: ignore[method-assign]
            hooked: list[list[int]] = []
            results: list[object] = []

            async def go() -> None:
                results.extend(await client.append_first_many([(_first("r"), hooked.append)]))

            async with trio.open_nursery() as nursery:
                with frozen(proc.pid):
                    nursery.start_soon(go)
                    await trio.sleep(0.7)  # the first fault: the batch's PubAck wait (0.5 s) ends unanswered
            assert stalls, "the append never read the run back"
            [res] = results
            assert isinstance(res, list), res
            assert [(e.event_id, e.stream_seq) for e in await nats.read_run("r")] == [("e-r", res[0])]
            assert hooked == [res]


async def test_a_check_cut_short_by_a_frozen_server_leaves_the_connection_whole(nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture) -> None:
    """``answers`` is a request, never a flush: a flush cut short left its PONG waiter in nats-py's
    queue, and the late PONG failed nats-py's read loop ('InvalidStateError', the connection
    dropped: a worker's graceful stop then could not write STOPPED_GRACEFUL, seen in CI)."""
    proc = nats_server.proc
    assert proc is not None
    with trio.fail_after(30):
        async with open_nats(nats_server.url, name="t", op_timeout=2.0) as client:
            with frozen(proc.pid):
                assert not await client.answers(0.3)
            assert await client.answers(5)  # answered after the frozen one's late reply: it has arrived
            assert client.is_connected
    assert not [r for r in caplog.records if r.name.startswith("nats") and r.levelname == "ERROR"], caplog.text
