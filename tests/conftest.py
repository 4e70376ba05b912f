"""Shared fixtures: a real nats-server per test (random loopback ports, temp store dir)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest

from pyoco_es.nats.cluster import NatsCluster
from pyoco_es.testing.faults import CuttableProxy
from pyoco_es.testing.fleet import Fleet
from pyoco_es.nats.client import NatsClient, open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.resources import ensure_resources


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A private nats-server with JetStream; ~40 ms to start, so every test gets its own."""
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nats(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    """A connected client with pyoco-es's streams and buckets created."""
    async with open_nats(nats_server.url, name="test") as client:
        await ensure_resources(client)
        yield client


# -- the cluster suites (test_cluster.py, test_cluster_faults.py) ---------------------------------

ROOT = Path(__file__).resolve().parent.parent
# Timers shortened so faults resolve in seconds (the lease still outlasts every NATS election).
CLUSTER_ENV = {
    "PYOCO_NATS_REPLICAS": "3",
    "PYOCO_RUN_LEASE_SEC": "4",
    "PYOCO_WORKER_HEARTBEAT_INTERVAL_SEC": "0.5",
    "PYOCO_WORKER_DISCONNECT_TIMEOUT_SEC": "4",
    "PYOCO_CONSUMER_ACK_WAIT_SEC": "5",
    "PYOCO_ACK_PROGRESS_INTERVAL_SEC": "1",
    "PYOCO_RECONCILE_INTERVAL_SEC": "2",
    "PYOCO_CANCEL_GRACE_PERIOD_SEC": "5",
}
CLUSTER_TAGS = ("scale", "c1", "c2", "c3", "c4", "c5", "c6", "c7")


@attrs.frozen
class ClusterSystem:
    """3 nats-server nodes (R3, ``sync_interval: always``) and 2 gateways (g1, g2), 2 conductors
    (c1, c2), 3 workers (w1, w2 on the node list; w3 through one cuttable proxy per node)."""

    cluster: NatsCluster
    fleet: Fleet
    proxies: tuple[CuttableProxy, ...]
    root: Path

    def effects(self, case: str) -> Path:
        return self.root / f"effects-{case}.txt"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The cluster fault suite's ledger figures, one line per case, after every run that had them."""
    from pyoco_es.testing.ledger import RECORDED

    if RECORDED:
        terminalreporter.section("cluster ledgers")
        for line in RECORDED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def cluster_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSystem]:
    root = tmp_path_factory.mktemp("cluster")
    cluster = NatsCluster(root=root / "nodes", sync="always", advertise=False)
    cluster.start()
    proxies = tuple(CuttableProxy(n.host, n.client_port) for n in cluster.nodes)
    fleet = Fleet(cluster.urls, root / "logs", ROOT, CLUSTER_ENV)
    try:
        worker_args = ["--tags", ",".join(CLUSTER_TAGS), "--concurrency", "4", "--allow-module", "tests.tasks"]
        for name in ("c1", "c2"):
            fleet.add("conductor", name)
        for name in ("g1", "g2"):
            fleet.add("gateway", name)
        fleet.add("worker", "w1", worker_args)
        fleet.add("worker", "w2", worker_args)
        w3_args = ["--tags", ",".join((*CLUSTER_TAGS, "w3only")), *worker_args[2:]]
        fleet.add("worker", "w3", w3_args, nats_url=",".join(p.url for p in proxies))
        yield ClusterSystem(cluster, fleet, proxies, root)
    finally:
        for p in proxies:
            p.heal()
        fleet.stop()
        for p in proxies:
            p.close()
        cluster.stop()
