"""Our ``pyoco-client`` wheel commands (the console script, a subprocess) against a real gateway,
and the upload preflight (pure) worded as pyoco-server's client words it, and ``workers --output plugins``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio
from asyncclick.testing import CliRunner

from pyoco_es.cli.client import client
from pyoco_es.config import Settings
from pyoco_es.core import wheels

from test_cli_client import cli, server  # noqa: F401 - server is a fixture
from test_cli_e2e import ok_json, pyoco
from test_cli_support import CannedServer
from test_gateway_support import open_gateway
from wheelmaker import make_wheel, write_wheel


def test_preflight_as_upstream() -> None:
    assert wheels.preflight(make_wheel("demo", "1.0")[1]) == ([], [])
    bare = make_wheel("demo", "1.0", entry_points=None, description="short", summary="")[1]
    errors, warnings = wheels.preflight(bare)
    assert errors == [
        "usage documentation is missing (need METADATA description>=80 chars or Project-URL: Documentation,...)",
        "entry_points are missing (dist-info/entry_points.txt)",
    ]
    assert warnings == ["METADATA Summary is empty"]
    assert wheels.preflight(bare, require_entry_points=False, require_usage_doc=False) == (
        [], ["METADATA Summary is empty", "usage documentation seems missing", "entry_points are missing"])
    assert wheels.preflight(b"junk") == (["wheel file is not a valid zip archive"], [])
    assert wheels.preflight(make_wheel("demo", "1.0", entry_points="not ini")[1])[0] == [
        "dist-info/entry_points.txt format is invalid", "entry_points are missing (dist-info/entry_points.txt)"]


async def inproc(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``pyoco-client --server URL ARGS`` in this process (CliRunner on this Trio loop)."""
    with trio.fail_after(30):
        result = await CliRunner().invoke(client, ["--server", url, *args], prog_name="pyoco-client", env={"COLUMNS": "120"})
    assert "Traceback" not in result.stderr
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


async def test_wheel_commands_end_to_end(tmp_path: Path) -> None:
    """The first command runs the real console script; the rest run in-process (same code, no
    interpreter start per command)."""
    async with open_gateway(tmp_path, settings=Settings(nats_unavailable_wait=1.0), conductor=False) as g:
        url = g.url
        v1 = write_wheel(tmp_path, "demo-pkg", "1.0.0")
        bare = write_wheel(tmp_path, "bare", "0.1", entry_points=None)

        out = await pyoco(url, "wheel-upload", "--wheel-file", str(bare))
        assert out.returncode == 1 and out.stdout == ""
        assert "ERR-PYOCO-0018" in out.stderr and "wheel preflight failed: entry_points are missing" in out.stderr
        out = await inproc(url, "wheel-upload", "--wheel-file", str(bare), "--preflight", "warn")
        assert ok_json(out)["name"] == bare.name and "[pyoco-client][preflight][warn] entry_points are missing" in out.stderr

        up = ok_json(await inproc(url, "wheel-upload", "--wheel-file", str(v1), "--tags", "cpu,gpu", "--no-replace"))
        assert up["tags"] == ["cpu", "gpu"] and up["size_bytes"] == v1.stat().st_size
        out = await inproc(url, "wheel-upload", "--wheel-file", str(v1))
        assert out.returncode == 1 and "ERR-PYOCO-HTTP" in out.stderr
        assert "HTTP 409 POST /wheels: wheel version already exists; bump version" in out.stderr
        assert "hint: the package already has this version or a newer one" in out.stderr
        out = await inproc(url, "wheel-upload", "--wheel-file", str(tmp_path / "missing.whl"))
        assert out.returncode == 1 and "file I/O error" in out.stderr

        assert [w["name"] for w in ok_json(await inproc(url, "wheels"))] == sorted([bare.name, v1.name])
        table = await inproc(url, "wheels", "--output", "table")
        assert table.returncode == 0 and "cpu,gpu" in table.stdout and v1.name in table.stdout
        assert ok_json(await inproc(url, "wheel-delete", "--name", bare.name)) == {"name": bare.name, "deleted": True}
        out = await inproc(url, "wheel-delete", "--name", "../etc/passwd")
        assert out.returncode == 1 and "HTTP 404" in out.stderr

        hist = ok_json(await inproc(url, "wheel-history", "--action", "upload"))
        assert [h["wheel_name"] for h in hist] == [v1.name, bare.name]
        table = await inproc(url, "wheel-history", "--output", "table", "--limit", "5")
        assert table.returncode == 0 and "delete" in table.stdout and "1.0.0" in table.stdout


async def test_workers_output_plugins_lists_installed_wheels(server: CannedServer) -> None:
    """pyoco-server's ``workers --output plugins``: one row per installed wheel, dashes for none."""
    installed = [
        {"package_name": "demo-pkg", "package_version": "2.0.0", "wheel_name": "demo_pkg-2.0.0-py3-none-any.whl"},
        {"package_name": "other", "package_version": "1.0", "wheel_name": "other-1.0-py3-none-any.whl"},
    ]
    server.json("GET", "/workers", [
        {"worker_id": "w1", "state": "IDLE", "tags": ["cpu"], "wheel_sync": {"enabled": True, "installed_wheels": installed}},
        {"worker_id": "w2", "state": "RUNNING", "tags": [], "wheel_sync": None},
    ])
    result = await cli(server, "workers", "--output", "plugins")
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["worker_id", "state", "tags", "package", "version", "wheel_name"]
    assert lines[1:] == [
        ["w1", "IDLE", "cpu", "demo-pkg", "2.0.0", "demo_pkg-2.0.0-py3-none-any.whl"],
        ["w1", "IDLE", "cpu", "other", "1.0", "other-1.0-py3-none-any.whl"],
        ["w2", "RUNNING", "-", "-", "-", "-"],
    ]
