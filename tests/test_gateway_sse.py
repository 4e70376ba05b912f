"""SSE over real HTTP: per-run watch (push, ids, resume with Last-Event-ID, heartbeats, the final
``end`` frame, timeouts, cleanup on disconnect) and the list-level ``/runs/stream``."""

from __future__ import annotations

import httpx
import trio

from test_gateway_support import gw  # noqa: F401 - a fixture
from test_gateway_support import HTTPX_STREAM_WARNINGS, GW, FakeWorker, open_sse, submit, wait_projected, wait_until

pytestmark = HTTPX_STREAM_WARNINGS


async def _open_streams(gw: GW) -> int:
    text = (await gw.client.get("/metrics")).text
    line = next(ln for ln in text.splitlines() if ln.startswith("pyoco_gateway_sse_streams "))
    return int(float(line.split()[1]))


async def test_watch_pushes_every_change_and_ends_at_terminal(gw: GW) -> None:
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats)
        run_id = await submit(gw.client)
        async with open_sse(gw.client, f"/runs/{run_id}/watch") as sse:
            first = await sse.next()
            assert first is not None and first.event == "snapshot" and first.id == "1"
            assert first.data["run_id"] == run_id and first.data["snapshot"]["status"] == "PENDING"
            assert "task_records" not in first.data["snapshot"] and isinstance(first.data["ts"], float)
            await worker.claim(run_id)
            running = await sse.next()
            assert running is not None and running.data["snapshot"]["status"] == "RUNNING" and running.id == "2"
            await worker.task_done(run_id, "first")
            await worker.task_done(run_id, "second")
            await worker.finish(run_id)
            frames = await sse.rest()  # the server closes the stream after the end frame
        assert frames[-1].event == "end" and frames[-1].data["status"] == "COMPLETED"
        snaps = [f for f in frames if f.event == "snapshot"]
        assert snaps[-1].data["snapshot"]["status"] == "COMPLETED" and snaps[-1].id == "7"
        ids = [int(f.id) for f in snaps if f.id]
        assert ids == sorted(set(ids))  # strictly increasing: versions, never repeated
        await wait_until(lambda: _zero(gw), what="SSE streams to close")


async def _zero(gw: GW) -> bool:
    return await _open_streams(gw) == 0


async def test_watch_resumes_after_a_dropped_connection(gw: GW) -> None:
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats)
        run_id = await submit(gw.client)
        async with open_sse(gw.client, f"/runs/{run_id}/watch") as sse:
            first = await sse.next()
            assert first is not None
            last_id = first.id
        # dropped; meanwhile the run moves on
        await worker.claim(run_id)
        await worker.task_done(run_id, "first")
        await wait_projected(gw.nats, run_id, 4)
        async with open_sse(gw.client, f"/runs/{run_id}/watch", headers={"Last-Event-ID": str(last_id)}) as sse:
            resumed = await sse.next()
            assert resumed is not None and resumed.event == "snapshot"
            assert int(resumed.id or 0) == 4 and resumed.data["snapshot"]["tasks"]["first"] == "SUCCEEDED"
            last_id = resumed.id
        # resuming at the current version sends nothing until the next change
        async with open_sse(gw.client, f"/runs/{run_id}/watch", headers={"Last-Event-ID": str(last_id)}) as sse:
            await worker.task_done(run_id, "second")
            nxt = await sse.next()
            assert nxt is not None and int(nxt.id or 0) > 4
            while nxt is not None and nxt.data["snapshot"]["tasks"]["second"] != "SUCCEEDED":
                nxt = await sse.next()
            assert nxt is not None and int(nxt.id or 0) == 6
        await worker.finish(run_id)
        await wait_projected(gw.nats, run_id, 7)
        # resuming after the terminal version: just the end frame, then close
        async with open_sse(gw.client, f"/runs/{run_id}/watch", headers={"Last-Event-ID": "7"}) as sse:
            frames = await sse.rest()
        assert [f.event for f in frames] == ["end"]
        # the query-string form works for fetch() clients that cannot set headers
        async with open_sse(gw.client, f"/runs/{run_id}/watch?last_event_id=6") as sse:
            frames = await sse.rest()
        assert [f.event for f in frames] == ["snapshot", "end"]


async def test_watch_heartbeats_timeout_and_since(gw: GW) -> None:
    with trio.fail_after(10):
        run_id = await submit(gw.client)
        async with open_sse(gw.client, f"/runs/{run_id}/watch?timeout_sec=1&include=records") as sse:
            first = await sse.next()
            assert first is not None and "task_records" in first.data["snapshot"]
            hb = await sse.next(skip_heartbeats=False)
            assert hb is not None and hb.event == "heartbeat" and hb.data["run_id"] == run_id
            start = trio.current_time()
            rest = await sse.rest()  # closes at the 1 s deadline
            assert trio.current_time() - start < 1.5 and all(f.event != "snapshot" for f in rest)
        # since in the future: the current snapshot is not sent (only later changes would be)
        async with open_sse(gw.client, f"/runs/{run_id}/watch?timeout_sec=1&since=99999999999") as sse:
            assert await sse.rest() == []


