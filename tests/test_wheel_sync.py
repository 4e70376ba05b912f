"""Worker wheel sync (issue 14): a syncing worker installs the registry's wheels for its tags into
versioned directories, new run processes import from them, and each attempt records which code
it ran.  Real nats-server, real pip (``--no-deps --no-index`` of a local file) into temp dirs.

Wheels are put into the object store the way pyoco-server 0.5.1's gateway does (object name =
file name, headers ``sha256`` and ``x-pyoco-wheel-tags``), so this side needs no gateway."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import trio
from packaging.tags import Tag

from pyoco_es.conductor.service import run_conductor
from pyoco_es.core.codec import decode_envelope, encode_envelope
from pyoco_es.core.events import Envelope, Producer, RunClaimed
from pyoco_es.core.model import RunStatus
from pyoco_es.core.wheelsync import StoredWheel, select_wheels, shadowed_modules, unsafe_members, verify_sha256
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.service import RunStore

from test_worker import ROOT, TERMINAL, fast_settings, start_stack, submit, wait_for, wait_status, worker_env

BUCKET = "pyoco_wheels"
FLOW = """
version: 1
flow:
  graph: which
tasks:
  which: {callable: "wsdemo.tasks:which"}
"""
NOT_ALLOWED = FLOW.replace("wsdemo.tasks:which", "wscommon.tasks:hello")


def build_wheel(dist: str, version: str, files: dict[str, str], *, broken: bool = False) -> tuple[str, bytes]:
    """A minimal pure-Python wheel (PEP 427) in memory; ``broken``: no ``.dist-info`` (pip refuses it)."""
    name = f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    members = dict(files)
    if not broken:
        members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        members[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    if not broken:
        record.append(f"{info}/RECORD,,")
        members[f"{info}/RECORD"] = "\n".join(record) + "\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, text in members.items():
            zf.writestr(path, text)
    return name, buf.getvalue()


DEMO_TASKS = """import os
import time


def which():
    return "v{version}"


def held(gate):
    while not os.path.exists(gate):  # the test opens the gate
        time.sleep(0.01)
    return "v{version}"
"""
HELD = FLOW.replace("graph: which", "graph: held").replace('which: {callable: "wsdemo.tasks:which"}', 'held: {callable: "wsdemo.tasks:held"}')


def demo_wheel(version: str, **kw: Any) -> tuple[str, bytes]:
    return build_wheel("wsdemo", version, {"wsdemo/__init__.py": "", "wsdemo/tasks.py": DEMO_TASKS.format(version=version)}, **kw)


async def put_wheel(nats: NatsClient, name: str, data: bytes, *, tags: str | None = None, sha256: str | None = None) -> None:
    """Store a wheel as pyoco-server's gateway does (contract §1.12 "Storage")."""
    from nats.js import api
    from nats.js.errors import BucketNotFoundError

    headers = {"content-type": "application/octet-stream", "sha256": sha256 or hashlib.sha256(data).hexdigest()}
    if tags:
        headers["x-pyoco-wheel-tags"] = tags

    async def go() -> None:
        try:
            store = await nats.js.object_store(BUCKET)
        except BucketNotFoundError:
            store = await nats.js.create_object_store(BUCKET)
        await store.put(name, data, meta=api.ObjectMeta(name=name, headers=headers))

    await nats.run("put wheel", go)


async def worker_record(nats: NatsClient, worker_id: str = "w1") -> dict[str, Any]:
    entry = await nats.kv_get(subjects.WORKERS_BUCKET, worker_id)
    return json.loads(entry.value) if entry is not None else {}


async def wheel_sync(nats: NatsClient) -> dict[str, Any]:
    return (await worker_record(nats)).get("wheel_sync") or {}


def installed(state: dict[str, Any]) -> dict[str, str]:
    return {w["package_name"]: w["package_version"] for w in state.get("installed_wheels", [])}


async def run_output(store: RunStore, yaml_text: str = FLOW) -> tuple[Any, Any]:
    run_id = await submit(store, yaml_text=yaml_text)
    snap = await wait_status(store, run_id, TERMINAL, timeout=20)
    return snap, run_id


