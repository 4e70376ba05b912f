"""The library API's HTTP clients (``pyoco_es.PyocoHttpClient``, ``AsyncPyocoHttpClient``)
against a real stack (nats-server + conductor + gateway + worker), and pyoco-server 0.5.1's own
``examples/submit_run.py`` run unchanged but for its import.

Nothing sleeps to wait for state: runs are followed with the watch stream, or polled with a
deadline; the cancellable run waits on a file-free task that only ends when cancelled.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from functools import partial
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import pyoco_es
from pyoco_es import AsyncPyocoHttpClient, PyocoHttpClient, PyocoHttpError
from pyoco_es.testing.stack import Stack, open_stack
from test_cli_e2e import fast_settings
from wheelmaker import make_wheel

pytestmark = [
    pytest.mark.filterwarnings("ignore:Async generator 'httpx.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore.:ResourceWarning"),
]

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = Path(__file__).resolve().parent / "upstream_examples"
# SHA-256 of pyoco-server 0.5.1's sdist files examples/<name>.
UPSTREAM_SHA256 = {
    "hello_flow.py": "12d419f4157ccd1d1a338ff75a408dbf40a9d6f5cae2fde03e976e44c2aee704",
    "submit_run.py": "a20997be3a88601e7e74136e82913451651ac640a4bce16ed4b87676e87271bb",
    "run_worker.py": "fc9013c52e63e851913804486540a8f1d92cb03a4c207ad27f73543073ab5636",
}

TWO_TASKS = (REPO / "examples" / "flow.yaml").read_text().replace("{x: 1}", "{x: 41}")
CANCELLABLE = """\
version: 1
flow:
  graph: |
    waiter
  defaults: {seconds: 60}
tasks:
  waiter: {callable: "examples.tasks:wait_for_cancel"}
"""


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(
        tmp_path,
        settings=fast_settings(),
        worker=True,
        worker_tags=("default", "hello"),
        concurrency=2,
        flow_resolver="tests.library_flows:resolve",  # type: ignore[arg-type]  # run_worker takes a spec string
    ) as s:
        yield s


def wait_terminal(client: PyocoHttpClient, run_id: str) -> dict[str, Any]:
    """Follow the run's watch stream until a terminal snapshot (the server ends the stream)."""
    for frame in client.watch_run(run_id, timeout_sec=60):
        snap = frame["data"].get("snapshot") if isinstance(frame["data"], dict) else None
        if snap and snap.get("status") in {"COMPLETED", "FAILED", "CANCELLED"}:
            return snap
    raise AssertionError(f"watch of {run_id} ended without a terminal status")


def sync_story(url: str) -> None:
    with PyocoHttpClient(url) as client:
        submitted = client.submit_run("hello", params={"x": 41}, tag="default")
        assert set(submitted) >= {"run_id", "status"}
        run_id = submitted["run_id"]
        assert wait_terminal(client, run_id)["status"] == "COMPLETED"
        snap = client.get_run(run_id)
        assert snap["status"] == "COMPLETED" and snap["tasks"] == {"add_one": "SUCCEEDED", "to_text": "SUCCEEDED"}
        assert "task_records" not in snap  # records only on request, as pyoco-server
        assert client.get_run_with_records(run_id)["task_records"]["to_text"]["output"] == "value=42"
        tasks = client.get_tasks(run_id)
        assert tasks["run_id"] == run_id and tasks["tasks"]["add_one"] == "SUCCEEDED"
        assert run_id in {r["run_id"] for r in client.list_runs(status="COMPLETED", flow="hello")}

        yaml_run = client.submit_run_yaml(TWO_TASKS, flow_name="main", tag="default")["run_id"]
        assert wait_terminal(client, yaml_run)["status"] == "COMPLETED"
        assert client.get_run_with_records(yaml_run)["task_records"]["to_text"]["output"] == "value=42"

        waiting = client.submit_run_yaml(CANCELLABLE, flow_name="main", tag="default")["run_id"]
        for frame in client.watch_run(waiting, timeout_sec=60):
            if isinstance(frame["data"], dict) and (frame["data"].get("snapshot") or {}).get("status") == "RUNNING":
                break
        assert client.cancel_run(waiting, wait=True, timeout_sec=30)["status"] == "CANCELLED"

        page = client.list_runs_vnext(limit=1, updated_after=0)
        assert len(page["items"]) == 1 and page["next_cursor"]  # three runs by now
        rest = client.list_runs_vnext(cursor=page["next_cursor"], limit=50)
        assert not {r["run_id"] for r in page["items"]} & {r["run_id"] for r in rest["items"]}
        assert len(rest["items"]) == 2
        assert client.list_runs_vnext(limit=1) == {"items": [page["items"][0]], "next_cursor": None}  # plain mode: a list, wrapped
        workers = client.get_workers(include_hidden=True)
        assert [w["worker_id"] for w in workers] == ["w1"]
        assert client.patch_worker_hidden("w1", hidden=True)["hidden"] is True
        assert client.get_workers() == []
        assert client.patch_worker_hidden("w1", hidden=False)["hidden"] is False
        assert "pyoco_http_requests_total" in client.get_metrics()

        with pytest.raises(PyocoHttpError) as missing:
            client.get_run("no-such-run")
        assert isinstance(missing.value, httpx.HTTPStatusError)  # what pyoco-server's client raises
        assert missing.value.response.status_code == 404 and "not found" in missing.value.detail.lower()
        with pytest.raises(PyocoHttpError) as bad:
            client.submit_run("hello", params={"x": 1}, tag="not a tag!")
        assert bad.value.response.status_code == 422 and "tag" in str(bad.value)

        name, data = make_wheel("lib-demo", "1.0")
        assert client.upload_wheel(filename=name, data=data, tags=["cpu", " "])["tags"] == ["cpu"]
        assert [w["name"] for w in client.list_wheels()] == [name]
        assert client.download_wheel(name) == data
        assert client.delete_wheel(name) == {"name": name, "deleted": True}
        assert [h["action"] for h in client.list_wheel_history(wheel_name=name, limit=5)] == ["delete", "upload"]
        assert client.list_wheel_history(action="delete", limit=1)[0]["wheel_name"] == name


