"""Several gateways on one NATS behave as one: idempotent retries land on the same run whichever
gateway answers, and writes through one are seen (lists, SSE) through the other.  Plus the
``pyoco-es gateway`` command: serves, and stops cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from pyoco_es.gateway.server import run_gateway
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats.client import open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from test_gateway_support import HTTPX_STREAM_WARNINGS, open_gateway, open_sse, wait_until

pytestmark = HTTPX_STREAM_WARNINGS


async def test_two_gateways_behave_as_one(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_gateway(tmp_path) as a:
            async with open_nats(a.stack.nats_url, name="gateway-b") as nats_b:
                host, port = await a.stack.nursery.start(
                    lambda task_status: run_gateway(nats_b, a.stack.settings, port=0, task_status=task_status)
                )
                async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as b:
                    body = {"flow_name": "twice", "params": {"n": 1}}
                    r1 = await a.client.post("/runs", json=body, headers={"Idempotency-Key": "lb-retry"})
                    r2 = await b.post("/runs", json=body, headers={"Idempotency-Key": "lb-retry"})
                    assert r1.status_code == r2.status_code == 200
                    run_id = r1.json()["run_id"]
                    assert r2.json()["run_id"] == run_id
                    # B reads A's write at once (fold on a KV miss), then lists it once projected
                    assert (await b.get(f"/runs/{run_id}")).json()["status"] == "PENDING"

                    async def listed_on_b() -> bool:
                        return any(i["run_id"] == run_id for i in (await b.get("/runs")).json())

                    await wait_until(listed_on_b, what="B's index to list A's run")
                    async with open_sse(b, f"/runs/{run_id}/watch") as sse:
                        assert (await sse.next()) is not None
                        assert (await a.client.post(f"/runs/{run_id}/cancel")).json()["status"] == "CANCELLED"
                        frames = await sse.rest()
                    assert frames[-1].event == "end" and frames[-1].data["status"] == "CANCELLED"
                a.stack.nursery.cancel_scope.cancel()


async def test_gateway_command_serves_and_stops_on_sigint(tmp_path: Path) -> None:
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.start()
    try:
        with trio.fail_after(30):
            cmd = [str(Path(sys.executable).parent / "pyoco-es"), "gateway", "--nats-url", server.url, "--port", "0"]
            env = {**os.environ, "PYOCO_LOAD_DOTENV": "0"}
            async with trio.open_nursery() as nursery:
                proc = await nursery.start(
                    lambda task_status: trio.run_process(cmd, **tied_to_this_process(env), stderr=subprocess.PIPE, check=False, task_status=task_status)
                )
                url = None
                buf = b""
                async for chunk in proc.stderr:
                    buf += chunk
                    if b"gateway on http://" in buf and buf.endswith(b"\n"):
                        url = buf.split(b"gateway on ", 1)[1].split()[0].decode().rstrip("/")
                        break
                assert url, buf.decode()
                async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                    assert (await client.get("/health")).json() == {"status": "ok"}
                    r = await client.post("/runs", json={"flow_name": "cli"})
                    assert r.status_code == 200
                proc.send_signal(signal.SIGINT)
                assert await proc.wait() == 0
    finally:
        server.stop()
