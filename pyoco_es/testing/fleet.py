"""A fleet of pyoco-es processes (gateways, conductors, workers) as separate OS processes, for tests
that kill them: each is started the way an operator starts it (``pyoco-es gateway``,
``conductor``, ``worker``), waited for until it announces itself, and can be SIGKILLed and started
again under the same name.  Each dies with the process that started it, even when that one is
SIGKILLed (:func:`~pyoco_es.lifeline.tied_to_this_process`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import attrs

from ..lifeline import PARENT_WATCH_PROLOGUE, tied_to_this_process

T = TypeVar("T")
ENTRY = "from pyoco_es.cli.main import main; main()"
READY = {"gateway": "gateway on http://", "conductor": "conductor running", "worker": " serving "}


def wait_for(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@attrs.define(eq=False)
class Member:
    """One process of the fleet."""

    name: str
    kind: str  # gateway | conductor | worker
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""  # a gateway's base URL

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@attrs.define(eq=False)
class Fleet:
    """Processes sharing ``nats_url`` (a cluster's URL list), with ``env`` on top of ours; logs
    under ``log_dir``; started from ``cwd`` (so test task modules import)."""

    nats_url: str
    log_dir: Path
    cwd: Path
    env: Mapping[str, str] = attrs.Factory(dict)
    members: dict[str, Member] = attrs.Factory(dict)

    def _environ(self, nats_url: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")}
        return base | {"PYOCO_LOAD_DOTENV": "0", **self.env, "PYOCO_NATS_URL": nats_url}

    def add(self, kind: str, name: str, args: Sequence[str] = (), *, nats_url: str | None = None, timeout: float = 60.0) -> Member:
        """Start a ``kind`` process called ``name`` (extra CLI ``args``) and wait until it serves."""
        argv = [sys.executable, "-c", ENTRY, kind, *args]
        if kind == "gateway":
            argv += ["--port", "0"]
        if kind == "worker":
            argv += ["--worker-id", name]
        member = Member(name, kind, argv, self.log_dir / f"{name}.log")
        self.members[name] = member
        self._start(member, nats_url or self.nats_url, timeout)
        return member

    def _start(self, m: Member, nats_url: str, timeout: float) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(m.log, "ab") as out:
            out.write(f"--- start {' '.join(m.argv[3:])}\n".encode())
            out.flush()
            start_at = out.tell()
            m.proc = subprocess.Popen(m.argv, cwd=self.cwd, **tied_to_this_process(self._environ(nats_url)),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)  # fmt: skip
        m.url = ""
        marker = READY[m.kind]

        def ready() -> bool:
            assert m.alive, f"{m.name} exited: {m.log_text()[-3000:]}"
            text = m.log_text()[start_at:]
            for line in text.splitlines():
                if marker in line:
                    if m.kind == "gateway":
                        m.url = line.split("gateway on ")[1].split()[0].rstrip("/")
                    return True
            return False

        wait_for(f"{m.name} to serve", ready, timeout)

    def kill(self, name: str) -> None:
        """``kill -9`` the process (its run processes end when their pipes close)."""
        m = self.members[name]
        if m.alive:
            assert m.proc is not None
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait()

    def restart(self, name: str, *, nats_url: str | None = None, timeout: float = 60.0) -> Member:
        """Start ``name`` again (killed first if it still runs), same command line."""
        self.kill(name)
        m = self.members[name]
        self._start(m, nats_url or self.nats_url, timeout)
        return m

    def gateways(self) -> list[str]:
        """The base URLs of the gateways that run now."""
        return [m.url for m in self.members.values() if m.kind == "gateway" and m.alive]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM everyone (SIGCONT first), wait, SIGKILL what is left."""
        for m in self.members.values():
            if m.alive:
                assert m.proc is not None
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    try:
                        os.killpg(m.proc.pid, sig)
                    except ProcessLookupError:
                        pass
        deadline = time.monotonic() + timeout
        for m in self.members.values():
            if m.proc is None:
                continue
            try:
                m.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(m.proc.pid, signal.SIGKILL)
                m.proc.wait()

    def tracebacks(self) -> dict[str, str]:
        """Members whose log shows a Python traceback (the tail of each)."""
        return {m.name: m.log_text()[-2000:] for m in self.members.values() if "Traceback" in m.log_text()}



RUN_SCRIPT = "import os, runpy, sys; sys.argv = sys.argv[1:]; sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')"


def watched_python(python: str, *args: str) -> list[str]:
    """``[python, *args]`` (``-c CODE ...`` or ``script.py ...``) for a Python program that is not a
    pyoco-es console script: run under :data:`~pyoco_es.lifeline.PARENT_WATCH_PROLOGUE`, so that
    with :func:`~pyoco_es.lifeline.tied_to_this_process` it dies with us too."""
    if args and args[0] == "-c":
        return [python, "-c", PARENT_WATCH_PROLOGUE + args[1], *args[2:]]
    return [python, "-c", PARENT_WATCH_PROLOGUE + RUN_SCRIPT, *args]
