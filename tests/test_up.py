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


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().split(")")[-1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _start_up(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``pyoco-server up --with-worker --allow-module examples`` as the README starts it (plus a
    random port and a private data dir); returns the process, the gateway URL and the log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")}
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pyoco_es.cli.main import server_main; server_main()",
             "up", "--port", "0", "--data-dir", str(tmp_path / "data"), "--with-worker", "--allow-module", "examples"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )
    url = ""
    deadline = time.monotonic() + 30
    while not url and time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if "gateway on" in line:
                url = line.split("gateway on ")[1].split()[0].rstrip("/")
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if not url:
        proc.kill()
        proc.wait()
        raise AssertionError(log.read_text())
    return proc, url, log


def _run_example(url: str) -> dict[str, object]:
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
    return snap


def test_up_with_worker_runs_a_flow_and_stops_cleanly(tmp_path: Path) -> None:
    proc, url, log = _start_up(tmp_path)
    try:
        snap = _run_example(url)
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


def test_up_with_worker_outlives_trio_thread_reaping(tmp_path: Path) -> None:
    """Issue 11 #1: the README's command stays up idle past Trio's 10 s idle-thread reaping (the
    worker's parent-death signal used to belong to a retired helper thread: SIGTERM at ~10-12 s),
    then still completes a run with the same worker process."""
    proc, url, log = _start_up(tmp_path)
    try:
        [worker] = [p for p in _children(proc.pid) if b"\0worker\0" in Path(f"/proc/{p}/cmdline").read_bytes()]
        until = time.monotonic() + 13.0  # longer than the 10 s thread reaping plus a margin
        while time.monotonic() < until:
            assert proc.poll() is None and _alive(worker), log.read_text()
            time.sleep(0.25)
        snap = _run_example(url)
        assert snap["status"] == "COMPLETED", snap
        assert _alive(worker) and "received SIGTERM" not in log.read_text(), log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=40)


def test_sigkilled_up_takes_its_worker_and_nats_with_it(tmp_path: Path) -> None:
    """Issue 11 #1: ``up`` is SIGKILLed while its worker runs a task: within 2 s the worker, the
    run's process and the nats-server are all gone (the worker watches a pipe from its parent and
    exits at once, nothing to drain with NATS gone; the run process follows its closed command
    pipe; nats-server's parent-death signal is armed from a thread that lives as long as ``up``).
    The old worker drained for up to its drain timeout instead."""
    proc, url, log = _start_up(tmp_path)
    children = _children(proc.pid)
    nats_pid = int((tmp_path / "data" / "nats" / "nats-server.pid").read_text())
    [worker] = [p for p in children if p != nats_pid]
    never = tmp_path / "never"
    flow = (
        "version: 1\nflow:\n  graph: hold\ntasks:\n"
        f'  hold: {{callable: "examples.tasks:wait_for_file", inputs: {{path: "{never}", seconds: 60}}}}\n'
    ).encode()
    r = httpx.post(f"{url}/runs/yaml", files={"workflow": ("flow.yaml", flow)}, data={"flow_name": "main", "tag": "default"})
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/runs/{run_id}").json()["status"] != "RUNNING":
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    doomed = [nats_pid, worker, *_children(worker)]
    assert len(doomed) >= 3, doomed  # the run's process is the worker's child
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 2.0
    while any(_alive(p) for p in doomed) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [p for p in doomed if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"still running 2 s after up was SIGKILLed: {left} of {doomed}"
