"""Fault injection for tests: freeze a process (SIGSTOP) the way a stalled VM or a GC pause does;
cut a process off the network (:class:`CuttableProxy`) the way a partition does."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from ``/proc`` (``T``: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextmanager
def frozen(pid: int, *, timeout: float = 5.0) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block and SIGCONT it on the way out, whatever happens.

    Entering waits until the process is really stopped (signal delivery is asynchronous: on a
    busy machine the process may run a little longer), so what the block sends meets a frozen peer.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while process_state(pid) != "T":
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {pid} did not stop")
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class CuttableProxy:
    """A TCP forwarder to ``target`` that a test can cut and heal, as a network partition does.

    Point one process at :attr:`url` instead of the server.  :meth:`cut` stops relaying in both
    directions without closing anything (connections stay open, bytes wait in the kernel's
    buffers, new connections are accepted and held), so the process sees silence, not a closed
    socket; :meth:`heal` lets everything through again, late.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"nats://{host}:{self.port}"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        with self._lock:
            for s in [self._listener, *self._socks]:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._open.wait()
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(a, b), name="proxy-relay", daemon=True).start()

    def _relay(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                self._open.wait()
                if not data or self._closed.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
