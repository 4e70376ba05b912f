"""The gateway's persistent read model (issue 18): ``GET /runs`` served from a SQLite file that
survives a kill -9 mid-write, is rebuilt when deleted or corrupt, answers every filter as a
reference computed from the events would, and lists the same whichever gateway answers."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pyoco_es.cli.readmodel_check import check_read_model
from pyoco_es.config import Settings
from pyoco_es.core.model import RunSnapshot
from pyoco_es.gateway.index import decode_cursor
from pyoco_es.gateway.runindex import RunIndex, coalesce
from pyoco_es.gateway.server import run_gateway
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats.client import NatsClient, open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.readmodel import Change, open_store, summarize
from pyoco_es.testing.history import fill
from test_gateway_support import wait_until

PYOCO_ES = str(Path(sys.executable).parent / "pyoco-es")


def reference(snaps: list[RunSnapshot], **want: Any) -> list[str]:
    """Run ids a list must return, newest first, computed from the folded events."""
    out = []
    for s in snaps:
        doc = s.to_json()
        if any(doc.get(k) != v for k, v in want.get("exact", {}).items()):
            continue
        if "prefix" in want and not s.run_id.startswith(want["prefix"]):
            continue
        if "after" in want and not doc["updated_at"] > want["after"]:
            continue
        if "before" in want and not doc["updated_at"] < want["before"]:
            continue
        if "error" in want and want["error"].lower() not in f"{doc.get('error') or ''} {doc.get('failure_reason') or ''}".lower():
            continue
        out.append((doc["updated_at"], s.run_id))
    return [r for _, r in sorted(out, reverse=True)]


async def listed(client: httpx.AsyncClient, params: dict[str, Any]) -> list[str]:
    """Every run id of a list, following cursors (delta mode)."""
    ids: list[str] = []
    cursor = None
    while True:
        page = (await client.get("/runs", params={**params, "limit": 200, "updated_after": params.get("updated_after", 0),
                                                  **({"cursor": cursor} if cursor else {})})).json()
        ids += [i["run_id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def gateway_process(nats_url: str, path: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], httpx.AsyncClient]]:
    port = free_port()
    env = {**os.environ, "PYOCO_LOAD_DOTENV": "0", "PYOCO_READ_MODEL_PATH": str(path)}
    proc = subprocess.Popen([PYOCO_ES, "gateway", "--nats-url", nats_url, "--port", str(port)], **tied_to_this_process(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def up() -> bool:
                assert proc.poll() is None, "the gateway exited"
                try:
                    return (await client.get("/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(up, what="the gateway to serve", timeout=60)
            yield proc, client
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)


@pytest.fixture
async def filled(nats: NatsClient) -> list[RunSnapshot]:
    snaps: list[RunSnapshot] = []
    await fill(nats, 300, chunk=100, progress=False, keep=snaps)
    return snaps


async def test_filters_match_a_reference_folded_from_the_events(
    tmp_path: Path, nats_server: EmbeddedNats, filled: list[RunSnapshot]
) -> None:
    """status, flow, tag, tenant, worker, time range, run id prefix and error text, alone and
    combined, over HTTP, against the runs folded from the events appended."""
    snaps = filled
    mid = sorted(s.updated_at for s in snaps)[150]
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({}, {}),
        ({"status": "FAILED"}, {"exact": {"status": "FAILED"}}),
        ({"flow": "flow7"}, {"exact": {"flow_name": "flow7"}}),
        ({"tag": "t3"}, {"exact": {"tag": "t3"}}),
        ({"tenant_id": "tenant4"}, {"exact": {"tenant_id": "tenant4"}}),
        ({"worker_id": "w7"}, {"exact": {"worker_id": "w7"}}),
        ({"status": "COMPLETED", "flow": "flow3", "tag": "t3"}, {"exact": {"status": "COMPLETED", "flow_name": "flow3", "tag": "t3"}}),
        ({"run_id_prefix": snaps[5].run_id[:2]}, {"prefix": snaps[5].run_id[:2]}),
        ({"updated_after": mid}, {"after": mid}),
        ({"updated_before": mid}, {"before": mid}),
        ({"error_contains": "DIVISION by"}, {"error": "division by"}),
        ({"error_contains": "50%_"}, {"error": "50%_"}),  # LIKE wildcards are literal
        ({"status": "FAILED", "error_contains": "missing", "updated_before": mid}, {"exact": {"status": "FAILED"}, "error": "missing", "before": mid}),
    ]
    with trio.fail_after(60):
        async with gateway_process(nats_server.url, tmp_path / "rm.sqlite3") as (_, client):
            for params, want in cases:
                expected = reference(snaps, **want)
                assert await listed(client, params) == expected, params
                assert expected or params.get("error_contains") == "50%_"  # every other case selects something
            first = (await client.get("/runs", params={"limit": 5, "status": "FAILED"})).json()
            assert [i["run_id"] for i in first] == reference(snaps, exact={"status": "FAILED"})[:5]
            assert first[0] == summarize(next(s for s in snaps if s.run_id == first[0]["run_id"]).to_json())


async def test_survives_kill_9_mid_write_and_rebuilds_when_deleted_or_corrupt(
    tmp_path: Path, nats_server: EmbeddedNats, nats: NatsClient
) -> None:
    path = tmp_path / "rm.sqlite3"
    snaps: list[RunSnapshot] = []
    with trio.fail_after(120):
        async with gateway_process(nats_server.url, path) as (proc, client):
            # the gateway is writing these to its file while it is killed
            await fill(nats, 2000, chunk=250, progress=False, keep=snaps)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        with sqlite3.connect(path) as conn:
            checkpoint = int(conn.execute("SELECT value FROM meta WHERE key = 'checkpoint'").fetchone()[0])
            rows = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        assert 0 < checkpoint and rows <= 2000
        expected = reference(snaps)
        async with gateway_process(nats_server.url, path) as (_, client):
            await wait_until(lambda: _count(client, 2000), what="the restarted gateway to catch up from its checkpoint", timeout=60)
            assert await listed(client, {}) == expected
        report = await check_read_model(nats, path)
        assert report.differences == () and report.integrity == "ok" and report.checked == 2000
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        assert await in_process_list(nats, path, status="FAILED") == reference(snaps, exact={"status": "FAILED"})
        with open(path, "r+b") as f:  # a file that is not a database any more
            f.write(b"garbage" * 20)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        assert await in_process_list(nats, path, tag="t1") == reference(snaps, exact={"tag": "t1"})
        # a file changed behind the gateway's back is what the replay check is for
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE runs SET summary = '{}' WHERE run_id = ?", (snaps[0].run_id,))
        report = await check_read_model(nats, path)
        assert [(d[0], d[1]) for d in report.differences] == [(snaps[0].run_id, "different")]


async def in_process_list(nats: NatsClient, path: Path, **filters: str) -> list[str]:
    """Every run id the gateway's run index over ``path`` lists with ``filters`` once caught up."""
    async with trio.open_nursery() as nursery:
        index = await nursery.start(RunIndex(nats, path=path).run)
        assert index.rebuilt  # the file was missing or unreadable
        ids: list[str] = []
        before = None
        while True:
            page = await index.list_page(limit=200, filters=filters, before=before)
            ids += [i["run_id"] for i in page.items]
            if page.next_cursor is None:
                break
            before = decode_cursor(page.next_cursor)
        nursery.cancel_scope.cancel()
    return ids


