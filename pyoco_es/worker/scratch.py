"""The worker's scratch directories: one per worker process, never left behind over time.

Every worker keeps its children's working directories under one directory of its own,
``<tmp>/pyoco-worker-<uid>/<pid>-<worker_id>-XXXX``, removed when the worker stops.  A worker
that was SIGKILLed cannot remove its own, so each worker, when it starts, removes the
directories whose owner process is gone (and only those: the pid is in the name).  Between runs,
a child empties its own directory (:func:`clean_scratch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def scratch_base() -> Path:
    """The directory every worker of this user keeps its scratch directory in."""
    return Path(tempfile.gettempdir()) / f"pyoco-worker-{os.getuid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_dead_leftovers(base: Path) -> list[Path]:
    """Remove the scratch directories under ``base`` whose owner pid no longer runs.

    Returns:
        The directories removed.
    """
    removed: list[Path] = []
    try:
        entries = list(base.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        pid_text = entry.name.split("-", 1)[0]
        if not pid_text.isdigit() or not entry.is_dir():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed the scratch directory %s of worker process %d, which is gone", entry, pid)
        removed.append(entry)
    return removed


def clean_scratch() -> None:
    """In a child, between runs: remove what the run left in its scratch directory (the cwd).  pyoco creates ``./artifacts`` for
    every run; an empty one is kept (recreating it costs two syscalls per run)."""
    try:
        for entry in os.scandir("."):
            if entry.is_dir(follow_symlinks=False):
                if entry.name == "artifacts":
                    with os.scandir(entry.path) as inner:
                        if next(inner, None) is None:
                            continue
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
    except OSError:
        pass


@contextlib.contextmanager
def open_scratch_root(worker_id: str) -> Iterator[Path]:
    """This worker process's scratch directory, removed on exit (a dead worker's, at entry)."""
    base = scratch_base()
    base.mkdir(mode=0o700, exist_ok=True)
    remove_dead_leftovers(base)
    root = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{worker_id}-", dir=base))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


__all__ = ["clean_scratch", "open_scratch_root", "remove_dead_leftovers", "scratch_base"]
