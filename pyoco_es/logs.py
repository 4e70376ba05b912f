"""Log lines: plain text (the default, on stderr) or pyoco-server's JSON lines (on stdout).

``PYOCO_LOG_FORMAT=json`` writes one JSON object per line with pyoco-server 0.5.1's field names
(``ts``, ``service``, ``level``, ``logger``, ``message``, ``pathname``, ``lineno``, ``func``,
``process``, ``thread``, any ``extra`` such as ``err_id``/``msg_id``/``run_id``, and
``exc_type``/``exc_message``/``exc_traceback``/``exc_origin`` for an exception), so log pipelines
built for it keep working.  JSON lines go to **stdout**, as pyoco-server's do; text lines stay on
stderr (a terminal's lines for people, stdout left free); ``PYOCO_LOG_STREAM`` overrides either.
Commands whose stdout is their output (``pyoco-server-admin``, ``pyoco-es events``/``replay``)
always log to stderr.  The operator lines a command prints (the gateway's address, a worker
serving) go through :func:`announce` to the same stream, so in JSON mode every line parses.

Log calls that match one of pyoco-server's carry its ``err_id``/``msg_id`` pair (:func:`ids`),
so alerts keyed on them keep firing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any, Final, TextIO

TRACE: Final = 5  # uvicorn's "trace", below DEBUG
LEVELS: Final = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
                 "info": logging.INFO, "debug": logging.DEBUG, "trace": TRACE,
                 "warn": logging.WARNING, "fatal": logging.CRITICAL, "notset": TRACE}  # fmt: skip  # + Python's names
# LogRecord attributes that are not ``extra`` fields (pyoco-server's list, plus newer Pythons').
_STANDARD: Final = frozenset({
    "args", "asctime", "created", "exc_info", "exc_text", "filename", "funcName", "levelname", "levelno", "lineno",
    "module", "msecs", "message", "msg", "name", "pathname", "process", "processName", "relativeCreated",
    "stack_info", "thread", "threadName", "taskName",
})  # fmt: skip
_KEYS: Final = ("err_id", "msg_id", "run_id", "flow_name", "tag", "worker_id", "reason")

logging.addLevelName(TRACE, "TRACE")

# pyoco-server's message catalogue numbers (ERR-PYOCO-nnnn / MSG-PYOCO-nnnn) for the situations
# our log calls share with it.
INVALID_INPUT: Final = 2  # a request's input refused (422)
NATS_UNAVAILABLE: Final = 3  # NATS could not be reached / did not answer
RUN_NOT_FOUND: Final = 5
FLOW_NOT_FOUND: Final = 6
EXECUTION_ERROR: Final = 7  # a run failed while running
INVALID_JOB: Final = 12  # a work item that cannot be processed
KEY_MISSING: Final = 14  # 401 api key required
KEY_INVALID: Final = 15  # 403 invalid api key
TOO_LARGE: Final = 16  # 413
WORKERS_QUERY_INVALID: Final = 19
WORKER_NOT_FOUND: Final = 20
CANCEL_TIMED_OUT: Final = 21  # a cancel that did not end the run in time (ours: forced)


def ids(number: int, **extra: Any) -> dict[str, Any]:
    """``extra=`` for a log call: pyoco-server's ``err_id``/``msg_id`` pair for ``number``, plus
    ``extra`` (``run_id=...``)."""
    return {"err_id": f"ERR-PYOCO-{number:04d}", "msg_id": f"MSG-PYOCO-{number:04d}", **extra}



def untrusted(value: object, limit: int = 500) -> str:
    """Text a client or a task supplied, made safe for one log line: control characters, lone
    surrogates and other unprintables escaped (``\\x1b``, ``\\ud800``), cut at ``limit``; a
    newline in a flow name or an error cannot forge a log line or break a UTF-8 log pipeline."""
    text = str(value)[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _stamp(created: float, utc: bool, *, millis: bool = False) -> str:
    """pyoco-server's ``ts`` (whole seconds); ``millis`` adds ``.mmm`` (the text lines)."""
    frac = f".{int(created % 1 * 1000):03d}" if millis else ""
    if utc:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + frac + "Z"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(created)) + frac + time.strftime("%z", time.localtime(created))


