"""pyoco-server 0.5.1's own code against our registry (from its scratch venv, as test_apikey):

- its ``pyoco-client wheel-upload / wheels / wheel-history / wheel-delete`` drive our gateway
  unchanged (preflight included);
- its gateway (``http_api.create_app``, in-process with Starlette's test client) on the same NATS:
  a wheel it uploads is listed, downloaded and deleted by us, with its history entry; a wheel we
  upload is listed by it, with ours in its history (the KV mirror).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import trio

from pyoco_es.config import Settings
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.testing.fleet import watched_python

from test_apikey import upstream_python
from test_gateway_support import open_gateway
from wheelmaker import make_wheel, write_wheel


def _client(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = upstream_python().parent / "pyoco-client"
    return subprocess.run([str(exe), "--server", url, *args], capture_output=True, text=True, timeout=60)


async def test_upstream_client_drives_our_registry(tmp_path: Path) -> None:
    async with open_gateway(tmp_path, settings=Settings(nats_unavailable_wait=1.0), conductor=False) as g:
        v1 = write_wheel(tmp_path, "demo-pkg", "1.0.0")
        out = await trio.to_thread.run_sync(_client, g.url, "wheel-upload", "--wheel-file", str(v1), "--tags", "cpu,gpu")
        assert out.returncode == 0, out.stderr
        up = json.loads(out.stdout)
        assert up["name"] == v1.name and up["tags"] == ["cpu", "gpu"] and len(up["sha256_hex"]) == 64
        out = await trio.to_thread.run_sync(_client, g.url, "wheel-upload", "--wheel-file", str(v1))
        assert out.returncode == 1 and "409" in out.stderr and "bump version" in out.stderr
        # Its preflight (client side) refuses a wheel without entry points unless told otherwise.
        bare = write_wheel(tmp_path, "bare", "1.0", entry_points=None)
        out = await trio.to_thread.run_sync(_client, g.url, "wheel-upload", "--wheel-file", str(bare))
        assert out.returncode == 1 and "entry_points are missing" in out.stderr
        assert (await g.client.post("/wheels", files={"wheel": (bare.name, bare.read_bytes())})).status_code == 200

        out = await trio.to_thread.run_sync(_client, g.url, "wheels")
        assert [w["name"] for w in json.loads(out.stdout)] == sorted([v1.name, bare.name])
        out = await trio.to_thread.run_sync(_client, g.url, "wheel-delete", "--name", v1.name)
        assert json.loads(out.stdout) == {"name": v1.name, "deleted": True}
        out = await trio.to_thread.run_sync(_client, g.url, "wheel-history", "--wheel-name", v1.name, "--limit", "5")
        assert [h["action"] for h in json.loads(out.stdout)] == ["delete", "upload"]


UPSTREAM_GATEWAY = r"""
import json, sys
from fastapi.testclient import TestClient
from pyoco_server.http_api import create_app
name, path, ours = sys.argv[1], sys.argv[2], sys.argv[3]
with TestClient(create_app()) as c:
    r = c.post("/wheels", files={"wheel": (name, open(path, "rb").read(), "application/octet-stream")}, data={"tags": "cpu"})
    assert r.status_code == 200, r.text
    listed = [w["name"] for w in c.get("/wheels").json()]
    history = c.get("/wheels/history").json()
    got = c.get("/wheels/" + ours)
    print(json.dumps({"upload": r.json(), "listed": listed, "history": history, "ours_len": len(got.content)}))
"""


async def test_registry_shared_with_an_upstream_gateway(tmp_path: Path) -> None:
    async with open_gateway(tmp_path, settings=Settings(nats_unavailable_wait=1.0), conductor=False) as g:
        ours_name, ours = make_wheel("ours", "1.0")
        r = await g.client.post("/wheels", files={"wheel": (ours_name, ours)})
        assert r.status_code == 200, r.text
        theirs = write_wheel(tmp_path, "theirs", "0.1")

        def run_upstream() -> subprocess.CompletedProcess[str]:
            env = {"PYOCO_NATS_URL": g.stack.nats_url, "PATH": "/usr/bin:/bin"}
            return subprocess.run(
                watched_python(str(upstream_python()), "-c", UPSTREAM_GATEWAY, theirs.name, str(theirs), ours_name),
                capture_output=True, text=True, timeout=120, **tied_to_this_process(env), cwd=tmp_path,
            )

        out = await trio.to_thread.run_sync(run_upstream)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["listed"] == sorted([ours_name, theirs.name]) and seen["ours_len"] == len(ours)
        assert {(h["action"], h["wheel_name"]) for h in seen["history"]} == {("upload", ours_name), ("upload", theirs.name)}

        listed = (await g.client.get("/wheels")).json()
        assert [(w["name"], w["tags"]) for w in listed] == sorted([(ours_name, []), (theirs.name, ["cpu"])])
        assert [w for w in listed if w["name"] == theirs.name][0]["nuid"] == seen["upload"]["nuid"]
        assert (await g.client.get(f"/wheels/{theirs.name}")).content == theirs.read_bytes()
        hist = (await g.client.get("/wheels/history")).json()
        assert [(h["action"], h["wheel_name"]) for h in hist] == [("upload", theirs.name), ("upload", ours_name)]
        assert (await g.client.delete(f"/wheels/{theirs.name}")).status_code == 200
        assert [w["name"] for w in (await g.client.get("/wheels")).json()] == [ours_name]