async def _count(client: httpx.AsyncClient, n: int) -> bool:
    return (await client.get("/ready")).json()["run_index"]["runs"] >= n


async def test_two_gateways_list_the_same_runs(tmp_path: Path, nats_server: EmbeddedNats, nats: NatsClient, filled: list[RunSnapshot]) -> None:
    settings = Settings(read_model_path=None)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            urls = []
            for name in ("a", "b"):
                client_nats = await nursery.start(_nats_for, nats_server.url, name)
                host, port = await nursery.start(lambda task_status, n=client_nats: run_gateway(n, settings, port=0, task_status=task_status))
                urls.append(f"http://{host}:{port}")
            async with httpx.AsyncClient(base_url=urls[0]) as a, httpx.AsyncClient(base_url=urls[1]) as b:
                # a change while both follow: each applies it from the bucket
                more: list[RunSnapshot] = []
                await fill(nats, 50, first=300, progress=False, keep=more)
                for client in (a, b):
                    await wait_until(lambda c=client: _count(c, 350), what="both gateways to apply the new runs", timeout=30)
                for params in ({}, {"status": "CANCELLED"}, {"flow": "flow2", "tag": "t2"}, {"tenant_id": "tenant1"}):
                    assert await listed(a, params) == await listed(b, params)
                assert (await a.get("/runs", params={"limit": 50})).json() == (await b.get("/runs", params={"limit": 50})).json()
            nursery.cancel_scope.cancel()


async def _nats_for(url: str, name: str, *, task_status: trio.TaskStatus[NatsClient] = trio.TASK_STATUS_IGNORED) -> None:
    async with open_nats(url, name=name) as client:
        task_status.started(client)
        await trio.sleep_forever()


