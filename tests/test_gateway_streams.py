"""The SSE streams as units over the run index, without HTTP: what a client of
``GET /runs/stream`` and ``GET /runs/{id}/watch`` receives, frame by frame."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from pyoco_es.core.events import JSONObject
from pyoco_es.gateway.runindex import RunIndex
from pyoco_es.gateway.streams import Pace, open_run_list_stream, open_run_stream
from pyoco_es.nats.client import KVEntry

from test_gateway_units import index_with, snap

PACE = Pace(timeout=30.0, heartbeat=5.0, clock=lambda: 1234.0)


def parse(frame: bytes) -> tuple[str, str | None, Any]:
    """(event, id, data) of one SSE frame."""
    fields = dict(line.split(": ", 1) for line in frame.decode().strip().split("\n"))
    return fields["event"], fields.get("id"), json.loads(fields["data"])


def put(index: RunIndex, doc: dict[str, Any], revision: int) -> None:
    index.apply(KVEntry(key=doc["run_id"], value=json.dumps(doc).encode(), revision=revision))


async def no_read(run_id: str) -> JSONObject | None:
    raise AssertionError("the stream re-read a run it already had")


class TestRunListStream:
    async def test_a_new_client_gets_ready_then_each_change_with_its_revision(self) -> None:
        index = index_with(snap("a", 1.0), snap("b", 2.0))
        async with open_run_list_stream(index, filters={}, after=None, pace=PACE) as frames:
            assert parse(await frames.receive()) == ("ready", "2", {"revision": 2, "runs": 2})
            put(index, snap("a", 3.0, status="RUNNING", version=2), 3)
            event, rev, data = parse(await frames.receive())
            assert (event, rev, data["run_id"], data["status"]) == ("run", "3", "a", "RUNNING")

    async def test_resuming_replays_what_changed_after_the_id_matching_the_filter(self) -> None:
        index = index_with(snap("a", 1.0), snap("b", 2.0, tag="gpu"), snap("c", 3.0))
        async with open_run_list_stream(index, filters={"tag": "default"}, after=1, pace=PACE) as frames:
            event, rev, data = parse(await frames.receive())
            assert (event, rev, data["run_id"]) == ("run", "3", "c")

    async def test_an_id_from_the_future_resets_the_client(self) -> None:
        index = index_with(snap("a", 1.0))
        async with open_run_list_stream(index, filters={}, after=99, pace=PACE) as frames:
            assert parse(await frames.receive()) == ("reset", "1", {"revision": 1, "runs": 1})

    async def test_silence_brings_heartbeats_and_the_stream_ends_at_its_timeout(self, autojump_clock: trio.testing.MockClock) -> None:
        index = index_with(snap("a", 1.0))
        async with open_run_list_stream(index, filters={}, after=None, pace=PACE) as frames:
            received = [parse(frame) async for frame in frames]
        events = [event for event, _, _ in received]
        assert events[0] == "ready" and set(events[1:]) == {"heartbeat"} and len(events) == 6
        assert received[1][2] == {"revision": 1, "ts": 1234.0}


class TestRunStream:
    async def test_sends_each_new_version_then_end_when_terminal(self) -> None:
        index = index_with(snap("r", 1.0))
        first = snap("r", 1.0)
        stream = open_run_stream(index, "r", first, read=no_read, includes=set(), since=None, last_id=None, pace=PACE)
        async with stream as frames:
            event, version, data = parse(await frames.receive())
            assert (event, version, data["snapshot"]["status"], data["ts"]) == ("snapshot", "1", "PENDING", 1234.0)
            put(index, snap("r", 2.0, status="COMPLETED", version=2), 2)
            assert parse(await frames.receive())[:2] == ("snapshot", "2")
            assert parse(await frames.receive()) == ("end", "2", {"run_id": "r", "status": "COMPLETED", "version": 2, "ts": 1234.0})
            assert [frame async for frame in frames] == []
        assert index.statistics().run_subscribers == 0

    async def test_resuming_at_the_current_version_sends_nothing_until_a_change(self, autojump_clock: trio.testing.MockClock) -> None:
        index = index_with(snap("r", 1.0, version=3))
        stream = open_run_stream(index, "r", snap("r", 1.0, version=3), read=no_read, includes=set(), since=None, last_id=3, pace=PACE)
        async with stream as frames:
            assert parse(await frames.receive())[:2] == ("heartbeat", None)

    async def test_a_newer_version_in_the_index_is_read_before_the_first_frame(self) -> None:
        index = index_with(snap("r", 1.0, version=2, status="RUNNING"))
        reads: list[str] = []

        async def read(run_id: str) -> JSONObject | None:
            reads.append(run_id)
            return snap("r", 1.0, version=2, status="RUNNING")

        stream = open_run_stream(index, "r", snap("r", 1.0), read=read, includes=set(), since=None, last_id=None, pace=PACE)
        async with stream as frames:
            event, version, data = parse(await frames.receive())
        assert reads == ["r"] and (event, version, data["snapshot"]["status"]) == ("snapshot", "2", "RUNNING")

    async def test_leaving_early_unsubscribes(self) -> None:
        index = index_with(snap("r", 1.0))
        async with open_run_stream(index, "r", snap("r", 1.0), read=no_read, includes=set(), since=None, last_id=None, pace=PACE) as frames:
            await frames.receive()
            assert index.statistics().run_subscribers == 1
        assert index.statistics().run_subscribers == 0
