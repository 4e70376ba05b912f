"""The worker's wire documents: the work item it consumes and the registry record it writes.

A work item (``pyoco.work.<tag>``, ``Nats-Msg-Id = run_id:attempt``) is a command, not a fact:
pyoco-server's job fields plus ``attempt``, derived from ``run.submitted``.  It is built here
(:meth:`WorkItem.for_attempt`), encoded here (:meth:`WorkItem.to_json`) and decoded here
(:meth:`WorkItem.from_json`), like h11's events: one frozen class converted at one edge.  The
conductor, the gateway and the worker import this type, never each other.

The worker record (KV ``pyoco_workers``, key = worker id) is :class:`WorkerRecord`: written by a
worker's heartbeat, read by the reaper (``runs``, ``state``) and the gateway (GET/PATCH /workers).

Pure: no trio, no NATS.
"""

from __future__ import annotations

import re
from typing import Any, Final

import attrs

from .codec import dumps, loads
from .events import RunSubmitted
from .model import RunSnapshot, RunStatus
from .wheelsync import initial_state

# One subject token (what run ids must be); the same rule as ``nats.subjects.is_token``.
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


class InvalidWorkItem(ValueError):
    """A work item that is not a job.  ``run_id``/``attempt`` are set when they could be read, so
    the run it names can be failed rather than left PENDING."""

    def __init__(self, message: str, *, run_id: str | None = None, attempt: int | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.attempt = attempt


@attrs.frozen(kw_only=True)
class WorkItem:
    """A decoded work item (contract §2.9 plus ``attempt``)."""

    run_id: str
    attempt: int
    flow_name: str
    tag: str
    tags: tuple[str, ...]
    params: dict[str, Any]
    tenant_id: str | None = None
    api_key_id: str | None = None
    workflow_yaml: str | None = None
    workflow_yaml_sha256: str | None = None
    workflow_yaml_bytes: int | None = None
    schedule_id: str | None = None
    submitted_at: float = 0.0
    max_attempts: int | None = None
    # The run's position when the dispatcher enqueued this attempt (optional): with it the claim
    # needs no read first (a stale position just makes the claim conflict and re-read).
    run_seq: int | None = None
    run_stream_seq: int | None = None
    timeout_sec: float | None = None  # the run's deadline after submitted_at (issue 16)

    @property
    def deadline_at(self) -> float | None:
        return self.submitted_at + self.timeout_sec if self.timeout_sec is not None else None

    @classmethod
    def for_attempt(
        cls,
        submitted: RunSubmitted,
        *,
        run_id: str,
        attempt: int,
        run_version: int | None = None,
        run_last_stream_seq: int | None = None,
    ) -> WorkItem:
        """The item for one attempt of a submitted run.

        ``run_version`` / ``run_last_stream_seq`` say where the run stood when the item was made:
        a worker can append its claim right there without reading the run first (if the run moved
        on meanwhile, the append conflicts and the worker reads and decides again).
        """
        positioned = run_version is not None and bool(run_last_stream_seq)
        yaml = submitted.workflow_yaml is not None
        return cls(
            run_id=run_id,
            attempt=attempt,
            max_attempts=submitted.max_attempts,
            flow_name=submitted.flow_name,
            tag=submitted.tag,
            tags=tuple(submitted.tags),
            tenant_id=submitted.tenant_id,
            api_key_id=submitted.api_key_id,
            params=submitted.params,
            submitted_at=submitted.submitted_at,
            schedule_id=submitted.schedule_id,
            run_seq=run_version if positioned else None,
            run_stream_seq=run_last_stream_seq if positioned else None,
            workflow_yaml=submitted.workflow_yaml,
            workflow_yaml_sha256=submitted.workflow_yaml_sha256 if yaml else None,
            workflow_yaml_bytes=submitted.workflow_yaml_bytes if yaml else None,
            timeout_sec=submitted.timeout_sec,
        )

    def to_json(self) -> bytes:
        """The item as published (compact JSON; the position and the YAML fields only when set)."""
        body: dict[str, object] = {
            "run_id": self.run_id,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "flow_name": self.flow_name,
            "tag": self.tag,
            "tags": list(self.tags),
            "tenant_id": self.tenant_id,
            "api_key_id": self.api_key_id,
            "params": self.params,
            "submitted_at": self.submitted_at,
            "schedule_id": self.schedule_id,
        }
        if self.run_seq is not None and self.run_stream_seq:
            body["run_seq"] = self.run_seq
            body["run_stream_seq"] = self.run_stream_seq
        if self.workflow_yaml is not None:
            body["workflow_yaml"] = self.workflow_yaml
            body["workflow_yaml_sha256"] = self.workflow_yaml_sha256
            body["workflow_yaml_bytes"] = self.workflow_yaml_bytes
        if self.timeout_sec is not None:
            body["timeout_sec"] = self.timeout_sec
        return dumps(body)

    @classmethod
    def from_json(cls, data: bytes) -> WorkItem:
        """Decode a published item; lenient about optional fields, strict about identity.

        Raises:
            InvalidWorkItem: not a JSON object, or ``run_id``/``attempt``/``flow_name``/``params``/
                ``workflow_yaml`` missing or of the wrong type.
        """
        try:
            doc = loads(data)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise InvalidWorkItem(f"payload is not JSON: {str(exc)[:200]}") from None
        if not isinstance(doc, dict):
            raise InvalidWorkItem("payload is not a JSON object")
        run_id = doc.get("run_id")
        if not isinstance(run_id, str) or _TOKEN_RE.fullmatch(run_id) is None:
            raise InvalidWorkItem("run_id missing or not a subject token")
        attempt = doc.get("attempt", 1)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise InvalidWorkItem("attempt must be a positive integer", run_id=run_id)
        flow_name = doc.get("flow_name")
        if not isinstance(flow_name, str):
            raise InvalidWorkItem("flow_name missing", run_id=run_id, attempt=attempt)
        params = doc.get("params") or {}
        if not isinstance(params, dict):
            raise InvalidWorkItem("params must be an object", run_id=run_id, attempt=attempt)
        yaml_text = doc.get("workflow_yaml")
        if yaml_text is not None and not isinstance(yaml_text, str):
            raise InvalidWorkItem("workflow_yaml must be a string", run_id=run_id, attempt=attempt)
        tag = doc.get("tag") or "default"
        tags = doc.get("tags") or [tag]
        return cls(
            run_id=run_id,
            attempt=attempt,
            flow_name=flow_name,
            tag=str(tag),
            tags=tuple(str(t) for t in tags) if isinstance(tags, list) else (str(tag),),
            params=params,
            tenant_id=_opt_str(doc.get("tenant_id")),
            api_key_id=_opt_str(doc.get("api_key_id")),
            workflow_yaml=yaml_text,
            workflow_yaml_sha256=_opt_str(doc.get("workflow_yaml_sha256")),
            workflow_yaml_bytes=_opt_int(doc.get("workflow_yaml_bytes")),
            schedule_id=_opt_str(doc.get("schedule_id")),
            submitted_at=float(doc["submitted_at"]) if isinstance(doc.get("submitted_at"), (int, float)) else 0.0,
            max_attempts=_opt_int(doc.get("max_attempts")),
            run_seq=_opt_int(doc.get("run_seq")),
            run_stream_seq=_opt_int(doc.get("run_stream_seq")),
            timeout_sec=_opt_positive(doc.get("timeout_sec")),
        )

    def pending_snapshot(self) -> RunSnapshot | None:
        """The PENDING snapshot the dispatcher saw, rebuilt from the item, or None without
        ``run_seq``/``run_stream_seq``.  Good enough to decide the claim and fold what follows."""
        if not self.run_seq or not self.run_stream_seq:
            return None
        return RunSnapshot(
            run_id=self.run_id,
            flow_name=self.flow_name,
            tag=self.tag,
            tags=self.tags,
            params=self.params,
            status=RunStatus.PENDING,
            submitted_at=self.submitted_at,
            updated_at=self.submitted_at,
            version=self.run_seq,
            last_stream_seq=self.run_stream_seq,
            max_attempts=self.max_attempts or 1,
            attempt=self.attempt,
            tenant_id=self.tenant_id,
            api_key_id=self.api_key_id,
            workflow_yaml_sha256=self.workflow_yaml_sha256,
            workflow_yaml_bytes=self.workflow_yaml_bytes,
            schedule_id=self.schedule_id,
            timeout_sec=self.timeout_sec,
            deadline_at=self.deadline_at,
        )


def _opt_positive(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


WORKER_RUNNING: Final = "RUNNING"
WORKER_IDLE: Final = "IDLE"
WORKER_STOPPED: Final = "STOPPED_GRACEFUL"

# ``wheel_sync`` of a worker that does not sync wheels (pyoco-server's record shape).
WHEEL_SYNC_DISABLED: Final[dict[str, Any]] = initial_state(enabled=False)


@attrs.frozen(kw_only=True)
class LastRun:
    """The run a worker finished last (``last_run_*`` of its record)."""

    run_id: str
    status: str | None
    started_at: float
    finished_at: float


@attrs.frozen(kw_only=True)
class WorkerRecord:
    """A worker's registry record (contract §2.3): who it is, what it holds, when it last beat.

    ``runs`` maps run id -> the highest attempt the worker holds; the reaper trusts it (with the
    record changing on its own clock) to keep those attempts' leases alive.
    """

    worker_id: str
    instance_id: str
    state: str
    hidden: bool
    tags: tuple[str, ...]
    now: float
    runs: dict[str, int]
    last_run: LastRun | None
    wheel_sync: dict[str, Any] | None
    concurrency: int
    completed_runs: int
    pid: int
    hostname: str
    log_lines_dropped: int = 0  # task output lines this worker dropped since it started (live logs)

    def to_json(self) -> dict[str, Any]:
        """The record as stored (``stopped_at``/``stop_reason`` set once ``STOPPED_GRACEFUL``)."""
        run_ids = sorted(self.runs)
        stopped = self.state == WORKER_STOPPED
        last = self.last_run
        return {
            "worker_id": self.worker_id,
            "instance_id": self.instance_id,
            "state": self.state,
            "hidden": self.hidden,
            "tags": list(self.tags),
            "last_seen_at": self.now,
            "last_heartbeat_at": self.now,
            "heartbeat_at": self.now,
            "updated_at": self.now,
            "current_run_id": run_ids[0] if run_ids else None,
            "current_run_ids": run_ids,
            "runs": self.runs,
            "last_run_id": last.run_id if last else None,
            "last_run_status": last.status if last else None,
            "last_run_started_at": last.started_at if last else None,
            "last_run_finished_at": last.finished_at if last else None,
            "stopped_at": self.now if stopped else None,
            "stop_reason": "graceful_shutdown" if stopped else None,
            "wheel_sync": self.wheel_sync or WHEEL_SYNC_DISABLED,
            "concurrency": self.concurrency,
            "completed_runs": self.completed_runs,
            "pid": self.pid,
            "hostname": self.hostname,
            "log_lines_dropped": self.log_lines_dropped,
        }


__all__ = [
    "WHEEL_SYNC_DISABLED",
    "WORKER_IDLE",
    "WORKER_RUNNING",
    "WORKER_STOPPED",
    "InvalidWorkItem",
    "LastRun",
    "WorkItem",
    "WorkerRecord",
]