@pytest.mark.parametrize("build", [False, True])
def test_error_text_search_follows_updates_and_deletes(tmp_path: Path, build: bool) -> None:
    """The error text index (FTS5 trigram where available) stays true through changes, also
    for a file built with its indexes deferred."""
    from pyoco_es.readmodel import Change, Query, open_store

    store, _ = open_store(tmp_path / "rm.sqlite3")
    assert store.fts  # this SQLite has the trigram tokenizer; the LIKE fallback is the same query shape
    if build:
        store.drop_indexes()

    def doc(run_id: str, version: int, error: str | None) -> dict[str, Any]:
        return {"run_id": run_id, "status": "FAILED" if error else "PENDING", "updated_at": float(version), "version": version, "error": error}

    store.write([Change("a", doc("a", 1, "KeyError: 'alpha'"), 1), Change("b", doc("b", 1, "ValueError: beta"), 2),
                 Change("c", doc("c", 1, None), 3)], 3)
    if build:
        store.create_indexes()
    store.write([Change("a", doc("a", 2, "TimeoutError: gamma"), 4), Change("b", None, 5)], 5)

    def found(text: str) -> list[str]:
        return [i["run_id"] for i in store.page(Query(limit=10, error_contains=text))[0]]

    assert found("alpha") == [] and found("GAMMA") == ["a"] and found("beta") == [] and found("Error") == ["a"]
    store.write([Change("c", doc("c", 2, "OSError: delta"), 6)], 6)
    assert found("delta") == ["c"] and found("er") == ["c", "a"]  # 2 characters: the column scan
    store.close()



_change = st.tuples(st.integers(0, 2), st.sampled_from(["value", "note", "delete"]), st.integers(1, 6))


@settings(max_examples=150, deadline=None)
@given(st.lists(_change, max_size=4), st.lists(_change, max_size=14))
def test_a_coalesced_batch_leaves_the_file_as_the_whole_batch_does(before: list[Any], batch: list[Any]) -> None:
    """The run index's writer drops changes a later one makes moot (``coalesce``): the file ends
    row for row as if every change had been written, whatever mix of values, notes (this
    gateway's own writes, revision 0) and deletes, in whatever version order."""
    revision = 0

    def changes(specs: list[Any]) -> list[Change]:
        nonlocal revision
        out = []
        for run, kind, version in specs:
            revision += 1
            doc = {"run_id": f"run-{run}", "status": f"S{version}", "updated_at": float(version), "version": version}
            out.append(Change(f"run-{run}", None if kind == "delete" else doc, 0 if kind == "note" else revision))
        return out

    first, second = changes(before), changes(batch)
    rows = []
    for shrink in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            store, _ = open_store(Path(tmp) / "r.sqlite3", identity="x")
            store.write(first, revision)
            store.write(coalesce(second) if shrink else second, revision)
            rows.append(store._writer.execute("SELECT run_id, status, version, revision, summary FROM runs ORDER BY run_id").fetchall())
            store.close()
    assert rows[0] == rows[1]
    assert len(coalesce(second)) <= len(second)


def test_a_common_error_text_is_found_by_walking_the_newest_runs_and_the_index_answers_the_rest(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """An error text in many runs is searched newest first within a bounded walk (fast at a
    million runs); a common text found only in older runs, a rare one, a mixed-case one and one
    combined with a filter all give the same pages as a reference filtering every run."""
    from pyoco_es import readmodel
    from pyoco_es.readmodel import Query

    monkeypatch.setattr(readmodel, "WALK_ROWS", 2000)
    store, _ = open_store(tmp_path / "r.sqlite3", identity="x")
    docs = []
    for i in range(5000):
        error = ("Timeout in step %d" % i) if i >= 4000 and i % 2 else ("OldFailure %d" % i) if i < 1200 else ("rare %d" % i) if i % 97 == 0 else None
        docs.append({"run_id": f"r{i:05d}", "status": "FAILED" if error else "COMPLETED", "updated_at": float(i), "version": 2,
                     "flow_name": f"flow{i % 3}", "error": error})
    store.write([Change(d["run_id"], d, n + 1) for n, d in enumerate(docs)], len(docs))

    def reference(text: str, flow: str | None = None) -> list[str]:
        hits = [d for d in docs if d["error"] and text.lower() in d["error"].lower() and (flow is None or d["flow_name"] == flow)]
        return [d["run_id"] for d in sorted(hits, key=lambda d: d["updated_at"], reverse=True)][:50]

    cases = [("Timeout in", None), ("timeout IN step", None), ("OldFailure", None), ("rare 1", None), ("Timeout", "flow1"), ("OldFailure 11", "flow2")]
    for text, flow in cases:
        items, _, _ = store.page(Query(limit=50, error_contains=text, exact={"flow_name": flow} if flow else {}))
        assert [i["run_id"] for i in items] == reference(text, flow), (text, flow)
    with store._reader() as conn:  # the branches taken: a walk for the recent common text, the index for the old one
        assert store._common_text(conn, "Timeout in") and store._walk_for_text(conn, Query(limit=50, error_contains="Timeout in")) is not None
        assert store._common_text(conn, "OldFailure") and store._walk_for_text(conn, Query(limit=50, error_contains="OldFailure")) is None
        assert not store._common_text(conn, "rare 1")
    store.close()
