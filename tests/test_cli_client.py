"""pyoco-client against a canned HTTP server: arguments, output modes, error shapes, exit codes.

The CLI runs in-process through asyncclick's CliRunner (same Trio loop as the canned server);
a few tests run the real console script as a subprocess (Ctrl-C, completion).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from asyncclick.testing import CliRunner, Result

from pyoco_es.cli.client import client
from pyoco_es.cli.client_http import SseParser
from pyoco_es.cli.client_live import render
from pyoco_es.cli.client_output import render_table
from test_cli_support import CannedServer, Reply, Seen, frame, snap_frame, sse, start_canned

# httpx/httpcore read streams through nested async generators; when a watch stops mid-stream
# (Ctrl-C, --max-events, the run ended) the inner ones are finalized by Trio with a
# ResourceWarning (encode/httpx#3686, fix pending in encode/httpx#3777).  Harmless: Trio closes
# them; Python ignores ResourceWarning by default, so users never see it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Async generator 'httpx.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore.:ResourceWarning"),
]

RUN = "r-1"
CLIENT_BIN = Path(sys.executable).parent / "pyoco-client"


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[CannedServer]:
    yield await start_canned(nursery, CannedServer())


async def cli(server: CannedServer, *args: str, env: dict[str, str] | None = None) -> Result:
    with trio.fail_after(10):
        return await CliRunner().invoke(client, ["--server", server.url, *args], env=env, prog_name="pyoco-client")


def assert_error(result: Result, code: str, *fragments: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"{code}: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# -- submit ------------------------------------------------------------------------------------


async def test_submit_merges_params_file_then_params_then_param(server: CannedServer, tmp_path: Path) -> None:
    """Later sources win: params-file < --params < --param; --param values are JSON-or-string."""
    server.json("POST", "/runs", {"run_id": RUN, "status": "PENDING", "bundle_hash": None})
    params_file = tmp_path / "p.yaml"
    params_file.write_text("a: 1\nb: from-file\nc: [1, 2]\n")
    result = await cli(
        server, "submit", "--flow-name", "etl", "--params-file", str(params_file), "--params", '{"b": "from-params", "d": true}',
        "--param", "d=false", "--param", "e=hello", "--param", "f={\"k\": 2}", "--param", "g=",
        "--tag", "gpu", "--tags", "x, y,,", "--idempotency-key", "key-1",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"run_id": RUN, "status": "PENDING", "bundle_hash": None}
    (req,) = server.requests("POST", "/runs")
    assert json.loads(req.body) == {
        "flow_name": "etl",
        "params": {"a": 1, "b": "from-params", "c": [1, 2], "d": False, "e": "hello", "f": {"k": 2}, "g": ""},
        "tag": "gpu",
        "tags": ["x", "y"],
    }
    assert req.headers["idempotency-key"] == "key-1"


async def test_submit_defaults_and_api_key_header(server: CannedServer) -> None:
    server.json("POST", "/runs", {"run_id": RUN, "status": "PENDING"})
    result = await cli(server, "--api-key", "k-123", "--api-key-header", "X-Token", "submit")
    assert result.exit_code == 0, result.stderr
    (req,) = server.requests("POST", "/runs")
    assert json.loads(req.body) == {"flow_name": "main", "params": {}}
    assert req.headers["x-token"] == "k-123"
    assert "idempotency-key" not in req.headers


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--params", "[1, 2]"], "--params must be JSON object (got list)"),
        (["--params", "{oops"], "--params must be valid JSON object"),
        (["--param", "novalue"], "--param must be key=value (got 'novalue')"),
        (["--param", "=1"], "--param key is empty"),
        (["--tag", "a.b"], "--tag must be letters, digits"),
        (["--bogus"], "No such option '--bogus'"),
    ],
)
async def test_submit_bad_input_is_err_0018_and_sends_nothing(server: CannedServer, args: list[str], fragment: str) -> None:
    result = await cli(server, "submit", *args)
    assert_error(result, "ERR-PYOCO-0018", fragment, "- hint: pyoco-client submit")
    assert server.seen == []


async def test_params_file_errors_name_the_file(server: CannedServer, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    result = await cli(server, "submit", "--params-file", str(missing))
    assert_error(result, "ERR-PYOCO-0018", "file I/O error", f"cannot read --params-file {missing}", "No such file")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    result = await cli(server, "submit", "--params-file", str(listy))
    assert_error(result, "ERR-PYOCO-0018", "must contain an object at the top level", str(listy))
    assert server.seen == []


async def test_submit_yaml_uploads_the_file_as_multipart(server: CannedServer, tmp_path: Path) -> None:
    server.json("POST", "/runs/yaml", {"run_id": RUN, "status": "PENDING"})
    flow = tmp_path / "flow.yaml"
    flow.write_text("flow:\n  graph: a >> b\ntasks:\n  a: {}\n  b: {}\n")
    result = await cli(server, "submit-yaml", "--workflow-file", str(flow), "--flow-name", "nightly", "--tag", "t1")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["run_id"] == RUN
    (req,) = server.requests("POST", "/runs/yaml")
    assert req.headers["content-type"].startswith("multipart/form-data")
    assert b"graph: a >> b" in req.body and b'name="flow_name"' in req.body and b"nightly" in req.body
    assert b'name="tag"' in req.body and b"t1" in req.body
    result = await cli(server, "submit-yaml", "--workflow-file", str(tmp_path / "missing.yaml"), "--flow-name", "x")
    assert_error(result, "ERR-PYOCO-0018", "file I/O error", "--workflow-file")
    result = await cli(server, "submit-yaml", "--flow-name", "x")
    assert_error(result, "ERR-PYOCO-0018", "Missing option '--workflow-file'", "- usage: pyoco-client submit-yaml")


# -- reads ---------------------------------------------------------------------------------------


async def test_get_and_tasks(server: CannedServer) -> None:
    server.json("GET", f"/runs/{RUN}", {"run_id": RUN, "status": "RUNNING"})
    server.json("GET", f"/runs/{RUN}/tasks", {"run_id": RUN, "tasks": {"a": "SUCCEEDED"}, "task_records": {}})
    assert json.loads((await cli(server, "get", RUN)).stdout)["status"] == "RUNNING"
    assert (await cli(server, "get", RUN, "--records")).exit_code == 0
    assert [r.arg("include") for r in server.requests("GET", f"/runs/{RUN}")] == [None, "records"]
    assert json.loads((await cli(server, "tasks", RUN)).stdout)["tasks"] == {"a": "SUCCEEDED"}


ITEMS = [
    {"run_id": "run-aaaaaaaaaaaaaaaaaaaaaaaa", "status": "COMPLETED", "flow_name": "a-rather-long-flow-name", "tag": "default", "updated_at": 1700000000.5},
    {"run_id": "run-bbbbbbbbbbbbbbbbbbbbbbbb", "status": "RUNNING", "flow_name": "main", "tag": "gpu", "updated_at": 1700000001.5},
]


async def test_list_json_table_filters_and_empty(server: CannedServer) -> None:
    server.json("GET", "/runs", ITEMS)
    result = await cli(server, "list", "--status", "RUNNING", "--flow", "main", "--tag", "gpu", "--full", "--limit", "5")
    assert json.loads(result.stdout) == ITEMS
    (req,) = server.requests("GET", "/runs")
    assert sorted(req.query) == sorted([("status", "RUNNING"), ("flow", "main"), ("tag", "gpu"), ("include", "full"), ("limit", "5")])
    table = (await cli(server, "list", "--output", "table")).stdout.splitlines()
    assert table[0].split() == ["run_id", "status", "flow_name", "tag", "updated_at"]
    assert "run-aaaaaaaaaaaaaaaaaaaaaaaa" in table[1] and "COMPLETED" in table[1]
    narrow = (await cli(server, "list", "--output", "table", env={"COLUMNS": "60"})).stdout.splitlines()
    assert all(len(line) <= 60 for line in narrow) and "…" in narrow[1]
    server.json("GET", "/runs", [])
    assert (await cli(server, "list", "--output", "table")).stdout == "(no items)\n"


async def test_list_vnext_table_prints_next_cursor(server: CannedServer) -> None:
    server.json("GET", "/runs", {"items": ITEMS[:1], "next_cursor": "CUR2"})
    result = await cli(server, "list-vnext", "--limit", "1", "--updated-after", "12.5", "--cursor", "CUR1", "--workflow-yaml-sha256", "abc", "--output", "table")
    lines = result.stdout.splitlines()
    assert lines[-1] == "next_cursor: CUR2" and len(lines) == 3
    (req,) = server.requests("GET", "/runs")
    assert dict(req.query) == {"limit": "1", "updated_after": "12.5", "cursor": "CUR1", "workflow_yaml_sha256": "abc"}
    assert json.loads((await cli(server, "list-vnext")).stdout)["next_cursor"] == "CUR2"
    server.json("GET", "/runs", [])  # plain mode answer: wrapped like pyoco-server's client does
    assert json.loads((await cli(server, "list-vnext")).stdout) == {"items": [], "next_cursor": None}


async def test_workers_and_metrics(server: CannedServer) -> None:
    server.json("GET", "/workers", [{"worker_id": "w1", "state": "IDLE", "tags": ["default", "gpu"], "heartbeat_at": None}])
    result = await cli(server, "workers", "--scope", "all", "--state", "idle", "--include-hidden", "--limit", "3", "--output", "table")
    assert result.stdout.splitlines()[1].split()[:3] == ["w1", "IDLE", "default,gpu"]
    (req,) = server.requests("GET", "/workers")
    assert dict(req.query) == {"scope": "all", "state": "IDLE", "include_hidden": "true", "limit": "3"}
    assert json.loads((await cli(server, "workers")).stdout)[0]["worker_id"] == "w1"
    server.reply("GET", "/metrics", Reply.text('pyoco_runs_total{status="COMPLETED"} 3\n'))
    assert (await cli(server, "metrics")).stdout == 'pyoco_runs_total{status="COMPLETED"} 3\n'


async def test_events_table_and_json_lines(server: CannedServer) -> None:
    envelopes = [
        {"event_id": "e1", "type": "run.submitted", "type_version": 1, "run_id": RUN, "seq": 1, "occurred_at": 1700000000.0,
         "producer": {"kind": "gateway", "id": "g1", "attempt": None}, "data": {"flow_name": "main", "params": {"x": 1}}, "stream_seq": 10},
        {"event_id": "e2", "type": "run.claimed", "type_version": 1, "run_id": RUN, "seq": 2, "occurred_at": 1700000001.0,
         "producer": {"kind": "worker", "id": "w1", "attempt": 1}, "data": {"worker_id": "w1", "attempt": 1}, "stream_seq": 12},
    ]  # fmt: skip
    server.json("GET", f"/runs/{RUN}/events", envelopes)
    lines = (await cli(server, "events", RUN, "--output", "json")).stdout.splitlines()
    assert [json.loads(line) for line in lines] == envelopes
    table = (await cli(server, "events", RUN, "--output", "table", "--after-seq", "0")).stdout.splitlines()
    assert table[0].split() == ["seq", "time", "type", "producer", "details"]
    assert "run.claimed" in table[2] and "worker:w1#1" in table[2] and "worker_id=w1" in table[2]
    server.json("GET", f"/runs/{RUN}/events", {"run_id": RUN, "last_seq": 2, "events": envelopes[1:]})  # the gateway's shape
    assert json.loads((await cli(server, "events", RUN)).stdout)["seq"] == 2  # piped: JSON lines by default
    assert server.requests("GET", f"/runs/{RUN}/events")[-1].arg("after_seq") == "0"


# -- errors --------------------------------------------------------------------------------------


async def test_http_errors_show_status_method_path_and_readable_body(server: CannedServer) -> None:
    server.json("GET", "/runs/missing", {"detail": "run not found"}, status=404)
    assert_error(await cli(server, "get", "missing"), "ERR-PYOCO-HTTP", "request failed", "- reason: HTTP 404 GET /runs/missing: run not found", "- hint:")
    server.json("POST", "/runs", {"detail": [{"loc": ["body", "tag"], "msg": "String should match pattern", "type": "x"}]}, status=422)
    assert_error(await cli(server, "submit"), "ERR-PYOCO-HTTP", "HTTP 422 POST /runs: body.tag: String should match pattern")
    server.json("GET", "/runs", {"detail": "api key required"}, status=401)
    assert_error(await cli(server, "list"), "ERR-PYOCO-HTTP", "HTTP 401 GET /runs: api key required", "--api-key")


async def test_unreachable_server_names_the_url_and_suggests_up() -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with trio.fail_after(10):
        result = await CliRunner().invoke(client, ["--server", url, "get", RUN], prog_name="pyoco-client")
    assert_error(result, "ERR-PYOCO-HTTP", "connection error", url, "pyoco-server up")
    with trio.fail_after(10):
        result = await CliRunner().invoke(client, ["list"], env={"PYOCO_SERVER_URL": url}, prog_name="pyoco-client")
    assert_error(result, "ERR-PYOCO-HTTP", url)
    with trio.fail_after(10):
        result = await CliRunner().invoke(client, ["--server", "localhost:8000", "list"], prog_name="pyoco-client")
    assert_error(result, "ERR-PYOCO-0018", "--server must be an http(s) URL")


# -- watch -------------------------------------------------------------------------------------


async def test_watch_json_status_and_max_events(server: CannedServer) -> None:
    server.routes[("GET", f"/runs/{RUN}/watch")] = sse(
        snap_frame(RUN, "PENDING", 1),
        frame("heartbeat", {"run_id": RUN, "ts": 1700000001.5}),
        snap_frame(RUN, "RUNNING", 2),
        snap_frame(RUN, "COMPLETED", 3),
    )
    lines = (await cli(server, "watch", RUN, "--records", "--since", "5", "--timeout-sec", "30")).stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["snapshot", "heartbeat", "snapshot", "snapshot"]
    assert events[0] == {"event": "snapshot", "id": "1", "data": {"run_id": RUN, "snapshot": {"run_id": RUN, "status": "PENDING", "updated_at": 1700000001.0}, "ts": 1700000001.0}}
    (req,) = server.requests("GET", f"/runs/{RUN}/watch")
    assert dict(req.query) == {"include": "records", "since": "5.0", "timeout_sec": "30"}
    status = (await cli(server, "watch", RUN, "--output", "status")).stdout.splitlines()
    assert status[0] == f"1700000001.0\tsnapshot\tPENDING\t{RUN}"
    assert status[1] == f"1700000001.5\theartbeat\t-\t{RUN}"
    assert len((await cli(server, "watch", RUN, "--max-events", "2")).stdout.splitlines()) == 2


@pytest.mark.parametrize(("final", "code"), [("COMPLETED", 0), ("FAILED", 2), ("CANCELLED", 3)])
async def test_watch_until_terminal_exit_code_tells_the_outcome(server: CannedServer, final: str, code: int) -> None:
    server.routes[("GET", f"/runs/{RUN}/watch")] = sse(snap_frame(RUN, "RUNNING", 1), snap_frame(RUN, final, 2), snap_frame(RUN, final, 3))
    result = await cli(server, "watch", RUN, "--until-terminal", "--output", "status")
    assert result.exit_code == code, result.stderr
    assert [line.split("\t")[2] for line in result.stdout.splitlines()] == ["RUNNING", final]  # stops at the first terminal


async def test_watch_until_terminal_always_shows_the_final_event(server: CannedServer) -> None:
    """The reader stopped when the follower had *parsed* the terminal frame, before it was
    handed over, so the last frame was sometimes never printed or drawn (a live view left at
    RUNNING with exit 0).  Frames back to back in one chunk make that ordering likely; Trio
    shuffles its run queue, so a few rounds see both orders."""
    frames = snap_frame(RUN, "RUNNING", 1) + snap_frame(RUN, "RUNNING", 2) + snap_frame(RUN, "COMPLETED", 3)

    async def one_chunk(_: Seen) -> Any:
        async def stream(send_chunk: Any) -> None:
            await send_chunk(frames)

        return stream

    server.routes[("GET", f"/runs/{RUN}/watch")] = one_chunk
    for _ in range(30):
        result = await cli(server, "watch", RUN, "--until-terminal", "--output", "json")
        assert result.exit_code == 0, result.stderr
        statuses = [json.loads(line)["data"]["snapshot"]["status"] for line in result.stdout.splitlines()]
        assert statuses == ["RUNNING", "RUNNING", "COMPLETED"], statuses


async def test_watch_until_terminal_times_out_with_exit_4(server: CannedServer) -> None:
    hold = trio.Event()
    server.routes[("GET", f"/runs/{RUN}/watch")] = sse(snap_frame(RUN, "RUNNING", 1), hold=hold)
    result = await cli(server, "watch", RUN, "--until-terminal", "--timeout-sec", "1")
    hold.set()
    assert_error(result, "ERR-PYOCO-WAIT", "wait timeout", f"run {RUN} is still RUNNING", exit_code=4)
    assert len(result.stdout.splitlines()) == 1


async def test_watch_resumes_with_last_event_id_and_prints_nothing_twice(server: CannedServer) -> None:
    """The first connection drops after seq 2; the second resumes from it (and resends seq 2)."""
    first = sse(snap_frame(RUN, "PENDING", 1), snap_frame(RUN, "RUNNING", 2), drop=True)
    second = sse(snap_frame(RUN, "RUNNING", 2), snap_frame(RUN, "RUNNING", 3), snap_frame(RUN, "COMPLETED", 4))

    @server.on("GET", f"/runs/{RUN}/watch")
    async def watch(seen: Seen) -> Any:
        return await (first if len(server.requests("GET", f"/runs/{RUN}/watch")) == 1 else second)(seen)

    result = await cli(server, "watch", RUN, "--until-terminal")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["1", "2", "3", "4"]
    assert "reconnecting" in result.stderr
    resumed = server.requests("GET", f"/runs/{RUN}/watch")
    assert [r.headers.get("last-event-id") for r in resumed] == [None, "2"]


async def test_watch_retries_a_503_after_a_drop_but_not_before(server: CannedServer) -> None:
    """A restarting gateway may answer 503 for a moment: retried once we were connected."""
    unavailable = Reply.json({"detail": "nats unavailable: NoServersError"}, 503)
    first = sse(snap_frame(RUN, "RUNNING", 1), drop=True)
    last = sse(snap_frame(RUN, "COMPLETED", 2))

    @server.on("GET", f"/runs/{RUN}/watch")
    async def watch(seen: Seen) -> Any:
        n = len(server.requests("GET", f"/runs/{RUN}/watch"))
        return await first(seen) if n == 1 else unavailable if n == 2 else await last(seen)

    result = await cli(server, "watch", RUN, "--until-terminal", "--output", "status")
    assert result.exit_code == 0, result.stderr
    assert [line.split("\t")[2] for line in result.stdout.splitlines()] == ["RUNNING", "COMPLETED"]
    server.json("GET", f"/runs/{RUN}/watch", {"detail": "nats unavailable: NoServersError"}, status=503)
    assert_error(await cli(server, "watch", RUN), "ERR-PYOCO-HTTP", "HTTP 503", "NATS")


async def test_watch_unknown_run_is_http_404_and_a_non_sse_answer_is_refused(server: CannedServer) -> None:
    server.json("GET", f"/runs/{RUN}/watch", {"detail": "run not found"}, status=404)
    assert_error(await cli(server, "watch", RUN), "ERR-PYOCO-HTTP", f"HTTP 404 GET /runs/{RUN}/watch: run not found")
    server.reply("GET", f"/runs/{RUN}/watch", Reply(200, b"<html></html>", "text/html"))
    assert_error(await cli(server, "watch", RUN, "--until-terminal"), "ERR-PYOCO-HTTP", "unexpected response", "not an event stream")
    server.reply("GET", "/runs", Reply(200, b"<html></html>", "text/html"))
    assert_error(await cli(server, "list"), "ERR-PYOCO-HTTP", "unexpected response", "did not return JSON")


# -- waiting -------------------------------------------------------------------------------------


async def test_submit_wait_prints_the_final_snapshot_and_exits_with_the_outcome(server: CannedServer) -> None:
    server.json("POST", "/runs", {"run_id": RUN, "status": "PENDING"})
    server.routes[("GET", f"/runs/{RUN}/watch")] = sse(snap_frame(RUN, "RUNNING", 1), snap_frame(RUN, "FAILED", 2))
    server.json("GET", f"/runs/{RUN}", {"run_id": RUN, "status": "FAILED", "error": "boom"})
    result = await cli(server, "submit", "--wait")
    assert result.exit_code == 2, result.stderr
    assert json.loads(result.stdout) == {"run_id": RUN, "status": "FAILED", "error": "boom"}


async def test_submit_watch_prints_submit_answer_then_events(server: CannedServer) -> None:
    server.json("POST", "/runs", {"run_id": RUN, "status": "PENDING"})
    server.routes[("GET", f"/runs/{RUN}/watch")] = sse(snap_frame(RUN, "RUNNING", 1), snap_frame(RUN, "COMPLETED", 2))
    result = await cli(server, "submit", "--watch")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["run_id"] == RUN and [e["data"]["snapshot"]["status"] for e in lines[1:]] == ["RUNNING", "COMPLETED"]


async def test_cancel_wait_and_its_timeout(server: CannedServer) -> None:
    server.json("POST", f"/runs/{RUN}/cancel", {"run_id": RUN, "status": "CANCELLING"})
    assert json.loads((await cli(server, "cancel", "--run-id", RUN)).stdout)["status"] == "CANCELLING"
    server.routes[("GET", f"/runs/{RUN}/watch")] = sse(snap_frame(RUN, "CANCELLING", 1), snap_frame(RUN, "CANCELLED", 2))
    server.json("GET", f"/runs/{RUN}", {"run_id": RUN, "status": "CANCELLED"})
    result = await cli(server, "cancel", "--run-id", RUN, "--wait")
    assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "CANCELLED"
    hold = trio.Event()
    server.routes[("GET", f"/runs/{RUN}/watch")] = sse(snap_frame(RUN, "CANCELLING", 1), hold=hold)
    result = await cli(server, "cancel", "--run-id", RUN, "--wait", "--timeout-sec", "1")
    hold.set()
    assert_error(result, "ERR-PYOCO-CANCEL", "wait timeout", "still CANCELLING")
    assert_error(await cli(server, "cancel"), "ERR-PYOCO-0018", "Missing option '--run-id'")


async def test_cancel_wait_outlasts_the_forced_cancel_and_says_why(server: CannedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """--wait gave up at 30 s, exactly the default grace, just when the worker kills the run; its
    hint blamed the worker."""
    from pyoco_es.cli.client_watch import CANCEL_WAIT_MARGIN, default_cancel_wait

    for name in ("PYOCO_CANCEL_GRACE_PERIOD_SEC", "PYOCO_RUN_LEASE_SEC"):
        monkeypatch.delenv(name, raising=False)
    assert default_cancel_wait() == 30 + 2 * 15 + CANCEL_WAIT_MARGIN  # past the reaper's bound
    monkeypatch.setenv("PYOCO_CANCEL_GRACE_PERIOD_SEC", "90")
    assert default_cancel_wait() == 90 + 2 * 15 + CANCEL_WAIT_MARGIN  # follows the operator's grace
    server.json("POST", f"/runs/{RUN}/cancel", {"run_id": RUN, "status": "CANCELLING"})
    hold = trio.Event()
    server.routes[("GET", f"/runs/{RUN}/watch")] = sse(snap_frame(RUN, "CANCELLING", 1), hold=hold)
    env = {"PYOCO_CANCEL_GRACE_PERIOD_SEC": "0.2", "PYOCO_RUN_LEASE_SEC": "0.5"}
    result = await cli(server, "cancel", "--run-id", RUN, "--wait", "--timeout-sec", "0.3", env=env)
    hold.set()
    assert_error(result, "ERR-PYOCO-CANCEL", "still CANCELLING", "kills a run that ignores it 0.2 s after", "1.2 s after")
    assert "a worker must pick" not in result.stderr


# -- help, pure pieces -------------------------------------------------------------------------


async def test_every_command_has_help_with_an_example(server: CannedServer) -> None:
    names = list(client.commands)
    assert {"submit", "submit-yaml", "get", "tasks", "list", "list-vnext", "watch", "cancel", "workers", "metrics", "events"} <= set(names)
    for name in [None, *names]:
        args = ["--help"] if name is None else [name, "-h"]
        result = await cli(server, *args)
        assert result.exit_code == 0
        assert "Example" in result.stdout, name


def test_sse_parser_follows_the_spec_for_our_fields() -> None:
    parser = SseParser()
    lines = [": comment", "id: 7", "event: snapshot", 'data: {"a":', "data: 1}", "", "event: heartbeat", "data: {}", ""]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert [(e.event, e.id, e.data) for e in events] == [("snapshot", "7", {"a": 1}), ("heartbeat", None, {})]


def test_table_fits_the_width_and_empty_is_no_items() -> None:
    assert render_table(["a"], []) == "(no items)"
    text = render_table(["run_id", "flow_name"], [["x" * 30, "y" * 40]], width=40)
    assert all(len(line) <= 40 for line in text.splitlines())


def test_live_render_shows_each_task_state_and_duration() -> None:
    snapshot = {
        "run_id": RUN, "flow_name": "main", "tag": "default", "status": "RUNNING", "start_time": 100.0,
        "tasks": {"extract": "SUCCEEDED", "load": "RUNNING", "report": "PENDING"},
        "task_records": {"extract": {"state": "SUCCEEDED", "duration_ms": 1500.0}, "load": {"state": "RUNNING", "started_at": 102.0}},
    }  # fmt: skip
    lines = render(snapshot, run_id=RUN, now=105.0, width=60)
    assert lines[1] == "status RUNNING  elapsed 5.00s"
    assert lines[2] == "  ✓ extract  SUCCEEDED  1.50s"
    assert lines[3] == "  ▶ load     RUNNING    3.00s"
    assert lines[4] == "  · report   PENDING"
    assert all(len(line) <= 60 for line in render(snapshot, run_id=RUN, now=105.0, width=12))
    # A retried task (issue 16) says how many tries it has had so far.
    snapshot["task_records"]["load"]["tries"] = 3  # type: ignore[index]
    assert render(snapshot, run_id=RUN, now=105.0, width=60)[3] == "  ▶ load     RUNNING    3.00s  (3 tries)"


def test_live_render_shows_a_killed_task_as_interrupted() -> None:
    """A forced cancel: the fold marks the running task CANCELLED; it was cut off, and it ran
    until the run ended (not "until now")."""
    snapshot = {
        "run_id": RUN, "status": "CANCELLED", "start_time": 100.0, "end_time": 131.0,
        "tasks": {"extract": "SUCCEEDED", "sleep": "CANCELLED", "report": "CANCELLED"},
        "task_records": {"extract": {"state": "SUCCEEDED", "duration_ms": 1000.0},
                         "sleep": {"state": "CANCELLED", "started_at": 101.0}, "report": {"state": "CANCELLED"}},
    }  # fmt: skip
    lines = render(snapshot, run_id=RUN, now=500.0, width=80)
    assert lines[3] == "  ↯ sleep    INTERRUPTED  30.0s"
    assert lines[4] == "  ⊘ report   CANCELLED"  # never started: cancelled, not interrupted


def test_live_render_fits_a_short_terminal() -> None:
    """Many tasks: succeeded ones fold into one line, then the rest is cut to the height."""
    tasks = {f"t{i:02d}": "SUCCEEDED" for i in range(30)} | {"x": "RUNNING", "y": "PENDING"}
    snapshot = {"run_id": RUN, "status": "RUNNING", "tasks": tasks, "task_records": {}, "error": None}
    lines = render(snapshot, run_id=RUN, now=0.0, width=80, height=6)
    assert lines[2:] == ["  ✓ 30 tasks succeeded", "  ▶ x    RUNNING", "  · y    PENDING"]
    lines = render(snapshot, run_id=RUN, now=0.0, width=80, height=4)
    assert len(lines) == 4 and lines[-1] == "  … 2 more"


# -- the real console script ----------------------------------------------------------------------


async def test_ctrl_c_exits_130_without_a_traceback(server: CannedServer, tmp_path: Path) -> None:
    """Ctrl-C while watching: exit 130, no traceback.  The signal is sent once the client says it
    is watching (its first status line), not after a fixed time, so load cannot reorder them."""
    hold = trio.Event()
    server.routes[("GET", f"/runs/{RUN}/watch")] = sse(snap_frame(RUN, "RUNNING", 1), hold=hold)
    err_path = tmp_path / "stderr.txt"
    with trio.fail_after(120), err_path.open("w") as err:  # a hang guard only: it never paces the test
        proc = await trio.lowlevel.open_process(
            [str(CLIENT_BIN), "--server", server.url, "watch", RUN, "--until-terminal", "--output", "status"],
            stdout=subprocess.PIPE,
            stderr=err,
        )
        try:
            assert proc.stdout is not None
            seen = b""
            while b"RUNNING" not in seen:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"the client exited before watching: {err_path.read_text()}"
                seen += chunk
            proc.send_signal(signal.SIGINT)
            await proc.wait()
        finally:
            hold.set()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 130, err_path.read_text()
    assert "Traceback" not in err_path.read_text()


def test_bash_and_zsh_completion_scripts() -> None:
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "compdef")):
        out = subprocess.run(
            [str(CLIENT_BIN)], env={**os.environ, "_PYOCO_CLIENT_COMPLETE": f"{shell}_source"}, capture_output=True, text=True, timeout=20
        )
        assert out.returncode == 0 and marker in out.stdout and "_PYOCO_CLIENT_COMPLETE" in out.stdout, out.stderr
    words = subprocess.run(
        [str(CLIENT_BIN)],
        env={**os.environ, "_PYOCO_CLIENT_COMPLETE": "bash_complete", "COMP_WORDS": "pyoco-client sub", "COMP_CWORD": "1"},
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert "submit" in words.stdout and "submit-yaml" in words.stdout


def test_a_closed_pipe_ends_quietly_with_141(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pyoco-client logs RUN --follow | head` must not print ERR-PYOCO-UNEXPECTED when head exits."""
    import asyncclick as click

    from pyoco_es.cli import client_command
    from pyoco_es.cli.client_command import EXIT_BROKEN_PIPE, _translate

    silenced: list[bool] = []
    monkeypatch.setattr(client_command, "_silence_stdout", lambda: silenced.append(True))  # not the test runner's fd 1

    out = _translate(BaseExceptionGroup("g", [BrokenPipeError(32, "Broken pipe")]))
    assert isinstance(out, click.exceptions.Exit) and out.exit_code == EXIT_BROKEN_PIPE == 141 and silenced == [True]
    other = _translate(ValueError("x"))
    assert not isinstance(other, click.exceptions.Exit)
