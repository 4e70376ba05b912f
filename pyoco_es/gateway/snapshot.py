"""Reading one run, without HTTP: its snapshot (read-your-writes), the ``include`` filter and
the worker liveness a run's answer carries (shared by :mod:`.runs`, :mod:`.streams` and
:mod:`.fastpath`).
"""

from __future__ import annotations

import json
from typing import Final

from ..core.errors import PyocoError, RunNotFound
from ..core.events import JSONObject
from ..nats import subjects
from .context import Gateway
from .params import RUN_ID_MAX
from .registry import liveness

RECORD_INCLUDES: Final = frozenset({"records", "task_records", "full", "all"})
FULL_INCLUDES: Final = frozenset({"full", "all"})


def valid_run_id(run_id: str) -> bool:
    return len(run_id) <= RUN_ID_MAX and subjects.is_token(run_id)


def filter_snapshot(doc: JSONObject, includes: set[str]) -> JSONObject:
    """Drop ``task_records`` unless asked for (contract §1.5)."""
    if includes & RECORD_INCLUDES:
        return doc
    out = dict(doc)
    out.pop("task_records", None)
    out.pop("task_records_truncated", None)
    return out


async def read_snapshot(gw: Gateway, run_id: str) -> JSONObject | None:
    """The run's snapshot: KV, or the fold of its events when KV misses it or is older than a
    write this gateway acknowledged (read-your-writes)."""
    cached = gw.index.doc_of(run_id)
    if cached is not None:
        return cached
    entry = await gw.nats.kv_get(subjects.RUNS_BUCKET, run_id)
    if entry is not None and entry.value:
        try:
            doc = json.loads(entry.value)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("version", 0) >= gw.index.version_of(run_id):
            return doc
    snap = await gw.store.load(run_id)
    if snap is None:  # on a cluster the replica that answered may lag behind an acknowledged submit
        snap = await gw.store.load(run_id, from_leader=True)
    return None if snap is None else snap.to_json()


async def read_existing(gw: Gateway, run_id: str) -> JSONObject:
    """:func:`read_snapshot` for a route: a malformed or unknown id is a 404, NATS down a 503."""
    if not valid_run_id(run_id):
        raise RunNotFound(run_id)
    gw.require_nats()
    doc = await read_snapshot(gw, run_id)
    if doc is None:
        raise RunNotFound(run_id)
    return doc


async def enrich(gw: Gateway, doc: JSONObject) -> JSONObject:
    """``doc`` with the ``worker_*`` liveness fields of the run's worker (best effort)."""
    worker_id = doc.get("worker_id")
    if not isinstance(worker_id, str) or not worker_id:
        return doc
    silent: float | None = 0.0  # read just now: a full window from first sight, as the reaper gives
    if gw.workers.ready.is_set():
        record = gw.workers.get(worker_id)  # the registry as the watch delivered it: no round trip
        silent = gw.workers.silence(worker_id)
    else:
        try:
            entry = await gw.nats.kv_get(subjects.WORKERS_BUCKET, worker_id)
            record = json.loads(entry.value) if entry is not None and entry.value else None
        except (PyocoError, ValueError):
            return doc  # best effort, like pyoco-server
    if record is not None and not isinstance(record, dict):
        record = None
    out = dict(doc)
    out.update(
        liveness(record, key=worker_id, silent=silent, disconnect_timeout=gw.settings.worker_disconnect_timeout)
    )
    return out

