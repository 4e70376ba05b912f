"""The worker side of the library API (``pyoco_es.PyocoNatsWorker``, ``NatsBackendConfig``,
``ensure_resources``, ``configure_logging``), and pyoco-server 0.5.1's own
``examples/run_worker.py`` run unchanged but for its import, against a real stack.

Nothing sleeps to wait for state: runs are followed with the watch stream, the worker list is
polled with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from pyoco_es import AsyncPyocoHttpClient, NatsBackendConfig, PyocoNatsWorker, WorkerStopped, ensure_resources
from pyoco_es.core.errors import EventLogUnavailable
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.testing.fleet import watched_python
from pyoco_es.testing.stack import open_stack
from test_cli_e2e import fast_settings

pytestmark = [
    pytest.mark.filterwarnings("ignore:Async generator 'httpx.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore.:ResourceWarning"),
]

UPSTREAM = Path(__file__).resolve().parent / "upstream_examples"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}


async def wait_terminal(client: AsyncPyocoHttpClient, run_id: str) -> dict[str, object]:
    async with client.watch_run(run_id, timeout_sec=60) as frames:
        async for frame in frames:
            snap = frame["data"].get("snapshot") if isinstance(frame["data"], dict) else None
            if snap and snap.get("status") in TERMINAL:
                return dict(snap)
    raise AssertionError(f"watch of {run_id} ended without a terminal status")


async def wait_workers(client: AsyncPyocoHttpClient, predicate: object, seconds: float = 30) -> list[dict[str, object]]:
    with trio.fail_after(seconds):
        while True:
            workers = await client.get_workers(scope="all", include_hidden=True)
            if predicate(workers):  # type: ignore[operator]
                return workers
            await trio.sleep(0.05)


def test_config_maps_onto_settings_and_refuses_what_cannot_carry() -> None:
    cfg = NatsBackendConfig(nats_url="nats://h:1", default_tag="gpu", consumer_ack_wait_sec=12.0, cancel_grace_period_sec=3.0)
    settings = cfg.to_settings()
    assert (settings.nats_url, settings.default_tag, settings.consumer_ack_wait, settings.cancel_grace_period) == ("nats://h:1", "gpu", 12.0, 3.0)
    assert settings.consumer_max_ack_pending == 200  # pyoco-server's default travels with its config object
    with pytest.raises(ValueError) as refused:
        NatsBackendConfig(runs_kv_bucket="my_runs", workers_kv_ttl_sec=30.0).to_settings()
    message = str(refused.value)
    assert "runs_kv_bucket='my_runs'" in message and "the conductor alone writes run snapshots" in message
    assert "workers_kv_ttl_sec=30.0" in message and "reaper" in message
    synced = NatsBackendConfig(wheel_sync_enabled=True, wheel_sync_dir="/w", wheel_sync_interval_sec=2.0, wheel_install_timeout_sec=9.0).to_settings()
    assert (synced.wheel_sync_enabled, synced.wheel_sync_dir, synced.wheel_sync_interval, synced.wheel_install_timeout) == (True, "/w", 2.0, 9.0)
    with pytest.raises(ValueError, match="invalid tag 'a.b'"):
        PyocoNatsWorker(flow_resolver="tests.library_flows:resolve", tags=["a.b"])
    with pytest.raises(ValueError, match="importable by name"):
        PyocoNatsWorker(flow_resolver=lambda name: None)


async def test_ensure_resources_creates_the_streams(nats_server: EmbeddedNats) -> None:
    with trio.fail_after(30):
        done = await ensure_resources(None, NatsBackendConfig(nats_url=nats_server.url))
        assert done  # a fresh server: everything was created
        assert await ensure_resources(NatsBackendConfig(nats_url=nats_server.url)) == []  # idempotent; (config) alone works too


async def test_worker_from_python_runs_and_stops(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_stack(tmp_path, settings=fast_settings()) as stack, AsyncPyocoHttpClient(stack.url) as client:
            config = NatsBackendConfig(nats_url=stack.nats_url, worker_heartbeat_interval_sec=0.2, cancel_grace_period_sec=1.0)
            worker = await PyocoNatsWorker.connect(config=config, flow_resolver="tests.library_flows:resolve", worker_id="lib1", tags=["hello"], allowed_modules=["examples"])
            try:
                assert await worker.run_once(timeout=0.05) is None  # nothing submitted yet
                run_id = (await client.submit_run("main", params={}, tag="hello"))["run_id"]
                assert await worker.run_once(timeout=30) == run_id  # its events are stored; the snapshot follows
                assert (await wait_terminal(client, run_id))["status"] == "COMPLETED"
                snap = await client.get_run_with_records(run_id)
                assert snap["status"] == "COMPLETED" and snap["worker_id"] == "lib1"
                assert snap["task_records"]["world"]["output"] == "world"
            finally:
                await worker.close()
            # close() deregistered it (the gateway's list follows the registry bucket: wait, with a deadline)
            await wait_workers(client, lambda ws: [(w["worker_id"], w["state"]) for w in ws] == [("lib1", "STOPPED_GRACEFUL")], seconds=15)
            with pytest.raises(WorkerStopped, match="lib1 is not running"):
                await worker.run_once(timeout=5)
            await worker.close()  # twice is fine


async def test_connect_to_no_server_fails_with_the_reason(tmp_path: Path) -> None:
    server = EmbeddedNats(data_dir=tmp_path / "gone")
    url = server.start()
    server.stop()
    with trio.fail_after(60), pytest.raises(EventLogUnavailable, match=f"cannot connect to NATS at {url}"):
        await PyocoNatsWorker.connect(config=NatsBackendConfig(nats_url=url), flow_resolver="tests.library_flows:resolve")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_upstream_run_worker_example(tmp_path: Path) -> None:
    """pyoco-server's examples/run_worker.py (import changed) serves ``main`` until interrupted."""
    with trio.fail_after(120):
        async with open_stack(tmp_path, settings=fast_settings()) as stack, AsyncPyocoHttpClient(stack.url) as client:
            env = {**os.environ, "PYOCO_WORKER_HEARTBEAT_INTERVAL_SEC": "0.2"}
            log = tmp_path / "run_worker.log"
            with open(log, "wb") as err:  # a file, not an unread pipe that fills and blocks the worker
                proc = await trio.lowlevel.open_process(
                    watched_python(sys.executable, str(UPSTREAM / "run_worker.py"), "--nats-url", stack.nats_url, "--tags", "hello", "--worker-id", "up1"),
                    cwd=str(UPSTREAM),
                    **tied_to_this_process(env),
                    stderr=err,
                    # A shell that runs the suite in the background ignores SIGINT, and the child
                    # would inherit that: give it Ctrl-C back, as a terminal would.
                    preexec_fn=_default_sigint,
                )
            try:
                await wait_workers(client, lambda ws: any(w["worker_id"] == "up1" for w in ws))
                run_ids = [(await client.submit_run("main", params={}, tag="hello"))["run_id"] for _ in range(2)]
                for run_id in run_ids:
                    snap = await wait_terminal(client, run_id)
                    assert snap["status"] == "COMPLETED", snap
                    assert snap["worker_id"] == "up1"
                    assert snap["tasks"] == {"hello": "SUCCEEDED", "world": "SUCCEEDED"}
            finally:
                with trio.CancelScope(shield=True):
                    proc.send_signal(signal.SIGINT)  # Ctrl-C: asyncio.run unwinds, the script's finally closes the worker
                    with trio.move_on_after(30):
                        await proc.wait()
                    if proc.returncode is None:  # never leave it behind, whatever failed above
                        proc.kill()
                        await proc.wait()
            assert proc.returncode != 0, log.read_text()  # KeyboardInterrupt, as with pyoco-server
            # the script's finally ran worker.close(): it drained and deregistered before exiting
            # (the gateway's worker list follows the registry bucket: wait for it, with a deadline)
            await wait_workers(client, lambda ws: [(w["worker_id"], w["state"]) for w in ws] == [("up1", "STOPPED_GRACEFUL")], seconds=15)


@pytest.mark.parametrize(("level", "shown"), [("info", True), ("warning", False)])
def test_configure_logging_honours_pyoco_log_level(level: str, shown: bool) -> None:
    code = "import logging; from pyoco_es import configure_logging; configure_logging(service='svc'); logging.getLogger('x').info('hello-log')"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYOCO_LOG_LEVEL": level}, capture_output=True, text=True, timeout=60, check=True)
    assert ("INFO x: hello-log" in done.stderr) is shown
