"""pyoco-client end to end: the real console script (a subprocess) against a real stack.

nats-server + conductor + gateway + worker (``open_stack``), flows from ``examples``.  Each
story drives several subcommands against one stack to keep the suite quick.  Nothing sleeps to
wait for state: ``wait_for`` polls with a deadline, and slow tasks are gated by files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from pyoco_es.config import Settings
from pyoco_es.gateway.server import run_gateway
from pyoco_es.testing.stack import Stack, open_stack

pytestmark = [
    pytest.mark.filterwarnings("ignore:Async generator 'httpx.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore.:ResourceWarning"),
]

CLIENT = str(Path(sys.executable).parent / "pyoco-client")
REPO = Path(__file__).resolve().parent.parent

TWO_TASKS = (REPO / "examples" / "flow.yaml").read_text().replace("{x: 1}", "{x: 41}")

FAILING = TWO_TASKS.replace("examples.tasks:add_one", "examples.tasks:boom")

CANCELLABLE = """\
version: 1
flow:
  graph: |
    waiter
  defaults: {seconds: 30}
tasks:
  waiter: {callable: "examples.tasks:wait_for_cancel"}
"""


def gated(path: Path) -> str:
    """first >> gate >> last, where ``gate`` blocks until ``path`` exists."""
    return f"""\
version: 1
flow:
  graph: |
    first >> gate >> last
  defaults: {{x: 1, path: "{path}", seconds: 30}}
tasks:
  first: {{callable: "examples.tasks:add_one"}}
  gate: {{callable: "tests.tasks:wait_for_file"}}
  last: {{callable: "examples.tasks:to_text", inputs: {{value: "$node.first.output"}}}}
"""


def fast_settings() -> Settings:
    return Settings(
        worker_heartbeat_interval=0.2,
        run_lease_seconds=3.0,
        cancel_grace_period=1.0,
        worker_poll_timeout=0.25,
        worker_drain_timeout=5.0,
        allowed_modules=("examples", "tests.tasks"),
        sse_heartbeat_interval=0.5,
    )


async def wait_for(fn: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll ``fn`` (sync or async) until it returns something truthy; fail after ``timeout``."""
    deadline = trio.current_time() + timeout
    while True:
        value = fn()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await trio.sleep(0.02)


