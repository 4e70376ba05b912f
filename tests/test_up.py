"""`pyoco-server up --with-worker` as a new user runs it: one process tree, a run completes,
Ctrl-C/SIGTERM stops everything."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyoco_es.lifeline import tied_to_this_process

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_") and k != "PYTHONPATH"}
# The console scripts, as the README runs them (``python -c`` would put the current directory on
# sys.path and hide what a newcomer meets).
BIN = Path(sys.executable).parent
SERVER = [str(BIN / "pyoco-server")]
PYOCO_ES = [str(BIN / "pyoco-es")]


def _project(tmp_path: Path) -> Path:
    """A newcomer's project root: a copy of examples/ and nothing on PYTHONPATH."""
    root = tmp_path / "project"
    shutil.copytree(ROOT / "examples", root / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _start_up(log: Path, *args: str, cwd: Path = ROOT) -> tuple[subprocess.Popen[bytes], str]:
    """``pyoco-server ARGS`` with stderr in ``log``; returns the process and its gateway URL."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([*SERVER, "--port", "0", *args], cwd=cwd, **tied_to_this_process(ENV), stdout=subprocess.DEVNULL, stderr=out)
    url = ""
    deadline = time.monotonic() + 60
    while not url and time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if "gateway on" in line:
                url = line.split("gateway on ")[1].split()[0].rstrip("/")
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    assert url, log.read_text()
    return proc, url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_up_with_worker_runs_a_flow_and_stops_cleanly(tmp_path: Path) -> None:
    """From a project root, as the README says: the example resolver in module form (no
    PYTHONPATH), a YAML run and a named run complete, and no ./artifacts is left behind."""
    log = tmp_path / "up.log"
    project = _project(tmp_path)
    proc, url = _start_up(log, "--data-dir", str(tmp_path / "data"), "--with-worker", "--allow-module", "examples",
                          "--worker-flow-resolver", "examples.flows:resolve", cwd=project)  # fmt: skip
    try:
        named = httpx.post(f"{url}/runs", json={"flow_name": "hello", "params": {"x": 4}})
        assert named.status_code == 200, named.text
        flow = (ROOT / "examples" / "flow.yaml").read_bytes()
        r = httpx.post(f"{url}/runs/yaml", files={"workflow": ("flow.yaml", flow)}, data={"flow_name": "main", "tag": "default"})
        assert r.status_code == 200, r.text
        snap = _wait_terminal(url, r.json()["run_id"])
        assert snap["status"] == "COMPLETED", snap
        assert snap["task_records"]["to_text"]["output"] == "value=2"  # type: ignore[index]
        # Not "submitted first, so ended first": four run processes take runs in any order.
        hello = _wait_terminal(url, named.json()["run_id"])
        assert hello["status"] == "COMPLETED", hello
        assert hello["task_records"]["to_text"]["output"] == "value=5"
        nats_pid = int((tmp_path / "data" / "nats" / "nats-server.pid").read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log.read_text()
        deadline = time.monotonic() + 10
        while _alive(nats_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(nats_pid)
        assert "Traceback" not in log.read_text()
        assert sorted(p.name for p in project.iterdir()) == ["examples"]  # no ./artifacts
    finally:
        _stop(proc)


def test_a_file_path_resolver_in_a_package_loads(tmp_path: Path) -> None:
    """``examples/flows.py:resolve`` is a module of a package with a relative import (``from .
    import tasks``): the child loads it as ``examples.flows``, from its own scratch directory."""
    project = _project(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spec = f"{project / 'examples' / 'flows.py'}:resolve"
    code = f"from pyoco_es.worker.child import load_resolver; print(load_resolver({spec!r})('hello').name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "hello", out.stderr


def test_up_names_the_flag_the_user_typed(tmp_path: Path) -> None:
    for spec, reason in (("no_such_module:resolve", "cannot find module 'no_such_module'"),
                         ("examples/nope.py:resolve", "file not found"), ("resolve", "expected 'module:function'")):  # fmt: skip
        out = subprocess.run([*SERVER, "--port", "0", "--data-dir", str(tmp_path / "d"), "--with-worker", "--worker-flow-resolver", spec],
                             cwd=_project(tmp_path / spec.replace("/", "_")), env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 1, out.stderr
        assert out.stderr.startswith(f"ERR-PYOCO-0018: --worker-flow-resolver: {reason}"), out.stderr
        assert "Usage:" not in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "d").exists()  # refused before anything started
    help_text = subprocess.run([*SERVER, "up", "--help"], env=ENV, capture_output=True, text=True, timeout=60).stdout
    assert "child process" in help_text and "in this process" not in help_text


def test_one_data_dir_one_nats_server(tmp_path: Path) -> None:
    """While `up` runs, `events` and `replay` use its server (no second nats-server on the store,
    no scratch bucket left behind), and a second `up` on the same data dir is refused."""
    data = tmp_path / "data"
    proc, url = _start_up(tmp_path / "up.log", "--data-dir", str(data))
    try:
        run_id = httpx.post(f"{url}/runs", json={"flow_name": "hello"}).json()["run_id"]
        events = subprocess.run([*PYOCO_ES, "events", run_id, "--data-dir", str(data), "--output", "json"],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert events.returncode == 0, events.stderr
        assert json.loads(events.stdout.splitlines()[0])["type"] == "run.submitted"
        replay = subprocess.run([*PYOCO_ES, "replay", "--data-dir", str(data)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
        assert replay.returncode in (0, 1), replay.stderr  # 1: the projector had not caught up yet
        assert "replayed 1 events of 1 runs" in replay.stdout, replay.stdout + replay.stderr
        nats_log = (data / "nats" / "nats-server.log").read_text()
        assert nats_log.count("Starting nats-server") == 1, nats_log
        assert "will rebuild" not in nats_log
        monitor = json.loads(next((data / "nats" / "run").glob("*.ports")).read_text())["monitoring"][0]
        streams = httpx.get(f"{monitor}/jsz", params={"streams": "true"}).text
        assert "KV_pyoco_runs\"" in streams and "KV_pyoco_runs_replay" not in streams
        second = subprocess.run([*SERVER, "--port", "0", "--data-dir", str(data)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr.startswith("ERR-PYOCO-0018: data dir "), second.stderr
        assert str(data / "nats") in second.stderr and f"pid {proc.pid}" in second.stderr and "Traceback" not in second.stderr
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert (data / "nats" / "nats-server.log").read_text().count("Starting nats-server") == 1
    finally:
        _stop(proc)


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


def _start_readme_up(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``pyoco-server up --with-worker --allow-module examples`` as the README starts it (plus a
    random port and a private data dir); returns the process, the gateway URL and the log."""
    log = tmp_path / "up.log"
    proc, url = _start_up(log, "--data-dir", str(tmp_path / "data"), "--with-worker", "--allow-module", "examples", *extra)
    return proc, url, log


def _run_example(url: str) -> dict[str, object]:
    flow = (ROOT / "examples" / "flow.yaml").read_bytes()
    r = httpx.post(f"{url}/runs/yaml", files={"workflow": ("flow.yaml", flow)}, data={"flow_name": "main", "tag": "default"})
    assert r.status_code == 200, r.text
    return _wait_terminal(url, r.json()["run_id"])


def _wait_terminal(url: str, run_id: str) -> dict[str, Any]:
    """The run's snapshot (with records) once it has ended, or the last one seen after 30 s."""
    snap: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = httpx.get(f"{url}/runs/{run_id}", params={"include": "records"}).json()
        if snap["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.02)
    return snap


def test_up_with_worker_outlives_trio_thread_reaping(tmp_path: Path) -> None:
    """Issue 11 #1: the README's command stays up idle past Trio's 10 s idle-thread reaping (the
    worker's parent-death signal used to belong to a retired helper thread: SIGTERM at ~10-12 s),
    then still completes a run with the same worker process."""
    proc, url, log = _start_readme_up(tmp_path)
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
    proc, url, log = _start_readme_up(tmp_path, "--allow-module", "tests.tasks")
    children = _children(proc.pid)
    nats_pid = int((tmp_path / "data" / "nats" / "nats-server.pid").read_text())
    [worker] = [p for p in children if p != nats_pid]
    never = tmp_path / "never"
    flow = (
        "version: 1\nflow:\n  graph: hold\ntasks:\n"
        f'  hold: {{callable: "tests.tasks:wait_for_file", inputs: {{path: "{never}", seconds: 60}}}}\n'
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


def _worker_child(pid: int) -> int | None:
    for p in _children(pid):
        try:
            if b"\0worker\0" in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
        except OSError:
            pass
    return None


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_up_restarts_its_worker_when_the_worker_dies(tmp_path: Path, stop: str) -> None:
    """``up`` supervises its worker child: the worker is SIGKILLed, ``up`` logs the death, starts
    a new worker after a short back-off, and that worker completes a run; ``up`` never exits.
    Afterwards ``up`` still stops cleanly on SIGTERM, and a SIGKILLed ``up`` still takes the new
    worker with it (each child gets its own parent-watch pipe)."""
    proc, url, log = _start_readme_up(tmp_path)
    try:
        worker = _worker_child(proc.pid)
        assert worker is not None, log.read_text()
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "worker restarted" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        assert "worker exited unexpectedly with code -9; restarting it in 1 s" in text, text
        again = _worker_child(proc.pid)
        assert again is not None and again != worker, text
        snap = _run_example(url)
        assert snap["status"] == "COMPLETED", snap
        assert proc.poll() is None and _alive(again), log.read_text()
        if stop == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=40) == 0, log.read_text()
            assert not _alive(again)
            assert "Traceback" not in log.read_text()
        else:
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 2.0
            while _alive(again) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not _alive(again), "the restarted worker outlived a SIGKILLed up"
    finally:
        _stop(proc)


def test_restart_backoff_doubles_to_a_ceiling_and_resets_after_a_healthy_life() -> None:
    from pyoco_es.runtime import RestartBackoff

    backoff = RestartBackoff(first=1.0, longest=30.0, healthy_after=60.0)
    delays: list[float] = []
    delay = None
    for _ in range(7):
        delay = backoff.next_delay(delay, lived=0.5)
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.next_delay(30.0, lived=60.0) == 1.0
