"""The gateway's pure parts, without I/O: the run index (paging, cursors, deltas, provisional
entries), SSE framing, worker normalisation, idempotency keys."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from pyoco_es.gateway import sse
from pyoco_es.gateway.index import WorkerIndex, decode_cursor, encode_cursor
from pyoco_es.gateway.runindex import RunIndex
from pyoco_es.gateway.snapshot import filter_snapshot
from pyoco_es.gateway.submit import request_fingerprint, run_id_for_key
from pyoco_es.gateway.registry import effective_state, liveness, normalize_worker
from pyoco_es.nats.client import KVEntry


def snap(run_id: str, updated_at: float, *, status: str = "PENDING", version: int = 1, **extra: Any) -> dict[str, Any]:
    return {"run_id": run_id, "flow_name": "f", "tag": "default", "tags": ["default"], "status": status,
            "updated_at": updated_at, "heartbeat_at": updated_at, "version": version, "params": {}, **extra}


def index_with(*docs: dict[str, Any]) -> RunIndex:
    index = RunIndex(None).open_offline()  # type: ignore[arg-type]  # only run() touches NATS
    for rev, doc in enumerate(docs, start=1):
        index.apply(KVEntry(key=doc["run_id"], value=json.dumps(doc).encode(), revision=rev))
    return index


class TestRunIndex:
    def test_pages_newest_first_with_ties_broken_by_run_id(self) -> None:
        index = index_with(snap("a", 1.0), snap("b", 2.0), snap("c", 2.0), snap("d", 3.0))
        page = index.page(limit=10)
        assert [i["run_id"] for i in page.items] == ["d", "c", "b", "a"] and page.next_cursor is None

    def test_cursor_pages_visit_everything_once(self) -> None:
        index = index_with(*(snap(f"r{i}", float(i % 3)) for i in range(10)))
        seen, before = [], None
        while True:
            page = index.page(limit=3, before=before)
            seen += [i["run_id"] for i in page.items]
            if page.next_cursor is None:
                break
            before = decode_cursor(page.next_cursor)
        assert sorted(map(str, seen)) == sorted(f"r{i}" for i in range(10)) and len(seen) == 10

    def test_next_cursor_only_when_more_match(self) -> None:
        index = index_with(snap("a", 1.0), snap("b", 2.0, status="RUNNING"))
        assert index.page(limit=1, filters={"status": "RUNNING"}).next_cursor is None
        assert index.page(limit=1).next_cursor is not None

    def test_updated_after_is_strict_and_filters_match_exactly(self) -> None:
        index = index_with(snap("a", 1.0), snap("b", 2.0, status="RUNNING"), snap("c", 3.0))
        assert [i["run_id"] for i in index.page(limit=10, updated_after=2.0).items] == ["c"]
        assert [i["run_id"] for i in index.page(limit=10, filters={"status": "RUNNING"}).items] == ["b"]
        assert index.page(limit=10, filters={"status": "running"}).items == []

    def test_updates_move_runs_and_keep_counts(self) -> None:
        index = index_with(snap("a", 1.0), snap("b", 2.0))
        index.apply(KVEntry(key="a", value=json.dumps(snap("a", 5.0, status="COMPLETED", version=3)).encode(), revision=9))
        assert [i["run_id"] for i in index.page(limit=10).items] == ["a", "b"]
        assert index.counts() == {"COMPLETED": 1, "PENDING": 1}
        assert index.revision == 9
        index.apply(KVEntry(key="b", value=None, revision=10))
        assert len(index) == 1 and index.counts() == {"COMPLETED": 1}

    def test_provisional_notes_never_overwrite_newer_versions(self) -> None:
        index = index_with(snap("a", 1.0, status="RUNNING", version=2))
        index.note(snap("a", 0.5, status="PENDING", version=1))
        assert index.get("a")["status"] == "RUNNING"  # type: ignore[index]
        index.note(snap("a", 2.0, status="CANCELLING", version=3))
        assert index.get("a")["status"] == "CANCELLING"  # type: ignore[index]
        index.note(snap("new", 3.0))
        assert index.page(limit=1).items[0]["run_id"] == "new"
        assert index.changed_since(0) == [(1, index.get("a"))]  # notes are not stream positions

    def test_changed_since_is_oldest_first_and_filtered(self) -> None:
        index = index_with(snap("a", 1.0), snap("b", 2.0, status="RUNNING"), snap("c", 3.0))
        index.apply(KVEntry(key="a", value=json.dumps(snap("a", 4.0, version=2)).encode(), revision=4))
        assert [(rev, s["run_id"]) for rev, s in index.changed_since(1)] == [(2, "b"), (3, "c"), (4, "a")]
        assert [s["run_id"] for _, s in index.changed_since(0, filters={"status": "RUNNING"})] == ["b"]

    def test_subscribers_get_the_newest_value_conflated(self) -> None:
        index = index_with(snap("a", 1.0))
        slot = index.subscribe("a")
        for v in (2, 3, 4):
            index.apply(KVEntry(key="a", value=json.dumps(snap("a", float(v), version=v)).encode(), revision=v))
        assert slot.changed.is_set()
        assert slot.take()["version"] == 4  # type: ignore[index]
        assert not slot.changed.is_set() and slot.take() is None
        index.unsubscribe(slot)
        assert index.statistics().run_subscribers == 0

    def test_undecodable_values_are_skipped(self) -> None:
        index = index_with(snap("a", 1.0))
        index.apply(KVEntry(key="bad", value=b"{nope", revision=7))
        assert len(index) == 1


class TestCursor:
    def test_round_trip(self) -> None:
        assert decode_cursor(encode_cursor((1.5, "r-1"))) == (1.5, "r-1")

    @pytest.mark.parametrize("bad", ["", "zz", "!!!", "eyJ1IjoxfQ", "WzEsMl0", "eyJ1IjoiYSIsInIiOiJ4In0"])
    def test_bad_cursors_say_why(self, bad: str) -> None:
        with pytest.raises(ValueError, match="cursor"):
            decode_cursor(bad)


class TestSse:
    def test_frame(self) -> None:
        assert sse.frame("snapshot", {"a": 1}, id=7) == b'id: 7\nevent: snapshot\ndata: {"a":1}\n\n'
        assert sse.frame("x", [], retry_ms=500).startswith(b"retry: 500\n")
        with pytest.raises(ValueError):
            sse.frame("a\nb", {})

    def test_last_event_id(self) -> None:
        assert sse.parse_last_event_id(None) is None and sse.parse_last_event_id(" ") is None
        assert sse.parse_last_event_id(" 12 ") == 12
        for bad in ("-1", "1.5", "abc", "9" * 30):
            with pytest.raises(ValueError, match="Last-Event-ID"):
                sse.parse_last_event_id(bad)


class TestWorkers:
    def test_normalisation_and_effective_state(self) -> None:
        rec = normalize_worker({"heartbeat_at": 100.0, "state": "??", "tags": None}, key="w")
        assert rec["worker_id"] == "w" and rec["instance_id"] == "w" and rec["state"] == "IDLE" and rec["tags"] == []
        assert rec["last_seen_at"] == rec["last_heartbeat_at"] == 100.0
        # judged by how long the gateway has not seen the record change, never by its stamps
        assert effective_state(rec, silent=10.0, disconnect_timeout=20.0) == "IDLE"
        assert effective_state(rec, silent=30.0, disconnect_timeout=20.0) == "DISCONNECTED"
        stopped = normalize_worker({"state": "STOPPED_GRACEFUL", "last_seen_at": 0.0}, key="s")
        assert effective_state(stopped, silent=1e9, disconnect_timeout=20.0) == "STOPPED_GRACEFUL"

    def test_the_registry_index_sees_life_in_changes_not_in_stamps(self) -> None:
        """A new revision from the worker is a sign of life whatever its stamps say; the same
        revision again (a restarted watch) or the gateway's own hide toggle is not."""
        now = [100.0]
        index = WorkerIndex(None, monotonic=lambda: now[0])  # type: ignore[arg-type]  # fed by hand
        record = {"worker_id": "w", "state": "IDLE", "heartbeat_at": 5.0, "hidden": False, "updated_at": 5.0}
        index.apply(KVEntry(key="w", value=json.dumps(record).encode(), revision=1))
        now[0] = 125.0
        assert index.silence("w") == 25.0
        index.apply(KVEntry(key="w", value=json.dumps(record).encode(), revision=1))
        index.apply(KVEntry(key="w", value=json.dumps({**record, "hidden": True, "updated_at": 9e9}).encode(), revision=2))
        assert index.silence("w") == 25.0
        index.apply(KVEntry(key="w", value=json.dumps({**record, "heartbeat_at": 1.0}).encode(), revision=3))
        assert index.silence("w") == 0.0 and index.silence("ghost") is None

    def test_liveness_of_a_missing_worker(self) -> None:
        assert liveness(None, key="w", silent=None, disconnect_timeout=20.0) == {
            "worker_alive": False, "worker_state": "DISCONNECTED", "worker_heartbeat_at": None}


