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
import functools
import importlib
import importlib.util
import json
import os
import sys
import threading
import time
import traceback
import types
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from pyoco.core.engine import Engine
from pyoco.core.models import Flow, RunContext, RunStatus, Task
from pyoco.dsl.syntax import TaskWrapper
from pyoco.trace.backend import TraceBackend

from ..core.errors import ValidationError
from ..flows.graph import build_flow
from ..flows.yaml import WorkflowDoc, parse_workflow_yaml
from ..flows.policy import apply_policy, policy_of
from .describe import describe, describe_error
from .capture import install_capture
from .executor import install_shared_executor
from .protocol import HEADER, FrameDecoder, encode_frame
from .retry import Prepared, TaskTimeout, guarded
from .scratch import clean_scratch
from .trust import RefusedCallable, env_refusal, exposed_values, missing_env, resolve_callable

DOC_CACHE_SIZE: Final = 256
_result = threading.local()


def json_safe(value: Any, max_bytes: int) -> tuple[Any, bool]:  # noqa: ANN401 - any task value
    """A JSON-safe copy of ``value`` (``repr`` for the rest: sets, objects, bytes, NaN), truncated
    with a marker over ``max_bytes`` of JSON.  Returns the value and whether it was truncated.
    Total: a value whose ``repr`` raises becomes a placeholder (issue 10 #3)."""
    try:
        raw = json.dumps(value, allow_nan=False, default=describe, ensure_ascii=False)
    except Exception:  # noqa: BLE001 - NaN, cycles, depth, a raising __repr__ ...
        value = describe(value)
        raw = json.dumps(value, ensure_ascii=False)
    if max_bytes > 0 and len(raw) > max_bytes:
        return f"{raw[:max_bytes]}...[truncated: {len(raw)} bytes of JSON]", True
    return json.loads(raw), False


def _task_function(obj: Any) -> Any:  # noqa: ANN401
    """A pyoco task object's function (what a ``callable:`` naming a ``@task`` really calls)."""
    if isinstance(obj, TaskWrapper):
        obj = obj.task
    return obj.func if isinstance(obj, Task) else obj


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
            message = (rec.error if rec is not None and rec.error else None) or describe_error(error).split(": ", 1)[1] or type(error).__name__
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
                    "reason": "timeout" if isinstance(error, TaskTimeout) else None,
                }
            )
        except Exception:  # noqa: BLE001
            pass


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
        expose_env: Sequence[str] = (),
    ) -> None:
        self.channel = channel
        self.expose_env = frozenset(expose_env)  # the worker operator's --expose-env names
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
                        _env_views.pop(run_id, None)
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
        """A YAML ``callable:`` under the allow-list (:func:`pyoco_es.worker.trust.resolve_callable`)."""
        fn = self.funcs.get(path)
        if fn is not None:
            return fn
        fn = _capture(resolve_callable(path, self.allowed, unwrap=_task_function))
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
            policy_of(task)  # bad retries/timeout attributes: a build error now, not at run time
        return flow

    def prepare(self, msg: dict[str, Any]) -> dict[str, Any]:
        run_id = str(msg["run_id"])
        flow_name = str(msg.get("flow_name") or "main")
        params = msg.get("params") or {}
        try:
            if msg.get("yaml") is not None or msg.get("sha256"):
                doc = self._doc(msg)
                missing = missing_env(doc.expose_env, self.expose_env)
                if missing:  # names only: the values never leave this process
                    raise RefusedCallable(env_refusal(missing))
                funcs = {name: self._import(doc.tasks[name].callable) for name in doc.plan.declared}

                def make(name: str) -> Task:
                    spec = doc.tasks[name]
                    return apply_policy(Task(func=funcs[name], name=name, inputs=dict(spec.inputs), outputs=list(spec.outputs)), spec.policy)

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
                "error": describe_error(exc),
            }
        with self.lock:
            self.prepared[run_id] = Prepared(run_id, flow, merged)
            if msg.get("yaml") is not None or msg.get("sha256"):
                _env_views[run_id] = exposed_values(doc.expose_env, os.environ)
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
            with guarded(p, self.channel):  # task retries and timeouts (issue 16)
                engine.run(p.flow, p.params, run_ctx)
        except Exception as exc:  # noqa: BLE001 - the task's own exception, re-raised by pyoco
            error = describe_error(exc)
            tb = traceback.format_exc()[-20000:]
        finally:
            with self.lock:
                self.prepared.pop(run_id, None)
                _env_views.pop(run_id, None)
            if self.scratch is not None and os.getcwd() == self.scratch:
                clean_scratch()
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
        return p.verdict({"ev": "done", "run_id": run_id, "outcome": outcome, "error": error, "traceback": tb})


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


_env_views: dict[str, dict[str, str]] = {}  # YAML run id -> what its `$env` may read


