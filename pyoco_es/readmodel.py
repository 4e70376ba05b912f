"""The gateway's persistent list read model: one SQLite file of run summaries, indexed for
``GET /runs`` and its filters, updated in batches from the runs bucket (a projection of the
projection, like the KV snapshots are of the event stream).

Plain synchronous code over :mod:`sqlite3` (no Trio): the gateway calls it from worker threads
(:mod:`pyoco_es.gateway.runindex`), ``pyoco-es replay --read-model`` from the CLI.

Durability: WAL mode; every batch is one transaction that also moves the checkpoint (the highest
KV revision applied), so after a kill -9 the file holds exactly the batches committed and the
follower resumes after the checkpoint.  A file that cannot be opened or read, or whose schema
version differs, is deleted and rebuilt from the bucket (:func:`open_store` reports why).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import queue
import threading
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 3  # 2: the error text search index (FTS5 trigram); 3: its update trigger
COMMON_TEXT: Final = 500  # an error text search matching this many runs walks the runs newest first
WALK_ROWS: Final = 20_000  # ... through at most this many of them
ERROR_TEXT_MAX: Final = 1000  # characters of error + failure_reason kept for the error search
SUMMARY_KEYS: Final = (
    "run_id",
    "schedule_id",
    "flow_name",
    "tag",
    "tags",
    "tenant_id",
    "api_key_id",
    "status",
    "updated_at",
    "heartbeat_at",
    "worker_id",
    "error",
    # pyoco-es additions (clients ignore unknown keys); the dashboard sorts finished runs by them
    "start_time",
    "end_time",
    "version",
    "attempt",
    "max_attempts",
    "failure_reason",
    "projection_error",  # set by the projector on a run it cannot fold (a corrupt event)
)
# exact-match filters: query name -> column
EXACT: Final = {
    "status": "status",
    "flow_name": "flow_name",
    "tag": "tag",
    "workflow_yaml_sha256": "yaml_sha",
    "schedule_id": "schedule_id",
    "tenant_id": "tenant_id",
    "worker_id": "worker_id",
}
_COLUMNS: Final = (
    "run_id", "updated_at", "status", "flow_name", "tag", "tenant_id", "worker_id", "schedule_id", "yaml_sha",
    "error_text", "projection_error", "version", "revision", "summary",
)
_AT: Final = {c: i for i, c in enumerate(_COLUMNS)}  # a column's place in a row
_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, updated_at REAL NOT NULL, status TEXT, flow_name TEXT, tag TEXT, tenant_id TEXT,
    worker_id TEXT, schedule_id TEXT, yaml_sha TEXT, error_text TEXT, projection_error INTEGER NOT NULL,
    version INTEGER, revision INTEGER NOT NULL, summary TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS runs_added AFTER INSERT ON runs
    BEGIN UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'runs'; END;
CREATE TRIGGER IF NOT EXISTS runs_removed AFTER DELETE ON runs
    BEGIN UPDATE meta SET value = CAST(CAST(value AS INTEGER) - 1 AS TEXT) WHERE key = 'runs'; END;
"""
# the list indexes: dropped while a file is built from revision 0 and created once at the end
# (one sort per index instead of a B-tree insert per row per index)
_INDEXED: Final = ("status", "flow_name", "tag", "tenant_id", "worker_id")
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS runs_order ON runs (updated_at, run_id);"
    "CREATE INDEX IF NOT EXISTS runs_revision ON runs (revision);"
    "CREATE INDEX IF NOT EXISTS runs_unprojectable ON runs (projection_error) WHERE projection_error = 1;"
    + "".join(f"CREATE INDEX IF NOT EXISTS runs_{c} ON runs ({c}, updated_at, run_id);" for c in _INDEXED)
)
# error text search: an FTS5 trigram index (substring LIKE, case-insensitive, served by the index
# for 3+ characters) over the runs that have an error, kept by triggers; LIKE over the bounded
# column where this SQLite has no FTS5 trigram tokenizer
_FTS: Final = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS runs_error USING fts5(error_text, content='runs', content_rowid='rowid', tokenize='trigram');"
)
_FTS_TRIGGERS: Final = """
CREATE TRIGGER IF NOT EXISTS runs_error_ai AFTER INSERT ON runs WHEN new.error_text IS NOT NULL
    BEGIN INSERT INTO runs_error (rowid, error_text) VALUES (new.rowid, new.error_text); END;
CREATE TRIGGER IF NOT EXISTS runs_error_ad AFTER DELETE ON runs WHEN old.error_text IS NOT NULL
    BEGIN INSERT INTO runs_error (runs_error, rowid, error_text) VALUES ('delete', old.rowid, old.error_text); END;
CREATE TRIGGER IF NOT EXISTS runs_error_au AFTER UPDATE OF error_text ON runs WHEN old.error_text IS NOT new.error_text
    BEGIN
        INSERT INTO runs_error (runs_error, rowid, error_text) SELECT 'delete', old.rowid, old.error_text WHERE old.error_text IS NOT NULL;
        INSERT INTO runs_error (rowid, error_text) SELECT new.rowid, new.error_text WHERE new.error_text IS NOT NULL;
    END;
"""
# one update trigger, delete then insert in that order (two triggers would run newest first,
# and deleting after inserting drops the trigrams old and new texts share)
_FTS_TRIGGER_NAMES: Final = ("runs_error_ai", "runs_error_ad", "runs_error_au")
_SET = ", ".join(
    f"{c} = CASE WHEN {{cond}} THEN excluded.{c} ELSE runs.{c} END" for c in _COLUMNS if c not in ("run_id", "revision")
)
_INSERT = f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) ON CONFLICT (run_id) DO UPDATE SET "
# a KV value replaces a summary unless this gateway noted a newer version; a note only a newer one
UPSERT_VALUE: Final = _INSERT + _SET.format(cond="excluded.version IS NULL OR runs.version IS NULL OR excluded.version >= runs.version") + ", revision = max(runs.revision, excluded.revision)"
# (an ignored note changes nothing: no index entry is rewritten)
UPSERT_NOTE: Final = _INSERT + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in ("run_id", "revision")) + " WHERE excluded.version > coalesce(runs.version, -1)"
# a KV value the file already holds (this gateway's note of the same version): only the revision
# moves, so no list index is rewritten (the summary holds every other column but yaml_sha)
SAME_VALUE: Final = "UPDATE runs SET revision = max(revision, ?) WHERE run_id = ? AND version = ? AND summary = ? AND yaml_sha IS ?"