class TestIdempotency:
    def test_run_id_is_deterministic_per_tenant(self) -> None:
        assert run_id_for_key(None, "k") == run_id_for_key(None, "k") != run_id_for_key("t1", "k")
        assert run_id_for_key(None, "k") != run_id_for_key(None, "k2")
        assert str(uuid.UUID(run_id_for_key(None, "k"))) == run_id_for_key(None, "k")  # canonical form

    def test_fingerprint_ignores_key_order(self) -> None:
        assert request_fingerprint({"a": 1, "b": {"x": 1, "y": 2}}) == request_fingerprint({"b": {"y": 2, "x": 1}, "a": 1})
        assert request_fingerprint({"a": 1}) != request_fingerprint({"a": 2})

    def test_records_are_filtered_unless_asked_for(self) -> None:
        doc: dict[str, Any] = {"run_id": "r", "task_records": {}, "task_records_truncated": False}
        assert filter_snapshot(doc, set()) == {"run_id": "r"}
        assert filter_snapshot(doc, {"records"}) == doc


def test_a_late_older_kv_value_does_not_undo_a_newer_note() -> None:
    index = index_with(snap("a", 1.0))
    index.note(snap("a", 2.0, status="CANCELLED", version=2))
    index.apply(KVEntry(key="a", value=json.dumps(snap("a", 1.0, version=1)).encode(), revision=5))
    assert index.get("a")["status"] == "CANCELLED" and index.version_of("a") == 2  # type: ignore[index]