def _walk(current: Any, parts: Sequence[str], reference: str) -> Any:  # noqa: ANN401
    """pyoco's walk of ``$node...output.a.b`` / ``$ctx.results.a.b`` (mapping keys, else
    attributes) that never takes a private step or passes through a module object (where
    ``os.environ`` and the like live).

    Raises:
        ValueError: such a step; KeyError/AttributeError: a missing key or attribute (as pyoco).
    """
    for part in parts:
        if part.startswith("_") or isinstance(current, types.ModuleType):
            raise ValueError(f"Invalid reference '{reference}': may not read private attributes or modules")
        current = current[part] if isinstance(current, Mapping) else getattr(current, part)
    if isinstance(current, types.ModuleType):
        raise ValueError(f"Invalid reference '{reference}': may not read a module")
    return current


def install_env_guard() -> None:
    """Make what a YAML document can reach through pyoco's references safe.

    pyoco resolves ``$env.NAME`` inputs and template expressions from ``os.environ`` (the
    worker's whole environment, which trusted task code keeps).  For a run prepared from a
    document, the lookup goes to that run's view instead (the names it listed, all of them
    exposed by the worker, see :meth:`Child.prepare`); named flows (operator code) are unchanged.
    Walks of task outputs (``$node.a.output.x``, ``{{ $ctx.results.a.x }}``) never take a private
    step or pass through a module, for any run (the gateway refuses private steps at submit).
    """
    from pyoco.core.context import Context
    from pyoco.dsl import expressions

    real_resolve = Context.resolve
    real_env_data = Context.env_data
    real_resolve_path = expressions.resolve_path

    def view_of(ctx: Any) -> dict[str, str] | None:  # noqa: ANN401
        run_ctx = getattr(ctx, "run_context", None)
        return _env_views.get(getattr(run_ctx, "run_id", None) or "")

    def resolve(self: Any, value: Any) -> Any:  # noqa: ANN401
        if not isinstance(value, str) or not value.startswith(("$env.", "$node.")):
            return real_resolve(self, value)
        if value.startswith("$node."):
            parts = value.split(".")
            if len(parts) <= 3:
                return real_resolve(self, value)
            return _walk(real_resolve(self, ".".join(parts[:3])), parts[3:], value)
        view = view_of(self)
        if view is None:
            return real_resolve(self, value)
        key = value[len("$env.") :]
        if key in self.env:
            return self.env[key]
        if key in view:
            return view[key]
        raise KeyError(f"Environment variable '{key}' is not exposed to this run.")

    def env_data(self: Any) -> dict[str, str]:  # noqa: ANN401
        view = view_of(self)
        if view is None:
            return real_env_data(self)  # type: ignore[no-any-return]
        return {**view, **self.env}

    def resolve_path(data: Mapping[str, Any], path: str, root: str) -> Any:  # noqa: ANN401
        head, _, rest = path.partition(".")
        current = real_resolve_path(data, head, root)
        try:
            return _walk(current, rest.split(".") if rest else [], f"{root}.{path}")
        except (KeyError, AttributeError, TypeError) as exc:
            raise expressions.ExpressionEvaluationError(f"{root}.{path} not found.") from exc
        except ValueError as exc:
            raise expressions.ExpressionEvaluationError(str(exc)) from exc

    Context.resolve = resolve  # type: ignore[method-assign]
    Context.env_data = env_data  # type: ignore[method-assign]
    expressions.resolve_path = resolve_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyoco_es.worker.child")
    parser.add_argument("--cmd-fd", type=int, required=True)
    parser.add_argument("--evt-fd", type=int, required=True)
    parser.add_argument("--flow-resolver", default=None)
    parser.add_argument("--allow-module", action="append", default=[])
    parser.add_argument("--expose-env", action="append", default=[], help="an environment name YAML runs may read")
    parser.add_argument("--max-output-bytes", type=int, default=65536)
    parser.add_argument("--scratch", default=None, help="this child's own working directory (cleaned after each run)")
    parser.add_argument("--code-path", action="append", default=[], help="a synced wheel's directory (worker/wheels.py)")
    args = parser.parse_args(argv)
    sys.path[:0] = args.code_path  # after the runner's own imports: a wheel can never replace them
    install_shared_executor()
    install_env_guard()
    channel = Channel(args.cmd_fd, args.evt_fd)
    install_capture(channel.send)  # task output → ``log`` frames (worker/capture.py)
    child = Child(
        channel,
        allowed_modules=args.allow_module,
        resolver_spec=args.flow_resolver,
        max_output_bytes=args.max_output_bytes,
        scratch=os.path.realpath(args.scratch) if args.scratch else None,
        expose_env=args.expose_env,
    )
    channel.send({"ev": "ready", "pid": os.getpid()})
    child.serve()


assert HEADER.size == 4

if __name__ == "__main__":
    main()
