"""Live task output (issue 16): captured in the run process, shipped to PYOCO_LOGS, read back.

Real stack (nats-server + conductor + gateway + worker).  Nothing sleeps to wait for state: a
chatty task runs until the test creates a file, and every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from pyoco_es.cli.client_logs import escape_terminal, render_line
from pyoco_es.config import Settings
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats.client import NatsClient
from pyoco_es.nats.logs import decode_chunk, read_chunks
from pyoco_es.nats.resources import ResourceConfig, ensure_resources
from pyoco_es.testing.flows import one_task_flow, submit_yaml
from pyoco_es.testing.stack import Stack, open_stack
from pyoco_es.worker.logship import LogShipper

from test_cli_e2e import CLIENT, REPO, fast_settings, pyoco, wait_for

pytestmark = [
    pytest.mark.filterwarnings("ignore:Async generator 'httpx.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore.:ResourceWarning"),
]


async def status(http: httpx.AsyncClient, run_id: str) -> str:
    return str((await http.get(f"/runs/{run_id}")).json()["status"])


async def all_lines(http: httpx.AsyncClient, run_id: str, **params: Any) -> list[dict[str, Any]]:
    """Every line through GET /runs/{id}/logs, paged by position (small pages on purpose)."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        body = (await http.get(f"/runs/{run_id}/logs", params={**params, "after": after, "limit": 7})).json()
        out.extend(body["lines"])
        assert body["next"] >= after
        after = body["next"]
        if not body["more"]:
            return out


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    settings = fast_settings()
    async with open_stack(tmp_path, settings=settings, worker=True, concurrency=2, allowed_modules=("examples", "tests.tasks")) as st:
        yield st


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        yield client


