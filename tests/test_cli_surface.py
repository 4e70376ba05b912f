"""pyoco-server's command-line surface on pyoco-es (issue 15): `up`'s NATS flags, `pyoco-worker
--run-once`, uvicorn's log levels, pyoco-server's settings (honoured or refused with the reason),
and JSON log lines."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from pyoco_es import logs
from pyoco_es.config import Settings, refused_settings
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.runtime import open_system_nats
from pyoco_es.worker.supervisor import consumer_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVER = [str(BIN / "pyoco-server")]
WORKER = [str(BIN / "pyoco-worker")]
PYOCO_ES = [str(BIN / "pyoco-es")]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_") and k != "PYTHONPATH"} | {"PYOCO_LOAD_DOTENV": "0"}


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Any:
    """The tests that configure logging in this process leave the root logger as they found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(log: Path, *args: str, env: dict[str, str] | None = None, json_logs: bool = False) -> tuple[subprocess.Popen[bytes], str, str]:
    """``pyoco-server --port 0 ARGS``; returns the process, its gateway URL and its NATS URL.

    Its log lines go to ``log``: stderr's, or with ``json_logs`` stdout's (stderr then goes to
    ``log`` + ``.err``)."""
    with open(log, "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        streams = {"stdout": out, "stderr": err} if json_logs else {"stdout": subprocess.DEVNULL, "stderr": out}
        proc = subprocess.Popen([*SERVER, "--port", "0", *args], cwd=ROOT, **tied_to_this_process(env or ENV), **streams)
    url = nats_url = ""
    deadline = time.monotonic() + 60
    while not url and time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if "embedded NATS at " in line:
                nats_url = line.split("embedded NATS at ")[1].split()[0]
            if "gateway on " in line:
                url = line.split("gateway on ")[1].split()[0].rstrip("/")
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    assert url and nats_url, log.read_text()
    return proc, url, nats_url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _submit(url: str) -> str:
    flow = (ROOT / "examples" / "flow.yaml").read_bytes()
    r = httpx.post(f"{url}/runs/yaml", files={"workflow": ("flow.yaml", flow)}, data={"flow_name": "main", "tag": "default"})
    assert r.status_code == 200, r.text
    return str(r.json()["run_id"])


def _wait_status(url: str, run_id: str, wanted: str) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = httpx.get(f"{url}/runs/{run_id}").json()
        if snap["status"] == wanted:
            break
        time.sleep(0.02)
    return snap


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


# -- up's NATS flags and pyoco-worker --run-once ------------------------------------------------


def test_with_nats_bootstrap_serves_nats_at_the_typed_address_and_run_once_serves_one_run(tmp_path: Path) -> None:
    client, monitor = _free_port(), _free_port()
    proc, url, nats_url = _start(tmp_path / "up.log", "--data-dir", str(tmp_path / "data"), "--with-nats-bootstrap",
                                 "--nats-client-port", str(client), "--nats-http-port", str(monitor))  # fmt: skip
    try:
        assert nats_url == f"nats://127.0.0.1:{client}"
        assert httpx.get(f"http://127.0.0.1:{monitor}/healthz").status_code == 200
        first, second = _submit(url), _submit(url)
        once = [*WORKER, "--nats-url", nats_url, "--allow-module", "examples", "--run-once", "--poll-timeout", "2"]
        out = _run(once)
        assert out.returncode == 0, out.stderr
        done: list[str] = []
        deadline = time.monotonic() + 30  # the worker has ended the run; the projection follows
        while not done and time.monotonic() < deadline:
            done = [r for r in (first, second) if httpx.get(f"{url}/runs/{r}").json()["status"] == "COMPLETED"]
            time.sleep(0.02)
        assert len(done) == 1, out.stderr  # one run served, the other left for the next worker
        left = second if done == [first] else first
        assert httpx.get(f"{url}/runs/{left}").json()["status"] == "PENDING"
        out = _run(once)
        assert out.returncode == 0, out.stderr
        assert _wait_status(url, left, "COMPLETED")["status"] == "COMPLETED"
        began = time.monotonic()
        out = _run(once)  # nothing queued: one poll cycle, then exit 0
        assert out.returncode == 0, out.stderr
        assert time.monotonic() - began < 20
        busy = _run([*SERVER, "--port", "0", "--data-dir", str(tmp_path / "other"), "--with-nats-bootstrap",
                     "--nats-client-port", str(client), "--nats-http-port", str(_free_port())])  # fmt: skip
        assert busy.returncode == 1
        assert busy.stderr.startswith(f"ERR-PYOCO-0018: NATS client port is already in use: 127.0.0.1:{client}"), busy.stderr
    finally:
        _stop(proc)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--with-nats-bootstrap", "--nats-url", "nats://10.0.0.1:4222"], "--nats-url nats://10.0.0.1:4222 does not match --with-nats-bootstrap's address nats://127.0.0.1:4222"),
        (["--nats-url", "nats://127.0.0.1:4222", "--nats-client-port", "4333"], "--nats-client-port place the embedded NATS, which --nats-url/PYOCO_NATS_URL"),
        (["--nats-client-port", "0"], "Invalid value for '--nats-client-port'"),
    ],
)
def test_up_refuses_nats_flags_that_contradict(tmp_path: Path, args: list[str], fragment: str) -> None:
    out = _run([*SERVER, "--port", "0", "--data-dir", str(tmp_path / "d"), *args])
    assert out.returncode in (1, 2) and fragment in out.stderr, out.stderr
    assert not (tmp_path / "d").exists()  # refused before anything started


