"""A small warm pool of child processes that execute runs (one run at a time per child).

Each child is ``python -m pyoco_es.worker.child`` in its own scratch directory, talking over two
private pipes (:mod:`pyoco_es.worker.protocol`).  A child is reused for the next run when its run
ended normally; a child that was killed (forced cancel, lost attempt, drain timeout) or died is
replaced.  Children start in their own session, so a Ctrl-C aimed at the worker's terminal does not
kill them mid-run: the worker decides (drain, then kill).  If the worker itself dies, the command
pipe closes and each child exits at once.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from ..core.wheelsync import NO_CODE, CodeGeneration
from .protocol import Command, FrameDecoder, ProtocolError, encode_frame

log = logging.getLogger(__name__)


class ChildDied(Exception):
    """The child process exited (or its pipe broke) while we were talking to it."""

    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode
        if returncode is not None and returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = str(-returncode)
            text = f"child process died with signal {-returncode} ({name})"
        else:
            text = f"child process exited with code {returncode}"
        super().__init__(text)


class ChildProtocolError(ChildDied):
    """The child sent something that is not a frame (a task wrote to the pipe, a bug): the child
    was killed, and the run it was running is failed at once (it would do the same again)."""

    def __init__(self, returncode: int | None, problem: str) -> None:
        super().__init__(returncode)
        self.args = (f"child process broke the pipe protocol: {problem}",)
        self.problem = problem


def _child_pythonpath() -> str:
    """The worker's import path for the child, with the worker's working directory first (the
    child runs in a scratch directory, and user task modules usually sit next to the worker)."""
    cwd = os.getcwd()
    seen: dict[str, None] = {cwd: None}
    for entry in sys.path:
        path = os.path.abspath(entry or cwd)
        seen.setdefault(path)
    old = os.environ.get("PYTHONPATH")
    if old:
        for entry in old.split(os.pathsep):
            if entry:
                seen.setdefault(os.path.abspath(entry))
    return os.pathsep.join(seen)


class ChildProcess:
    """One running child: send commands, receive events."""

    def __init__(
        self, proc: trio.Process, cmd: trio.lowlevel.FdStream, evt: trio.lowlevel.FdStream, scratch: Path, code: CodeGeneration = NO_CODE
    ) -> None:
        self.proc = proc
        self.code = code  # the synced wheels this process imports from, for its whole life
        self._cmd = cmd
        self._evt = evt
        self.scratch = scratch
        self._decoder = FrameDecoder()
        self._inbox: list[dict[str, Any]] = []
        self.known_docs: set[str] = set()
        self.runs = 0
        self.healthy = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, cmd: Command) -> None:
        try:
            frame = encode_frame(cmd.to_json())
        except (ValueError, TypeError, RecursionError) as exc:
            raise ProtocolError(f"cannot encode the {cmd.OP!r} command: {exc}") from exc
        try:
            await self._cmd.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.healthy = False
            raise ChildDied(self.proc.poll()) from exc

    def send_from_any_thread(self, *cmds: Command) -> bool:
        """Write small frames now, in one write, from any thread (e.g. a NATS-thread hook), if the
        pipe takes them whole; False otherwise (the caller then sends them the usual way).  Only
        while no :meth:`send` is in flight: up to ``PIPE_BUF`` bytes are written atomically or
        not at all, so frames never interleave."""
        try:
            frame = b"".join(encode_frame(c.to_json()) for c in cmds)
        except (ValueError, TypeError, RecursionError):
            return False  # send() reports it on the Trio side
        if len(frame) > select.PIPE_BUF:
            return False
        try:
            return os.write(self._cmd.fileno(), frame) == len(frame)
        except OSError:  # full (EAGAIN), closed, broken: let send() handle it
            return False

    async def receive(self) -> dict[str, Any]:
        while not self._inbox:
            try:
                data = await self._evt.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self.healthy = False
                with trio.move_on_after(2):
                    await self.proc.wait()
                raise ChildDied(self.proc.poll())
            try:
                self._inbox.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                self.kill()
                with trio.move_on_after(2):
                    await self.proc.wait()
                raise ChildProtocolError(self.proc.poll(), str(exc)) from None
        return self._inbox.pop(0)

    def receive_nowait(self) -> dict[str, Any] | None:
        return self._inbox.pop(0) if self._inbox else None

    def kill(self) -> None:
        """SIGKILL the child's whole process group (it leads its own session), so processes a
        task started die with it."""
        self.healthy = False
        if self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                self.proc.kill()
            except ProcessLookupError:  # pragma: no cover
                pass

    async def aclose(self) -> None:
        self.healthy = False
        with trio.CancelScope(shield=True):
            for stream in (self._cmd, self._evt):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            with trio.move_on_after(2) as scope:
                await self.proc.wait()
            if scope.cancelled_caught:
                self.kill()
                await self.proc.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)


async def spawn_child(
    *,
    scratch_root: Path,
    allowed_modules: Sequence[str],
    flow_resolver: str | None,
    max_output_bytes: int,
    expose_env: Sequence[str] = (),
    code: CodeGeneration = NO_CODE,
) -> ChildProcess:
    """Start a child and wait for its ``ready`` frame.  ``code``'s wheel directories go first on
    its import path (after its own imports, so a wheel never replaces the runner).

    Raises:
        ChildDied: the child failed to start.
    """
    scratch = Path(tempfile.mkdtemp(prefix="child-", dir=scratch_root))
    cmd_r, cmd_w = os.pipe()
    evt_r, evt_w = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "pyoco_es.worker.child",
        "--cmd-fd",
        str(cmd_r),
        "--evt-fd",
        str(evt_w),
        "--max-output-bytes",
        str(max_output_bytes),
        "--scratch",
        str(scratch),
    ]
    if flow_resolver:
        argv += ["--flow-resolver", flow_resolver]
    for prefix in allowed_modules:
        argv += ["--allow-module", prefix]
    for name in expose_env:
        argv += ["--expose-env", name]
    for path in code.paths:
        argv += ["--code-path", path]
    env = dict(os.environ)
    env["PYTHONPATH"] = _child_pythonpath()
    env.setdefault("PYOCO_CUTE", "0")
    try:
        proc = await trio.lowlevel.open_process(
            argv,
            pass_fds=(cmd_r, evt_w),
            cwd=str(scratch),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(cmd_r)
        os.close(evt_w)
    child = ChildProcess(proc, trio.lowlevel.FdStream(cmd_w), trio.lowlevel.FdStream(evt_r), scratch, code)
    try:
        with trio.fail_after(60):
            ready = await child.receive()
    except (ChildDied, trio.TooSlowError):
        child.kill()
        await child.aclose()
        raise ChildDied(proc.poll()) from None
    except BaseException:  # cancelled while starting: never leave the process behind
        child.kill()
        await child.aclose()
        raise
    if ready.get("ev") != "ready":  # pragma: no cover - protocol violation
        child.kill()
        await child.aclose()
        raise ChildDied(proc.poll())
    return child


class ChildPool:
    """Up to ``size`` warm children; :meth:`acquire` hands out an idle one or starts one."""

    def __init__(
        self,
        *,
        size: int,
        scratch_root: Path,
        allowed_modules: Sequence[str],
        flow_resolver: str | None,
        max_output_bytes: int,
        expose_env: Sequence[str] = (),
    ) -> None:
        self.size = size
        self.expose_env = tuple(expose_env)
        self.scratch_root = scratch_root
        self.allowed_modules = tuple(allowed_modules)
        self.flow_resolver = flow_resolver
        self.max_output_bytes = max_output_bytes
        self._idle: list[ChildProcess] = []
        self._slots = trio.Semaphore(size)
        self._all: set[ChildProcess] = set()
        self._warming = 0  # children warm() is starting right now
        self._warmed = trio.Event()  # set whenever one of them is ready (or failed)
        self.started = 0
        self.code = NO_CODE  # what new children import (worker/wheels.py switches it between runs)

    def _current(self, child: ChildProcess) -> bool:
        return child.healthy and child.proc.poll() is None and child.code is self.code

    async def set_code(self, code: CodeGeneration) -> None:
        """Start new children with ``code`` from now on: idle children of an older generation
        are closed (a busy one finishes its run with the code it started with, then goes), and
        fresh ones are warmed."""
        self.code = code
        stale = [c for c in self._idle if c.code is not code]
        self._idle = [c for c in self._idle if c.code is code]
        for child in stale:
            await self._discard(child)
        await self.warm()

    def paths_in_use(self) -> set[str]:
        """Wheel directories some live child (idle or busy) imports from."""
        return {p for child in self._all for p in child.code.paths}

    async def _spawn(self) -> ChildProcess:
        child = await spawn_child(
            scratch_root=self.scratch_root,
            allowed_modules=self.allowed_modules,
            flow_resolver=self.flow_resolver,
            max_output_bytes=self.max_output_bytes,
            expose_env=self.expose_env,
            code=self.code,
        )
        self.started += 1
        self._all.add(child)
        return child

    async def warm(self) -> None:
        """Start children until ``size`` are idle (at start-up in the background, and after a new
        code generation)."""
        count = max(0, self.size - len(self._all) - self._warming)
        self._warming += count
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(self._warm_one)

    async def _warm_one(self) -> None:
        try:
            child = await self._spawn()
        except ChildDied as exc:
            log.warning("could not start a warm child: %s", exc)
            return
        finally:
            self._warming -= 1
            self._warmed.set()
            self._warmed = trio.Event()
        if child.code is self.code:
            self._idle.append(child)
        else:  # the code changed while it was starting
            await self._discard(child)

    async def acquire(self) -> ChildProcess:
        await self._slots.acquire()
        try:
            while not self._idle and self._warming:
                await self._warmed.wait()  # one is starting already: take it, not a second one
            while self._idle:
                child = self._idle.pop()
                if self._current(child):
                    return child
                await self._discard(child)
            return await self._spawn()
        except BaseException:
            self._slots.release()
            raise

    async def release(self, child: ChildProcess) -> None:
        """Return a child after a run; an unhealthy one is killed and replaced lazily."""
        try:
            if self._current(child) and len(self._idle) < self.size:
                child.runs += 1
                self._idle.append(child)
            else:
                await self._discard(child)
        finally:
            self._slots.release()

    async def _discard(self, child: ChildProcess) -> None:
        child.kill()
        self._all.discard(child)
        await child.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for child in list(self._all):
                child.kill()
            for child in list(self._all):
                await child.aclose()
            self._all.clear()
            self._idle.clear()