async def pyoco(url: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``pyoco-client --server URL ARGS…`` and capture its output."""
    with trio.fail_after(timeout):
        done = await trio.run_process(
            [CLIENT, "--server", url, *args], capture_stdout=True, capture_stderr=True, check=False, cwd=REPO,
            env={**os.environ, "COLUMNS": "100"},
        )  # fmt: skip
    out = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())
    assert "Traceback" not in out.stderr, out.stderr
    return out


def ok_json(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, (out.returncode, out.stderr)
    return json.loads(out.stdout)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(
        tmp_path, settings=fast_settings(), worker=True, concurrency=2, flow_resolver="examples.flows:resolve"  # type: ignore[arg-type]  # run_worker takes a spec string
    ) as stack:
        yield stack


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


async def test_submit_wait_watch_read_and_list(stack: Stack, tmp_path: Path) -> None:
    """A run goes in, finishes, and every read command shows it."""
    with trio.fail_after(60):
        url = stack.url
        flow = write(tmp_path, "flow.yaml", TWO_TASKS)

        # submit-yaml --wait prints the final snapshot and exits 0 for COMPLETED.
        final = ok_json(await pyoco(url, "submit-yaml", "--workflow-file", flow, "--flow-name", "two", "--tag", "default", "--wait"))
        assert final["status"] == "COMPLETED" and final["flow_name"] == "two"
        run_id = final["run_id"]

        # A named flow with --param; the same Idempotency-Key gives the same run.
        first = ok_json(await pyoco(url, "submit", "--flow-name", "hello", "--param", "x=1", "--idempotency-key", "cli-e2e-1"))
        again = ok_json(await pyoco(url, "submit", "--flow-name", "hello", "--param", "x=1", "--idempotency-key", "cli-e2e-1"))
        assert first["run_id"] == again["run_id"] and first["status"] == "PENDING"
        reused = await pyoco(url, "submit", "--flow-name", "hello", "--param", "x=2", "--idempotency-key", "cli-e2e-1")
        assert reused.returncode == 1 and "- reason: HTTP 422 POST /runs: Idempotency-Key 'cli-e2e-1' was already used" in reused.stderr
        status_lines = (await pyoco(url, "watch", first["run_id"], "--until-terminal", "--output", "status")).stdout.splitlines()
        assert status_lines[-1].split("\t")[1:] == ["snapshot", "COMPLETED", first["run_id"]]

        # Watching an ended run: its snapshot, then the gateway's final frame; exit 0.
        out = await pyoco(url, "watch", run_id, "--records")
        events = [json.loads(line) for line in out.stdout.splitlines()]
        assert out.returncode == 0 and [e["event"] for e in events] == ["snapshot", "end"]
        assert events[0]["data"]["snapshot"]["task_records"]["to_text"]["output"] == "value=42"

        got = ok_json(await pyoco(url, "get", run_id, "--records"))
        assert got["tasks"] == {"add_one": "SUCCEEDED", "to_text": "SUCCEEDED"} and "task_records" in got
        assert "task_records" not in ok_json(await pyoco(url, "get", run_id))
        assert ok_json(await pyoco(url, "tasks", run_id))["task_records"]["add_one"]["output"] == 42

        listed = ok_json(await pyoco(url, "list", "--status", "COMPLETED"))
        assert {run_id, first["run_id"]} <= {item["run_id"] for item in listed}
        table = (await pyoco(url, "list", "--output", "table", "--flow", "two")).stdout.splitlines()
        assert table[0].split() == ["run_id", "status", "flow_name", "tag", "updated_at"] and run_id in table[1]
        assert (await pyoco(url, "list", "--output", "table", "--flow", "no-such-flow")).stdout == "(no items)\n"
        page = (await pyoco(url, "list-vnext", "--limit", "1", "--output", "table")).stdout.splitlines()
        assert page[-1].startswith("next_cursor: ")
        rest = ok_json(await pyoco(url, "list-vnext", "--limit", "5", "--cursor", page[-1].removeprefix("next_cursor: ")))
        assert len(rest["items"]) == 1 and rest["next_cursor"] is None

        # The audit history: JSON lines when piped, a table on request.
        history = [json.loads(line) for line in (await pyoco(url, "events", run_id)).stdout.splitlines()]
        types = [e["type"] for e in history]
        assert types[0] == "run.submitted" and types[-1] == "run.completed" and "task.completed" in types
        assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
        table = (await pyoco(url, "events", run_id, "--output", "table", "--after-seq", "1")).stdout.splitlines()
        assert table[0].split() == ["seq", "time", "type", "producer", "details"] and len(table) == len(history)

        workers = (await pyoco(url, "workers", "--output", "table")).stdout.splitlines()
        assert workers[1].split()[0] == "w1"
        assert ok_json(await pyoco(url, "workers", "--scope", "all"))[0]["worker_id"] == "w1"
        metrics = await pyoco(url, "metrics")
        assert metrics.returncode == 0 and 'pyoco_runs_total{status="COMPLETED"}' in metrics.stdout


async def test_outcome_exit_codes_cancel_and_errors(stack: Stack, tmp_path: Path) -> None:
    """Exit codes tell the outcome; cancel --wait; bad input and HTTP errors in pyoco-server's shape."""
    with trio.fail_after(60):
        url = stack.url
        failing = await pyoco(url, "submit-yaml", "--workflow-file", write(tmp_path, "f.yaml", FAILING), "--flow-name", "f", "--wait")
        assert failing.returncode == 2 and json.loads(failing.stdout)["status"] == "FAILED"

        # submit --watch when piped: the submit answer, then JSON lines until the end.
        watched = await pyoco(url, "submit", "--flow-name", "hello", "--param", "x=1", "--watch")
        lines = [json.loads(line) for line in watched.stdout.splitlines()]
        assert watched.returncode == 0 and lines[-1]["data"]["snapshot"]["status"] == "COMPLETED"

        # Cancel a running run and wait for it; watching it afterwards exits 3.
        run_id = ok_json(await pyoco(url, "submit-yaml", "--workflow-file", write(tmp_path, "c.yaml", CANCELLABLE), "--flow-name", "c"))["run_id"]
        await wait_for(lambda: _status_is(url, run_id, "RUNNING"), "the run to start")
        cancelled = ok_json(await pyoco(url, "cancel", "--run-id", run_id, "--wait", "--timeout-sec", "20"))
        assert cancelled["status"] == "CANCELLED"
        assert (await pyoco(url, "watch", run_id, "--until-terminal", "--output", "status")).returncode == 3
        assert ok_json(await pyoco(url, "cancel", "--run-id", run_id))["status"] == "CANCELLED"  # idempotent

        missing = await pyoco(url, "get", "0" * 32)
        assert missing.returncode == 1
        assert missing.stderr.splitlines()[:2] == ["ERR-PYOCO-HTTP: request failed", f"- reason: HTTP 404 GET /runs/{'0' * 32}: run not found"]
        bad_yaml = await pyoco(url, "submit-yaml", "--workflow-file", write(tmp_path, "bad.yaml", "flows: {}\n"), "--flow-name", "x")
        assert bad_yaml.returncode == 1 and "- reason: HTTP 422 POST /runs/yaml: " in bad_yaml.stderr
        bad_params = await pyoco(url, "submit", "--params", "[1]")
        assert bad_params.returncode == 1 and bad_params.stderr.startswith("ERR-PYOCO-0018: ") and "--params must be JSON object" in bad_params.stderr
        no_eq = await pyoco(url, "submit", "--param", "x")
        assert no_eq.returncode == 1 and "--param must be key=value" in no_eq.stderr
        no_file = await pyoco(url, "submit", "--params-file", str(tmp_path / "none.yaml"))
        assert no_file.returncode == 1 and "file I/O error" in no_file.stderr and "none.yaml" in no_file.stderr

        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        down = await pyoco(dead, "list")
        assert down.returncode == 1 and dead in down.stderr and "pyoco-server up" in down.stderr


async def _status_is(url: str, run_id: str, status: str) -> bool:
    out = await pyoco(url, "get", run_id)
    return out.returncode == 0 and json.loads(out.stdout)["status"] == status


async def test_watch_survives_a_gateway_restart(tmp_path: Path) -> None:
    """The gateway goes away mid-run and comes back on the same port: the watch resumes with
    Last-Event-ID, prints every snapshot exactly once, and exits 0 when the run completes."""
    gate = tmp_path / "gate"
    with trio.fail_after(60):
        async with open_stack(tmp_path, settings=fast_settings(), gateway=False, worker=True, concurrency=1) as stack:
            nursery = stack.nursery

            async def gateway(port: int, scope: trio.CancelScope, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                with scope:
                    await run_gateway(stack.nats, stack.settings, host="127.0.0.1", port=port, task_status=task_status)

            first = trio.CancelScope()
            host, port = await nursery.start(gateway, 0, first)
            url = f"http://{host}:{port}"
            run_id = ok_json(await pyoco(url, "submit-yaml", "--workflow-file", write(tmp_path, "g.yaml", gated(gate)), "--flow-name", "g"))["run_id"]

            timed_out = await pyoco(url, "watch", run_id, "--until-terminal", "--timeout-sec", "1", "--output", "status")
            assert timed_out.returncode == 4 and timed_out.stderr.startswith("ERR-PYOCO-WAIT: wait timeout")

            out_path, err_path = tmp_path / "watch.out", tmp_path / "watch.err"
            with out_path.open("w") as out, err_path.open("w") as err:
                proc = await trio.lowlevel.open_process(
                    [CLIENT, "--server", url, "watch", run_id, "--until-terminal", "--output", "json"], stdout=out, stderr=err
                )
            try:

                def snapshots() -> list[dict[str, Any]]:
                    lines = [json.loads(line) for line in out_path.read_text().splitlines() if line.strip()]
                    return [e for e in lines if e["event"] == "snapshot"]

                await wait_for(lambda: any(s["data"]["snapshot"]["tasks"].get("gate") == "RUNNING" for s in snapshots()), "gate to run")
                first.cancel()  # the gateway goes away while the run is blocked in `gate`
                await wait_for(lambda: "connection lost" in err_path.read_text(), "the watch to notice")
                second = trio.CancelScope()
                await nursery.start(gateway, port, second)
                await wait_for(lambda: "reconnected" in err_path.read_text(), "the watch to reconnect")
                gate.write_text("go")
                with trio.fail_after(30):
                    await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, err_path.read_text()
            seen = snapshots()
            ids = [int(e["id"]) for e in seen]
            assert ids == sorted(set(ids)), ids  # strictly increasing: nothing printed twice
            assert seen[-1]["data"]["snapshot"]["status"] == "COMPLETED"
            assert "Traceback" not in err_path.read_text()
            second.cancel()


async def test_live_view_in_a_pseudo_terminal(stack: Stack, tmp_path: Path) -> None:
    """Under pexpect (a pty, so stdout is a terminal) `watch` picks the live view by itself and
    redraws in place (cursor-up escapes) until every task has SUCCEEDED; exit 0."""
    import pexpect  # type: ignore[import-untyped]

    gate = tmp_path / "gate"
    with trio.fail_after(60):
        run_id = ok_json(await pyoco(stack.url, "submit-yaml", "--workflow-file", write(tmp_path, "g.yaml", gated(gate)), "--flow-name", "pty"))["run_id"]
        child = pexpect.spawn(
            CLIENT, ["--server", stack.url, "watch", run_id], env={**os.environ, "TERM": "xterm"},
            dimensions=(30, 100), encoding="utf-8", timeout=30,
        )  # fmt: skip
        try:
            colour = r"(?:\x1b\[[0-9;]*m)?"
            await trio.to_thread.run_sync(child.expect, rf"gate\s+RUNNING")
            before_release = child.before + child.after
            assert "✓ first" in before_release and "\x1b[J" in before_release
            gate.write_text("go")
            await trio.to_thread.run_sync(child.expect, rf"status {colour}COMPLETED")
            await trio.to_thread.run_sync(child.expect, rf"✓ last\s+SUCCEEDED")
            await trio.to_thread.run_sync(child.expect, pexpect.EOF)
        finally:
            child.close(force=True)
        assert child.exitstatus == 0
        assert re.search(r"\x1b\[\d+F", before_release), "redraws move the cursor up instead of scrolling"


async def test_live_view_in_a_terminal(stack: Stack, tmp_path: Path) -> None:
    """Under tmux, `watch` draws the run in place: tasks go from RUNNING to SUCCEEDED on one screen."""
    gate = tmp_path / "gate"
    sock = f"pyoco-cli-{os.getpid()}-{tmp_path.name}"
    with trio.fail_after(60):
        run_id = ok_json(await pyoco(stack.url, "submit-yaml", "--workflow-file", write(tmp_path, "g.yaml", gated(gate)), "--flow-name", "live"))["run_id"]
        command = f"{shlex.quote(CLIENT)} --server {stack.url} watch {run_id}; echo EXIT=$?; sleep 60"
        tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
        await trio.run_process([*tmux, "new-session", "-d", "-x", "100", "-y", "30", "-e", "TERM=xterm-256color", command])
        try:

            async def screen() -> str:
                done = await trio.run_process([*tmux, "capture-pane", "-p", "-t", "0"], capture_stdout=True)
                return done.stdout.decode()

            async def shows(*words: str) -> str | None:
                text = await screen()
                return text if all(w in text for w in words) else None

            text: str = await wait_for(lambda: shows("gate", "RUNNING", "elapsed"), "the live view to show gate running")
            assert "✓ first" in text and "SUCCEEDED" in text
            gate.write_text("go")
            text = await wait_for(lambda: shows("EXIT="), "the watch to end")
            assert "status COMPLETED" in text and "EXIT=0" in text
            for task in ("first", "gate", "last"):
                rows = [line for line in text.splitlines() if f" {task} " in f"{line} " and "SUCCEEDED" in line]
                assert len(rows) == 1, text  # drawn in place: one row per task, not a scrolling log
            assert text.count("status ") == 1, text
        finally:
            await trio.run_process([*tmux, "kill-server"], check=False)