class ReadModelBroken(Exception):
    """The file is unreadable, from another schema version or another bucket: rebuild it."""


@attrs.frozen
class Change:
    """One run's new state: ``doc`` None deletes it; ``revision`` 0 is a note (this gateway's own
    write, not yet seen in the bucket)."""

    run_id: str
    doc: dict[str, Any] | None
    revision: int


@attrs.frozen
class Query:
    """What a list asks for (None: no condition)."""

    limit: int = 50
    exact: dict[str, str] = attrs.field(factory=dict)  # EXACT keys
    updated_after: float | None = None  # strictly greater
    updated_before: float | None = None  # strictly smaller
    before: tuple[float, str] | None = None  # a cursor: strictly smaller (updated_at, run_id)
    run_id_prefix: str | None = None
    error_contains: str | None = None  # case-insensitive substring of error / failure_reason


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """The list item of a snapshot (contract §1.4: only these keys, when present)."""
    return {k: doc[k] for k in SUMMARY_KEYS if k in doc}


def _row(change: Change) -> tuple[Any, ...]:
    doc = change.doc or {}
    updated = doc.get("updated_at")
    version = doc.get("version")
    error = " ".join(str(doc[k]) for k in ("error", "failure_reason") if doc.get(k))[:ERROR_TEXT_MAX]

    def text(key: str) -> str | None:
        value = doc.get(key)
        return value if isinstance(value, str) else None

    return (
        change.run_id,
        float(updated) if isinstance(updated, (int, float)) and not isinstance(updated, bool) else 0.0,
        str(doc.get("status") or "UNKNOWN"),
        text("flow_name"), text("tag"), text("tenant_id"), text("worker_id"), text("schedule_id"),
        text("workflow_yaml_sha256"),
        error or None,
        1 if doc.get("projection_error") else 0,
        version if isinstance(version, int) and not isinstance(version, bool) else None,
        change.revision,
        json.dumps(summarize(doc), separators=(",", ":"), ensure_ascii=False),
    )


