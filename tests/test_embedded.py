"""The embedded nats-server: started by `pyoco-es` commands, never left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyoco_es.core.errors import InfraError
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats.embedded import DataDirInUse, EmbeddedNats, running_server_url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait(predicate, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_sync_modes_reach_the_server_config(tmp_path: Path) -> None:
    for mode, line in (("1s", "sync_interval: 1s"), ("always", "sync_interval: always"), ("default", None)):
        server = EmbeddedNats(data_dir=tmp_path / mode, sync=mode)
        server.start()
        try:
            conf = (tmp_path / mode / "nats.conf").read_text()
            assert (line in conf) if line else "sync_interval" not in conf
        finally:
            server.stop()
    with pytest.raises(InfraError, match="--nats-sync must be one of"):
        EmbeddedNats(data_dir=tmp_path / "bad", sync="sometimes").start()


def _spawn_conductor(data_dir: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "PYOCO_NATS_URL"}
    return subprocess.Popen(
        [sys.executable, "-c", "from pyoco_es.cli.main import main; main()", "conductor", "--data-dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **tied_to_this_process(env),
    )


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_orphan_nats_server_when_the_parent_stops(tmp_path: Path, how: str) -> None:
    """The embedded server dies with its parent: on a clean stop, and also when the parent is SIGKILLed."""
    proc = _spawn_conductor(tmp_path)
    pid_file = tmp_path / "nats" / "nats-server.pid"
    try:
        _wait(pid_file.exists, "the embedded server")
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        while "conductor running" not in line:
            assert line, "conductor exited early"
            line = proc.stderr.readline().decode()
        nats_pid = int(pid_file.read_text())
        assert _alive(nats_pid)
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=20)
        if how != "SIGKILL":
            assert proc.returncode == 0
        _wait(lambda: not _alive(nats_pid), "nats-server to exit")
        # The data dir's lock died with its holder: the store can be opened again at once.
        assert running_server_url(tmp_path / "nats", timeout=0) is None
        server = EmbeddedNats(data_dir=tmp_path / "nats")
        server.start()
        server.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_one_data_dir_runs_one_server(tmp_path: Path) -> None:
    """A second server on a store in use is refused, naming the directory and the holder's pid;
    readers find the running server instead of starting their own."""
    first = EmbeddedNats(data_dir=tmp_path / "nats")
    first.start()
    try:
        assert running_server_url(tmp_path / "nats") == first.url
        with pytest.raises(DataDirInUse) as caught:
            EmbeddedNats(data_dir=tmp_path / "nats").start()
        message = caught.value.message
        assert str(tmp_path / "nats") in message and f"pid {os.getpid()}" in message and first.url in message
        assert "--data-dir" in message and "--nats-url" in message
        assert first.proc is not None and first.proc.poll() is None  # the refusal touched nothing
        assert len(list((tmp_path / "nats" / "run").glob("*.ports"))) == 1
    finally:
        first.stop()
    assert running_server_url(tmp_path / "nats", timeout=0) is None
    again = EmbeddedNats(data_dir=tmp_path / "nats")
    again.start()
    again.stop()


def test_a_server_left_running_on_the_store_is_never_joined_by_a_second(tmp_path: Path) -> None:
    """Its holder died but the nats-server lingers (no death signal reached it): a new holder
    waits for it, then refuses, naming its pid, rather than open the store twice."""
    import pyoco_es.nats.embedded as embedded

    orphan = EmbeddedNats(data_dir=tmp_path / "nats")
    orphan.start()
    try:
        assert orphan.proc is not None
        os.close(orphan.lock_fd)  # the holder "dies"; its server does not
        orphan.lock_fd = None
        started = time.monotonic()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(embedded, "ORPHAN_WAIT", 0.3)
            with pytest.raises(DataDirInUse, match=f"pid {orphan.proc.pid} \\(a nats-server left running"):
                EmbeddedNats(data_dir=tmp_path / "nats").start()
        assert time.monotonic() - started < 5
        assert orphan.proc.poll() is None
    finally:
        orphan.stop()
