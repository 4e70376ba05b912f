"""The child process that executes pyoco runs, one at a time, for a worker actor.

Started by :mod:`pyoco_es.worker.pool` as ``python -m pyoco_es.worker.child --cmd-fd N --evt-fd M``
in its own scratch directory (pyoco's ``Context`` creates ``./artifacts`` in the current
directory and pyoco redirects ``sys.stdout`` per run, so the protocol uses private pipes).  It
imports no trio and no NATS: plain threads, because pyoco is synchronous.

Caches (the point of keeping children warm): parsed ``flow.yaml`` documents by sha256 and
imported callables by ``module:attr``.  Every build still makes fresh pyoco ``Task`` objects,
because pyoco stores dependency edges on them.

Two threads take turns reading commands; ``cancel`` is applied at once (``run_ctx.status =
CANCELLING``, which pyoco honours at task boundaries, or before the run starts), and a ``go`` runs
in the thread that read it while the other one takes over the pipe.  When the command
pipe closes (the worker died, even by SIGKILL) the child exits immediately, abandoning its run:
the conductor's reaper retries the attempt elsewhere, and nothing keeps executing behind its back.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import importlib.util
import json
import os
import shutil
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from pyoco.core.engine import Engine
from pyoco.core.models import Flow, RunContext, RunStatus, Task
from pyoco.dsl.syntax import TaskWrapper
from pyoco.trace.backend import TraceBackend

from ..core.errors import ValidationError
from ..flows.graph import build_flow
from ..flows.yaml import WorkflowDoc, parse_workflow_yaml
from .protocol import HEADER, FrameDecoder, encode_frame

DOC_CACHE_SIZE: Final = 256
ALLOW_ALL: Final = "*"
_result = threading.local()


class RefusedCallable(Exception):
    pass


def module_allowed(module: str, allowed: Sequence[str]) -> bool:
    """``module`` equals an allowed prefix or is inside it (``pkg`` allows ``pkg.sub``)."""
    for prefix in allowed:
        prefix = prefix.strip()
        if prefix == ALLOW_ALL or module == prefix or module.startswith(prefix + "."):
            return True
    return False


def refusal(callable_path: str, module: str) -> str:
    return (
        f"callable '{callable_path}' refused: module '{module}' is not in the allowed modules "
        f"(--allow-module / PYOCO_ALLOWED_MODULES)"
    )


def json_safe(value: Any, max_bytes: int) -> tuple[Any, bool]:  # noqa: ANN401 - any task value
    """A JSON-safe copy of ``value`` (``repr`` for the rest), truncated with a marker over
    ``max_bytes`` of JSON.  Returns the value and whether it was truncated."""
    try:
        raw = json.dumps(value, allow_nan=False, default=repr, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        value = repr(value)
        raw = json.dumps(value, ensure_ascii=False)
    if max_bytes > 0 and len(raw) > max_bytes:
        return f"{raw[:max_bytes]}...[truncated: {len(raw)} bytes of JSON]", True
    return json.loads(raw), False


def _capture(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task function so its return value is visible to ``on_node_end`` (which pyoco calls
    in the same thread before it stores the output on the record)."""
    if getattr(func, "pyoco_es_capturing", False):
        return func

    @functools.wraps(func)  # keeps inspect.signature, so pyoco's injection works
    def capturing(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        result = func(*args, **kwargs)
        _result.value = result
        return result

    capturing.pyoco_es_capturing = True  # type: ignore[attr-defined]
    return capturing


class Channel:
    """Frames over two pipe fds; writes are serialised (trace hooks run on pool threads)."""

    def __init__(self, cmd_fd: int, evt_fd: int) -> None:
        self.cmd_fd = cmd_fd
        self.evt_fd = evt_fd
        self._lock = threading.Lock()
        self._decoder = FrameDecoder()
        self._frames: deque[dict[str, Any]] = deque()

    def send(self, msg: dict[str, Any]) -> None:
        data = encode_frame(msg)
        with self._lock:
            view = memoryview(data)
            while view:
                n = os.write(self.evt_fd, view)
                view = view[n:]

    def read_command(self) -> dict[str, Any] | None:
        """The next command frame (blocking); None once the worker closed the pipe.  Callers
        take turns (see :meth:`Child.serve`), so one thread reads at a time."""
        while not self._frames:
            try:
                data = os.read(self.cmd_fd, 65536)
            except OSError:
                data = b""
            if not data:
                return None
            self._frames.extend(self._decoder.feed(data))
        return self._frames.popleft()


class Backend(TraceBackend):
    """pyoco trace hooks → task events on the pipe."""

    def __init__(self, channel: Channel, run_ctx: RunContext, run_id: str, max_output_bytes: int) -> None:
        self.channel = channel
        self.run_ctx = run_ctx
        self.run_id = run_id
        self.max_output_bytes = max_output_bytes

    def on_flow_start(self, flow_name: str, run_id: str | None = None) -> None:
        pass

    def on_flow_end(self, flow_name: str) -> None:
        pass

    def on_node_start(self, node_name: str) -> None:
        try:
            rec = self.run_ctx.task_records.get(node_name)
            started = rec.started_at if rec is not None and rec.started_at else time.time()
            _result.value = None
            self.channel.send({"ev": "task.started", "run_id": self.run_id, "task": node_name, "started_at": started})
        except Exception:  # noqa: BLE001 - a hook must never fail the task
            pass

    def _inputs(self, node_name: str) -> tuple[dict[str, Any], Any]:  # noqa: ANN401
        rec = self.run_ctx.task_records.get(node_name)
        inputs: Any = {}
        if rec is not None and rec.inputs:
            inputs, truncated = json_safe(rec.inputs, self.max_output_bytes)
            if truncated or not isinstance(inputs, dict):
                inputs = {"_truncated": inputs}
        return inputs, rec

    def on_node_end(self, node_name: str, duration_ms: float) -> None:
        try:
            inputs, rec = self._inputs(node_name)
            output, truncated = json_safe(getattr(_result, "value", None), self.max_output_bytes)
            _result.value = None
            self.channel.send(
                {
                    "ev": "task.completed",
                    "run_id": self.run_id,
                    "task": node_name,
                    "started_at": rec.started_at if rec is not None else None,
                    "ended_at": time.time(),
                    "duration_ms": duration_ms,
                    "inputs": inputs,
                    "output": output,
                    "truncated": truncated,
                }
            )
        except Exception:  # noqa: BLE001
            pass

    def on_node_error(self, node_name: str, error: Exception) -> None:
        try:
            inputs, rec = self._inputs(node_name)
            message = (rec.error if rec is not None and rec.error else None) or str(error) or type(error).__name__
            tb = rec.traceback if rec is not None and rec.traceback else "".join(
                traceback.format_exception(type(error), error, error.__traceback__)
            )
            started = rec.started_at if rec is not None else None
            ended = rec.ended_at if rec is not None and rec.ended_at else time.time()
            self.channel.send(
                {
                    "ev": "task.failed",
                    "run_id": self.run_id,
                    "task": node_name,
                    "started_at": started,
                    "ended_at": ended,
                    "duration_ms": (ended - started) * 1000 if started else None,
                    "inputs": inputs,
                    "error": f"{type(error).__name__}: {message}",
                    "traceback": tb[-20000:],
                }
            )
        except Exception:  # noqa: BLE001
            pass


class Prepared:
    def __init__(self, run_id: str, flow: Flow, params: dict[str, Any]) -> None:
        self.run_id = run_id
        self.flow = flow
        self.params = params
        self.cancel_requested = False
        self.run_ctx: RunContext | None = None


def _topological(flow: Flow) -> list[str]:
    names = sorted(t.name for t in flow.tasks)
    deps = {t.name: {d.name for d in t.dependencies if d in flow.tasks} for t in flow.tasks}
    out: list[str] = []
    done: set[str] = set()
    while len(out) < len(names):
        ready = [n for n in names if n not in done and deps[n] <= done]
        if not ready:  # cycle or control flow: keep the rest in name order
            ready = [n for n in names if n not in done]
        for n in ready:
            done.add(n)
            out.append(n)
    return out


class Child:
    def __init__(
        self,
        channel: Channel,
        *,
        allowed_modules: Sequence[str],
        resolver_spec: str | None,
        max_output_bytes: int,
        scratch: str | None = None,
    ) -> None:
        self.channel = channel
        self.scratch = scratch  # cleaned after every run; only ever the pool's own directory
        self.allowed = tuple(allowed_modules)
        self.resolver_spec = resolver_spec
        self._resolver: Callable[[str], Any] | None = None
        self.max_output_bytes = max_output_bytes
        self.docs: OrderedDict[str, WorkflowDoc] = OrderedDict()
        self.funcs: dict[str, Callable[..., Any]] = {}
        self.prepared: dict[str, Prepared] = {}
        self.lock = threading.Lock()
        self.read_turn = threading.Lock()  # whose turn it is to read the command pipe

    # -- commands -------------------------------------------------------------------------------

    def serve(self) -> None:
        """Two threads take turns reading commands (leader/follower): the reader handles a
        command at once, except ``go``, which it runs after handing the reading over, so a
        ``cancel`` is read while the run executes and no command waits for a thread hand-off."""
        threading.Thread(target=self._serve, name="pyoco-es-cmd", daemon=True).start()
        self._serve()

    def _serve(self) -> None:
        while True:
            with self.read_turn:
                msg = self.channel.read_command()
                if msg is None:
                    # The worker is gone (or closed our pipe): stop now, even in the middle of a run.
                    os._exit(0)
                op = msg.get("op")
                run_id = str(msg.get("run_id", ""))
                if op == "cancel":
                    self._cancel(run_id)
                    continue
                if op == "prepare":
                    self.channel.send(self.prepare(msg))
                    continue
                if op == "abort":
                    with self.lock:
                        self.prepared.pop(run_id, None)
                    continue
                if op != "go":
                    continue
            # A go for a run that is not prepared (its prepare failed: the worker may have sent
            # the go from its NATS thread the moment the claim was stored) is dropped: the
            # worker ends such a run itself and expects no frame for it.
            if run_id in self.prepared:
                self.channel.send(self.run(run_id))

    def _cancel(self, run_id: str) -> None:
        with self.lock:
            p = self.prepared.get(run_id)
            if p is not None:
                p.cancel_requested = True
                if p.run_ctx is not None and p.run_ctx.status == RunStatus.RUNNING:
                    p.run_ctx.status = RunStatus.CANCELLING

    # -- building -------------------------------------------------------------------------------

    def _doc(self, msg: dict[str, Any]) -> WorkflowDoc:
        sha = msg.get("sha256")
        if sha and sha in self.docs:
            self.docs.move_to_end(sha)
            return self.docs[sha]
        text = msg.get("yaml")
        if text is None:
            raise ValidationError("workflow_yaml missing from the job")
        doc = parse_workflow_yaml(text.encode("utf-8"), max_bytes=0)
        self.docs[doc.sha256] = doc
        if sha and sha != doc.sha256:
            self.docs[sha] = doc
        while len(self.docs) > DOC_CACHE_SIZE:
            self.docs.popitem(last=False)
        return doc

    def _import(self, path: str) -> Callable[..., Any]:
        fn = self.funcs.get(path)
        if fn is not None:
            return fn
        module_name, attr = path.split(":", 1)
        if not module_allowed(module_name, self.allowed):
            raise RefusedCallable(refusal(path, module_name))
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is a build error
            raise RefusedCallable(f"callable '{path}': cannot import module '{module_name}': {type(exc).__name__}: {exc}") from exc
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError as exc:
                raise RefusedCallable(f"callable '{path}': module '{module_name}' has no attribute '{attr}'") from exc
        if isinstance(obj, TaskWrapper):
            obj = obj.task.func
        elif isinstance(obj, Task):
            obj = obj.func
        if not callable(obj):
            raise RefusedCallable(f"callable '{path}' is not callable ({type(obj).__name__})")
        fn = _capture(obj)
        self.funcs[path] = fn
        return fn

    def _resolve(self, flow_name: str) -> Flow:
        if self.resolver_spec is None:
            raise KeyError(f"unknown flow '{flow_name}' (this worker has no --flow-resolver)")
        if self._resolver is None:
            self._resolver = load_resolver(self.resolver_spec)
        flow = self._resolver(flow_name)
        if not isinstance(flow, Flow):
            raise TypeError(f"flow resolver returned {type(flow).__name__}, not a pyoco Flow")
        for task in flow.tasks:
            task.func = _capture(task.func)
        return flow

    def prepare(self, msg: dict[str, Any]) -> dict[str, Any]:
        run_id = str(msg["run_id"])
        flow_name = str(msg.get("flow_name") or "main")
        params = msg.get("params") or {}
        try:
            if msg.get("yaml") is not None or msg.get("sha256"):
                doc = self._doc(msg)
                funcs = {name: self._import(doc.tasks[name].callable) for name in doc.plan.declared}

                def make(name: str) -> Task:
                    spec = doc.tasks[name]
                    return Task(func=funcs[name], name=name, inputs=dict(spec.inputs), outputs=list(spec.outputs))

                flow = build_flow(doc.plan, make, flow_name=flow_name)
                merged = {**json.loads(json.dumps(doc.flow_defaults)), **params}
                names = list(doc.plan.task_names)
            else:
                try:
                    flow = self._resolve(flow_name)
                except KeyError as exc:
                    message = exc.args[0] if exc.args else flow_name
                    return {"ev": "prepare_failed", "run_id": run_id, "reason": "flow_not_found", "error": f"flow_not_found: {message}"}
                merged = dict(params)
                names = _topological(flow)
        except (RefusedCallable, ValidationError) as exc:
            return {"ev": "prepare_failed", "run_id": run_id, "reason": "build_error", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - user code (resolver, imports) may raise anything
            return {
                "ev": "prepare_failed",
                "run_id": run_id,
                "reason": "build_error",
                "error": f"{type(exc).__name__}: {exc}",
            }
        with self.lock:
            self.prepared[run_id] = Prepared(run_id, flow, merged)
        return {"ev": "prepared", "run_id": run_id, "tasks": names}

    # -- running --------------------------------------------------------------------------------

    def run(self, run_id: str) -> dict[str, Any]:
        with self.lock:
            p = self.prepared.get(run_id)
            if p is None:
                return {"ev": "done", "run_id": run_id, "outcome": "FAILED", "error": "run was not prepared"}
            run_ctx = RunContext(run_id=run_id)
            if p.cancel_requested:
                run_ctx.status = RunStatus.CANCELLING
            p.run_ctx = run_ctx
        engine = Engine(trace_backend=Backend(self.channel, run_ctx, run_id, self.max_output_bytes))
        error = tb = None
        try:
            engine.run(p.flow, p.params, run_ctx)
        except Exception as exc:  # noqa: BLE001 - the task's own exception, re-raised by pyoco
            error = f"{type(exc).__name__}: {exc}"
            tb = traceback.format_exc()[-20000:]
        finally:
            with self.lock:
                self.prepared.pop(run_id, None)
            if self.scratch is not None and os.getcwd() == self.scratch:
                _clean_scratch()
        status = run_ctx.status
        if status == RunStatus.CANCELLED or (status == RunStatus.CANCELLING and error is None):
            # A cancel reached the run while it was running (pyoco leaves CANCELLING when the
            # last task finished after the request): the run is cancelled, even if a cooperative
            # task returned normally after noticing it.
            outcome = "CANCELLED"
            error = None
        elif error is not None or status == RunStatus.FAILED:
            outcome = "FAILED"
            error = error or "run failed"
        else:
            outcome = "COMPLETED"
        return {"ev": "done", "run_id": run_id, "outcome": outcome, "error": error, "traceback": tb}


def _clean_scratch() -> None:
    """Remove what the run left in the scratch directory.  pyoco creates ``./artifacts`` for
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


def file_module(path: str) -> tuple[str, str]:
    """(import root, dotted name) of a ``.py`` file: inside a package (``__init__.py`` files up
    the tree) it is that package's module, so its relative imports work (``examples/flows.py``
    is ``examples.flows`` under the directory holding ``examples/``)."""
    directory, filename = os.path.split(os.path.abspath(path))
    parts = [os.path.splitext(filename)[0]]
    while os.path.isfile(os.path.join(directory, "__init__.py")):
        directory, package = os.path.split(directory)
        parts.insert(0, package)
    return directory, ".".join(parts)


def load_resolver(spec: str) -> Callable[[str], Any]:
    """``module:fn`` or ``path/to/file.py:fn`` (split on the last ``:``; dotted attributes ok).

    Raises:
        ValueError: the spec is malformed, the file is missing, or the target is not callable.
    """
    if ":" not in spec:
        raise ValueError(f"--flow-resolver must be 'module:function' or 'path.py:function', got {spec!r}")
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise ValueError(f"--flow-resolver must be 'module:function' or 'path.py:function', got {spec!r}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ValueError(f"--flow-resolver file not found: {target}")
        root, dotted = file_module(path)
        if root not in sys.path:
            sys.path.insert(0, root)  # its siblings (or its package) import as they would from there
        if "." in dotted:
            module: Any = importlib.import_module(dotted)
        else:  # a lone file: under a private name, so it never collides with an installed module
            name = "pyoco_es_resolver_" + dotted
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ValueError(f"--flow-resolver cannot load {target}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            # No flag name: the operator typed --flow-resolver or up's --worker-flow-resolver.
            raise ValueError(f"flow resolver {spec!r}: {target} has no attribute {attr!r}")
    if not callable(obj):
        raise ValueError(f"flow resolver {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


class _RunExecutor:
    """What pyoco's engine gets instead of a new ``ThreadPoolExecutor`` per run: the same API on
    a pool shared by the child's (sequential) runs.  Leaving the ``with`` block waits for this
    run's futures, as ``shutdown(wait=True)`` would; no threads are started or joined per run.

    Submitted tasks are held until the engine waits for them (:meth:`release`): a lone task
    with nothing else of the run in flight and no ``timeout_sec`` then runs right in the
    engine's thread, which saves two thread hand-offs per task of a sequential flow (most of a
    trivial task's cost); several at once, or one beside a running task, go to the pool.
    """

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._pool = pool
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._held: list[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:  # noqa: ANN401
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._futures.add(future)
        self._held.append((future, fn, args, kwargs))
        return future

    def release(self) -> None:
        """Start the held tasks (called when the engine is about to wait for its futures)."""
        held, self._held = self._held, []
        held = [h for h in held if h[0].set_running_or_notify_cancel()]  # skip cancelled ones
        if not held:
            return
        starting = {h[0] for h in held}
        busy = any(f.running() for f in self._futures - starting)
        if len(held) == 1 and not busy and not getattr(held[0][2][0] if held[0][2] else None, "timeout_sec", None):
            future, fn, args, kwargs = held[0]
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - what a pool thread would record
                future.set_exception(exc)
            return
        for future, fn, args, kwargs in held:
            self._pool.submit(_run_into, future, fn, args, kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            for future in self._futures:
                future.cancel()
        self.release()
        if wait:
            concurrent.futures.wait(self._futures)

    def __enter__(self) -> _RunExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)


def _run_into(future: concurrent.futures.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001
        future.set_exception(exc)


_current: list[_RunExecutor] = []  # the engine's executor of the run in progress (one at a time)


def install_shared_executor(max_workers: int = 8) -> None:
    """Make pyoco's engine reuse task threads across runs (it creates a ThreadPoolExecutor per
    run, and starting/joining its threads was about a third of a trivial run's cost), and start
    its held tasks when it waits (see :class:`_RunExecutor`).

    Only calls made from ``pyoco.core.engine`` are redirected; any other code in the child
    (user tasks) still gets a real, private ``ThreadPoolExecutor`` and the real ``wait``.
    """
    real = concurrent.futures.ThreadPoolExecutor
    real_wait = concurrent.futures.wait
    shared = real(max_workers=max_workers, thread_name_prefix="pyoco-task")

    class EngineAwareThreadPoolExecutor(real):  # type: ignore[misc, valid-type]
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            if sys._getframe(1).f_globals.get("__name__") == "pyoco.core.engine":
                executor = _RunExecutor(shared)
                _current[:] = [executor]
                return executor
            return super().__new__(cls)

    def engine_aware_wait(fs: Any, timeout: float | None = None, return_when: str = concurrent.futures.ALL_COMPLETED) -> Any:  # noqa: ANN401
        if _current and sys._getframe(1).f_globals.get("__name__") == "pyoco.core.engine":
            _current[0].release()
        return real_wait(fs, timeout=timeout, return_when=return_when)

    concurrent.futures.ThreadPoolExecutor = EngineAwareThreadPoolExecutor  # type: ignore[misc]
    concurrent.futures.wait = engine_aware_wait  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyoco_es.worker.child")
    parser.add_argument("--cmd-fd", type=int, required=True)
    parser.add_argument("--evt-fd", type=int, required=True)
    parser.add_argument("--flow-resolver", default=None)
    parser.add_argument("--allow-module", action="append", default=[])
    parser.add_argument("--max-output-bytes", type=int, default=65536)
    parser.add_argument("--scratch", default=None, help="this child's own working directory (cleaned after each run)")
    args = parser.parse_args(argv)
    install_shared_executor()
    channel = Channel(args.cmd_fd, args.evt_fd)
    child = Child(
        channel,
        allowed_modules=args.allow_module,
        resolver_spec=args.flow_resolver,
        max_output_bytes=args.max_output_bytes,
        scratch=os.path.realpath(args.scratch) if args.scratch else None,
    )
    channel.send({"ev": "ready", "pid": os.getpid()})
    child.serve()


assert HEADER.size == 4

if __name__ == "__main__":
    main()