def _phrase(text: str) -> str:
    """``text`` as one FTS5 phrase (a substring for the trigram tokenizer)."""
    return '"' + text.replace('"', '""') + '"'


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def where(q: Query, *, fts: bool = False) -> tuple[str, list[Any]]:
    """The WHERE clause (with leading ``WHERE`` or empty) and its parameters."""
    conds: list[str] = []
    args: list[Any] = []
    for key, value in q.exact.items():
        conds.append(f"{EXACT[key]} = ?")
        args.append(value)
    if q.updated_after is not None:
        conds.append("updated_at > ?")
        args.append(q.updated_after)
    if q.updated_before is not None:
        conds.append("updated_at < ?")
        args.append(q.updated_before)
    if q.before is not None:
        conds.append("(updated_at, run_id) < (?, ?)")
        args.extend(q.before)
    if q.run_id_prefix:
        conds.append("run_id >= ? AND run_id < ?")
        args.extend((q.run_id_prefix, q.run_id_prefix + "\U0010ffff"))
    if q.error_contains and fts and len(q.error_contains) >= 3:
        # a trigram phrase MATCH is a case-insensitive substring search served by the index
        # (a LIKE with ESCAPE is not: SQLite then scans the whole FTS table)
        conds.append("rowid IN (SELECT rowid FROM runs_error WHERE runs_error MATCH ?)")
        args.append(_phrase(q.error_contains))
    elif q.error_contains:
        conds.append("error_text LIKE ? ESCAPE '\\'")
        args.append(f"%{_like_escape(q.error_contains)}%")
    return (" WHERE " + " AND ".join(conds)) if conds else "", args


