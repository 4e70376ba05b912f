"""The event catalogue and the envelope.

Events are facts, named in the past tense.  Each class has an explicit, stable wire tag
(``TYPE``) and a payload schema version (``VERSION``); renaming a class never changes the wire
format.  See ``docs/events.md`` for the catalogue with examples.
"""

from __future__ import annotations

from typing import ClassVar, Final, Union

import attrs
from attrs import field, frozen
from attrs.validators import deep_iterable, ge, instance_of, optional

JSONValue = Union[None, bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"]]
JSONObject = dict[str, JSONValue]

_str = instance_of(str)
_opt_str = optional(instance_of(str))
_int = instance_of(int)
_num = instance_of((int, float))
_opt_num = optional(instance_of((int, float)))
_dict = instance_of(dict)
_attempt = [instance_of(int), ge(1)]


def _str_tuple(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of strings, got {type(value).__name__}")
    return tuple(value)


_str_items = deep_iterable(member_validator=_str)


def _code_tuple(value: object) -> tuple[dict[str, str], ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of wheel records, got {type(value).__name__}")
    return tuple(value)


def _check_code(instance: object, attribute: object, value: tuple[object, ...]) -> None:
    for item in value:
        if not isinstance(item, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in item.items()):
            raise TypeError("each wheel record must be an object of strings (name, version, sha256, wheel_name)")


@frozen(kw_only=True)
class Event:
    """Base of every event payload."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1


# -- submission ---------------------------------------------------------------------------------


@frozen(kw_only=True)
class RunSubmitted(Event):
    """A client asked for a run.  Carries everything needed to run it again (for replays and retries)."""

    TYPE: ClassVar[str] = "run.submitted"
    flow_name: str = field(validator=_str)
    params: JSONObject = field(validator=_dict)
    tag: str = field(validator=_str)
    tags: tuple[str, ...] = field(converter=_str_tuple, validator=_str_items)
    submitted_at: float = field(validator=_num)
    max_attempts: int = field(default=3, validator=_attempt)
    tenant_id: str | None = field(default=None, validator=_opt_str)
    api_key_id: str | None = field(default=None, validator=_opt_str)
    workflow_yaml: str | None = field(default=None, validator=_opt_str)
    workflow_yaml_sha256: str | None = field(default=None, validator=_opt_str)
    workflow_yaml_bytes: int | None = field(default=None, validator=optional(_int))
    schedule_id: str | None = field(default=None, validator=_opt_str)
    idempotency_key: str | None = field(default=None, validator=_opt_str)
    request_sha256: str | None = field(default=None, validator=_opt_str)
    # The submitter hands attempt 1 to the workers itself (the gateway's fast path), so the
    # conductor does not publish it a second time; its reconcile covers a hand-off that was lost.
    fast_dispatch: bool = field(default=False, validator=instance_of(bool))
    # The run's deadline, in seconds after ``submitted_at`` (issue 16): past it the run ends
    # FAILED with reason ``timeout`` (the conductor enforces it from the events).
    timeout_sec: float | None = field(default=None, validator=_opt_num)


# -- ownership ----------------------------------------------------------------------------------


@frozen(kw_only=True)
class RunClaimed(Event):
    """A worker took ownership of one attempt; ``tasks`` lists the flow's tasks (all PENDING),
    ``wheels`` the synced code its run process has."""

    TYPE: ClassVar[str] = "run.claimed"
    worker_id: str = field(validator=_str)
    attempt: int = field(validator=_attempt)
    lease_seconds: float = field(validator=_num)
    tasks: tuple[str, ...] = field(default=(), converter=_str_tuple, validator=_str_items)
    instance_id: str | None = field(default=None, validator=_opt_str)
    # The synced wheels the attempt's run process imports from ({name, version, sha256,
    # wheel_name} each; empty without wheel sync): which code ran this attempt.
    wheels: tuple[dict[str, str], ...] = field(default=(), converter=_code_tuple, validator=_check_code)


@frozen(kw_only=True)
class RunWorkerLost(Event):
    """The owning worker stopped heartbeating within its lease; the run waits for its next attempt."""

    TYPE: ClassVar[str] = "run.worker_lost"
    attempt: int = field(validator=_attempt)
    worker_id: str | None = field(default=None, validator=_opt_str)
    detected_by: str = field(validator=_str)


@frozen(kw_only=True)
class RunReleased(Event):
    """A draining worker gave its attempt back; the run goes back to the queue."""

    TYPE: ClassVar[str] = "run.released"
    attempt: int = field(validator=_attempt)
    worker_id: str = field(validator=_str)
    reason: str = field(validator=_str)


# -- tasks --------------------------------------------------------------------------------------


@frozen(kw_only=True)
class TaskStarted(Event):
    TYPE: ClassVar[str] = "task.started"
    attempt: int = field(validator=_attempt)
    task: str = field(validator=_str)
    started_at: float = field(validator=_num)


@frozen(kw_only=True)
class TaskCompleted(Event):
    TYPE: ClassVar[str] = "task.completed"
    attempt: int = field(validator=_attempt)
    task: str = field(validator=_str)
    started_at: float | None = field(default=None, validator=_opt_num)
    ended_at: float = field(validator=_num)
    duration_ms: float | None = field(default=None, validator=_opt_num)
    inputs: JSONObject = field(factory=dict, validator=_dict)
    output: JSONValue = None
    truncated: bool = field(default=False, validator=instance_of(bool))


@frozen(kw_only=True)
class TaskFailed(Event):
    TYPE: ClassVar[str] = "task.failed"
    attempt: int = field(validator=_attempt)
    task: str = field(validator=_str)
    started_at: float | None = field(default=None, validator=_opt_num)
    ended_at: float = field(validator=_num)
    duration_ms: float | None = field(default=None, validator=_opt_num)
    inputs: JSONObject = field(factory=dict, validator=_dict)
    error: str = field(validator=_str)
    traceback: str | None = field(default=None, validator=_opt_str)
    reason: str | None = field(default=None, validator=_opt_str)  # "timeout": its timeout_sec passed


@frozen(kw_only=True)
class TaskRetryScheduled(Event):
    """Try ``try_number`` of a task failed (``reason`` error or timeout) and the task will be
    tried again after ``delay_sec`` (issue 16: pyoco's own retries leave no trace)."""

    TYPE: ClassVar[str] = "task.retry_scheduled"
    attempt: int = field(validator=_attempt)
    task: str = field(validator=_str)
    try_number: int = field(validator=[instance_of(int), ge(1)])
    max_tries: int = field(validator=[instance_of(int), ge(1)])
    error: str = field(validator=_str)
    reason: str = field(default="error", validator=_str)
    delay_sec: float = field(validator=_num)
    failed_at: float = field(validator=_num)


# -- cancellation -------------------------------------------------------------------------------


@frozen(kw_only=True)
class RunCancelRequested(Event):
    TYPE: ClassVar[str] = "run.cancel_requested"
    requested_at: float = field(validator=_num)
    by: str | None = field(default=None, validator=_opt_str)
    reason: str | None = field(default=None, validator=_opt_str)


# -- endings ------------------------------------------------------------------------------------


@frozen(kw_only=True)
class RunCompleted(Event):
    TYPE: ClassVar[str] = "run.completed"
    attempt: int = field(validator=_attempt)
    ended_at: float = field(validator=_num)


RUN_FAILED_REASONS: Final = frozenset(
    {
        "error",  # a task raised
        "flow_not_found",
        "build_error",  # the flow could not be built (bad graph, import refused, ...)
        "worker_lost",  # the last allowed attempt lost its worker
        "invalid_job",
        "timeout",  # the run's deadline passed, or a task's timeout_sec (issue 16)
    }
)


@frozen(kw_only=True)
class RunFailed(Event):
    TYPE: ClassVar[str] = "run.failed"
    attempt: int = field(validator=_attempt)
    ended_at: float = field(validator=_num)
    reason: str = field(validator=_str)
    error: str = field(validator=_str)


RUN_CANCELLED_REASONS: Final = frozenset({"requested", "forced", "not_started"})


@frozen(kw_only=True)
class RunCancelled(Event):
    TYPE: ClassVar[str] = "run.cancelled"
    ended_at: float = field(validator=_num)
    reason: str = field(validator=attrs.validators.in_(RUN_CANCELLED_REASONS))
    attempt: int | None = field(default=None, validator=optional(_attempt))
    by: str | None = field(default=None, validator=_opt_str)


EVENT_TYPES: Final[dict[str, type[Event]]] = {
    cls.TYPE: cls
    for cls in (
        RunSubmitted,
        RunClaimed,
        RunWorkerLost,
        RunReleased,
        TaskStarted,
        TaskCompleted,
        TaskFailed,
        TaskRetryScheduled,
        RunCancelRequested,
        RunCompleted,
        RunFailed,
        RunCancelled,
    )
}


# -- envelope -----------------------------------------------------------------------------------


@frozen(kw_only=True)
class Producer:
    """Who appended an event: ``kind`` is gateway, conductor or worker; ``attempt`` fences workers."""

    kind: str = field(validator=_str)
    id: str = field(validator=_str)
    attempt: int | None = field(default=None, validator=optional(_int))


@frozen(kw_only=True)
class Envelope:
    """One stored event: the payload plus its identity, position and lineage.

    ``seq`` is the per-run position (1-based, gap-free).  ``stream_seq`` is the global JetStream
    position; it is not part of the body, it comes from the message metadata when read.
    """

    event_id: str = field(validator=_str)
    run_id: str = field(validator=_str)
    seq: int = field(validator=[_int, ge(1)])
    occurred_at: float = field(validator=_num)
    producer: Producer
    event: Event
    causation_id: str | None = field(default=None, validator=_opt_str)
    correlation_id: str | None = field(default=None, validator=_opt_str)
    stream_seq: int | None = field(default=None, eq=False)

    @property
    def type(self) -> str:
        return self.event.TYPE
