"""pyoco-server 0.5.1's own worker pointed at pyoco-es's NATS fails at start instead of running our
work (issue 15).

pyoco-server's worker binds the per-tag work consumer ``pyoco_workers_<tag>`` on ``PYOCO_WORK``
(creating it if missing) and writes run snapshots into ``pyoco_runs`` itself.  Our consumers are
named ``pyoco_es_work_<tag>``; on a work-queue stream two consumers cannot share a filter, so its
bind is refused by JetStream and it exits with the error.  Resource healing deletes consumers of
its name (left by an older pyoco-es, or made by such a worker on a tag none of ours served yet).

The worker runs from its scratch venv (``test_apikey.upstream_python``), through the small
``asyncio.wait_for`` shim it needs on Python 3.11 (reference/pyoco-server-measured.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import trio

from pyoco_es.config import Settings
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient
from pyoco_es.nats.resources import ensure_resources
from pyoco_es.testing.fleet import watched_python
from pyoco_es.testing.upstream import WORKER_SHIM as SHIM
from pyoco_es.worker.supervisor import consumer_config

from test_apikey import upstream_python
from test_gateway_support import open_gateway, wait_until



def _upstream_worker(tag: str, *extra: str) -> list[str]:
    return watched_python(str(upstream_python()), "-c", SHIM, "--tags", tag, "--worker-id", "upstream-w", *extra)


def _env(nats_url: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")} | {"PYOCO_LOAD_DOTENV": "0", "PYOCO_NATS_URL": nats_url}


async def _run_upstream_worker(nats_url: str, tag: str, cwd: Path, *, once: bool = True) -> trio.CompletedProcess[bytes]:
    """Run it to its end (with ``once``: one poll of 1 s, then exit 0 if nothing stopped it)."""
    with trio.fail_after(60):
        return await trio.run_process(
            _upstream_worker(tag, "--poll-timeout", "1", "--run-once") if once else _upstream_worker(tag, "--poll-timeout", "0.2"),
            cwd=cwd, **tied_to_this_process(_env(nats_url)), capture_stdout=True, capture_stderr=True, check=False,
        )


async def _consumers(nats: NatsClient) -> set[str]:
    async def go() -> set[str]:
        return {c.name for c in await nats.js.consumers_info(subjects.WORK_STREAM)}

    return await nats.run("list consumers", go)


async def test_upstream_worker_fails_at_start_and_leaves_our_run_alone(tmp_path: Path) -> None:
    settings = Settings(sse_heartbeat_interval=0.2, nats_unavailable_wait=1.0)
    async with open_gateway(tmp_path, settings=settings) as g:
        # no pyoco-es worker has served "shared": the gateway made our consumer before the item
        r = await g.client.post("/runs", json={"flow_name": "hello", "tag": "shared"})
        assert r.status_code == 200, r.text
        run_id = r.json()["run_id"]
        work_subject = subjects.work_subject("shared")

        async def waiting() -> bool:
            return (run_id, 1) in await g.nats.work_items(work_subject)

        await wait_until(waiting, what="the run's work item")
        before = (await g.client.get(f"/runs/{run_id}")).json()

        done = await _run_upstream_worker(g.stack.nats_url, "shared", tmp_path)
        err = done.stderr.decode(errors="replace")
        assert done.returncode != 0, (done.stdout, err)  # with --run-once it would take the item and exit 0
        assert "consumer" in err and "not unique" in err, err  # JetStream's refusal, visible

        # our run: untouched (still PENDING, no upstream snapshot fields, the same history) ...
        after = (await g.client.get(f"/runs/{run_id}")).json()
        assert after["status"] == "PENDING" and after["version"] == before["version"]
        entry = await g.nats.kv_get(subjects.RUNS_BUCKET, run_id)
        assert entry is not None and json.loads(entry.value)["status"] == "PENDING"
        events = (await g.client.get(f"/runs/{run_id}/events")).json()["events"]
        assert all(e["producer"]["kind"] != "worker" for e in events), events
        # ... and its work item still waits for a pyoco-es worker
        assert await waiting()
        assert await _consumers(g.nats) == {subjects.work_durable("shared")}


async def test_healing_deletes_pyoco_servers_consumer_name(nats: NatsClient) -> None:
    """Upgrade path: the per-tag consumer an older pyoco-es made (pyoco-server's name) is deleted by
    resource healing, after which our worker's consumer takes the tag's filter."""
    settings = Settings()
    await nats.ensure_pull_consumer(subjects.WORK_STREAM, "pyoco_workers_legacy", consumer_config("legacy", settings))
    done = await ensure_resources(nats)
    assert "deleted consumer pyoco_workers_legacy" in done
    await nats.ensure_pull_consumer(subjects.WORK_STREAM, subjects.work_durable("legacy"), consumer_config("legacy", settings))
    assert await _consumers(nats) == {"pyoco_es_work_legacy"}
    assert "deleted consumer" not in " ".join(await ensure_resources(nats))  # ours stays


async def test_upstream_worker_first_on_an_idle_tag_is_stopped_by_the_conductor(tmp_path: Path) -> None:
    """pyoco-server's worker started on a tag that has no consumer yet creates one; the conductor
    deletes it at once (consumer-created advisory) and the worker dies on its next fetch (exit 1,
    the error on stderr).  A run then submitted for the tag waits for a pyoco-es worker."""
    async with open_gateway(tmp_path) as g:
        done = await _run_upstream_worker(g.stack.nats_url, "fresh", tmp_path, once=False)  # it serves until it fails
        assert done.returncode == 1 and b"Error" in done.stderr, done.stderr
        r = await g.client.post("/runs", json={"flow_name": "hello", "tag": "fresh"})
        assert r.status_code == 200, r.text
        run_id = r.json()["run_id"]

        async def waiting() -> bool:
            return (run_id, 1) in await g.nats.work_items(subjects.work_subject("fresh"))

        await wait_until(waiting, what="the run's work item")
        assert await _consumers(g.nats) == {"pyoco_es_work_fresh"}
        assert (await g.client.get(f"/runs/{run_id}")).json()["status"] == "PENDING"
