"""Processes a test starts die with the test process, even when it is SIGKILLed and no fixture
teardown runs (a crashed pytest-xdist worker once left three workers and an ``up`` running for an
hour): a helper process starts a small fleet the way the tests do, is SIGKILLed, and every process
it started, children and grandchildren, must be gone within a few seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pyoco_es.testing.fleet import wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Started as the tests start things: EmbeddedNats (nats-server, PR_SET_PDEATHSIG), a Fleet
# (gateway, conductor, worker with its warm run processes), `pyoco-server up` (its own nats-server)
# and a Python program that is not ours (the prologue), all through tied_to_this_process.
HELPER = r"""
import subprocess, sys, time
from pathlib import Path
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.lifeline import PARENT_WATCH_PROLOGUE, tied_to_this_process
from pyoco_es.testing.fleet import Fleet, wait_for

root, cwd, server_bin = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
nats = EmbeddedNats(data_dir=root / "nats")
nats.start()
fleet = Fleet(nats.url, root / "logs", cwd)
for kind in ("conductor", "gateway", "worker"):
    fleet.add(kind, kind[0])
with open(root / "up.log", "wb") as log:
    up = subprocess.Popen([server_bin, "--port", "0", "--data-dir", str(root / "up")], **tied_to_this_process(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
theirs = subprocess.Popen([sys.executable, "-c", PARENT_WATCH_PROLOGUE + "import time; time.sleep(600)"], **tied_to_this_process())
wait_for("up to serve", lambda: "gateway on" in (root / "up.log").read_text(), 60)
print("ready", flush=True)
time.sleep(600)
"""


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of ``pid``, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` (pid: start time, to tell a reused pid apart)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[2]
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = starts[child]
            todo.append(child)
    return out


def _alive(pid: int, start: str) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == start and st[1] != "Z"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def _kill_helper_then_nothing_it_started_lives(tmp_path: Path, argv: list[str], check: Callable[[dict[int, str]], None],
                                               env: dict[str, str] | None = None) -> None:
    """Run ``argv`` (a helper that prints ``ready`` once it has started its processes), ``check``
    what it started, SIGKILL it, and assert that every process it started ends within 10 s."""
    errors = tmp_path / "helper.log"
    started: dict[int, str] = {}
    with open(errors, "wb") as err, subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err) as helper:
        try:
            assert helper.stdout is not None
            assert helper.stdout.readline() == b"ready\n", errors.read_text()
            started = _descendants(helper.pid)
            check(started)
            helper.kill()
            helper.wait()
            wait_for("every process the helper started to end", lambda: not any(_alive(p, s) for p, s in started.items()), 10)
        finally:
            helper.kill()
            left = [p for p, s in started.items() if _alive(p, s)]
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            assert not left, [_cmdline(p) for p in left]


def test_everything_a_sigkilled_test_process_started_dies_with_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")} | {"PYOCO_LOAD_DOTENV": "0"}

    def check(started: dict[int, str]) -> None:
        commands = " | ".join(_cmdline(p) for p in started)
        # nats-server; gateway, conductor, worker (+ the run processes it is warming); up and its
        # nats-server; the foreign program
        assert sum("nats-server" in _cmdline(p) for p in started) == 2, commands
        assert len(started) >= 7, commands

    _kill_helper_then_nothing_it_started_lives(tmp_path, [sys.executable, "-c", HELPER, str(tmp_path), str(ROOT), str(BIN / "pyoco-server")], check, env)


# The benchmarks' launcher (benchmarks/bench_e2e.py's Procs.start, which bench_batch, bench_auth
# and bench_http_floor share): a binary (PR_SET_PDEATHSIG) and a Python program that is not ours
# and ignores SIGTERM, as a server busy shutting down gracefully would (only the prologue's pipe
# ends it), its stderr a pipe to the killed process (the prologue's goodbye line then fails: EPIPE).
BENCH_HELPER = r"""
import signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from bench_e2e import Procs
from pyoco_es.testing.fleet import watched_python

procs = Procs()
procs.start(["sleep", "600"])
procs.start(watched_python(sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x', file=sys.stderr, flush=True); time.sleep(600)"),
            stderr=subprocess.PIPE)
assert procs.procs[1].stderr.readline() == b"x\n"
print("ready", flush=True)
time.sleep(600)
"""


def test_what_a_sigkilled_benchmark_started_dies_with_it(tmp_path: Path) -> None:
    def check(started: dict[int, str]) -> None:
        assert len(started) == 2, [_cmdline(p) for p in started]

    _kill_helper_then_nothing_it_started_lives(tmp_path, [sys.executable, "-c", BENCH_HELPER, str(ROOT / "benchmarks")], check)