async def test_sync_client_drives_every_method(stack: Stack) -> None:
    with trio.fail_after(120):
        await trio.to_thread.run_sync(sync_story, stack.url)


async def test_async_client_on_trio(stack: Stack) -> None:
    with trio.fail_after(120):
        async with AsyncPyocoHttpClient(stack.url) as client:
            run_id = (await client.submit_run("hello", params={"x": 1}, tag="default"))["run_id"]
            statuses = []
            async with client.watch_run(run_id, timeout_sec=60) as frames:
                async for frame in frames:
                    snap = frame["data"].get("snapshot") if isinstance(frame["data"], dict) else None
                    if snap:
                        statuses.append(snap["status"])
                        assert frame["id"] is not None  # pyoco-es adds the run's event seq
            assert statuses[-1] == "COMPLETED"
            assert (await client.get_run_with_records(run_id))["task_records"]["to_text"]["output"] == "value=2"
            assert run_id in {r["run_id"] for r in await client.list_runs(tag="default")}
            assert (await client.get_tasks(run_id))["tasks"]["to_text"] == "SUCCEEDED"
            assert [w["worker_id"] for w in await client.get_workers()] == ["w1"]

            waiting = (await client.submit_run_yaml(CANCELLABLE, flow_name="main", tag="default"))["run_id"]
            async with client.watch_run(waiting, timeout_sec=60) as frames:
                async for frame in frames:
                    if (frame["data"].get("snapshot") or {}).get("status") == "RUNNING":
                        break
            assert (await client.cancel_run(waiting, wait=True))["status"] == "CANCELLED"

            with pytest.raises(PyocoHttpError) as missing:
                await client.get_run("no-such-run")
            assert missing.value.response.status_code == 404
            with pytest.raises(PyocoHttpError) as bad_wheel:
                await client.upload_wheel(filename="x.whl", data=b"")
            assert bad_wheel.value.response.status_code == 422 and bad_wheel.value.detail == "invalid wheel filename"
            name, data = make_wheel("lib-async", "1.0")
            assert (await client.upload_wheel(filename=name, data=data, replace=False))["name"] == name
            assert (await client.download_wheel(name)) == data
            assert [w["name"] for w in await client.list_wheels()] == [name]
            assert (await client.list_wheel_history(limit=1))[0]["wheel_name"] == name
            assert (await client.delete_wheel(name))["deleted"] is True


async def test_api_key_is_sent_as_x_api_key() -> None:
    """The header reaches the server (the gateway's check is issue 13's): a raw TCP server sees it."""
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        seen.append(data)
        body = b'{"run_id":"r1","status":"PENDING"}'
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            async with AsyncPyocoHttpClient(url, api_key="k-123") as client:
                assert await client.submit_run("main") == {"run_id": "r1", "status": "PENDING"}
            await trio.to_thread.run_sync(lambda: PyocoHttpClient(url, api_key="k-456", api_key_header="X-Other").get_run("r1"))
            nursery.cancel_scope.cancel()
    assert b"x-api-key: k-123" in seen[0].lower()
    assert b"x-other: k-456" in seen[1].lower()


def test_exports() -> None:
    import pyoco_es.client

    assert pyoco_es.PyocoHttpClient is pyoco_es.client.PyocoHttpClient
    assert {"PyocoHttpClient", "AsyncPyocoHttpClient"} <= set(pyoco_es.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pyoco_es.Nope  # noqa: B018


def test_upstream_examples_differ_only_in_their_imports() -> None:
    for name, digest in UPSTREAM_SHA256.items():
        text = (UPSTREAM / name).read_text()
        restored = text.replace("from pyoco_es import ", "from pyoco_server import ")
        assert hashlib.sha256(restored.encode()).hexdigest() == digest, name


async def test_upstream_submit_run_example(stack: Stack) -> None:
    """pyoco-server's examples/submit_run.py, import changed, submits ``main`` and sees it end."""
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, str(UPSTREAM / "submit_run.py"), "--server", stack.url, "--tag", "hello"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(REPO),
        )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "submitted run_id=" in out and "terminal status=COMPLETED" in out
    assert "'hello': 'SUCCEEDED'" in out and "'world': 'SUCCEEDED'" in out