class JsonFormatter(logging.Formatter):
    """pyoco-server's JSON line: its fields, its extras, its exception fields."""

    def __init__(self, *, service: str, utc: bool = True, include_traceback: bool = True) -> None:
        super().__init__()
        self.service = service
        self.utc = utc
        self.include_traceback = include_traceback

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _stamp(record.created, self.utc),
            "service": self.service,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pathname": record.pathname,
            "lineno": record.lineno,
            "func": record.funcName,
            "process": record.process,
            "thread": record.thread,
        }
        for key, value in record.__dict__.items():
            if key.startswith("_") or key in doc or key in _STANDARD:
                continue
            try:
                json.dumps(value)
                doc[key] = value
            except (TypeError, ValueError):
                doc[key] = str(value)
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, tb = record.exc_info
            doc["exc_type"] = exc_type.__name__
            doc["exc_message"] = str(exc)
            if self.include_traceback and tb is not None:
                doc["exc_traceback"] = "".join(traceback.format_exception(exc_type, exc, tb))
                frames = traceback.extract_tb(tb)
                if frames:
                    doc["exc_origin"] = {"file": frames[-1].filename, "line": frames[-1].lineno, "func": frames[-1].name}
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message (err_id=..., run_id=...)``, plus the traceback if enabled."""

    def __init__(self, *, utc: bool = True, include_traceback: bool = True) -> None:
        super().__init__()
        self.utc = utc
        self.include_traceback = include_traceback

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_stamp(record.created, self.utc, millis=True)} {record.levelname} {record.name}: {record.getMessage()}"
        keys = [f"{k}={getattr(record, k)}" for k in _KEYS if getattr(record, k, None) is not None]
        if keys:
            line += " (" + ", ".join(keys) + ")"
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, tb = record.exc_info
            if self.include_traceback:
                line += "\n" + "".join(traceback.format_exception(exc_type, exc, tb)).rstrip("\n")
            else:
                line += f" [{exc_type.__name__}: {exc}]"
        return line


_formatter: logging.Formatter | None = None  # the one configure() installed (None: text, unconfigured)
_stream_name: str = "stderr"  # where configure() sends the lines (and announce() its own)


def stream() -> TextIO:
    """The stream log lines go to (looked up each time: tests swap ``sys.stdout``)."""
    return sys.stdout if _stream_name == "stdout" else sys.stderr


def configure(
    level: str,
    *,
    service: str,
    fmt: str = "text",
    utc: bool = True,
    include_traceback: bool = True,
    to: str | None = None,
) -> None:
    """Send the root logger's records in ``fmt`` at ``level`` (a :data:`LEVELS` name) to ``to``
    (``stdout``/``stderr``; None: stdout for JSON, stderr for text); handlers installed before are
    replaced, so a second call does not double the lines."""
    global _formatter, _stream_name
    _stream_name = to or ("stdout" if fmt == "json" else "stderr")
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(service=service, utc=utc, include_traceback=include_traceback)
    else:
        formatter = TextFormatter(utc=utc, include_traceback=include_traceback)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(stream())
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level.lower(), logging.WARNING))
    _formatter = formatter


def announce(message: str, **extra: Any) -> None:
    """A line for the operator (an address, "serving", "stopped"), shown whatever the level: plain
    in text mode, a JSON record (level INFO, logger ``pyoco_es``) in JSON mode."""
    if isinstance(_formatter, JsonFormatter):
        record = logging.getLogger("pyoco_es").makeRecord("pyoco_es", logging.INFO, "", 0, message, (), None, extra=extra)
        line = _formatter.format(record)
    else:
        line = message
    print(line, file=stream(), flush=True)


def child_line(name: str, text: str) -> str:
    """A child service's stderr line as the parent shows it: ``[name] text`` in text mode; in
    JSON mode a child's JSON line as it is (it names its own service), anything else (a crash's
    traceback) wrapped as a record of logger ``name``."""
    if not isinstance(_formatter, JsonFormatter):
        return f"[{name}] {text}"
    if text.startswith("{"):
        try:
            if isinstance(json.loads(text), dict):
                return text
        except ValueError:
            pass
    record = logging.getLogger(name).makeRecord(name, logging.WARNING, "", 0, text, (), None)
    return _formatter.format(record)


def configure_logging(*, service: str) -> None:
    """pyoco-server's ``configure_logging(service=...)``: the root logger from PYOCO_LOG_LEVEL,
    PYOCO_LOG_FORMAT, PYOCO_LOG_UTC and PYOCO_LOG_INCLUDE_TRACEBACK (and ``.env``), for scripts
    that called it.  JSON lines go to stdout as there; the one difference is that the default
    format is text (on stderr).

    Raises:
        ValueError: PYOCO_LOG_LEVEL or PYOCO_LOG_FORMAT names no level or format.
    """
    from .config import Settings, refused_settings

    bad = [m for m in refused_settings() if m.startswith(("PYOCO_LOG_LEVEL", "PYOCO_LOG_FORMAT", "PYOCO_LOG_STREAM"))]
    if bad:
        raise ValueError("; ".join(bad))
    s = Settings.from_env()
    configure(s.log_level or "warning", service=service, fmt=s.log_format, utc=s.log_utc,
              include_traceback=s.log_include_traceback, to=s.log_stream)
