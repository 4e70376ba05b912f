"""The audit archive's file format: gzip JSON lines, one file per UTC day, each run's events
chained by hash so that a changed, missing or reordered line is detectable.

A run is written as its events (``{"run_id", "n", "event", "prev", "hash"}``, ``n`` from 1) then
one closing line (``{"run_id", "end": true, "events": N, "prev", "hash"}``).  ``prev`` of the
first line is :func:`chain_start` of the run id; each line's ``hash`` is
``sha256(prev + canonical(line without "hash"))``; the closing line's hash is the run's *head*,
recorded in the ``run.archived`` audit event, so even a run dropped whole from the file is
detectable against the stream's audit subject.  Appending a pass is appending a gzip member
(a valid gzip file of several members).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

FILE_PREFIX: Final = "pyoco-runs-"
FILE_SUFFIX: Final = ".jsonl.gz"


def canonical(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_start(run_id: str) -> str:
    return hashlib.sha256(f"pyoco-archive:{run_id}".encode()).hexdigest()


def _sealed(doc: dict[str, Any]) -> dict[str, Any]:
    doc["hash"] = hashlib.sha256((doc["prev"] + canonical(doc)).encode()).hexdigest()
    return doc


def run_lines(run_id: str, events: Sequence[dict[str, Any]]) -> tuple[list[str], str]:
    """The lines of one run (events as JSON objects, in order) and its head hash."""
    prev = chain_start(run_id)
    lines = []
    for n, event in enumerate(events, start=1):
        doc = _sealed({"run_id": run_id, "n": n, "event": event, "prev": prev})
        prev = doc["hash"]
        lines.append(canonical(doc))
    end = _sealed({"run_id": run_id, "end": True, "events": len(events), "prev": prev})
    lines.append(canonical(end))
    return lines, end["hash"]


def day_file(directory: Path, ended_at: float) -> Path:
    """The archive file for runs that ended on that UTC day."""
    import datetime as dt

    day = dt.datetime.fromtimestamp(ended_at, tz=dt.timezone.utc).strftime("%Y-%m-%d")
    return directory / f"{FILE_PREFIX}{day}{FILE_SUFFIX}"


def append(path: Path, lines: Sequence[str]) -> None:
    """Append ``lines`` as one gzip member, flushed to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write("".join(line + "\n" for line in lines).encode())
        raw.flush()
        os.fsync(raw.fileno())


@attrs.frozen
class Verified:
    runs: dict[str, str]  # run_id -> head hash (complete, intact runs)
    problems: tuple[str, ...]  # "line N: what is wrong"

    @property
    def ok(self) -> bool:
        return not self.problems


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            yield number, line.rstrip("\n")


def verify(path: Path) -> Verified:
    """Check every run's chain in ``path``: each line's hash, its link to the previous line, the
    event numbering and the closing line."""
    open_runs: dict[str, tuple[str, int]] = {}  # run_id -> (prev hash, events so far)
    heads: dict[str, str] = {}
    problems: list[str] = []
    try:
        for number, line in _lines(path):
            problem = _check_line(line, open_runs, heads)
            if problem:
                problems.append(f"line {number}: {problem}")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        problems.append(f"unreadable: {exc}")
    problems += [f"run {r}: no closing line (events missing at the end)" for r in open_runs]
    return Verified(heads, tuple(problems))


def _check_line(line: str, open_runs: dict[str, tuple[str, int]], heads: dict[str, str]) -> str | None:
    try:
        doc = json.loads(line)
        run_id, prev, got = doc["run_id"], doc["prev"], doc.pop("hash")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "not an archive line"
    want_prev, count = open_runs.get(run_id, (chain_start(run_id), 0))
    if hashlib.sha256((prev + canonical(doc)).encode()).hexdigest() != got:
        open_runs.pop(run_id, None)
        return f"run {run_id}: hash mismatch (the line was changed)"
    if prev != want_prev:
        open_runs.pop(run_id, None)
        return f"run {run_id}: chain broken (a line before it is missing or changed)"
    if doc.get("end"):
        open_runs.pop(run_id, None)
        if doc.get("events") != count:
            return f"run {run_id}: closing line counts {doc.get('events')} events, {count} present"
        heads[run_id] = got
        return None
    if doc.get("n") != count + 1:
        open_runs.pop(run_id, None)
        return f"run {run_id}: event {doc.get('n')} follows event {count}"
    open_runs[run_id] = (got, count + 1)
    return None


def read_run(path: Path, run_id: str) -> tuple[list[dict[str, Any]], Verified]:
    """The events archived for ``run_id`` in ``path`` (in order), and the file's verification."""
    checked = verify(path)
    events = []
    for _, line in _lines(path):
        doc = json.loads(line)
        if doc.get("run_id") == run_id and not doc.get("end"):
            events.append(doc["event"])
    return events, checked
