"""`pyoco-server up --with-worker` as a new user runs it: one process tree, a run completes,
Ctrl-C/SIGTERM stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_up_with_worker_runs_a_flow_and_stops_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")}
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pyoco_es.cli.main import server_main; server_main()",
             "--port", "0", "--data-dir", str(tmp_path / "data"), "--with-worker", "--allow-module", "examples"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )
    try:
        url = ""
        deadline = time.monotonic() + 30
        while not url and time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if "gateway on" in line:
                    url = line.split("gateway on ")[1].split()[0].rstrip("/")
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert url, log.read_text()
        flow = (ROOT / "examples" / "flow.yaml").read_bytes()
        r = httpx.post(f"{url}/runs/yaml", files={"workflow": ("flow.yaml", flow)}, data={"flow_name": "main", "tag": "default"})
        assert r.status_code == 200, r.text
        run_id = r.json()["run_id"]
        snap: dict[str, object] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snap = httpx.get(f"{url}/runs/{run_id}", params={"include": "records"}).json()
            if snap["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            time.sleep(0.02)
        assert snap["status"] == "COMPLETED", snap
        assert snap["task_records"]["to_text"]["output"] == "value=2"  # type: ignore[index]
        nats_pid = int((tmp_path / "data" / "nats" / "nats-server.pid").read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log.read_text()
        deadline = time.monotonic() + 10
        while _alive(nats_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(nats_pid)
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