def _remove_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses at most the last commits, never consistency
    conn.execute("PRAGMA cache_size=-8000")  # 8 MB per connection: memory does not grow with history
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class ReadModelStore:
    """The SQLite file.  ``write`` is for one thread at a time (the writer); every reading
    thread gets its own connection (``_reader``)."""

    def __init__(self, path: Path, *, identity: str = "") -> None:
        self.path = path
        self.identity = identity
        self._writer = _connect(path)
        self.fts = False
        self.building = False  # between drop_indexes and create_indexes
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self._check()
        except BaseException:
            self._writer.close()
            raise

    def _check(self) -> None:
        try:
            self._writer.executescript(_SCHEMA + _INDEXES)
            self.fts = self._try_fts()
            meta = dict(self._writer.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise ReadModelBroken(f"unreadable ({exc})") from exc
        if not meta:
            self._writer.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("checkpoint", "0"), ("runs", "0"), ("identity", self.identity)],
            )
            return
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ReadModelBroken(f"schema version {meta.get('schema_version')} (this gateway reads {SCHEMA_VERSION})")
        if self.identity and meta.get("identity") not in ("", self.identity):
            raise ReadModelBroken(f"built from another bucket ({meta.get('identity')}, now {self.identity})")

    def close(self) -> None:
        with self._lock:
            for conn in (*self._readers, self._writer):
                conn.close()
            self._readers.clear()

    # -- writing ------------------------------------------------------------------------------------

    def checkpoint(self) -> int:
        return int(self._writer.execute("SELECT value FROM meta WHERE key = 'checkpoint'").fetchone()[0])

    def runs(self) -> int:
        """How many runs the file holds (a counter kept by triggers: no scan)."""
        return int(self._writer.execute("SELECT value FROM meta WHERE key = 'runs'").fetchone()[0])

    def write(self, changes: Sequence[Change], checkpoint: int) -> int:
        """Apply ``changes`` and raise the checkpoint to ``checkpoint``, in one transaction;
        returns how many runs the file then holds."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            for change in changes:
                if change.doc is None:
                    conn.execute("DELETE FROM runs WHERE run_id = ?", (change.run_id,))
                elif change.revision == 0:
                    conn.execute(UPSERT_NOTE, _row(change))
                else:
                    row = _row(change)
                    run_id, version, revision, summary, yaml_sha = (row[_AT[c]] for c in ("run_id", "version", "revision", "summary", "yaml_sha"))
                    if self.building or version is None or not conn.execute(SAME_VALUE, (revision, run_id, version, summary, yaml_sha)).rowcount:
                        conn.execute(UPSERT_VALUE, row)
            conn.execute(
                "UPDATE meta SET value = CAST(max(CAST(value AS INTEGER), ?) AS TEXT) WHERE key = 'checkpoint'", (checkpoint,)
            )
            runs = int(conn.execute("SELECT value FROM meta WHERE key = 'runs'").fetchone()[0])
            conn.execute("COMMIT")
            return runs
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _try_fts(self) -> bool:
        try:
            self._writer.executescript(_FTS + _FTS_TRIGGERS)
            stale = self._writer.execute("SELECT value FROM meta WHERE key = 'fts'").fetchone()
            if stale is not None and stale[0] == "stale":  # stopped during a build: index what is there
                self._writer.execute("INSERT INTO runs_error (runs_error) VALUES ('rebuild')")
                self._writer.execute("DELETE FROM meta WHERE key = 'fts'")
            return True
        except sqlite3.OperationalError as exc:  # no FTS5, or no trigram tokenizer (SQLite < 3.34)
            log.info("read model: no FTS5 trigram index (%s); error text search scans", exc)
            return False

    def drop_indexes(self) -> None:
        """Before building from revision 0 (see :meth:`create_indexes`)."""
        self.building = True  # no notes to match while building: values go straight in
        for name in ("order", "revision", "unprojectable", *_INDEXED):
            self._writer.execute(f"DROP INDEX IF EXISTS runs_{name}")
        for name in _FTS_TRIGGER_NAMES:
            self._writer.execute(f"DROP TRIGGER IF EXISTS {name}")
        self._writer.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('fts', 'stale')")

    def create_indexes(self) -> None:
        """The list indexes and the error text index, then statistics for the query planner."""
        self._writer.executescript(_INDEXES)
        if self.fts:
            self._writer.execute("INSERT INTO runs_error (runs_error) VALUES ('rebuild')")
            self._writer.executescript(_FTS_TRIGGERS)
        self._writer.execute("DELETE FROM meta WHERE key = 'fts'")
        self._writer.execute("ANALYZE")
        self.building = False

    # -- reading ------------------------------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A reading connection from the pool (one per concurrent reader, kept for reuse)."""
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only=1")
            with self._lock:
                self._readers.append(conn)
        try:
            yield conn
        finally:
            self._pool.put(conn)

    def page(self, q: Query) -> tuple[list[dict[str, Any]], list[tuple[float, str]], bool]:
        """Up to ``q.limit`` summaries newest first, their sort keys, and whether more match."""
        with self._reader() as conn:
            rows = self._walk_for_text(conn, q) if self._common_text(conn, q.error_contains) else None
            if rows is None:
                clause, args = where(q, fts=self.fts)
                rows = conn.execute(
                    f"SELECT updated_at, run_id, summary FROM runs{clause} ORDER BY updated_at DESC, run_id DESC LIMIT ?",
                    (*args, q.limit + 1),
                ).fetchall()
        more = len(rows) > q.limit
        rows = rows[: q.limit]
        return [json.loads(r[2]) for r in rows], [(r[0], r[1]) for r in rows], more

    def _walk_for_text(self, conn: sqlite3.Connection, q: Query) -> list[Any] | None:
        """A page of a common error text from the newest WALK_ROWS runs matching the other
        conditions, newest first with a LIKE on each (None when those hold less than a page and
        older runs exist: the index answers then)."""
        order = "ORDER BY updated_at DESC, run_id DESC"
        others, others_args = where(attrs.evolve(q, error_contains=None))
        edge = conn.execute(f"SELECT updated_at, run_id FROM runs{others} {order} LIMIT 1 OFFSET ?", (*others_args, WALK_ROWS)).fetchone()
        clause, args = where(q, fts=False)  # the LIKE form of the text condition
        if edge is not None:
            clause += " AND (updated_at, run_id) > (?, ?)"
            args += [edge[0], edge[1]]
        rows = conn.execute(f"SELECT updated_at, run_id, summary FROM runs{clause} {order} LIMIT ?", (*args, q.limit + 1)).fetchall()
        return rows if edge is None or len(rows) > q.limit else None

    def _common_text(self, conn: sqlite3.Connection, text: str | None) -> bool:
        """Whether an error text search is better served by walking the runs newest first (a
        LIKE on each, stopping at a page) than by the trigram index: an ASCII text found in at
        least COMMON_TEXT runs.  The index hands back every match to be sorted (at 1,000,000
        runs, a text in 40,000 of them took ~130 ms); walking the newest runs meets a page of a
        common text within a few thousand rows.  (LIKE folds ASCII case only, hence ASCII.)"""
        if not text or not self.fts or len(text) < 3 or not text.isascii():
            return False
        found = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM runs_error WHERE runs_error MATCH ? LIMIT ?)",
            (_phrase(text), COMMON_TEXT),
        ).fetchone()[0]
        return bool(found >= COMMON_TEXT)

    def changed_since(self, revision: int, q: Query, limit: int = 10000) -> list[tuple[int, dict[str, Any]]]:
        clause, args = where(q, fts=self.fts)
        clause = (clause + " AND" if clause else " WHERE") + " revision > ?"
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT revision, summary FROM runs{clause} ORDER BY revision LIMIT ?", (*args, revision, limit)
            ).fetchall()
        return [(r[0], json.loads(r[1])) for r in rows]

    def count(self, q: Query | None = None) -> int:
        clause, args = where(q or Query(), fts=self.fts)
        with self._reader() as conn:
            return int(conn.execute(f"SELECT count(*) FROM runs{clause}", args).fetchone()[0])

    def counts(self) -> dict[str, int]:
        """Runs per status."""
        with self._reader() as conn:
            return dict(conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._reader() as conn:
            row = conn.execute("SELECT summary FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def figures(self, start: float, end: float) -> tuple[dict[str, int], dict[str, int], int]:
        """For ``/metrics``: runs updated in [start, end) by status, PENDING runs by tag, and
        runs the projector could not fold."""
        with self._reader() as conn:
            today = dict(conn.execute(
                "SELECT status, count(*) FROM runs WHERE updated_at >= ? AND updated_at < ? GROUP BY status", (start, end)
            ).fetchall())
            waiting = dict(conn.execute(
                "SELECT coalesce(tag, ''), count(*) FROM runs WHERE status = 'PENDING' GROUP BY tag"
            ).fetchall())
            broken = int(conn.execute("SELECT count(*) FROM runs WHERE projection_error = 1").fetchone()[0])
        return today, waiting, broken

    def rows(self, run_ids: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        """(revision, summary) of each of ``run_ids`` held (for ``replay --read-model``)."""
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        with self._reader() as conn:
            for k in range(0, len(run_ids), 500):
                part = run_ids[k : k + 500]
                sql = f"SELECT run_id, revision, summary FROM runs WHERE run_id IN ({','.join('?' * len(part))})"
                out.update({r[0]: (r[1], json.loads(r[2])) for r in conn.execute(sql, part)})
        return out

    def all_run_ids(self) -> Iterator[str]:
        with self._reader() as conn:
            for row in conn.execute("SELECT run_id FROM runs"):
                yield row[0]

    def integrity(self) -> str:
        with self._reader() as conn:
            return str(conn.execute("PRAGMA quick_check").fetchone()[0])


def open_store(path: Path, *, identity: str = "") -> tuple[ReadModelStore, str | None]:
    """Open (or create) the read model at ``path``; a broken one is deleted and created afresh.

    Returns the store and why it was rebuilt (None when the file was usable).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    reason: str | None = None if path.exists() else "no read model file yet"
    try:
        return ReadModelStore(path, identity=identity), reason
    except (ReadModelBroken, sqlite3.DatabaseError) as exc:
        reason = f"read model {path} {exc if isinstance(exc, ReadModelBroken) else f'unreadable ({exc})'}; rebuilding it"
        log.warning("%s", reason)
    _remove_files(path)
    return ReadModelStore(path, identity=identity), reason
