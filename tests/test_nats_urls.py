"""``PYOCO_NATS_URL`` as a comma-separated list of servers (a cluster's nodes), everywhere a
process connects: the parser, the client, and the commands (``up`` must not start an embedded
server for it, the worker ``up`` starts gets the whole list, the admin tool and ``events`` use it).

Here the list is one live server plus a port nobody listens on, so failing over is exercised
without a cluster (the cluster suite uses the real thing)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats.client import open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.resources import ensure_resources
from pyoco_es.nats.urls import NatsUrlError, split_nats_urls

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")} | {"PYOCO_LOAD_DOTENV": "0"}


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"nats://127.0.0.1:{port}"  # closed: connections are refused


def test_split_nats_urls_accepts_lists_and_names_a_bad_item() -> None:
    assert split_nats_urls("nats://a:1,nats://b:2, nats://c:3 ") == ["nats://a:1", "nats://b:2", "nats://c:3"]
    assert split_nats_urls("nats://a:1") == ["nats://a:1"]
    assert split_nats_urls("a:5,tls://b,") == ["nats://a:5", "tls://b:4222"]
    assert split_nats_urls("nats://u:p@a:1") == ["nats://u:p@a:1"]
    for bad, named in (("", "no NATS server URL"), (" , ", "no NATS server URL"), ("nats://a:1,http://b:2", "'http://b:2'"),
                       ("nats://a:notaport", "'nats://a:notaport'"), ("nats://a:1/path", "'nats://a:1/path'"),
                       ("nats://:4222", "no host"), ("nats://a:1,ws://b:2", "mix websocket")):  # fmt: skip
        with pytest.raises(NatsUrlError, match=named):
            split_nats_urls(bad)


async def test_a_client_fails_over_to_the_live_server_of_a_list(nats_server: EmbeddedNats) -> None:
    urls = f"{_dead_url()},{nats_server.url}"
    for _ in range(3):  # nats-py shuffles the list: the dead one is tried first some of the time
        async with open_nats(urls, name="multi") as nats:
            assert nats.is_connected and nats.url == urls
            assert "created PYOCO_EVENTS" in await ensure_resources(nats) or _ > 0


def test_up_worker_admin_and_events_take_a_list_and_start_no_embedded_server(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    urls = f"{_dead_url()},{nats_server.url}"
    env = ENV | {"PYOCO_NATS_URL": urls}
    data = tmp_path / "data"
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([str(BIN / "pyoco-server"), "up", "--port", "0", "--data-dir", str(data), "--with-worker",
                               "--allow-module", "examples"], cwd=ROOT, **tied_to_this_process(env), stdout=subprocess.DEVNULL, stderr=out)  # fmt: skip
    try:
        url = ""
        deadline = time.monotonic() + 60
        while not url:
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            url = next((line.split("gateway on ")[1].split()[0].rstrip("/") for line in log.read_text().splitlines() if "gateway on" in line), "")
            time.sleep(0.05)
        flow = (ROOT / "examples" / "flow.yaml").read_bytes()
        r = httpx.post(f"{url}/runs/yaml", files={"workflow": ("flow.yaml", flow)}, data={"flow_name": "main", "tag": "default"})
        assert r.status_code == 200, r.text
        run_id = r.json()["run_id"]
        deadline = time.monotonic() + 30
        while (status := httpx.get(f"{url}/runs/{run_id}").json()["status"]) not in ("COMPLETED", "FAILED"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status == "COMPLETED"  # the worker `up` started reached NATS through the list
        assert not (data / "nats").exists()  # no embedded server was started
        events = subprocess.run([str(BIN / "pyoco-es"), "events", run_id, "--data-dir", str(data)], env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert events.returncode == 0 and "run.completed" in events.stdout, events.stderr
        admin = subprocess.run([str(BIN / "pyoco-server-admin"), "api-key", "list"], env=env, capture_output=True, text=True, timeout=60)
        assert admin.returncode == 0, admin.stderr
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=40) == 0, log.read_text()
        assert "invalid connect url" not in log.read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    bad = subprocess.run([str(BIN / "pyoco-es"), "conductor", "--nats-url", "nats://a:1,http://b:2", "--data-dir", str(tmp_path / "d2")],
                         env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 1 and "bad NATS server URL 'http://b:2'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "d2" / "nats").exists()
