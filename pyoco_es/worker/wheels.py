"""Wheel sync (``pyoco-worker --wheel-sync``): install the registry's wheels for this worker's
tags into versioned directories that new run processes import from.

One pass (at start, then every ``wheel_sync_interval``):

1. List the object store ``pyoco_wheels`` and select, per distribution, the newest wheel whose
   tags match this worker's (pyoco-server's rules: :mod:`pyoco_es.core.wheelsync`).
2. A wheel already installed with the same object ``nuid`` is kept as it is.  A pass first reads
   the object store's stream position (it moves with every put and delete): when it has not
   moved since the last clean pass, that one request is the whole pass (plus the directory
   clean-up of step 6), and the record rides on the next heartbeat.
3. A new or changed wheel is downloaded, its sha256 checked against the registry's, its members
   checked (no absolute or ``..`` paths, nothing that shadows the standard library, ``pyoco`` or
   ``pyoco_es``), and installed with ``python -m pip install --no-deps --no-index --target
   <sync-dir>/<name>-<version>-<sha8>`` in a subprocess under ``wheel_install_timeout``.  Never
   into the worker's own environment: a broken wheel can fail its own install, nothing else.
   A directory that is already there (installed by an earlier worker process) is reused.
4. A wheel that fails any of this is reported (``wheel_sync.failed_wheels``, ``last_error``, the
   worker's log) and not tried again until the registry's object changes; the previously
   installed version of that distribution stays in use.
5. If the set of installed directories changed, the pool gets a new
   :class:`~pyoco_es.core.wheelsync.CodeGeneration`: idle run processes are replaced, busy ones
   finish their run with the code they started with.  So a sync is applied between runs, never
   in the middle of one, and without restarting the worker.  Each attempt's ``run.claimed``
   records the wheels of the process that runs it.
6. Directories no live process imports from and the current generation does not list are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import trio
from packaging.tags import sys_tags

from ..config import Settings
from ..core.errors import PyocoError
from ..core.wheelsync import (
    NO_CODE,
    Candidate,
    CodeGeneration,
    InstalledWheel,
    Selection,
    WheelRef,
    initial_state,
    pass_state,
    select_wheels,
    shadowed_modules,
    unsafe_members,
    verify_sha256,
)
from ..nats.client import NatsClient
from ..nats.wheelread import get_wheel, list_wheels, store_position
from .pool import ChildPool
from .registry import Registry

log = logging.getLogger(__name__)

MARKER: Final = ".pyoco-wheel.json"  # in each installed directory: what it holds
PIP_OUTPUT_CHARS: Final = 2000  # the tail of pip's output kept in a failure (pyoco-server's cap)


class WheelFailed(Exception):
    """One wheel could not be installed (the reason is the message)."""


def install_dir_name(ref: WheelRef) -> str:
    """``<name>-<version>-<sha8>``: from the parsed (normalized) name and version, never from
    the object name as given."""
    return f"{ref.package}-{ref.version}-{ref.sha256[:8]}"


def check_members(data: bytes) -> None:
    """Refuse a wheel that is not a zip, has unsafe paths, or shadows the runner's modules.

    Raises:
        WheelFailed: with the reason.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise WheelFailed(f"not a valid wheel (zip): {exc}") from None
    bad = unsafe_members(names)
    if bad:
        raise WheelFailed(f"unsafe member paths: {', '.join(bad[:5])}")
    shadow = shadowed_modules(names, sys.stdlib_module_names)
    if shadow:
        raise WheelFailed(f"would shadow modules the run process needs: {', '.join(shadow[:10])}")


async def pip_install(wheel_file: Path, target: Path, timeout: float) -> None:
    """``pip install --no-deps --no-index --target`` in a subprocess, killed after ``timeout``.

    Raises:
        WheelFailed: pip failed (the tail of its output) or timed out.
    """
    cmd = [
        sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--isolated",
        "--no-deps", "--no-index", "--target", str(target), str(wheel_file),
    ]  # fmt: skip
    result = None
    with trio.move_on_after(timeout):
        result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, stdin=b"")
    if result is None:
        raise WheelFailed(f"pip install timed out after {timeout:g}s")
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or b"").decode("utf-8", errors="replace").strip()
        raise WheelFailed(f"pip install failed (code {result.returncode}): {detail[-PIP_OUTPUT_CHARS:]}")