async def test_watch_errors_before_streaming(gw: GW) -> None:
    with trio.fail_after(10):
        r = await gw.client.get("/runs/unknown/watch")
        assert r.status_code == 404 and r.json() == {"detail": "run not found"}
        run_id = await submit(gw.client)
        r = await gw.client.get(f"/runs/{run_id}/watch", params={"timeout_sec": 0})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "timeout_sec"]
        r = await gw.client.get(f"/runs/{run_id}/watch", params={"timeout_sec": 601})
        assert r.status_code == 422
        r = await gw.client.get(f"/runs/{run_id}/watch", headers={"Last-Event-ID": "abc"})
        assert r.status_code == 422 and "Last-Event-ID" in r.json()["detail"][0]["msg"]
        assert await _open_streams(gw) == 0


async def test_watchers_are_freed_when_clients_disconnect(gw: GW) -> None:
    with trio.fail_after(15):
        run_id = await submit(gw.client)

        async def watcher(ready: trio.MemorySendChannel[None]) -> None:
            async with open_sse(gw.client, f"/runs/{run_id}/watch") as sse:
                assert await sse.next() is not None
                await ready.send(None)
                await trio.sleep_forever()

        send, recv = trio.open_memory_channel[None](0)
        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(watcher, send)
            for _ in range(20):
                await recv.receive()
            assert await _open_streams(gw) == 20
            assert gw.stack.nats is not None
            n.cancel_scope.cancel()  # 20 abrupt disconnects
        await wait_until(lambda: _zero(gw), what="all SSE streams to be freed")


async def test_status_change_reaches_a_watcher_fast(gw: GW) -> None:
    """Push, not polling: the claim's append to the watcher's frame (projector + KV watch)."""
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats)
        latencies = []
        for _ in range(5):
            run_id = await submit(gw.client)
            async with open_sse(gw.client, f"/runs/{run_id}/watch") as sse:
                assert await sse.next() is not None
                t0 = trio.current_time()
                await worker.claim(run_id)
                frame = await sse.next()
                latencies.append(trio.current_time() - t0)
                assert frame is not None and frame.data["snapshot"]["status"] == "RUNNING"
        latencies.sort()
        assert latencies[len(latencies) // 2] < 0.25, latencies  # pyoco-server polls every 0.5 s


async def test_runs_stream_pushes_summaries_and_resumes(gw: GW) -> None:
    with trio.fail_after(10):
        worker = FakeWorker(gw.nats)
        early = await submit(gw.client, "early")
        await wait_projected(gw.nats, early, 1)
        async with open_sse(gw.client, "/runs/stream") as sse:
            ready = await sse.next()
            assert ready is not None and ready.event == "ready" and ready.data["runs"] == 1
            run_id = await submit(gw.client, "later")
            frame = await sse.next()
            assert frame is not None and frame.event == "run" and frame.data["run_id"] == run_id
            assert frame.data["status"] == "PENDING" and int(frame.id or 0) > int(ready.id or 0)
            last_id = frame.id
        await worker.claim(run_id)
        await wait_projected(gw.nats, run_id, 2)
        async with open_sse(gw.client, "/runs/stream", headers={"Last-Event-ID": str(last_id)}) as sse:
            frame = await sse.next()
            assert frame is not None and frame.data["run_id"] == run_id and frame.data["status"] == "RUNNING"
        # from the beginning: every run once, oldest change first
        async with open_sse(gw.client, "/runs/stream?after=0") as sse:
            a, b = await sse.next(), await sse.next()
            assert a is not None and b is not None
            assert [a.data["run_id"], b.data["run_id"]] == [early, run_id]
        # filters
        async with open_sse(gw.client, "/runs/stream?after=0&status=RUNNING&timeout_sec=1") as sse:
            frames = await sse.rest()
        assert [f.data["run_id"] for f in frames] == [run_id]
        # an id this bucket never reached (rebuilt bucket, lagging gateway): reset, then live
        async with open_sse(gw.client, "/runs/stream", headers={"Last-Event-ID": "999999"}) as sse:
            reset = await sse.next()
            assert reset is not None and reset.event == "reset" and int(reset.id or 0) < 999999
            await worker.finish(run_id)
            frame = await sse.next()
            assert frame is not None and frame.event == "run" and frame.data["status"] == "COMPLETED"


async def test_one_change_fans_out_to_many_watchers(gw: GW) -> None:
    """100 watchers of one run share the gateway's single KV watch (no NATS consumer each): one
    claim reaches all of them, and all are freed afterwards."""
    with trio.fail_after(20):
        worker = FakeWorker(gw.nats)
        run_id = await submit(gw.client)
        n = 100
        connected = trio.Semaphore(0)
        got: list[float] = []
        t0 = 0.0

        async def watcher(client: httpx.AsyncClient) -> None:
            async with open_sse(client, f"/runs/{run_id}/watch") as sse:
                assert await sse.next() is not None
                connected.release()
                frame = await sse.next()
                assert frame is not None and frame.data["snapshot"]["status"] == "RUNNING"
                got.append(trio.current_time() - t0)

        limits = httpx.Limits(max_connections=n + 5)
        async with httpx.AsyncClient(base_url=gw.url, timeout=10, limits=limits) as watchers:
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(watcher, watchers)
                for _ in range(n):
                    await connected.acquire()
                assert await _open_streams(gw) == n
                t0 = trio.current_time()
                await worker.claim(run_id)
        assert len(got) == n and max(got) < 2.0, sorted(got)[:: n // 10]
        await wait_until(lambda: _zero(gw), what="all watchers freed")
