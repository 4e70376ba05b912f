"""``pyoco-es dev-cluster``: a 3-node NATS cluster on this machine for trying a clustered setup."""

from __future__ import annotations

from pathlib import Path

import asyncclick as click
import trio

from ..core.errors import PyocoError
from ..nats.cluster import NatsCluster
from ..runtime import wait_for_stop_signal
from .options import fail


@click.command("dev-cluster")
@click.option("--dir", "root", default=".pyoco-es-cluster", show_default=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the nodes' stores and logs (DIR/n1, DIR/n2, ...); kept between starts.")  # fmt: skip
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 9), help="How many nats-server nodes.")
@click.option("--sync", type=click.Choice(["1s", "always", "default"]), default="1s", show_default=True,
              help="The nodes' sync_interval: always = fsync before every ack (what a production cluster should use).")  # fmt: skip
async def dev_cluster(root: Path, nodes: int, sync: str) -> None:
    """Run NATS nodes on loopback (free ports), routed to each other with JetStream, until
    Ctrl-C/SIGTERM stops them all.  Prints the PYOCO_NATS_URL to point every process at.

    For trying things out on one machine; a production cluster runs one node per machine
    (docs/operator-guide.md, "A NATS cluster").

    \b
    Example:
      pyoco-es dev-cluster --dir /tmp/c
      export PYOCO_NATS_URL=...   # as printed
      export PYOCO_NATS_REPLICAS=3
      pyoco-server up --with-worker --allow-module examples
    """
    cluster = NatsCluster(root=root.resolve(), size=nodes, sync=sync)
    try:
        await trio.to_thread.run_sync(cluster.start)
    except PyocoError as exc:
        fail(exc.message, hint="pyoco-es dev-cluster --help")
    try:
        click.echo(f"NATS cluster of {nodes} node(s) (sync {sync}, stores under {cluster.root}):", err=True)
        for node in cluster.nodes:
            click.echo(f"  {node.name}  {node.url}  monitoring {node.monitor_url}  pid {node.pid}", err=True)
        click.echo(f"export PYOCO_NATS_URL={cluster.urls}")
        click.echo(f"export PYOCO_NATS_REPLICAS={min(nodes, 3)}")
        click.echo("(Ctrl-C stops every node)", err=True)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(wait_for_stop_signal, stop)
            await stop.wait()
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(cluster.stop)
    click.echo("cluster stopped", err=True)
