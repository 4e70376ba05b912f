"""Retention with an audit archive (issue 18): old terminal runs are written to a hash-chained
archive, recorded, then removed from the stream, the bucket and the gateway's list; the archive
round-trips each history exactly, a tampered line is detected, and the run answers 410."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from pyoco_es import archive
from pyoco_es.config import Settings
from pyoco_es.conductor.retention import PurgeDenied, archive_runs
from pyoco_es.core.codec import envelope_to_json
from pyoco_es.core.model import RunSnapshot
from pyoco_es.gateway.server import run_gateway
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient, open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.resources import ResourceConfig, ensure_resources
from pyoco_es.service import RunStore
from pyoco_es.testing.history import fill
from test_gateway_support import wait_until

PYOCO_ES = str(Path(sys.executable).parent / "pyoco-es")
DAY = 86400.0


@pytest.fixture
async def purgeable(nats_server: EmbeddedNats) -> NatsClient:  # type: ignore[misc]
    async with open_nats(nats_server.url, name="test") as client:
        await ensure_resources(client, ResourceConfig(allow_event_purge=True))
        yield client


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYOCO_ES, *args], capture_output=True, text=True, env={**os.environ, "PYOCO_LOAD_DOTENV": "0"}, timeout=60)


async def test_old_runs_are_archived_then_removed_and_answer_410(
    tmp_path: Path, nats_server: EmbeddedNats, purgeable: NatsClient
) -> None:
    nats = purgeable
    old: list[RunSnapshot] = []
    new: list[RunSnapshot] = []
    now = time.time()
    await fill(nats, 30, base=now - 40 * DAY, progress=False, keep=old)  # ended ~40 days ago
    await fill(nats, 10, first=30, base=now - 3600, progress=False, keep=new)
    histories = {s.run_id: [envelope_to_json(e) for e in await RunStore(nats).history(s.run_id)] for s in old}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(lambda task_status: run_gateway(nats, Settings(), port=0, task_status=task_status))
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
                await wait_until(lambda: _listed(client, 40), what="the gateway to list every run")
                report = await archive_runs(nats, older_than=30 * DAY, directory=tmp_path / "archive", now=now)
                assert report.archived == 30 and report.files
                # gone from the list (the bucket's purge reached the read model), the stream and the bucket
                await wait_until(lambda: _listed(client, 10), what="archived runs to leave the list")
                listed = {i["run_id"] for i in (await client.get("/runs", params={"limit": 200})).json()}
                assert listed == {s.run_id for s in new}
                gone = old[0].run_id
                r = await client.get(f"/runs/{gone}")
                assert r.status_code == 410 and any(f in r.json()["detail"] for f in report.files), r.text
                # an id that is no subject token is a 404, and the gateway keeps serving (test_fuzz_api caught a lookup of one)
                assert (await client.get("/runs/bad%20id.>")).status_code == 404
                assert (await client.get(f"/runs/{new[0].run_id}")).status_code == 200
                assert (await client.get("/runs/00000000000000000000000000000000")).status_code == 404
            nursery.cancel_scope.cancel()
    assert await RunStore(nats).history(gone) == []
    assert await nats.kv_get(subjects.RUNS_BUCKET, gone) is None
    audit = await nats.read_events(subjects.RUN_ARCHIVED_SUBJECT, after_stream_seq=0)
    records = {json.loads(raw)["run_id"]: json.loads(raw) for _, raw in audit}
    assert set(records) == set(histories)
    # every history round-trips exactly, and each chain's head is the one the audit event recorded
    files = [tmp_path / "archive" / f for f in report.files]
    heads: dict[str, str] = {}
    for path in files:
        checked = archive.verify(path)
        assert checked.ok, checked.problems
        heads.update(checked.runs)
        for run_id in checked.runs:
            events, _ = archive.read_run(path, run_id)
            assert [{k: v for k, v in e.items() if k != "stream_seq"} for e in events] == json.loads(json.dumps(histories[run_id]))
    assert heads == {r: rec["head"] for r, rec in records.items()}
    # a second pass finds nothing left to archive
    again = await archive_runs(nats, older_than=30 * DAY, directory=tmp_path / "archive", now=now)
    assert again.archived == 0 and again.skipped == 0
    # the CLI: verify, and events --archive prints the history
    assert cli("archive", "verify", str(files[0])).returncode == 0
    run_in_file = next(iter(archive.verify(files[0]).runs))
    out = cli("events", "--archive", str(files[0]), "--output", "json", run_in_file)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["type"] for line in out.stdout.splitlines()] == [e["type"] for e in histories[run_in_file]]


async def _listed(client: httpx.AsyncClient, n: int) -> bool:
    return len((await client.get("/runs", params={"limit": 200})).json()) == n


def _rewrite(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    with gzip.open(path, "wt") as f:
        f.write("".join(line + "\n" for line in change(lines)))


@pytest.mark.parametrize("tamper", ["change", "drop_middle", "drop_last_event", "drop_end", "swap"])
def test_a_tampered_archive_is_detected(tmp_path: Path, tamper: str) -> None:
    events = [{"type": "run.submitted", "seq": 1, "data": {"x": 1}}, {"type": "run.claimed", "seq": 2, "data": {}},
              {"type": "run.completed", "seq": 3, "data": {}}]
    path = tmp_path / "a.jsonl.gz"
    archive.append(path, archive.run_lines("r1", events)[0])
    archive.append(path, archive.run_lines("r2", events[:2])[0])  # a second gzip member
    clean = archive.verify(path)
    assert clean.ok and set(clean.runs) == {"r1", "r2"}
    changes = {
        "change": lambda ls: [ls[0].replace('"x":1', '"x":2'), *ls[1:]],
        "drop_middle": lambda ls: [ls[0], *ls[2:]],
        "drop_last_event": lambda ls: [*ls[:2], *ls[3:]],
        "drop_end": lambda ls: [*ls[:3], *ls[4:]],
        "swap": lambda ls: [ls[1], ls[0], *ls[2:]],
    }
    _rewrite(path, changes[tamper])
    checked = archive.verify(path)
    assert not checked.ok and "r1" not in checked.runs and "r2" in checked.runs, checked
    if tamper == "change":  # the CLI says so too, and refuses to print the run
        assert cli("archive", "verify", str(path)).returncode == 1
        assert cli("events", "--archive", str(path), "r1").returncode == 1


async def test_a_stream_that_denies_purge_is_refused_before_anything_is_written(tmp_path: Path, nats: NatsClient) -> None:
    await fill(nats, 3, base=time.time() - 40 * DAY, progress=False)
    with pytest.raises(PurgeDenied, match="deny_purge"):
        await archive_runs(nats, older_than=DAY, directory=tmp_path / "archive", now=time.time())
    assert not (tmp_path / "archive").exists()
    assert len(await nats.kv_keys(subjects.RUNS_BUCKET)) == 3


async def test_the_conductor_applies_PYOCO_RUN_RETENTION_DAYS(tmp_path: Path, purgeable: NatsClient) -> None:
    from pyoco_es.conductor.service import run_conductor

    nats = purgeable
    now = time.time()
    await fill(nats, 12, base=now - 40 * DAY, progress=False)
    young: list[RunSnapshot] = []
    await fill(nats, 3, first=12, base=now - 3600, progress=False, keep=young)
    settings = Settings(run_retention_days=30, run_retention_interval=3600, archive_dir=tmp_path / "arch", events_allow_purge=True)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_conductor, nats, settings)

            async def only_young_left() -> bool:
                return sorted(await nats.kv_keys(subjects.RUNS_BUCKET)) == sorted(s.run_id for s in young)

            await wait_until(only_young_left, what="the conductor's retention pass", timeout=50)
            nursery.cancel_scope.cancel()
    files = list((tmp_path / "arch").iterdir())
    assert files and sum(len(archive.verify(f).runs) for f in files) == 12