def test_api_key_auth_mode_fails_closed() -> None:
    """Auth is not implemented: asking for it must not silently serve unauthenticated."""
    from pyoco_es.config import Settings
    from pyoco_es.core.errors import ValidationError
    from pyoco_es.gateway.app import create_app

    with pytest.raises(ValidationError, match="PYOCO_HTTP_AUTH_MODE"):
        create_app(None, Settings(http_auth_mode="api_key"))  # type: ignore[arg-type]


def test_full_snapshots_are_cached_for_reads_within_bounds() -> None:
    """GET /runs/{id} answers from the index's bounded cache, never with a version older than
    one this gateway acknowledged, and forgets deleted runs."""
    from pyoco_es.gateway.runindex import RunIndex
    from pyoco_es.nats.client import KVEntry

    index = RunIndex(None).open_offline()  # type: ignore[arg-type]  # fed by hand: no NATS needed
    index.doc_cache_size = 2

    def put(run_id: str, version: int, rev: int) -> None:
        doc = {"run_id": run_id, "status": "PENDING", "updated_at": float(rev), "version": version}
        index.apply(KVEntry(key=run_id, value=json.dumps(doc).encode(), revision=rev))

    put("a", 1, 1)
    doc = index.doc_of("a")
    assert doc is not None and doc["version"] == 1
    index.note({"run_id": "a", "status": "CANCELLED", "updated_at": 9.0, "version": 2})
    assert index.doc_of("a") is None  # our own write is newer than the cached copy: read KV
    put("a", 2, 2)
    cached = index.doc_of("a")
    assert cached is not None and cached["version"] == 2
    put("b", 1, 3)
    put("c", 1, 4)
    assert index.doc_of("a") is None and index.doc_of("c") is not None  # bounded: oldest evicted
    index.apply(KVEntry(key="c", value=None, revision=5))
    assert index.doc_of("c") is None


async def test_a_missing_dashboard_is_a_404_through_the_one_error_path(tmp_path: Any) -> None:
    """No handler words its own 404: a dashboard without its files answers like any other error."""
    from pyoco_es.config import Settings
    from pyoco_es.gateway.app import create_app

    app = create_app(None, Settings(), static_dir=tmp_path)  # type: ignore[arg-type]  # "/" touches no NATS
    response = await app.test_client().get("/")
    assert response.status_code == 404 and await response.get_json() == {"detail": "dashboard not found"}


def test_summaries_walks_every_run_in_pages() -> None:
    """The compatible iteration (what callers of the in-memory index used) visits each run once."""
    index = index_with(*(snap(f"r{i:04d}", float(i % 7)) for i in range(2500)))
    ids = [s["run_id"] for s in index.summaries()]
    assert len(ids) == len(set(ids)) == 2500
    assert [s["run_id"] for s in index.summaries({"status": "RUNNING"})] == []
