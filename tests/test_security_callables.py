"""Issue 10 items 1 and 2: what a submitted document may reach in a run process.

A YAML ``callable:`` resolves only to an object *defined* in a module the worker operator allowed
(whatever path reached it), and a run reads only the environment names the worker operator
exposed.  Hostile shapes live in ``tests/hostile/`` (allowed as ``tests.hostile``).
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from pyoco.core.context import Context
from pyoco.core.models import RunContext
from pyoco.dsl import expressions

from pyoco_es.config import Settings
from pyoco_es.core.errors import ValidationError
from pyoco_es.flows.yaml import parse_workflow_yaml
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.worker import child
from pyoco_es.worker.supervisor import run_worker
from pyoco_es.worker.trust import RefusedCallable, check_allowed_modules, check_env_names, module_allowed, resolve_callable
from test_gateway_support import HTTPX_STREAM_WARNINGS, GW, open_gateway, submit_yaml, wait_until

pytestmark = HTTPX_STREAM_WARNINGS

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = ("tests.hostile", "examples")
NEVER = "can never be allowed"
NOT_ALLOWED = "is not in the allowed modules (--allow-module / PYOCO_ALLOWED_MODULES)"


# -- the rule, in process -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """`examples` and `tests.hostile` import from the checkout, as they do in a worker's children."""
    monkeypatch.syspath_prepend(str(ROOT))


REFUSED = [
    # the two escapes from the issue: an allowed module's `os` attribute, reached two ways
    ("tests.hostile.mod:os.system", f"'os' is module 'os', which {NEVER}"),
    ("tests.hostile:mod.os.system", f"'os' is module 'os', which {NEVER}"),
    # re-exports: the object is what counts, not the module that holds it
    ("tests.hostile.mod:system", f"it is defined in module 'posix', which {NEVER}"),
    ("tests.hostile.mod:evaluate", f"it is defined in module 'builtins', which {NEVER}"),
    ("tests.hostile.mod:Popen", f"it is defined in module 'subprocess', which {NEVER}"),
    ("tests.hostile.mod:Path", f"it is defined in module 'pathlib', which {NEVER}"),
    # a class defined in the allowed module whose constructor is Popen's
    ("tests.hostile.mod:Shell", f"its base class 'Popen' is defined in module 'subprocess', which {NEVER}"),
    # a partial of os.system; a slot wrapper of object; methods of builtin instances
    ("tests.hostile.mod:shell", f"it is defined in module 'posix', which {NEVER}"),
    ("tests.hostile.mod:bound_system", f"it is defined in module 'builtins', which {NEVER}"),
    ("tests.hostile.mod:CONFIG.get", f"'CONFIG' is defined in module 'builtins', which {NEVER}"),
    ("tests.hostile.mod:listing.append", f"'listing' is defined in module 'builtins', which {NEVER}"),
    ("tests.hostile.mod:functools.partial", f"'functools' is module 'functools', which {NOT_ALLOWED}"),
    # dunder and private walks never start
    ("examples.tasks:__builtins__", "`__builtins__`: every part must be a public name"),
    ("examples.tasks:add_one.__globals__", "`__globals__`: every part must be a public name"),
    ("examples.tasks:add_one.__class__.__init__.__globals__", "`__class__`: every part must be a public name"),
    ("examples._private:f", "`_private`: every part must be a public name"),
    # the never list, even though nothing else refused it
    ("os:system", f"module 'os' {NEVER}"),
    ("builtins:eval", f"module 'builtins' {NEVER}"),
    # prefix confusion: `tests.hostile` does not allow `tests.hostile_evil`
    ("tests.hostile_evil:run", f"module 'tests.hostile_evil' {NOT_ALLOWED}"),
]


@pytest.mark.parametrize(("path", "why"), REFUSED, ids=[p for p, _ in REFUSED])
def test_a_callable_is_judged_by_what_it_is_not_how_it_was_reached(path: str, why: str) -> None:
    """Each refusal names the callable and the rule that refused it."""
    with pytest.raises(RefusedCallable) as info:
        resolve_callable(path, ALLOWED, unwrap=child._task_function)
    assert str(info.value).startswith(f"callable '{path}' refused: ")
    assert why in str(info.value)