class WheelSync:
    """This worker's wheel sync: the passes, the installed directories, the reported state."""

    def __init__(
        self, nats: NatsClient, settings: Settings, *, tags: Sequence[str], pool: ChildPool, registry: Registry, clock: Callable[[], float]
    ) -> None:
        self.nats = nats
        self.settings = settings
        self.tags = tuple(tags)
        self.pool = pool
        self.registry = registry
        self.clock = clock
        # One directory per worker id: workers sharing a sync dir never remove each other's code.
        self.root = Path(settings.wheel_sync_dir).expanduser().absolute() / registry.worker_id
        self.supported = frozenset(sys_tags())
        self.code = NO_CODE
        # (wheel name, nuid) -> the failure: not tried again until the registry's object changes
        self.failed: dict[tuple[str, str], dict[str, Any]] = {}
        self.state: dict[str, Any] = initial_state(enabled=True)
        self._seen: int | None = None  # the store's position when a pass last completed cleanly
        registry.set_wheel_sync(self.state)

    async def run(self) -> None:
        """A pass every ``wheel_sync_interval`` seconds (the first one is :meth:`sync_once` at start)."""
        while True:
            await trio.sleep(self.settings.wheel_sync_interval)
            try:
                await self.sync_once()
            except Exception:  # noqa: BLE001 - a sync bug must not stop the worker serving runs
                log.exception("wheel sync pass failed")

    async def sync_once(self) -> None:
        """One pass (module docstring); never raises for a registry or wheel problem."""
        attempted = self.clock()
        bucket = self.settings.wheel_object_store_bucket
        try:
            position = await store_position(self.nats, bucket)
            if position is not None and position == self._seen:  # nothing changed: no listing
                self._collect_garbage()
                quiet = {"last_attempt_at": attempted}
                if self.state.get("last_result") == "ok":
                    quiet.update(last_success_at=attempted, last_synced_at=attempted)
                await self._report({**self.state, **quiet})
                return
            objects = await list_wheels(self.nats, bucket)
        except PyocoError as exc:
            log.warning("wheel sync: cannot list the registry: %s", exc)
            await self._report(pass_state(self.state, attempted_at=attempted, finished_at=self.clock(), selection=None, updated=(),
                                          removed=(), installed=self._installed_json(), failed=(), generation=self.code.number,
                                          error=f"cannot list the wheel registry: {exc}"))  # fmt: skip
            return
        selection = select_wheels(objects, self.tags, self.supported)
        self._seen = position
        current = {w.ref.package: w for w in self.code.installed}
        installed: list[InstalledWheel] = []
        updated: list[str] = []
        failed: list[dict[str, Any]] = []
        for cand in selection.chosen:
            have = current.get(cand.package)
            if have is not None and have.nuid == cand.wheel.nuid:
                installed.append(have)
                continue
            got = await self._install(cand, failed)
            if got is not None:
                installed.append(got)
                updated.append(cand.wheel.name)
            elif have is not None:
                installed.append(have)  # the previous version stays in use
        live = {(c.wheel.name, c.wheel.nuid) for c in selection.chosen}
        self.failed = {k: v for k, v in self.failed.items() if k in live}
        chosen = {c.package for c in selection.chosen}
        removed = [w.ref.wheel_name for w in self.code.installed if w.ref.package not in chosen]
        if tuple(installed) != self.code.installed:
            self.code = CodeGeneration(number=self.code.number + 1, installed=tuple(installed))
            log.info("wheel sync: generation %d: %s", self.code.number,
                     ", ".join(f"{w.ref.package} {w.ref.version}" for w in installed) or "no wheels")  # fmt: skip
            await self.pool.set_code(self.code)
        self._collect_garbage()
        await self._report(pass_state(self.state, attempted_at=attempted, finished_at=self.clock(), selection=selection,
                                      updated=updated, removed=removed, installed=self._installed_json(), failed=failed,
                                      generation=self.code.number))  # fmt: skip

    def _installed_json(self) -> list[dict[str, Any]]:
        return [w.to_json() for w in self.code.installed]

    async def _report(self, state: dict[str, Any]) -> None:
        """Hand the record to the registry; write it now only when something besides the times
        changed (a quiet pass rides on the next heartbeat: no extra write per pass)."""
        times = ("last_attempt_at", "last_success_at", "last_synced_at")
        changed = {k: v for k, v in state.items() if k not in times} != {k: v for k, v in self.state.items() if k not in times}
        self.state = state
        self.registry.set_wheel_sync(state)
        if not changed:
            return
        try:
            await self.registry.write()
        except PyocoError as exc:
            log.warning("wheel sync: could not write the worker record: %s", exc)

    async def _install(self, cand: Candidate, failed: list[dict[str, Any]]) -> InstalledWheel | None:
        """Download, verify and install one wheel; on failure append to ``failed`` (and remember
        it for this object) and return None."""
        wheel = cand.wheel
        key = (wheel.name, wheel.nuid)
        known = self.failed.get(key)
        if known is not None:
            failed.append(known)
            return None
        try:
            return await self._download_and_install(cand)
        except (WheelFailed, PyocoError, OSError) as exc:
            reason = str(exc.message if isinstance(exc, PyocoError) else exc)
            log.warning("wheel sync: %s not installed: %s", wheel.name, reason, extra={"wheel_name": wheel.name})
            entry = {"wheel_name": wheel.name, "package_name": cand.package, "package_version": str(cand.version), "error": reason}
            if isinstance(exc, PyocoError):  # a NATS blip: tried again next pass
                self._seen = None
            else:
                self.failed[key] = entry
            failed.append(entry)
            return None

    async def _download_and_install(self, cand: Candidate) -> InstalledWheel:
        wheel = cand.wheel
        data = await get_wheel(self.nats, self.settings.wheel_object_store_bucket, wheel.name)
        sha = hashlib.sha256(data).hexdigest()
        problem = verify_sha256(wheel, sha)
        if problem:
            raise WheelFailed(problem)
        ref = WheelRef(package=cand.package, version=str(cand.version), sha256=sha, wheel_name=wheel.name)
        final = self.root / install_dir_name(ref)
        marker = _marker(final)
        if marker.get("sha256_hex") == sha:  # installed by an earlier worker process: reuse it
            at = marker.get("installed_at")
            return InstalledWheel(ref=ref, path=str(final), nuid=wheel.nuid, installed_at=at if isinstance(at, (int, float)) else self.clock())
        check_members(data)
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".install-", dir=self.root))
        try:
            wheel_file = work / wheel.name  # a validated wheel file name (pip parses it)
            wheel_file.write_bytes(data)
            target = work / "target"
            await pip_install(wheel_file, target, self.settings.wheel_install_timeout)
            installed = InstalledWheel(ref=ref, path=str(final), nuid=wheel.nuid, installed_at=self.clock())
            (target / MARKER).write_text(json.dumps({**installed.to_json(), "path": str(final)}), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)  # a half-written leftover (no marker)
            target.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return installed

    def _collect_garbage(self) -> None:
        """Remove installed directories neither the current generation nor a live process uses."""
        keep = set(self.code.paths) | self.pool.paths_in_use()
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.is_dir() and (entry / MARKER).is_file() and str(entry) not in keep:
                shutil.rmtree(entry, ignore_errors=True)


def _marker(path: Path) -> dict[str, Any]:
    """What an installed directory's marker says ({} when there is none or it is unreadable)."""
    try:
        doc = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


__all__ = ["WheelFailed", "WheelSync", "check_members", "install_dir_name", "pip_install"]