async def test_follow_prints_lines_while_the_task_runs(stack: Stack, http: httpx.AsyncClient, tmp_path: Path) -> None:
    """`pyoco-client logs --follow` shows a task's lines while it is still running, then ends
    with the run, every line once and in order."""
    release = tmp_path / "release"
    run_id = await submit_yaml(http, one_task_flow("talk", "tests.tasks:chatter_until", {"path": str(release), "text": "tick"}))
    proc = await trio.lowlevel.open_process(
        [CLIENT, "--server", stack.url, "logs", run_id, "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, **tied_to_this_process()
    )
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(20):
            while b"[talk] tick 1\n" not in buf:  # two lines seen before the release (it checks every 0.1 s)
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "the follower ended before printing a line"
                buf += chunk
        # The first lines arrived while the run was still running.
        assert await status(http, run_id) == "RUNNING"
        release.touch()
        with trio.fail_after(20):
            while True:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
            await proc.wait()
        assert proc.returncode == 0
    finally:
        proc.kill()
        await proc.wait()
    assert await status(http, run_id) == "COMPLETED"
    printed = buf.decode().splitlines()
    ticks = [int(line.rsplit(" ", 1)[1]) for line in printed if line.startswith("[talk] tick ")]
    assert ticks == list(range(len(ticks))) and len(ticks) >= 2, printed
    stored = [line["text"] for line in await all_lines(http, run_id)]
    assert stored == [f"tick {i}" for i in ticks]


async def test_every_way_of_writing_is_captured_and_shown_escaped(stack: Stack, http: httpx.AsyncClient) -> None:
    """print, stderr, logging and a subprocess's output (fd level) all reach the run's log,
    tagged; the CLI never passes a terminal control sequence through."""
    run_id = await submit_yaml(http, one_task_flow("noisy", "tests.tasks:noisy", {"text": "hi"}))
    await wait_for(lambda: _done(http, run_id), "the run to end")
    lines = await all_lines(http, run_id)
    by_text = {line["text"]: line for line in lines}
    assert by_text["out: hi"]["stream"] == "stdout"
    assert by_text["err: hi"]["stream"] == "stderr"
    assert by_text["WARNING tests.noisy: logged: hi"]["stream"] == "log"
    assert by_text["sub: hi"]["stream"] == "stdout"  # written by `echo`, a child process of the task
    assert all(line["task"] == "noisy" and line["try"] == 1 and line["attempt"] == 1 for line in lines)
    assert [line["text"] for line in await all_lines(http, run_id, stream="stderr")] == ["err: hi"]
    assert await all_lines(http, run_id, task="other") == []

    out = await pyoco(stack.url, "logs", run_id)
    assert out.returncode == 0, out.stderr
    assert "[noisy] sub: hi" in out.stdout and "[noisy stderr] err: hi" in out.stdout
    assert "\x1b" not in out.stdout
    assert "[noisy] esc: \\x1b[2J\\x1b[31mred\\x1b[0m" in out.stdout

    assert (await http.get("/runs/no-such-run/logs")).status_code == 404
    assert (await http.get("/runs/no-such-run/logs/stream")).status_code == 404
    bad = await http.get(f"/runs/{run_id}/logs", params={"stream": "nope"})
    assert bad.status_code == 422 and "stream" in bad.text


async def _done(http: httpx.AsyncClient, run_id: str) -> bool:
    return await status(http, run_id) in ("COMPLETED", "FAILED", "CANCELLED")


async def test_sse_resume_gives_no_duplicates_and_no_gaps(stack: Stack, http: httpx.AsyncClient) -> None:
    """A client that drops the stream mid-run and resumes with Last-Event-ID gets every line
    exactly once."""
    run_id = await submit_yaml(http, one_task_flow("talk", "tests.tasks:chatter", {"count": 25, "interval": 0.04}))
    got: list[int] = []
    last_id: str | None = None
    with trio.fail_after(30):
        async with http.stream("GET", f"/runs/{run_id}/logs/stream") as resp:
            async with aclosing(_frames(resp)) as frames:
                async for event, ident, data in frames:
                    if event == "logs" and data["lines"]:
                        got += [line["pos"] for line in data["lines"]]
                        last_id = ident
                        break
        assert last_id is not None
        ended = False
        async with http.stream("GET", f"/runs/{run_id}/logs/stream", headers={"Last-Event-ID": last_id}) as resp:
            async with aclosing(_frames(resp)) as frames:
                async for event, _ident, data in frames:
                    if event == "logs":
                        got += [line["pos"] for line in data["lines"]]
                    if event == "end":
                        ended = data["status"] == "COMPLETED"
    assert ended
    expected = [line["pos"] for line in await all_lines(http, run_id)]
    assert len(expected) == 25
    assert got == expected


async def _frames(resp: httpx.Response) -> AsyncIterator[tuple[str, str | None, Any]]:
    event, ident, data = "message", None, None
    async for raw in resp.aiter_lines():
        if raw == "":
            if data is not None:
                yield event, ident, json.loads(data)
            event, ident, data = "message", None, None
        elif raw.startswith("event: "):
            event = raw[7:]
        elif raw.startswith("id: "):
            ident = raw[4:]
        elif raw.startswith("data: "):
            data = raw[6:]


async def test_drop_marker_when_a_run_reaches_its_log_limit(tmp_path: Path) -> None:
    """Past PYOCO_LOGS_MAX_MSGS_PER_RUN chunks a run's lines are dropped, a visible marker says
    how many, the run itself is unharmed, and /metrics counts the drops."""
    settings = Settings(**{**_fast_kwargs(), "logs_max_msgs_per_run": 3})
    async with open_stack(tmp_path, settings=settings, worker=True, concurrency=1, allowed_modules=("tests.tasks",)) as st:
        async with httpx.AsyncClient(base_url=st.url, timeout=30) as http:
            run_id = await submit_yaml(http, one_task_flow("flood", "tests.tasks:flood", {"lines": 3000}))
            await wait_for(lambda: _done(http, run_id), "the run to end")
            assert await status(http, run_id) == "COMPLETED"

            async def marked() -> list[dict[str, Any]]:
                lines = await all_lines(http, run_id)
                return lines if lines and lines[-1]["stream"] == "dropped" else []

            lines = await wait_for(marked, "the drop marker")  # stored before the end, unless NATS is slow
            markers = [line for line in lines if line["stream"] == "dropped"]
            assert len(markers) == 1 and markers[0] is lines[-1]
            kept = len(lines) - 1
            assert 0 < kept <= 1000  # two chunks at most; the third slot holds the marker
            assert markers[0]["dropped"] == 3000 - kept
            assert f"{3000 - kept} lines dropped" in markers[0]["text"]
            # the marker passes a stream filter too
            assert (await all_lines(http, run_id, stream="stderr")) == markers

            async def counted() -> bool:
                text = (await http.get("/metrics")).text
                return f'pyoco_log_lines_dropped{{worker_id="w1"}} {float(3000 - kept)}' in text

            await wait_for(counted, "/metrics to count the dropped lines")


def _fast_kwargs() -> dict[str, Any]:
    s = fast_settings()
    return {
        "worker_heartbeat_interval": s.worker_heartbeat_interval,
        "run_lease_seconds": s.run_lease_seconds,
        "worker_poll_timeout": s.worker_poll_timeout,
        "allowed_modules": ("tests.tasks",),
        "sse_heartbeat_interval": s.sse_heartbeat_interval,
    }


async def test_worker_buffer_is_bounded_and_counts_what_it_drops() -> None:
    """The worker never holds more than PYOCO_LOGS_BUFFER_LINES lines (NATS slow): the rest are
    counted as dropped, with a reason for the marker."""
    ship = LogShipper(None, Settings(logs_buffer_lines=100))  # type: ignore[arg-type]  # offer() never touches NATS
    line = [None, 1, "stdout", 0.0, "x"]
    ship.offer("r1", 1, {"ev": "log", "lines": [line] * 80, "dropped": 0})
    ship.offer("r1", 1, {"ev": "log", "lines": [line] * 80, "dropped": 5})
    assert ship.dropped_total == 60 + 5
    state = ship._attempts[("r1", 1)]
    assert len(state.lines) == 100 and state.dropped == 65 and "PYOCO_LOGS_BUFFER_LINES" in state.reason
    ship.offer("r1", 1, {"ev": "log", "lines": "garbage"})  # a malformed frame is ignored, not fatal
    assert len(state.lines) == 100


def test_terminal_escaping_and_chunk_decoding() -> None:
    assert escape_terminal("a\x1b[2Jb\x07\x9b\u202ec\td") == "a\\x1b[2Jb\\x07\\x9b\\u202ec\td"
    line = {"task": "t\x1b", "stream": "stderr", "text": "x\ry"}
    assert render_line(line) == "[t\\x1b stderr] x\\x0dy"
    assert decode_chunk(5, b"not json") == []
    assert decode_chunk(5, b'{"lines": [["t", 1, "stdout", 1.5, "hi"], "bad", [1, 2]]}') == [
        {"pos": 5000, "attempt": 1, "task": "t", "try": 1, "stream": "stdout", "ts": 1.5, "text": "hi"}
    ]


def test_cli_help_lists_logs() -> None:
    out = subprocess.run([CLIENT, "logs", "--help"], capture_output=True, text=True, check=False, env={**os.environ})
    assert out.returncode == 0 and "--follow" in out.stdout and "--stream" in out.stdout, out.stderr


async def test_logs_routes_are_tenant_scoped(tmp_path: Path) -> None:
    """With API keys on, a run's output is its tenant's: another tenant (and no key) is refused
    exactly as on every run route."""
    from test_gateway_auth import AUTH, _key
    from test_gateway_support import open_gateway

    async with open_gateway(tmp_path, settings=AUTH) as agw:
        a_key, _ = await _key(agw, "team-a")
        b_key, _ = await _key(agw, "team-b")
        a, b = {"X-API-Key": a_key}, {"X-API-Key": b_key}
        r = await agw.client.post("/runs", json={"flow_name": "hello"}, headers=a)
        assert r.status_code == 200, r.text
        run_id = r.json()["run_id"]
        for path in (f"/runs/{run_id}/logs", f"/runs/{run_id}/logs/stream"):
            r = await agw.client.get(path, headers=b)
            assert (r.status_code, r.json()) == (404, {"detail": "run not found"}), path
            assert (await agw.client.get(path)).status_code == 401
        r = await agw.client.get(f"/runs/{run_id}/logs", headers=a)
        assert r.status_code == 200 and r.json() == {"run_id": run_id, "lines": [], "next": 0, "more": False}
        r = await agw.client.get(f"/runs/{run_id}/logs/stream", params={"timeout_sec": 1}, headers=a)
        assert r.status_code == 200 and "event: logs" in r.text


async def test_chunks_nats_refuses_are_dropped_with_a_marker(nats: NatsClient) -> None:
    """JetStream refusing a chunk (here: above the stream's max_msg_size) drops its lines, counts
    them, and the next thing stored for the run is the marker saying so; later lines follow."""
    await ensure_resources(nats, ResourceConfig(max_msg_size=2048))
    ship = LogShipper(nats, Settings())
    big = [["t", 1, "stdout", 1.0, "x" * 100]] * 50  # one chunk of ~6 KB: refused

    async def stored() -> list[dict[str, Any]]:
        return [line for seq, data in await read_chunks(nats, "r1", after_seq=0, limit=100) for line in decode_chunk(seq, data)]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ship.run)
        ship.offer("r1", 1, {"ev": "log", "lines": big, "dropped": 0})
        lines = await wait_for(stored, "the drop marker")
        assert [line["stream"] for line in lines] == ["dropped"]
        assert lines[0]["dropped"] == 50 and "50 lines dropped: NATS did not store them" in lines[0]["text"]
        assert ship.dropped_total == 50
        ship.offer("r1", 1, {"ev": "log", "lines": [["t", 1, "stdout", 2.0, "small"]], "dropped": 0})
        with trio.fail_after(10):
            await ship.flushed("r1", 1)
        assert [line["text"] for line in await stored()][1:] == ["small"]
        nursery.cancel_scope.cancel()


def test_log_pane_script_has_no_html_sinks_and_translated_strings() -> None:
    """static/logs.js follows the dashboard's rules: text only through textContent, every
    string in both languages."""
    from test_dashboard_static import STATIC, _table

    js = (STATIC / "logs.js").read_text(encoding="utf-8")
    code = re.sub(r"^\s*//.*$", "", re.sub(r"/\*.*?\*/", "", js, flags=re.S), flags=re.M)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, sink
    used = set(re.findall(r'\bt\("([\w.]+)"[,)]', js)) | {f"logs.state_{s}" for s in ("connecting", "live", "ended")}
    assert {"logs.title", "logs.search", "logs.download", "logs.all", "logs.empty"} <= used
    for lang in ("en", "ja"):
        assert sorted(used - set(_table(lang))) == [], lang
    assert '<script src="/static/logs.js"></script>' in (STATIC / "index.html").read_text(encoding="utf-8")