@pytest.mark.parametrize(
    ("path", "args", "result"),
    [
        ("tests.hostile.mod:ok", (1,), 2),
        ("tests.hostile:mod.ok", (1,), 2),  # a walk through an allowed submodule
        ("tests.hostile.mod:decorated", (3,), 6),  # a pyoco @task: its function is checked
        ("tests.hostile.mod:Runner.make", (4,), 4),  # a classmethod of an allowed class
        ("tests.hostile.mod:runner.run", (5,), 5),  # a bound method of an allowed instance
        ("tests.hostile.mod:runner", (6,), 6),  # a callable instance of an allowed class
        ("tests.hostile.mod:double", (), 3),  # a partial of an allowed function
        ("examples.tasks:add_one", (1,), 2),
    ],
)
def test_code_defined_in_an_allowed_module_resolves(path: str, args: tuple[Any, ...], result: object) -> None:
    assert resolve_callable(path, ALLOWED, unwrap=child._task_function)(*args) == result


def test_star_allows_any_module_except_the_standard_library_and_the_never_list() -> None:
    assert resolve_callable("tests.hostile.mod:ok", ("*",))(1) == 2
    for path, why in [
        ("math:sqrt", "module 'math' is in the standard library, which '*' does not allow"),
        ("subprocess:run", f"module 'subprocess' {NEVER}"),
        ("pyoco_es.worker.child:load_resolver", f"module 'pyoco_es.worker.child' {NEVER}"),
        ("tests.hostile.mod:system", f"defined in module 'posix', which {NEVER}"),
        ("tests.hostile.mod:os.system", f"'os' is module 'os', which {NEVER}"),
    ]:
        with pytest.raises(RefusedCallable, match=re.escape(why)):
            resolve_callable(path, ("*",))


def test_a_prefix_allows_the_module_and_its_submodules_only() -> None:
    assert module_allowed("examples", ["examples"]) and module_allowed("examples.x.y", ["examples"])
    assert not module_allowed("examples_evil", ["examples"]) and not module_allowed("example", ["examples"])
    assert not module_allowed("os.path", ["*"]) and not module_allowed("os", ["os"])


@pytest.mark.parametrize("prefix", ["os", "os.path", "subprocess", "builtins", "importlib", "sys", "ctypes", "pickle", "shutil", "posix", "pty", "socket", "multiprocessing", "runpy", "code", "marshal", "pyoco_es"])
def test_a_never_module_is_refused_when_the_worker_starts(prefix: str) -> None:
    with pytest.raises(ValueError, match=f"--allow-module '{prefix}': this module can never be allowed"):
        check_allowed_modules(["examples", prefix])
    assert check_allowed_modules(["examples", "*", "os_tools", "examples"]) == ("examples", "*", "os_tools")


def test_exposed_names_are_environment_names() -> None:
    assert check_env_names(["SOME_SECRET", " B ", "SOME_SECRET", ""]) == ("SOME_SECRET", "B")
    for bad in ["A B", "-x", "A=1", "1A"]:
        with pytest.raises(ValueError, match="--expose-env"):
            check_env_names([bad])
    assert Settings.from_env({"PYOCO_WORKER_EXPOSE_ENV": "A, B", "PYOCO_LOAD_DOTENV": "0"}).worker_expose_env == ("A", "B")
    assert Settings.from_env({"PYOCO_LOAD_DOTENV": "0"}).worker_expose_env == ()


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "from pyoco_es.cli.worker import worker_main; worker_main()", "--allow-module", "examples", "--allow-module", "os"],
        ["-c", "from pyoco_es.cli.main import main; main()", "up", "--with-worker", "--allow-module", "os", "--port", "0"],
    ],
    ids=["pyoco-worker", "pyoco-server up"],
)
def test_the_commands_refuse_a_never_module_before_starting_anything(argv: list[str], tmp_path: Path) -> None:
    """A clear error and exit 1, before NATS is reached or started (nothing listens on port 1)."""
    env = dict(os.environ, PYOCO_LOAD_DOTENV="0", PYOCO_NATS_URL="nats://127.0.0.1:1", PYOCO_DATA_DIR=str(tmp_path / "d"))
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "ERR-PYOCO-0018" in proc.stderr and "--allow-module 'os': this module can never be allowed" in proc.stderr
    assert not (tmp_path / "d").exists()


