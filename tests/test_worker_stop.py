"""A worker asked to stop (SIGTERM) while its NATS is gone (killed) or frozen (SIGSTOP), with a run
in progress, exits within a few seconds, without waiting out its drain (it once took 18 s, and workers whose NATS
was long gone were seen running 20 s after SIGTERM), exits 0, and says in its log what it could
not hand back.  Nothing is lost: the run it could not release is re-delivered and completes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from pyoco_es.core.model import RunStatus
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats.client import NatsClient
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.worker.stopping import DRAIN_WITHOUT_NATS, HANDBACK_WAIT
from pyoco_es.worker.supervisor import run_worker
from test_worker import ROOT, submit, task_running, wait_for, wait_status, worker_env
from test_worker_faults import conductor_for, hold_flow

DRAIN = 60.0  # PYOCO_WORKER_DRAIN_TIMEOUT_SEC: never waited out, NATS does not answer
# What a stop may take beyond the drain: the hand-back wait, the STOPPED_GRACEFUL write's
# minimum, closing NATS and the run processes, and interpreter exit (operator-guide.md).
SLACK = HANDBACK_WAIT + 2.0


def _worker(nats_server: EmbeddedNats, log: Path, drain: float) -> subprocess.Popen[bytes]:
    env = worker_env(nats_server) | {"PYOCO_WORKER_DRAIN_TIMEOUT_SEC": str(drain)}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", "from pyoco_es.cli.worker import worker_main; worker_main()", "--nats-url", nats_server.url,
             "--worker-id", "stopper", "--concurrency", "1", "--allow-module", "tests.tasks"],
            **tied_to_this_process(env), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip


@pytest.mark.parametrize("fault", ["killed", "frozen"])
async def test_a_worker_stopped_while_nats_is_gone_exits_in_bounded_time(
    fault: str, nats_server: EmbeddedNats, nats: NatsClient, nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(90):
        settings, store, markers, gate = await conductor_for(nursery, nats, tmp_path, lease=2.0)
        log = tmp_path / "worker.log"
        proc = _worker(nats_server, log, DRAIN)
        try:
            run_id = await submit(store, yaml_text=hold_flow(markers, gate))
            await wait_for(lambda: task_running(store, run_id, "hold"), "the run to be held by the worker", 30)
            assert nats_server.proc is not None
            if fault == "killed":
                nats_server.proc.kill()
                nats_server.proc.wait()
            else:
                nats_server.proc.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if fault == "frozen":
                nats_server.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        text = log.read_text()
        assert code == 0, text
        assert took < DRAIN_WITHOUT_NATS + SLACK, f"stopped after {took:.1f} s: {text}"
        assert f"run {run_id} attempt 1: could not hand it back" in text, text
        assert "could not write STOPPED_GRACEFUL" in text, text
        assert "not waiting out the drain for 1 run(s)" in text, text
        assert "Traceback" not in text, text
        if fault == "frozen":
            # NATS is back: the run the worker held is re-delivered (its release, or its expired
            # lease) and completes on another worker.
            gate.write_text("go")
            await nursery.start(lambda task_status: run_worker(nats, settings, worker_id="next", tags=["default"], concurrency=1,
                                                               allowed_modules=["tests.tasks"], task_status=task_status))  # fmt: skip
            snap = await wait_status(store, run_id, {RunStatus.COMPLETED, RunStatus.FAILED}, timeout=40)
            assert snap.status is RunStatus.COMPLETED and snap.attempt >= 2, snap