async def test_worker_syncs_wheels_switches_versions_between_runs_and_survives_bad_ones(
    nats: NatsClient, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """v1 runs; v2 uploaded → the next run uses v2 without a restart and records it; wheels for
    other tags are ignored; a broken wheel and a sha mismatch are reported and v2 keeps serving;
    an installed wheel's module still needs the allow-list."""
    with trio.fail_after(120):
        v1 = demo_wheel("1.0")
        await put_wheel(nats, *v1, tags="default,other")
        await put_wheel(nats, *build_wheel("wsgpu", "1.0", {"wsgpu.py": "X = 1\n"}), tags="gpu")
        await put_wheel(nats, *build_wheel("wscommon", "1.0", {"wscommon/__init__.py": "", "wscommon/tasks.py": "def hello():\n    return 'hi'\n"}))
        settings = fast_settings(
            wheel_sync_enabled=True,
            wheel_sync_dir=str(tmp_path / "wheels"),
            wheel_sync_interval=0.2,
            allowed_modules=("examples", "tests.tasks", "wsdemo"),
        )
        await start_stack(nursery, nats, settings)
        store = RunStore(nats)

        state = await wheel_sync(nats)
        assert state["enabled"] is True and state["last_result"] == "ok", state
        assert installed(state) == {"wsdemo": "1.0", "wscommon": "1.0"}  # the gpu wheel is not for us
        assert sorted(state["selected_wheels"]) == ["wscommon-1.0-py3-none-any.whl", "wsdemo-1.0-py3-none-any.whl"]

        snap, run_id = await run_output(store)
        assert snap.status is RunStatus.COMPLETED, snap.error
        assert snap.tasks["which"].output == "v1.0"
        sha1 = hashlib.sha256(v1[1]).hexdigest()
        assert {"name": "wsdemo", "version": "1.0", "sha256": sha1, "wheel_name": v1[0]} in snap.wheels
        claimed = [e for e in await store.history(run_id) if isinstance(e.event, RunClaimed)]
        assert [w["version"] for w in claimed[0].event.wheels if w["name"] == "wsdemo"] == ["1.0"]

        # installed but not allowed: the allow-list still decides what a YAML callable may import
        refused, _ = await run_output(store, NOT_ALLOWED)
        assert refused.status is RunStatus.FAILED and refused.failure_reason == "build_error", refused.error
        assert "wscommon" in (refused.error or "")

        v2 = demo_wheel("2.0")
        await put_wheel(nats, *v2, tags="default")

        async def has(version: str) -> bool:
            return installed(await wheel_sync(nats)).get("wsdemo") == version

        await wait_for(lambda: has("2.0"), "v2 to be installed", timeout=30)
        snap, run_id = await run_output(store)
        assert snap.tasks["which"].output == "v2.0", snap.error
        claimed = [e for e in await store.history(run_id) if isinstance(e.event, RunClaimed)]
        assert {"name": "wsdemo", "version": "2.0", "sha256": hashlib.sha256(v2[1]).hexdigest(), "wheel_name": v2[0]} in claimed[0].event.wheels

        # a wheel pip refuses, then one whose bytes are not what the registry recorded
        await put_wheel(nats, *demo_wheel("3.0", broken=True), tags="default")

        async def failed(fragment: str) -> dict[str, Any] | None:
            state = await wheel_sync(nats)
            hit = [f for f in state.get("failed_wheels", []) if fragment in f["wheel_name"]]
            return state if hit and state["last_result"] == "error" else None

        state = await wait_for(lambda: failed("wsdemo-3.0"), "the broken wheel to be reported", timeout=30)
        assert "pip install failed" in state["failed_wheels"][0]["error"]
        assert installed(state)["wsdemo"] == "2.0"
        snap, _ = await run_output(store)
        assert snap.tasks["which"].output == "v2.0"

        name4, data4 = demo_wheel("4.0")
        await put_wheel(nats, name4, data4, tags="default", sha256="0" * 64)
        state = await wait_for(lambda: failed("wsdemo-4.0"), "the sha mismatch to be reported", timeout=30)
        assert "sha256 mismatch" in state["failed_wheels"][0]["error"]
        assert installed(state)["wsdemo"] == "2.0"
        snap, _ = await run_output(store)
        assert snap.tasks["which"].output == "v2.0"
        # nothing of the refused versions reached the sync directory
        assert not [p for p in (tmp_path / "wheels" / "w1").iterdir() if p.name.startswith(("wsdemo-3.0", "wsdemo-4.0"))]


async def test_a_running_attempt_keeps_its_code_and_its_directory(nats: NatsClient, nursery: trio.Nursery, tmp_path: Path) -> None:
    """A sync while a run is in progress: that run finishes with v1 (and records v1), a run
    started after the sync gets v2 from a fresh process, and v1's directory is removed only once
    no process uses it."""
    with trio.fail_after(90):
        await put_wheel(nats, *demo_wheel("1.0"))
        root = tmp_path / "wheels"
        settings = fast_settings(wheel_sync_enabled=True, wheel_sync_dir=str(root), wheel_sync_interval=0.2,
                                 allowed_modules=("wsdemo",))  # fmt: skip
        await start_stack(nursery, nats, settings, concurrency=2)
        store = RunStore(nats)
        gate = tmp_path / "gate"
        held = await submit(store, yaml_text=HELD, params={"gate": str(gate)})
        await wait_status(store, held, {RunStatus.RUNNING})
        v1_dir = root / "w1" / Path(installed_paths(await wheel_sync(nats))["wsdemo"]).name

        await put_wheel(nats, *demo_wheel("2.0"))

        async def v2() -> bool:
            return installed(await wheel_sync(nats)).get("wsdemo") == "2.0"

        await wait_for(v2, "v2 to be installed", timeout=30)
        snap, _ = await run_output(store)
        assert snap.tasks["which"].output == "v2.0", snap.error
        assert v1_dir.is_dir(), "v1 is still imported by the held run's process"

        gate.touch()
        done = await wait_status(store, held, TERMINAL, timeout=20)
        assert done.status is RunStatus.COMPLETED and done.tasks["held"].output == "v1.0", done.error
        assert [w["version"] for w in done.wheels] == ["1.0"]

        async def v1_gone() -> bool:
            return not v1_dir.exists()

        await wait_for(v1_gone, "v1's directory to be removed once unused", timeout=20)


def installed_paths(state: dict[str, Any]) -> dict[str, str]:
    return {w["package_name"]: w["wheel_name"].split("-py3")[0] + "-" + w["sha256_hex"][:8] for w in state["installed_wheels"]}


# -- the pure rules -------------------------------------------------------------------------------


def _stored(name: str, tags: str | None = None, nuid: str = "n") -> StoredWheel:
    headers = {"x-pyoco-wheel-tags": tags} if tags is not None else {}
    return StoredWheel(name=name, nuid=nuid, size=1, digest="", headers=headers)


def test_selection_follows_pyoco_server() -> None:
    supported = {Tag("py3", "none", "any")}
    objs = [
        _stored("a-1.0-py3-none-any.whl", "default"),
        _stored("a-1.10-py3-none-any.whl", "default"),  # newest (1.10 > 1.9 as versions)
        _stored("a-1.9-py3-none-any.whl"),
        _stored("b-2.0-py3-none-any.whl", "gpu"),  # another tag: ignored
        _stored("c-1.0-py3-none-any.whl", "bad tag!,default"),  # invalid entries dropped, default kept
        _stored("d-1.0-cp27-cp27m-win32.whl"),  # not for this interpreter: reported
        _stored("not-a-wheel.txt"),
        _stored("../evil-1.0-py3-none-any.whl"),
    ]
    sel = select_wheels(objs, ["default"], supported)
    assert [(c.package, str(c.version)) for c in sel.chosen] == [("a", "1.10"), ("c", "1.0")]
    assert sel.skipped_incompatible == ({"wheel_name": "d-1.0-cp27-cp27m-win32.whl", "package_name": "d", "package_version": "1.0", "reason": "unsupported_wheel_tags"},)


def test_sha_and_member_checks() -> None:
    data = b"wheel bytes"
    sha = hashlib.sha256(data).hexdigest()
    digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
    good = StoredWheel(name="a-1-py3-none-any.whl", nuid="n", size=1, digest=digest, headers={"sha256": sha})
    assert verify_sha256(good, sha) is None
    lying = StoredWheel(name="a-1-py3-none-any.whl", nuid="n", size=1, digest=digest, headers={"sha256": "1" * 64})
    assert "registry's sha256" in (verify_sha256(lying, sha) or "")
    unlabelled = StoredWheel(name="a-1-py3-none-any.whl", nuid="n", size=1, digest=digest)
    assert verify_sha256(unlabelled, sha) is None
    assert "object store's digest" in (verify_sha256(unlabelled, "2" * 64) or "")
    members = ["pkg/__init__.py", "json/__init__.py", "pyoco_es/worker/trust.py", "site.py", "pkg-1.dist-info/METADATA", "pkg-1.data/scripts/x"]
    assert shadowed_modules(members, {"json", "site", "os"}) == ["json", "pyoco_es", "site"]
    assert unsafe_members(["ok/a.py", "../x.py", "/etc/passwd", "a/../../b", "C:/x"]) == ["../x.py", "/etc/passwd", "a/../../b", "C:/x"]


def test_sync_reads_the_store_with_the_registrys_parser() -> None:
    """One parser for names, headers and digests: the sync installs exactly the names ``GET
    /wheels`` lists, reads Go-style list and bytes header values like the registry does, and
    keeps upstream's one difference (a worker drops an invalid tag, the server drops them all)."""
    from pyoco_es.core import wheels

    names = ["a-1.0-py3-none-any.whl", " a-1.1-py3-none-any.whl", "a..b-1.0-py3-none-any.whl", "junk.whl",
             "x" * 250 + "-1.0-py3-none-any.whl", "b-1.0-py3-none-any.whl", "_c-1.0-py3-none-any.whl"]  # fmt: skip
    chosen = {c.wheel.name for c in select_wheels([_stored(n) for n in names], [], {Tag("py3", "none", "any")}).chosen}
    assert chosen == {n for n in names if wheels.is_valid_name(n) and wheels.try_parse_name(n)} == {names[0], names[5]}
    sha = hashlib.sha256(b"x").hexdigest()
    go_style = StoredWheel(name=names[0], nuid="n", size=1, digest="sha-256=" + wheels.hex_to_digest(sha).split("=", 1)[1],
                           headers={"Sha256": [sha.upper().encode()], "X-Pyoco-Wheel-Tags": [b"gpu,bad tag!"]})  # fmt: skip
    assert go_style.sha256 == wheels.sha256_from_headers(go_style.headers) == sha
    assert go_style.digest_sha256 == sha
    assert go_style.tags == {"gpu"} and wheels.tags_from_headers(go_style.headers) == ()
    assert unsafe_members(["ok", "a\x01b", ""]) == ["a\x01b", ""]  # the registry's member rule


def test_claimed_wheels_survive_the_codec() -> None:
    wheels = ({"name": "a", "version": "1.0", "sha256": "f" * 64, "wheel_name": "a-1.0-py3-none-any.whl"},)
    env = Envelope(event_id="e", run_id="r", seq=2, occurred_at=1.0, producer=Producer(kind="worker", id="w", attempt=1),
                   event=RunClaimed(worker_id="w", attempt=1, lease_seconds=15, wheels=wheels))  # fmt: skip
    back = decode_envelope(encode_envelope(env))
    assert isinstance(back.event, RunClaimed) and back.event.wheels == wheels
    with pytest.raises(TypeError):
        RunClaimed(worker_id="w", attempt=1, lease_seconds=15, wheels=({"name": 1},))  # type: ignore[dict-item]


# -- what users read --------------------------------------------------------------------------------


async def test_client_shows_workers_plugins_and_claimed_wheels(nursery: trio.Nursery) -> None:
    """``pyoco-client workers --output plugins`` (pyoco-server's columns) and the events table's
    ``wheels=name@version(sha8)``."""
    from asyncclick.testing import CliRunner

    from pyoco_es.cli.client import client
    from test_cli_support import CannedServer, start_canned

    server = await start_canned(nursery, CannedServer())
    sync = {"installed_wheels": [{"wheel_name": "a-1.0-py3-none-any.whl", "package_name": "a", "package_version": "1.0"},
                                 {"wheel_name": "b-2.0-py3-none-any.whl", "package_name": "b", "package_version": "2.0"}]}  # fmt: skip
    server.json("GET", "/workers", [{"worker_id": "w1", "state": "IDLE", "tags": ["default"], "wheel_sync": sync},
                                    {"worker_id": "w2", "state": "RUNNING", "tags": [], "wheel_sync": {"installed_wheels": []}}])  # fmt: skip
    claimed = {"seq": 2, "occurred_at": 1.0, "type": "run.claimed", "producer": {"kind": "worker", "id": "w1", "attempt": 1},
               "data": {"worker_id": "w1", "wheels": [{"name": "a", "version": "1.0", "sha256": "abcdef0123" + "0" * 54, "wheel_name": "a-1.0-py3-none-any.whl"}]}}  # fmt: skip
    server.json("GET", "/runs/r-1/events", {"items": [claimed]})
    with trio.fail_after(10):
        out = await CliRunner().invoke(client, ["--server", server.url, "workers", "--output", "plugins"], prog_name="pyoco-client")
        events = await CliRunner().invoke(client, ["--server", server.url, "events", "r-1", "--output", "table"], prog_name="pyoco-client")
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["worker_id", "state", "tags", "package", "version", "wheel_name"]
    assert [line.split() for line in lines[1:]] == [
        ["w1", "IDLE", "default", "a", "1.0", "a-1.0-py3-none-any.whl"],
        ["w1", "IDLE", "default", "b", "2.0", "b-2.0-py3-none-any.whl"],
        ["w2", "RUNNING", "-", "-", "-", "-"],
    ]
    assert "wheels=a@1.0(abcdef01)" in events.stdout, events.stdout
    # the live view (watch --output live) names the code too, within the width
    from pyoco_es.cli.client_live import render

    snap = {"run_id": "r-1", "status": "RUNNING", "start_time": 100.0, "wheels": claimed["data"]["wheels"], "tasks": {}}
    assert "code a@1.0(abcdef01)" in render(snap, run_id="r-1", now=101.0, width=80)[1]
    assert all(len(line) <= 30 for line in render(snap, run_id="r-1", now=101.0, width=30)[1:2])


async def test_pyoco_worker_flags_and_a_restart_reuses_the_installed_directory(
    nats_server: EmbeddedNats, nats: NatsClient, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``pyoco-worker --wheel-sync --wheel-sync-dir ... --wheel-install-timeout-sec ...`` plus
    ``PYOCO_WHEEL_SYNC_INTERVAL_SEC``: the process runs wheel code; restarted, it reuses the
    directory it installed (no second pip run) and runs the same code at once."""
    with trio.fail_after(90):
        await put_wheel(nats, *demo_wheel("1.0"))
        await nursery.start(run_conductor, nats, fast_settings())
        store = RunStore(nats)
        env = dict(worker_env(nats_server), PYOCO_WHEEL_SYNC_INTERVAL_SEC="0.2")
        argv = [sys.executable, "-c", "from pyoco_es.cli.worker import worker_main; worker_main()", "--nats-url", nats_server.url,
                "--worker-id", "cli", "--concurrency", "1", "--allow-module", "wsdemo", "--wheel-sync",
                "--wheel-sync-dir", str(tmp_path / "wheels"), "--wheel-install-timeout-sec", "60"]  # fmt: skip
        seen: list[float] = []
        for _ in range(2):
            proc = subprocess.Popen(argv, **tied_to_this_process(env), cwd=ROOT, stderr=subprocess.DEVNULL)
            try:
                snap, _ = await run_output(store)
                assert snap.tasks["which"].output == "v1.0", snap.error
                state = (await worker_record(nats, "cli"))["wheel_sync"]
                assert state["enabled"] and installed(state) == {"wsdemo": "1.0"}
                seen.append(state["installed_wheels"][0]["installed_at"])
            finally:
                proc.send_signal(signal.SIGINT)
                assert await trio.to_thread.run_sync(proc.wait) == 0
        assert seen[0] == seen[1], "the restarted worker installed the same wheel again"


async def test_pip_is_killed_after_the_install_timeout(tmp_path: Path) -> None:
    """``--wheel-install-timeout-sec``: a pip that takes longer is killed and the wheel fails."""
    from pyoco_es.worker.wheels import WheelFailed, pip_install

    name, data = demo_wheel("1.0")
    (tmp_path / name).write_bytes(data)
    with trio.fail_after(30), pytest.raises(WheelFailed, match="timed out after 0.05s"):
        await pip_install(tmp_path / name, tmp_path / "target", 0.05)
    assert not (tmp_path / "target" / "wsdemo").exists()


def test_pyoco_server_wheel_variables() -> None:
    from pyoco_es.config import Settings

    s = Settings.from_env({"PYOCO_LOAD_DOTENV": "0", "PYOCO_WHEEL_SYNC_ENABLED": "true", "PYOCO_WHEEL_SYNC_DIR": "/srv/wheels",
                           "PYOCO_WHEEL_SYNC_INTERVAL_SEC": "0.01", "PYOCO_WHEEL_INSTALL_TIMEOUT_SEC": "30",
                           "PYOCO_WHEEL_OBJECT_STORE_BUCKET": "team_wheels"})  # fmt: skip
    assert (s.wheel_sync_enabled, s.wheel_sync_dir, s.wheel_sync_interval, s.wheel_install_timeout, s.wheel_object_store_bucket) == (
        True, "/srv/wheels", 0.1, 30.0, "team_wheels")  # fmt: skip
    off = Settings.from_env({"PYOCO_LOAD_DOTENV": "0"})
    assert (off.wheel_sync_enabled, off.wheel_sync_dir, off.wheel_sync_interval, off.wheel_install_timeout) == (False, ".pyoco/wheels", 10.0, 180.0)