def test_up_help_explains_the_bootstrap_mapping() -> None:
    text = " ".join(_run([*SERVER, "up", "--help"]).stdout.split())
    assert "Here that server is the embedded one" in text and "--data-dir" in text


# -- log levels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["critical", "error", "warning", "info", "debug", "trace", "TRACE"])
def test_every_command_takes_uvicorns_levels(level: str) -> None:
    for cmd in ([*PYOCO_ES, "events", "bad id!"], [*WORKER, "--worker-id", "bad id!"]):
        out = _run([*cmd, "--log-level", level])
        assert out.returncode == 1 and "invalid" in out.stderr and "Invalid value for '--log-level'" not in out.stderr, out.stderr
    for cmd in (["up"], ["conductor"], ["gateway"], ["replay"], ["events"], ["worker"]):
        assert "critical|error|warning|info|debug|trace" in _run([*PYOCO_ES, *cmd, "--help"]).stdout, cmd


def test_trace_level_lets_trace_records_through(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("trace", service="t")
    logging.getLogger("x").log(logs.TRACE, "deep")
    logs.configure("debug", service="t")
    logging.getLogger("x").log(logs.TRACE, "hidden")
    err = capsys.readouterr().err
    assert "TRACE x: deep" in err and "hidden" not in err
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z TRACE", err)


# -- pyoco-server's settings --------------------------------------------------------------------


REFUSED = {
    "PYOCO_RUNS_KV_BUCKET": ("runs_b", "only 'pyoco_runs' is"),
    "PYOCO_WORKERS_KV_BUCKET": ("w_b", "only 'pyoco_workers' is"),
    "PYOCO_DLQ_STREAM": ("DLQ2", "only 'PYOCO_DLQ' is"),
    "PYOCO_DLQ_SUBJECT_PREFIX": ("x.dlq", "only 'pyoco.dlq' is"),
    "PYOCO_WORKERS_KV_TTL_SEC": ("15", "worker records do not expire here"),
    "PYOCO_RUN_HEARTBEAT_INTERVAL_SEC": ("1", "runs carry no heartbeat of their own here"),
    "PYOCO_LOG_FORMAT": ("xml", "is not a format: use json or text"),
    "PYOCO_LOG_LEVEL": ("loud", "is not a level"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_setting_we_cannot_honour_is_refused_at_start_with_why(tmp_path: Path, name: str) -> None:
    value, why = REFUSED[name]
    env = ENV | {name: value}
    for cmd in ([*SERVER, "--port", "0", "--data-dir", str(tmp_path / "d")], [*WORKER, "--nats-url", "nats://127.0.0.1:1"]):
        out = _run(cmd, env=env)
        assert out.returncode == 1, out.stderr
        assert name in out.stderr and why in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "d").exists()


def test_our_own_names_and_upstreams_defaults_pass() -> None:
    same = {"PYOCO_RUNS_KV_BUCKET": "pyoco_runs", "PYOCO_WORKERS_KV_BUCKET": "pyoco_workers", "PYOCO_DLQ_STREAM": "PYOCO_DLQ",
            "PYOCO_DLQ_SUBJECT_PREFIX": "pyoco.dlq", "PYOCO_LOG_LEVEL": "INFO", "PYOCO_LOG_FORMAT": "json", "PYOCO_LOAD_DOTENV": "0"}  # fmt: skip
    assert refused_settings(same) == []


def test_consumer_max_ack_pending_is_honoured_and_defaults_to_1000() -> None:
    assert consumer_config("default", Settings.from_env({"PYOCO_LOAD_DOTENV": "0"}))["max_ack_pending"] == 1000
    env = {"PYOCO_CONSUMER_MAX_ACK_PENDING": "200", "PYOCO_LOAD_DOTENV": "0"}
    assert consumer_config("default", Settings.from_env(env))["max_ack_pending"] == 200


async def test_dlq_limits_are_honoured_on_the_stream(nats_server: EmbeddedNats) -> None:
    env = {"PYOCO_DLQ_MAX_AGE_SEC": "3600", "PYOCO_DLQ_MAX_MSGS": "500", "PYOCO_DLQ_MAX_BYTES": "1048576", "PYOCO_LOAD_DOTENV": "0"}
    settings = Settings.from_env(env)
    async with open_system_nats(Settings(nats_url=nats_server.url, dlq_max_age=settings.dlq_max_age,
                                         dlq_max_msgs=settings.dlq_max_msgs, dlq_max_bytes=settings.dlq_max_bytes), name="t"):  # fmt: skip
        pass
    jsz = await trio.to_thread.run_sync(lambda: httpx.get(f"{nats_server.monitor_url}/jsz", params={"streams": "true", "config": "true"}).json())
    streams = {s["name"]: s["config"] for d in jsz["account_details"] for s in d["stream_detail"]}
    assert streams["PYOCO_DLQ"]["max_age"] == 3600 * 10**9
    assert streams["PYOCO_DLQ"]["max_msgs"] == 500
    assert streams["PYOCO_DLQ"]["max_bytes"] == 1048576


# -- JSON logs ----------------------------------------------------------------------------------


FIELDS = {"ts", "service", "level", "logger", "message", "pathname", "lineno", "func", "process", "thread"}


def test_json_logs_of_a_real_up_parse_line_by_line(tmp_path: Path) -> None:
    """`up --with-worker` with PYOCO_LOG_FORMAT=json at info: every stdout line (the parent's, the
    worker child's, the announcements) is one JSON object with pyoco-server's fields; stderr stays
    empty."""
    env = ENV | {"PYOCO_LOG_FORMAT": "json", "PYOCO_LOG_LEVEL": "info", "PYOCO_LOG_UTC": "true"}
    log = tmp_path / "up.log"
    proc, url, _ = _start(log, "--data-dir", str(tmp_path / "data"), "--with-worker", "--allow-module", "examples", env=env, json_logs=True)
    try:
        assert _wait_status(url, _submit(url), "COMPLETED")["status"] == "COMPLETED"
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text()
    assert log.with_suffix(".err").read_text() == ""
    lines = log.read_text().splitlines()
    docs = [json.loads(line) for line in lines]  # each line parses on its own
    assert all(isinstance(d, dict) and FIELDS <= d.keys() for d in docs), [d for d in docs if not FIELDS <= d.keys()]
    assert {d["service"] for d in docs} == {"pyoco-server:http", "pyoco-server:worker"}
    assert all(d["ts"].endswith("Z") for d in docs)
    messages = [d["message"] for d in docs]
    assert any("gateway on http://" in m for m in messages) and any("serving default" in m for m in messages)
    assert any(d["level"] == "INFO" and d["logger"].startswith("pyoco_es.") and d["logger"] != "pyoco_es" for d in docs)


def _record(exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.getLogger("pyoco_es.test").makeRecord(
        "pyoco_es.test", logging.ERROR, __file__, 7, "failed %s", ("x",), info, "fn",
        extra={"err_id": "ERR-PYOCO-0003", "msg_id": "MSG-PYOCO-0003", "run_id": "r1"},
    )  # fmt: skip


def test_json_line_carries_extras_and_the_exception_as_pyoco_server_does() -> None:
    doc = json.loads(logs.JsonFormatter(service="pyoco-server:http").format(_record(exc=True)))
    assert doc["err_id"] == "ERR-PYOCO-0003" and doc["msg_id"] == "MSG-PYOCO-0003" and doc["run_id"] == "r1"
    assert doc["message"] == "failed x" and doc["level"] == "ERROR" and doc["lineno"] == 7 and doc["func"] == "fn"
    assert doc["exc_type"] == "ValueError" and doc["exc_message"] == "boom"
    assert "raise ValueError" in doc["exc_traceback"] and doc["exc_origin"]["func"] == "_record"
    bare = json.loads(logs.JsonFormatter(service="s", include_traceback=False, utc=False).format(_record(exc=True)))
    assert "exc_traceback" not in bare and "exc_origin" not in bare and bare["exc_type"] == "ValueError"
    assert not bare["ts"].endswith("Z")


def test_text_line_keeps_the_keys_and_honours_the_traceback_switch() -> None:
    line = logs.TextFormatter().format(_record(exc=True))
    assert "ERROR pyoco_es.test: failed x (err_id=ERR-PYOCO-0003, msg_id=MSG-PYOCO-0003, run_id=r1)" in line
    assert "Traceback" in line
    short = logs.TextFormatter(include_traceback=False).format(_record(exc=True))
    assert "Traceback" not in short and short.endswith("[ValueError: boom]")


@pytest.mark.parametrize(("command", "ready", "service"), [("conductor", "conductor running", "pyoco-es:conductor"),
                                                           ("gateway", "gateway on http://", "pyoco-server:http")])  # fmt: skip
def test_json_logs_of_conductor_and_gateway_alone(tmp_path: Path, command: str, ready: str, service: str) -> None:
    env = ENV | {"PYOCO_LOG_FORMAT": "json", "PYOCO_LOG_LEVEL": "debug"}
    log = tmp_path / "out.log"
    extra = ["--port", "0"] if command == "gateway" else []
    with open(log, "wb") as out, open(tmp_path / "err.log", "wb") as err:
        proc = subprocess.Popen([*PYOCO_ES, command, "--data-dir", str(tmp_path / "d"), *extra], cwd=ROOT, **tied_to_this_process(env),
                                stdout=out, stderr=err)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while ready not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text()
    docs = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(ready in d["message"] for d in docs)
    assert all(FIELDS <= d.keys() and d["service"] == service for d in docs)
    assert any(d["level"] == "DEBUG" for d in docs)  # PYOCO_LOG_LEVEL honoured


@pytest.mark.parametrize(("command", "hint"), [("conductor", ""), ("gateway", "hint: pyoco-es gateway --help")])
def test_conductor_and_gateway_alone_refuse_a_bad_nats_url_cleanly(tmp_path: Path, command: str, hint: str) -> None:
    """Both run through runtime.serve_until_stopped: a NATS failure is one clean line, exit 1."""
    bad = subprocess.run([*PYOCO_ES, command, "--nats-url", "nats://a:1,http://b:2", "--data-dir", str(tmp_path / "d")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 1 and "bad NATS server URL 'http://b:2'" in bad.stderr and hint in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_pyoco_servers_configure_logging_reads_the_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYOCO_LOAD_DOTENV", "0")
    monkeypatch.setenv("PYOCO_LOG_FORMAT", "json")
    monkeypatch.setenv("PYOCO_LOG_LEVEL", "INFO")
    logs.configure_logging(service="pyoco-server:worker")
    logging.getLogger("pyoco_server.worker").info("hello", extra={"err_id": "ERR-PYOCO-0012", "msg_id": "MSG-PYOCO-0012"})
    logging.getLogger("x").debug("below the level")
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # stdout, as pyoco-server
    assert [(d["service"], d["message"], d["err_id"], d["msg_id"]) for d in docs] == [("pyoco-server:worker", "hello", "ERR-PYOCO-0012", "MSG-PYOCO-0012")]
    monkeypatch.setenv("PYOCO_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="PYOCO_LOG_FORMAT='xml' is not a format"):
        logs.configure_logging(service="s")


def test_log_utc_and_traceback_switches_reach_the_formatter(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in (("PYOCO_LOAD_DOTENV", "0"), ("PYOCO_LOG_FORMAT", "json"), ("PYOCO_LOG_UTC", "false"),
                        ("PYOCO_LOG_INCLUDE_TRACEBACK", "false"), ("TZ", "Asia/Tokyo")):  # fmt: skip
        monkeypatch.setenv(name, value)
    time.tzset()
    try:
        logs.configure_logging(service="s")
        try:
            raise KeyError("k")
        except KeyError:
            logging.getLogger("x").exception("failed")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    doc = json.loads(capsys.readouterr().out)
    assert doc["ts"].endswith("+0900") and doc["exc_type"] == "KeyError" and "exc_traceback" not in doc


def test_every_process_that_heals_resources_asks_for_the_same_shape() -> None:
    """The conductor's reconcile re-applies the stream configs every interval: if it built its
    own ResourceConfig, it would revert what `up` applied from the settings (it dropped the DLQ
    limits and the auth bucket after the merge of both features).  One constructor serves all."""
    import inspect

    from pyoco_es import backend, runtime
    from pyoco_es.conductor import service
    from pyoco_es.nats.resources import ResourceConfig

    settings = Settings(dlq_max_age=3600.0, dlq_max_msgs=500, dlq_max_bytes=1 << 20, auth_kv_bucket="other_auth")
    cfg = ResourceConfig.from_settings(settings)
    assert (cfg.dlq_max_age, cfg.dlq_max_msgs, cfg.dlq_max_bytes, cfg.auth_bucket) == (3600.0, 500, 1 << 20, "other_auth")
    assert runtime.resource_config(settings) == cfg
    for module in (service, backend, runtime):
        source = inspect.getsource(module)
        assert "ResourceConfig(" not in source.replace("ResourceConfig.from_settings(", ""), module.__name__


def test_json_logs_on_stdout_carry_pyoco_servers_err_and_msg_ids(tmp_path: Path) -> None:
    """A real gateway in api_key mode with PYOCO_LOG_FORMAT=json and PYOCO_LOG_LEVEL=WARN (Python's
    name, as pyoco-server accepts it): its refusals are logged on stdout as JSON lines with
    pyoco-server's err_id/msg_id (ERR-PYOCO-0014 for a missing key, 0015 for a bad one)."""
    env = ENV | {"PYOCO_LOG_FORMAT": "json", "PYOCO_LOG_LEVEL": "WARN", "PYOCO_HTTP_AUTH_MODE": "api_key"}
    log, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(log, "wb") as out, open(err, "wb") as errf:
        proc = subprocess.Popen([*PYOCO_ES, "gateway", "--data-dir", str(tmp_path / "d"), "--port", "0"], cwd=ROOT, **tied_to_this_process(env),
                                stdout=out, stderr=errf)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "gateway on http://" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.05)
        url = log.read_text().split("gateway on ")[1].split()[0].rstrip("/")
        assert httpx.get(f"{url}/runs").status_code == 401
        assert httpx.get(f"{url}/runs", headers={"X-API-Key": "pyoco_0123456789abcdef.secretsecretsecretsecret"}).status_code == 403
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        _stop(proc)
    assert proc.returncode == 0, err.read_text()
    assert err.read_text() == ""  # JSON lines go to stdout, as pyoco-server's
    docs = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(FIELDS <= d.keys() and d["service"] == "pyoco-server:http" for d in docs)
    refused = [d for d in docs if d.get("err_id")]
    assert [(d["err_id"], d["msg_id"], d["level"]) for d in refused] == [
        ("ERR-PYOCO-0014", "MSG-PYOCO-0014", "WARNING"), ("ERR-PYOCO-0015", "MSG-PYOCO-0015", "WARNING")]
    assert refused[1]["api_key_id"] == "0123456789abcdef" and "secret" not in json.dumps(docs)
    assert not [d for d in docs if d["level"] in ("INFO", "DEBUG") and d["logger"] != "pyoco_es"]  # WARN honoured (announcements aside)


@pytest.mark.parametrize(("value", "level"), [("WARN", "warning"), ("fatal", "critical"), ("NOTSET", "trace"), ("Info", "info")])
def test_python_level_names_are_accepted(value: str, level: str) -> None:
    from pyoco_es.config import Settings, refused_settings

    assert Settings.from_env({"PYOCO_LOG_LEVEL": value, "PYOCO_LOAD_DOTENV": "0"}).log_level == level
    assert not [m for m in refused_settings({"PYOCO_LOG_LEVEL": value}) if "LOG" in m]
    assert [m for m in refused_settings({"PYOCO_LOG_STREAM": "file"}) if "PYOCO_LOG_STREAM='file' is not a stream" in m]


def test_logs_go_to_stderr_for_commands_whose_stdout_is_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyoco_es.config import Settings
    from pyoco_es.runtime import configure_logging

    settings = Settings(log_format="json", log_level="warning")
    configure_logging(settings, service="pyoco-server:admin", stdout_is_output=True)
    logging.getLogger("x").warning("to stderr")
    configure_logging(settings, service="pyoco-server:http")
    logging.getLogger("x").warning("to stdout")
    out = capsys.readouterr()
    assert json.loads(out.err)["message"] == "to stderr" and json.loads(out.out)["message"] == "to stdout"


def test_refused_requests_are_logged_with_pyoco_servers_ids(caplog: pytest.LogCaptureFixture) -> None:
    from pyoco_es.core.errors import PayloadTooLarge, RunNotFound
    from pyoco_es.gateway.answer import error_answer
    from pyoco_es.gateway.params import RequestInvalid, ResourceNotFound

    cases = [(RunNotFound("r1"), "/runs/r1", "0005"), (PayloadTooLarge("big"), "/runs/yaml", "0016"),
             (ResourceNotFound("worker not found"), "/workers/w1", "0020"), (RequestInvalid("bad scope"), "/workers", "0019"),
             (RequestInvalid("bad tag"), "/runs", "0002")]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pyoco_es.gateway.answer"):
        for exc, path, _ in cases:
            error_answer(None, exc, "GET", path)  # type: ignore[arg-type]  # 4xx answers need no gateway
    assert [(r.err_id, r.msg_id) for r in caplog.records] == [(f"ERR-PYOCO-{n}", f"MSG-PYOCO-{n}") for _, _, n in cases]  # type: ignore[attr-defined]


def test_untrusted_text_is_one_printable_log_line() -> None:
    """A flow name or task error a client chose reaches log lines escaped: no forged second line,
    no terminal escape, no lone surrogate (a UTF-8 log pipeline, and pytest-xdist, choke on it)."""
    from pyoco_es.logs import untrusted

    assert untrusted("plain text") == "plain text"
    out = untrusted("a\nERROR forged\x1b[2J\ud800")
    assert "\n" not in out and "\x1b" not in out
    assert out == "a\\nERROR forged\\x1b[2J\\ud800"
    out.encode("utf-8")  # would raise on a lone surrogate
    assert len(untrusted("x" * 10_000)) == 500