# -- submit time: what can never be valid is a 422 ------------------------------------------------


def _doc(callable_: str = "examples.tasks:add_one", inputs: str = "{}", graph: str = "a", runtime: str = "") -> bytes:
    return f"flow: {{graph: '{graph}'}}\ntasks:\n  a: {{callable: '{callable_}', inputs: {inputs}}}\n{runtime}".encode()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (_doc("examples.tasks:__builtins__"), "tasks.a.callable (line 3): `__builtins__`: every part must be a public name"),
        (_doc("examples.tasks:add_one.__globals__"), "tasks.a.callable (line 3): `__globals__`"),
        (_doc("examples..tasks:f"), "tasks.a.callable (line 3): must be `module.path:function` (an empty name"),
        (_doc("examples.tasks:"), "tasks.a.callable (line 3): must be `module.path:function`"),
        (_doc("examples.tasks:a-b"), "tasks.a.callable (line 3): `a-b`: names may only contain"),
        (_doc(inputs="{v: '$node.b.output.__class__'}"), "tasks.a.inputs.v: `$node.b.output.__class__` may not read private"),
        # pyoco reads `{{env.NAME}}` as `$env.NAME` (the old check only looked for `$env.`)
        (_doc(graph="switch(on={{env.SECRET}}){ 1: a; default: a; }"), "graph: `$env.SECRET` is not listed in runtime.expose_env"),
        (_doc(graph="switch(on={{$ctx.results.a._x}}){ 1: a; default: a; }"), "may not read private"),
        (_doc(runtime="runtime: {expose_env: ['A B']}\n"), "runtime.expose_env (line 4): 'A B' is not an environment variable name"),
    ],
)
def test_a_document_that_can_never_be_valid_is_refused_at_parse(raw: bytes, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_workflow_yaml(raw, max_bytes=0)
    assert fragment in str(info.value)


async def test_the_gateway_answers_422_naming_the_callable(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_gateway(tmp_path) as gw:
            r = await submit_yaml(gw.client, _doc("examples.tasks:add_one.__globals__"))
            assert r.status_code == 422, r.text
            assert "tasks.a.callable" in r.json()["detail"] and "__globals__" in r.json()["detail"]


# -- run time: a real worker, real child processes ------------------------------------------------


async def _start_worker(gw: GW, settings: Settings, tag: str) -> None:
    await gw.stack.nursery.start(
        lambda task_status: run_worker(gw.nats, settings, worker_id=f"w-{tag}", tags=[tag], concurrency=1, task_status=task_status)
    )


async def _submit(gw: GW, text: str, tag: str) -> str:
    r = await submit_yaml(gw.client, text.encode(), tag=tag)
    assert r.status_code == 200, r.text
    return str(r.json()["run_id"])


async def _terminal(gw: GW, run_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await gw.client.get(f"/runs/{run_id}?include=full")
        body: dict[str, Any] = r.json()
        return body if r.status_code == 200 and body["status"] in {"COMPLETED", "FAILED", "CANCELLED"} else None

    return await wait_until(check, timeout=20, what=f"run {run_id} to end")


def _fast(**overrides: Any) -> Settings:  # noqa: ANN401
    return Settings(worker_heartbeat_interval=0.2, run_lease_seconds=3.0, worker_poll_timeout=0.25, worker_drain_timeout=2.0, **overrides)


ESCAPE = """\
flow:
  graph: a
tasks:
  a:
    callable: "{callable}"
    inputs: {{command: "touch {marker}"}}
"""


async def test_the_escapes_fail_the_run_and_execute_nothing(tmp_path: Path) -> None:
    """`tests.hostile.mod:os.system`, `tests.hostile:mod.os.system` and a re-exported `system` each end
    FAILED (build_error naming the callable and the rule); the command never ran."""
    with trio.fail_after(60):
        async with open_gateway(tmp_path) as gw:
            await _start_worker(gw, _fast(allowed_modules=ALLOWED), "default")
            cases = {}
            for i, path in enumerate(["tests.hostile.mod:os.system", "tests.hostile:mod.os.system", "tests.hostile.mod:system"]):
                marker = tmp_path / f"pwned-{i}"
                cases[await _submit(gw, ESCAPE.format(callable=path, marker=marker), "default")] = (path, marker)
            good = await _submit(gw, "flow: {graph: a}\ntasks: {a: {callable: 'tests.hostile.mod:ok', inputs: {x: 41}}}\n", "default")
            for run_id, (path, marker) in cases.items():
                snap = await _terminal(gw, run_id)
                assert snap["status"] == "FAILED" and snap["failure_reason"] == "build_error", snap
                assert snap["error"].startswith(f"callable '{path}' refused: ") and NEVER in snap["error"], snap["error"]
                assert not marker.exists()
            snap = await _terminal(gw, good)
            assert snap["status"] == "COMPLETED" and snap["task_records"]["a"]["output"] == 42, snap


SECRET_VALUE = "s3cr3t-value-4f9a1c"
ASKS_FOR_SECRET = """\
flow:
  graph: show
tasks:
  show:
    callable: "examples.tasks:to_text"
    inputs: {value: "$env.SOME_SECRET"}
runtime: {expose_env: [SOME_SECRET]}
"""
LISTS_SECRET = """\
flow:
  graph: show
tasks:
  show:
    callable: "examples.tasks:to_text"
    inputs: {value: 1}
runtime: {expose_env: [SOME_SECRET]}
"""


async def test_a_run_reads_only_what_its_worker_exposes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's environment holds SOME_SECRET.  A worker that does not expose it fails every
    document asking for it (listing it, or reading `$env.SOME_SECRET`), naming the variable and
    never its value; a worker started with `--expose-env SOME_SECRET` runs the same document."""
    monkeypatch.setenv("SOME_SECRET", SECRET_VALUE)
    with trio.fail_after(60):
        async with open_gateway(tmp_path) as gw:
            await _start_worker(gw, _fast(allowed_modules=("examples",)), "plain")
            await _start_worker(gw, _fast(allowed_modules=("examples",), worker_expose_env=("SOME_SECRET",)), "exposed")
            refused = [await _submit(gw, text, "plain") for text in (ASKS_FOR_SECRET, LISTS_SECRET)]
            allowed = await _submit(gw, ASKS_FOR_SECRET, "exposed")
            for run_id in refused:
                snap = await _terminal(gw, run_id)
                assert snap["status"] == "FAILED" and snap["failure_reason"] == "build_error", snap
                assert "environment variable 'SOME_SECRET' not exposed by this worker" in snap["error"], snap["error"]
                events = await gw.client.get(f"/runs/{run_id}/events")
                assert events.status_code == 200 and "SOME_SECRET" in events.text
                assert SECRET_VALUE not in events.text and SECRET_VALUE not in json.dumps(snap)
            snap = await _terminal(gw, allowed)
            assert snap["status"] == "COMPLETED", snap
            assert snap["task_records"]["show"]["output"] == f"value={SECRET_VALUE}"


def test_env_guard_limits_what_pyoco_references_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth inside the run process: for a YAML run, pyoco's `$env` lookups (inputs and
    expressions) see only the run's view, whatever the process environment holds; other runs
    (named flows, the operator's code) keep pyoco's behaviour.  Walks of task outputs never reach
    a module (where `os.environ` lives) or a private attribute, whoever asks."""
    monkeypatch.setattr(Context, "resolve", Context.resolve)  # restored after the test
    monkeypatch.setattr(Context, "env_data", Context.env_data)
    monkeypatch.setattr(expressions, "resolve_path", expressions.resolve_path)
    monkeypatch.setenv("SOME_SECRET", SECRET_VALUE)
    monkeypatch.setitem(child._env_views, "yaml-run", {"SHOWN": "1"})
    child.install_env_guard()
    guarded = Context(run_context=RunContext(run_id="yaml-run"))
    trusted = Context(run_context=RunContext(run_id="named-run"))
    assert guarded.resolve("$env.SHOWN") == "1"
    with pytest.raises(KeyError, match="not exposed"):
        guarded.resolve("$env.SOME_SECRET")
    assert guarded.env_data() == {"SHOWN": "1"}
    assert trusted.resolve("$env.SOME_SECRET") == SECRET_VALUE
    assert trusted.env_data()["SOME_SECRET"] == SECRET_VALUE

    output = types.SimpleNamespace(data={"k": [1]}, mod=os, _hidden=1)
    for ctx in (guarded, trusted):
        ctx.results["a"] = output
        assert ctx.resolve("$node.a.output.data.k") == [1]
        for ref in ("$node.a.output.mod.environ", "$node.a.output.mod", "$node.a.output._hidden"):
            with pytest.raises(ValueError, match="may not read"):
                ctx.resolve(ref)
        data = ctx.expression_data()
        assert expressions.Expression("$ctx.results.a.data.k").evaluate(ctx=data, env=ctx.env_data()) == [1]
        with pytest.raises(expressions.ExpressionEvaluationError, match="may not read"):
            expressions.Expression("$ctx.results.a.mod.environ").evaluate(ctx=data, env=ctx.env_data())
    shown = expressions.Expression("$env.SHOWN").evaluate(ctx=guarded.expression_data(), env=guarded.env_data())
    assert shown == "1"
    with pytest.raises(expressions.ExpressionEvaluationError):
        expressions.Expression("$env.SOME_SECRET").evaluate(ctx=guarded.expression_data(), env=guarded.env_data())


def test_up_passes_expose_env_to_its_worker(tmp_path: Path) -> None:
    """`pyoco-server up --with-worker --expose-env SOME_SECRET`: the worker it starts exposes it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")}
    env["SOME_SECRET"] = SECRET_VALUE
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pyoco_es.cli.main import server_main; server_main()", "--port", "0",
             "--data-dir", str(tmp_path / "data"), "--with-worker", "--allow-module", "examples", "--expose-env", "SOME_SECRET"],
            cwd=ROOT, **tied_to_this_process(env), stdout=subprocess.DEVNULL, stderr=out,
        )
    try:
        url = ""
        deadline = time.monotonic() + 30
        while not url and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            url = next((line.split("gateway on ")[1].split()[0].rstrip("/") for line in log.read_text().splitlines() if "gateway on" in line), "")
            time.sleep(0.05)
        assert url, log.read_text()
        r = httpx.post(f"{url}/runs/yaml", files={"workflow": ("flow.yaml", ASKS_FOR_SECRET.encode())}, data={"flow_name": "main"})
        assert r.status_code == 200, r.text
        snap: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while snap.get("status") not in ("COMPLETED", "FAILED", "CANCELLED") and time.monotonic() < deadline:
            snap = httpx.get(f"{url}/runs/{r.json()['run_id']}", params={"include": "records"}).json()
            time.sleep(0.02)
        assert snap["status"] == "COMPLETED", snap
        assert snap["task_records"]["show"]["output"] == f"value={SECRET_VALUE}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_readme_allow_list_offers_only_examples_own_harmless_functions() -> None:
    """`--allow-module examples` (the README's stack) offers every public name of the package to
    whoever can submit: only functions defined there, none that write files or kill processes
    (those test helpers live in tests/tasks.py)."""
    import inspect

    import examples.tasks

    # Only functions can pass the allow-list here (a name imported from elsewhere, like
    # typing.Any, is refused for its module: see the table above).
    offered = {name for name, obj in vars(examples.tasks).items() if not name.startswith("_") and inspect.isfunction(obj)}
    assert offered, "examples.tasks offers no callables"
    for name in offered:
        assert getattr(examples.tasks, name).__module__ == "examples.tasks", name
    assert not offered & {"record", "wait_for_file", "die", "big", "fail_loudly"}, offered
