"""Worker registry records as the API serves them (contract §2.3), pure.

Records live in KV ``pyoco_workers`` (written by workers' heartbeats).  Reading normalises them
and derives the effective state: ``DISCONNECTED`` when the gateway has not seen the record
change for the disconnect timeout (``silent``, measured on the gateway's own monotonic clock by
:class:`~.index.WorkerIndex`).  The times a worker stamps are shown, never compared with the
gateway's clock: a worker whose clock is 20 s behind is as alive as any other.  Workers never
write ``DISCONNECTED`` themselves.
"""

from __future__ import annotations

from typing import Final

from ..core.events import JSONObject

WORKER_STATES: Final = ("RUNNING", "IDLE", "STOPPED_GRACEFUL", "DISCONNECTED")
ALIVE_STATES: Final = frozenset({"RUNNING", "IDLE"})


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def normalize_worker(record: JSONObject, *, key: str) -> JSONObject:
    """Fill pyoco-server's defaults: instance_id, state, timestamps and tags."""
    out = dict(record)
    out.setdefault("worker_id", key)
    if not out.get("instance_id"):
        out["instance_id"] = out["worker_id"]
    if out.get("state") not in WORKER_STATES:
        out["state"] = "IDLE"
    hb = _num(out.get("heartbeat_at"))
    last_seen = _num(out.get("last_seen_at"))
    if last_seen is None:
        last_seen = hb
    last_hb = _num(out.get("last_heartbeat_at"))
    if last_hb is None:
        last_hb = hb if hb is not None else last_seen
    out["last_seen_at"] = last_seen
    out["last_heartbeat_at"] = last_hb
    out["heartbeat_at"] = last_hb
    if not isinstance(out.get("tags"), list):
        out["tags"] = []
    out["hidden"] = bool(out.get("hidden", False))
    return out


def effective_state(record: JSONObject, *, silent: float | None, disconnect_timeout: float) -> str:
    """The stored state, or ``DISCONNECTED`` when the record has not changed for longer than
    ``disconnect_timeout`` seconds (``silent``; None: never seen)."""
    state = str(record.get("state") or "IDLE")
    if state in ("STOPPED_GRACEFUL", "DISCONNECTED"):
        return state
    if silent is None or silent > disconnect_timeout:
        return "DISCONNECTED"
    return state


def worker_view(record: JSONObject, *, key: str, silent: float | None, disconnect_timeout: float) -> JSONObject:
    """A normalised record with the effective ``state`` (what GET /workers returns per item)."""
    out = normalize_worker(record, key=key)
    out["stored_state"] = out["state"]
    out["state"] = effective_state(out, silent=silent, disconnect_timeout=disconnect_timeout)
    return out


def liveness(record: JSONObject | None, *, key: str, silent: float | None, disconnect_timeout: float) -> JSONObject:
    """The ``worker_*`` fields GET /runs/{id} adds for the run's worker (contract §1.5)."""
    if record is None:
        return {"worker_alive": False, "worker_state": "DISCONNECTED", "worker_heartbeat_at": None}
    view = worker_view(record, key=key, silent=silent, disconnect_timeout=disconnect_timeout)
    return {
        "worker_alive": view["state"] in ALIVE_STATES,
        "worker_state": view["state"],
        "worker_heartbeat_at": view["last_heartbeat_at"],
        "worker_hidden": view["hidden"],
        "worker_tags": view["tags"],
    }
