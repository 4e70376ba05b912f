"""A 3-node NATS cluster: ``pyoco-es dev-cluster`` starts and stops one, an R1 deployment moves to R3
by changing ``PYOCO_NATS_REPLICAS`` and restarting, and 2 gateways + 2 conductors + 3 workers on
the cluster behave as one system.  The fault cases are in test_cluster_faults.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from pyoco_es.config import Settings
from pyoco_es.nats.client import NatsClient
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.runtime import open_system_nats
from pyoco_es.testing.ledger import Ledger, Submitter, check, listed_runs, side_effect_flow

from conftest import ClusterSystem

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")} | {"PYOCO_LOAD_DOTENV": "0"}


async def _replicas(nats: NatsClient) -> dict[str, tuple[int, int]]:
    """Every stream in the account: (configured replicas, replicas current with the leader)."""
    out = {}
    for name in (await nats.jetstream_api("STREAM.NAMES"))["streams"]:
        info = await nats.jetstream_api(f"STREAM.INFO.{name}")
        cluster = info.get("cluster") or {}
        current = int(bool(cluster.get("leader"))) + sum(1 for r in cluster.get("replicas") or () if r.get("current"))
        out[name] = (info["config"]["num_replicas"], current)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


async def test_dev_cluster_runs_three_nodes_and_an_r1_deployment_moves_to_r3(tmp_path: Path) -> None:
    proc = subprocess.Popen([str(BIN / "pyoco-es"), "dev-cluster", "--dir", str(tmp_path / "c")], **tied_to_this_process(ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with trio.fail_after(60):
            line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert line.startswith("export PYOCO_NATS_URL="), (line, proc.stderr.read() if proc.poll() is not None else "")
        urls = line.strip().split("=", 1)[1]
        assert len(urls.split(",")) == 3
        with trio.fail_after(60):
            async with open_system_nats(Settings(nats_url=urls, nats_replicas=1), name="r1") as nats:
                before = await _replicas(nats)
                for i in range(20):
                    await nats.kv_put("pyoco_workers", f"w{i}", b'{"x":1}')
            assert {r for r, _ in before.values()} == {1} and "PYOCO_EVENTS" in before and "KV_pyoco_runs" in before, before
            # The operator changes the setting and restarts: every process heals resources at start.
            async with open_system_nats(Settings(nats_url=urls, nats_replicas=3), name="r3") as nats:

                async def all_r3() -> dict[str, tuple[int, int]] | None:
                    now = await _replicas(nats)
                    return now if all(v == (3, 3) for v in now.values()) else None

                while (after := await all_r3()) is None:
                    await trio.sleep(0.1)
                assert set(after) == set(before), (before, after)  # updated in place, nothing recreated
                assert {"PYOCO_EVENTS", "PYOCO_WORK", "PYOCO_DLQ", "KV_pyoco_runs", "KV_pyoco_workers", "KV_pyoco_auth"} <= set(after)
                assert (await nats.kv_get("pyoco_workers", "w19")) is not None  # the data moved along
            # A command started without PYOCO_NATS_REPLICAS (an operator's `pyoco-es replay` in a
            # shell) leaves R3 alone: it used to scale every stream down to R1.
            async with open_system_nats(Settings(nats_url=urls), name="unset") as nats:
                assert await _replicas(nats) == after
            replay = subprocess.run([str(BIN / "pyoco-es"), "replay", "--nats-url", urls], env=ENV, capture_output=True, text=True, timeout=60)
            assert replay.returncode == 0 and "config changed" not in replay.stderr, replay.stderr
        pids = [int(p) for p in re.findall(r"pid (\d+)", proc.stderr.readline() + "".join(proc.stderr.readline() for _ in range(3)))]
        assert len(pids) == 3 and all(_pid_alive(p) for p in pids), pids
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: proc.wait(timeout=30)) == 0
        assert not any(_pid_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes its pipes


def _watch_until_end(url: str, run_id: str) -> list[str]:
    """The SSE event names of ``/runs/{id}/watch`` through ``url`` until its ``end`` frame."""
    names: list[str] = []
    with httpx.stream("GET", f"{url}/runs/{run_id}/watch", timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event:"):
                names.append(line.split(":", 1)[1].strip())
                if names[-1] == "end":
                    return names
    raise AssertionError(f"the watch of {run_id} ended without an end frame: {names}")


def test_two_gateways_two_conductors_three_workers_behave_as_one(cluster_system: ClusterSystem) -> None:
    """Any gateway serves any run (get, list, watch, events); every run is claimed and executed
    once (two conductors project and dispatch without doubling anything); every worker takes work,
    w3 over its own connections."""
    fleet = cluster_system.fleet
    g1, g2 = fleet.members["g1"].url, fleet.members["g2"].url
    ledger = Ledger("scale", cluster_system.effects("scale"))
    watched_key = "scale-watched"
    ledger.flows[watched_key] = side_effect_flow(ledger.effects, watched_key, 1.0)
    with httpx.Client(timeout=15) as client:
        ledger.submit(client, g1, watched_key)
    assert watched_key in ledger.ok, ledger.refused or ledger.unknown
    assert _watch_until_end(g2, ledger.ok[watched_key])[-1] == "end"  # submitted through g1, watched on g2
    submitter = Submitter(ledger, fleet.gateways, rate=8.0, seconds=(0.3, 0.6))
    submitter.start()
    time.sleep(3.0)  # the load's duration (the scenario), not a wait for state
    submitter.stop()
    figures = check(ledger, fleet.gateways, cluster_system.cluster.urls, settle=30, case="scale-out")
    assert figures.ok >= 15 and not ledger.refused, figures
    assert figures.attempts == figures.ok == figures.executions and figures.re_executed == 0, figures
    assert set(figures.claims_by_worker) == {"w1", "w2", "w3"}, figures.claims_by_worker
    with httpx.Client(timeout=15) as client:
        for rid in list(ledger.ok.values())[:10]:
            # The same stored run; the worker_* liveness fields are each gateway's own live view.
            a, b = ({k: v for k, v in client.get(f"{g}/runs/{rid}").json().items() if k == "worker_id" or not k.startswith("worker_")}
                    for g in (g1, g2))  # fmt: skip
            assert a == b and a["status"] == "COMPLETED", (a, b)
            ea, eb = client.get(f"{g1}/runs/{rid}/events").json(), client.get(f"{g2}/runs/{rid}/events").json()
            assert ea == eb
        assert listed_runs(client, g1, "scale") == listed_runs(client, g2, "scale") == set(ledger.ok.values())
    assert not fleet.tracebacks(), fleet.tracebacks()
