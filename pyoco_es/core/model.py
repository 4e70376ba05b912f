"""Run and task snapshots: the read model the fold produces.

``RunSnapshot.to_json()`` gives pyoco-server's snapshot shape (contract §2.2) plus our additions
(``version``, ``last_stream_seq``, ``attempt``, ``failure_reason`` ...).  Clients ignore unknown keys.
"""

from __future__ import annotations

import copy
import enum
from typing import Final

import attrs
from attrs import field, frozen

from .events import JSONObject, JSONValue


class RunStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: Final = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


class TaskState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@frozen(kw_only=True)
class TaskRecord:
    """One task of the current attempt, in pyoco's ``TaskRecord`` shape."""

    state: TaskState = TaskState.PENDING
    started_at: float | None = None
    ended_at: float | None = None
    duration_ms: float | None = None
    error: str | None = None
    traceback: str | None = None
    inputs: JSONObject = field(factory=dict)
    output: JSONValue = None
    output_truncated: bool = False
    tries: int = 0  # tries started (issue 16: retries); served once the task started
    failure_reason: str | None = None  # "timeout" when its timeout_sec passed

    def to_json(self) -> JSONObject:
        out: JSONObject = {
            "state": self.state.value,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_ms": self.duration_ms,
            "error": self.error,
            "traceback": self.traceback,
            "inputs": self.inputs,
            "output": self.output,
            "artifacts": {},
        }
        if self.output_truncated:
            out["output_truncated"] = True
        if self.tries:
            out["tries"] = self.tries
        if self.failure_reason is not None:
            out["failure_reason"] = self.failure_reason
        return out

    @classmethod
    def from_json(cls, data: JSONObject) -> TaskRecord:
        return cls(
            state=TaskState(data["state"]),
            started_at=data.get("started_at"),  # type: ignore[arg-type]
            ended_at=data.get("ended_at"),  # type: ignore[arg-type]
            duration_ms=data.get("duration_ms"),  # type: ignore[arg-type]
            error=data.get("error"),  # type: ignore[arg-type]
            traceback=data.get("traceback"),  # type: ignore[arg-type]
            inputs=data.get("inputs") or {},  # type: ignore[arg-type]
            output=data.get("output"),
            output_truncated=bool(data.get("output_truncated", False)),
            tries=data["tries"] if isinstance(data.get("tries"), int) else 0,  # type: ignore[arg-type]
            failure_reason=data.get("failure_reason"),  # type: ignore[arg-type]
        )


@frozen(kw_only=True, slots=False)
class RunSnapshot:
    """The state of one run after folding its events up to ``version``."""

    run_id: str
    flow_name: str
    tag: str
    tags: tuple[str, ...]
    params: JSONObject
    status: RunStatus
    submitted_at: float
    updated_at: float
    version: int  # last applied per-run seq
    last_stream_seq: int  # stream position of that event (0 when folded without metadata)
    max_attempts: int = 3
    attempt: int = 1
    tenant_id: str | None = None
    api_key_id: str | None = None
    workflow_yaml_sha256: str | None = None
    workflow_yaml_bytes: int | None = None
    schedule_id: str | None = None
    idempotency_key: str | None = None
    request_sha256: str | None = None
    worker_id: str | None = None
    lease_seconds: float | None = None
    start_time: float | None = None
    claimed_at: float | None = None  # when the current attempt was claimed
    end_time: float | None = None
    error: str | None = None
    failure_reason: str | None = None
    cancel_requested_at: float | None = None
    cancel_requested_by: str | None = None
    cancel_reason: str | None = None
    timeout_sec: float | None = None  # the run's deadline (issue 16), served only when set
    deadline_at: float | None = None  # submitted_at + timeout_sec
    tasks: dict[str, TaskRecord] = field(factory=dict)
    wheels: tuple[dict[str, str], ...] = ()  # the current attempt's synced code (run.claimed)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def replace(self, **changes: object) -> RunSnapshot:
        """``attrs.evolve`` without re-running ``__init__`` (the fold's hot path: ~10x faster)."""
        new = copy.copy(self)
        new.__dict__.update(changes)
        return new

    def to_json(self) -> JSONObject:
        """The stored/served shape (contract §2.2 plus pyoco-es fields; ``wheels`` when the
        attempt's process had synced wheels)."""
        doc: JSONObject = {
            "run_id": self.run_id,
            "flow_name": self.flow_name,
            "tag": self.tag,
            "tags": list(self.tags),
            "tenant_id": self.tenant_id,
            "api_key_id": self.api_key_id,
            "status": self.status.value,
            "params": self.params,
            "tasks": {name: rec.state.value for name, rec in self.tasks.items()},
            "task_records": {name: rec.to_json() for name, rec in self.tasks.items()},
            "task_records_truncated": False,
            "start_time": self.start_time,
            "claimed_at": self.claimed_at,
            "end_time": self.end_time,
            "heartbeat_at": self.updated_at,
            "updated_at": self.updated_at,
            "submitted_at": self.submitted_at,
            "error": self.error,
            "failure_reason": self.failure_reason,
            "workflow_yaml_sha256": self.workflow_yaml_sha256,
            "workflow_yaml_bytes": self.workflow_yaml_bytes,
            "schedule_id": self.schedule_id,
            "worker_id": self.worker_id,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "lease_seconds": self.lease_seconds,
            "cancel_requested_at": self.cancel_requested_at,
            "cancel_requested_by": self.cancel_requested_by,
            "cancel_reason": self.cancel_reason,
            "idempotency_key": self.idempotency_key,
            "request_sha256": self.request_sha256,
            "version": self.version,
            "last_stream_seq": self.last_stream_seq,
        }
        if self.wheels:  # only with wheel sync: snapshots stored before the field stay byte-identical (replay)
            doc["wheels"] = list(self.wheels)
        if self.timeout_sec is not None:
            doc["timeout_sec"] = self.timeout_sec
            doc["deadline_at"] = self.deadline_at
        return doc

    @classmethod
    def from_json(cls, data: JSONObject) -> RunSnapshot:
        """Inverse of ``to_json`` (task records dropped by compaction stay dropped)."""
        records = data.get("task_records") or {}
        states = data.get("tasks") or {}
        assert isinstance(records, dict) and isinstance(states, dict)
        tasks: dict[str, TaskRecord] = {}
        for name, state in states.items():
            rec = records.get(name)
            tasks[name] = (
                TaskRecord.from_json(rec)  # type: ignore[arg-type]
                if isinstance(rec, dict)
                else TaskRecord(state=TaskState(state))
            )
        kwargs = {a.name: data.get(a.name) for a in attrs.fields(cls) if a.name in data}
        kwargs["tags"] = tuple(data.get("tags") or ())  # type: ignore[arg-type]
        kwargs["wheels"] = tuple(w for w in (data.get("wheels") or ()) if isinstance(w, dict))  # type: ignore[union-attr]
        kwargs["status"] = RunStatus(data["status"])
        kwargs["tasks"] = tasks
        return cls(**kwargs)  # type: ignore[arg-type]
