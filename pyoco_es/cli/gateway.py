"""``pyoco-es gateway``: the HTTP gateway alone (several behind a load balancer act as one)."""

from __future__ import annotations

from pathlib import Path

import asyncclick as click
import trio

from ..core.errors import PyocoError
from ..nats.client import NatsClient
from ..runtime import configure_logging, serve_until_stopped
from .options import DATA_DIR, LOG_LEVEL, NATS_SYNC, NATS_URL, fail, first_error, settings_with


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int, help="HTTP port (0 = random).")
@NATS_URL
@DATA_DIR
@NATS_SYNC
@click.option("--dashboard-lang", type=click.Choice(["auto", "ja", "en"]), default=None, help="Dashboard language (PYOCO_DASHBOARD_LANG).")
@LOG_LEVEL
async def gateway(
    host: str, port: int, nats_url: str | None, data_dir: Path, nats_sync: str, dashboard_lang: str | None, log_level: str | None
) -> None:
    """Run the HTTP gateway alone, against a NATS that a conductor also uses.

    Every gateway keeps its own list read model (a SQLite file: PYOCO_READ_MODEL_PATH, default
    DATA_DIR/read-model/gateway-PORT.sqlite3) fed by the runs KV, and all writes are appends
    fenced by optimistic concurrency, so any number of gateways behave as one.

    \b
    Example:
      pyoco-es gateway --nats-url nats://nats-1:4222 --host 0.0.0.0 --port 8000
    """
    settings = settings_with(nats_url=nats_url, data_dir=data_dir, nats_sync=nats_sync, dashboard_lang=dashboard_lang)
    configure_logging(settings, log_level, service="pyoco-server:http")
    from ..gateway.server import run_gateway

    async def start(nats: NatsClient, nursery: trio.Nursery) -> str:
        bound = await nursery.start(lambda task_status: run_gateway(nats, settings, host=host, port=port, task_status=task_status))
        return f"pyoco-es gateway on http://{bound[0]}:{bound[1]}/ (Ctrl-C to stop)"

    try:
        await serve_until_stopped(settings, name="pyoco-gateway", start=start)
    except* PyocoError as group:
        fail(first_error(group).message, hint="pyoco-es gateway --help")  # type: ignore[attr-defined]
