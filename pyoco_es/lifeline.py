"""Children that die with their parent, even when it is SIGKILLed: the parent-watch pipe.

The parent passes the read end of a pipe whose write end only it holds (fd in
``PYOCO_ES_PARENT_FD``); nobody ever writes, so the child's read returns end of file exactly when
the parent is gone.  Every pyoco-es console script calls :func:`exit_with_parent` first; ``up``
gives each child its own pipe (:func:`pyoco_es.runtime.run_child_service`), other parents (the
test suite) one pipe for all (:func:`tied_to_this_process`).  Binaries such as nats-server get
``PR_SET_PDEATHSIG`` instead (:func:`pyoco_es.nats.embedded.spawn_bound_to_parent`).  Stdlib only:
the client commands call it too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

PARENT_FD_ENV = "PYOCO_ES_PARENT_FD"
EXIT_PARENT_GONE = 70


def exit_with_parent() -> None:
    """In a child given the pipe (by ``up`` or :func:`tied_to_this_process`): exit at once when the
    parent dies; without ``PYOCO_ES_PARENT_FD``, nothing.

    The parent holds the write end of a pipe whose read end we inherit (fd in
    ``PYOCO_ES_PARENT_FD``); nobody ever writes, so the read returns EOF exactly when the last
    holder of the write end is gone: the parent exited or was SIGKILLed.  Unlike
    ``PR_SET_PDEATHSIG`` this does not depend on which of the parent's threads forked us (issue 11).
    A lost parent means the embedded NATS is gone too, so there is nothing to drain: the process
    ends with code 70, and its run processes end because their command pipes close.
    """
    raw = os.environ.pop(PARENT_FD_ENV, None)
    if not raw:
        return
    try:
        fd = int(raw)
        os.set_inheritable(fd, False)  # our own children must not keep it
    except (ValueError, OSError):
        return

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        try:
            os.write(2, b"parent process is gone: exiting now\n")
        finally:
            os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="pyoco-es-parent-watch", daemon=True).start()


_lifeline: tuple[int, int] | None = None  # (our pid, read end): one pipe a process, its write end held for life
_lifeline_lock = threading.Lock()


def tied_to_this_process(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``env`` and ``pass_fds`` for ``subprocess.Popen`` / ``trio.lowlevel.open_process`` /
    ``trio.run_process`` so that the child exits at once when this process dies, even by SIGKILL.

    The same parent-watch pipe as ``up``'s children (:func:`exit_with_parent`, which every
    pyoco-es console script calls first), but one pipe for all of this process's children: its
    write end stays open until this process is gone.  ``env`` (default: ours) gets the pipe's
    fd.  A Python program that is not ours watches it if started through
    :data:`PARENT_WATCH_PROLOGUE`; a binary such as nats-server uses
    :func:`~pyoco_es.nats.embedded.spawn_bound_to_parent` instead.
    """
    global _lifeline
    with _lifeline_lock:
        if _lifeline is None or _lifeline[0] != os.getpid():  # a forked copy of us needs its own
            read_end, _write_end = os.pipe()  # both non-inheritable: children get the read end by pass_fds
            _lifeline = (os.getpid(), read_end)
        fd = _lifeline[1]
    return {"env": {**(os.environ if env is None else env), PARENT_FD_ENV: str(fd)}, "pass_fds": (fd,)}


# The watch of exit_with_parent in stdlib-only code, for a ``python -c`` program that is not ours
# (pyoco-server 0.5.1's gateway or worker under test): prepend it to the program.
PARENT_WATCH_PROLOGUE = f"""
import os as _os, threading as _threading
def _pyoco_es_parent_watch(fd=int(_os.environ.pop("{PARENT_FD_ENV}", "-1"))):
    if fd < 0:
        return
    _os.set_inheritable(fd, False)
    def watch():
        while True:
            try:
                if not _os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        try:  # stderr may be a pipe to the parent that is gone (EPIPE): exit all the same
            _os.write(2, b"parent process is gone: exiting now\\n")
        finally:
            _os._exit({EXIT_PARENT_GONE})
    _threading.Thread(target=watch, daemon=True).start()
_pyoco_es_parent_watch()
"""


__all__ = ["EXIT_PARENT_GONE", "PARENT_FD_ENV", "PARENT_WATCH_PROLOGUE", "exit_with_parent", "tied_to_this_process"]
