"""The pure core: state table, fold properties, decisions and the codec."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyoco_es.core import decide
from pyoco_es.core.codec import decode_envelope, decode_snapshot, encode_envelope, encode_snapshot
from pyoco_es.core.errors import CorruptStreamError, RunAlreadyExists, RunNotFound, StaleAttempt
from pyoco_es.core.events import (
    EVENT_TYPES,
    Envelope,
    Event,
    Producer,
    RunCancelled,
    RunCancelRequested,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunSubmitted,
    RunWorkerLost,
    TaskCompleted,
    TaskFailed,
    TaskRetryScheduled,
    TaskStarted,
)
from pyoco_es.core.fold import SequenceGap, apply, fold
from pyoco_es.core.model import RunStatus, TaskState
from pyoco_es.core.transitions import TRANSITIONS

CORE = Path(__file__).parent.parent / "pyoco_es" / "core"
FORBIDDEN = {"trio", "nats", "quart", "quart_trio", "hypercorn", "asyncclick", "asyncio", "trio_asyncio", "httpx"}
GW = Producer(kind="gateway", id="g1")
WK = Producer(kind="worker", id="w1", attempt=1)


def test_core_imports_no_io_libraries() -> None:
    """The core stays pure: no module under pyoco_es/core imports an I/O framework."""
    offenders = []
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def submitted(**kw: object) -> RunSubmitted:
    base: dict[str, object] = dict(flow_name="main", params={"x": 1}, tag="default", tags=["default"], submitted_at=100.0)
    base.update(kw)
    return RunSubmitted(**base)  # type: ignore[arg-type]


def history(*events: Event, run_id: str = "r1") -> list[Envelope]:
    ids = (f"e{i}" for i in itertools.count(1))
    return [
        Envelope(event_id=next(ids), run_id=run_id, seq=i, occurred_at=100.0 + i, producer=GW, event=e, stream_seq=10 * i)
        for i, e in enumerate(events, start=1)
    ]


HAPPY = [
    submitted(),
    RunClaimed(worker_id="w1", attempt=1, lease_seconds=15.0, tasks=["a", "b"]),
    TaskStarted(attempt=1, task="a", started_at=101.0),
    TaskCompleted(attempt=1, task="a", ended_at=102.0, duration_ms=1.0, output=2),
    TaskStarted(attempt=1, task="b", started_at=102.0),
    TaskFailed(attempt=1, task="b", ended_at=103.0, error="boom", traceback="tb"),
    RunFailed(attempt=1, ended_at=104.0, reason="error", error="boom"),
]


def test_fold_happy_path_gives_the_contract_shape() -> None:
    snap = fold(None, history(*HAPPY))
    assert snap is not None
    doc = snap.to_json()
    assert doc["status"] == "FAILED" and doc["error"] == "boom" and doc["failure_reason"] == "error"
    assert doc["tasks"] == {"a": "SUCCEEDED", "b": "FAILED"}
    assert doc["task_records"]["a"]["output"] == 2
    assert doc["task_records"]["b"]["traceback"] == "tb"
    assert doc["version"] == 7 and doc["last_stream_seq"] == 70
    for key in ("run_id", "flow_name", "tag", "tags", "tenant_id", "api_key_id", "params", "start_time", "end_time", "heartbeat_at", "updated_at", "worker_id"):
        assert key in doc


def test_every_table_transition_is_reachable_only_from_its_states() -> None:
    """Each event type is refused by the fold from every status the table does not list."""
    for status, allowed in TRANSITIONS.items():
        for etype in EVENT_TYPES.values():  # the table is keyed by event class
            assert (etype in allowed) == (TRANSITIONS[status].get(etype) is not None)
    assert TRANSITIONS[RunStatus.COMPLETED] == {} and TRANSITIONS[RunStatus.CANCELLED] == {}


def test_illegal_sequences_and_gaps_are_rejected() -> None:
    envs = history(submitted(), RunCompleted(attempt=1, ended_at=1.0))
    with pytest.raises(CorruptStreamError, match="cannot follow status PENDING"):
        fold(None, envs)
    envs = history(*HAPPY)
    with pytest.raises(SequenceGap):
        fold(None, [envs[0], envs[2]])
    with pytest.raises(CorruptStreamError):
        fold(None, envs[1:])  # no run.submitted first
    stale = history(*HAPPY[:2], TaskStarted(attempt=2, task="a", started_at=1.0))
    with pytest.raises(CorruptStreamError, match="attempt 2"):
        fold(None, stale)
    after_end = history(*HAPPY, RunCompleted(attempt=1, ended_at=1.0))
    with pytest.raises(CorruptStreamError):
        fold(None, after_end)


def test_cancel_of_running_run_marks_unfinished_tasks_cancelled() -> None:
    snap = fold(None, history(*HAPPY[:4], RunCancelRequested(requested_at=103.0, by="me"), RunCancelled(attempt=1, ended_at=104.0, reason="requested")))
    assert snap is not None
    assert snap.status is RunStatus.CANCELLED
    assert snap.tasks["a"].state is TaskState.SUCCEEDED and snap.tasks["b"].state is TaskState.CANCELLED
    assert snap.cancel_requested_by == "me"


def test_a_task_running_when_its_run_fails_is_marked_failed() -> None:
    snap = fold(None, history(*HAPPY[:3], RunFailed(attempt=1, ended_at=9.0, reason="error", error="child process died with signal 9")))
    assert snap is not None
    assert snap.tasks["a"].state is TaskState.FAILED and snap.tasks["a"].error == "interrupted: error"
    assert snap.tasks["b"].state is TaskState.PENDING


def test_worker_lost_moves_to_next_attempt() -> None:
    snap = fold(None, history(*HAPPY[:3], RunWorkerLost(attempt=1, worker_id="w1", detected_by="c")))
    assert snap is not None and snap.status is RunStatus.PENDING and snap.attempt == 2 and snap.worker_id is None
    snap2 = apply(snap, history(*HAPPY[:3], RunWorkerLost(attempt=1, worker_id="w1", detected_by="c"), RunClaimed(worker_id="w2", attempt=2, lease_seconds=1.0, tasks=["a"]))[-1])
    assert snap2.status is RunStatus.RUNNING and snap2.tasks["a"].state is TaskState.PENDING


# -- decisions -----------------------------------------------------------------------------------


def test_submit_is_create_once_and_idempotent_by_fingerprint() -> None:
    assert decide.submit_run(None, submitted(request_sha256="x"), run_id="r1") == [submitted(request_sha256="x")]
    snap = fold(None, history(submitted(request_sha256="x")))
    with pytest.raises(RunAlreadyExists) as same:
        decide.submit_run(snap, submitted(request_sha256="x"), run_id="r1")
    assert same.value.same_request
    with pytest.raises(RunAlreadyExists) as other:
        decide.submit_run(snap, submitted(request_sha256="y"), run_id="r1")
    assert not other.value.same_request and "Idempotency-Key" in other.value.message


def test_cancel_decisions_by_status() -> None:
    pending = fold(None, history(submitted()))
    running = fold(None, history(*HAPPY[:3]))
    done = fold(None, history(*HAPPY))
    [ev] = decide.request_cancel(pending, run_id="r1", now=5.0, by="u")
    assert isinstance(ev, RunCancelled) and ev.reason == "not_started"
    [ev] = decide.request_cancel(running, run_id="r1", now=5.0)
    assert isinstance(ev, RunCancelRequested)
    assert decide.request_cancel(done, run_id="r1", now=5.0) == []
    with pytest.raises(RunNotFound):
        decide.request_cancel(None, run_id="r1", now=5.0)


def test_claim_and_fencing() -> None:
    pending = fold(None, history(submitted()))
    [ev] = decide.claim_run(pending, run_id="r1", attempt=1, worker_id="w1", lease_seconds=5.0)
    assert isinstance(ev, RunClaimed)
    running = fold(None, history(*HAPPY[:2]))
    with pytest.raises(StaleAttempt):
        decide.claim_run(running, run_id="r1", attempt=1, worker_id="w2", lease_seconds=5.0)
    with pytest.raises(StaleAttempt):
        decide.finish_run(running, run_id="r1", attempt=1, worker_id="w2", outcome="COMPLETED", now=1.0)
    with pytest.raises(StaleAttempt):
        decide.worker_event(running, TaskStarted(attempt=2, task="a", started_at=1.0), run_id="r1", attempt=2, worker_id="w1")


def test_worker_lost_decision_retries_then_fails() -> None:
    running = fold(None, history(submitted(max_attempts=2), *HAPPY[1:3]))
    [ev] = decide.mark_worker_lost(running, run_id="r1", attempt=1, detected_by="c", now=9.0)
    assert isinstance(ev, RunWorkerLost)
    last = attrs.evolve(running, attempt=2)
    [ev] = decide.mark_worker_lost(last, run_id="r1", attempt=2, detected_by="c", now=9.0)
    assert isinstance(ev, RunFailed) and ev.reason == "worker_lost"
    assert decide.mark_worker_lost(running, run_id="r1", attempt=3, detected_by="c", now=9.0) == []


# -- properties ----------------------------------------------------------------------------------

_task_names = st.sampled_from(["a", "b", "c"])


@st.composite
def legal_histories(draw: st.DrawFn) -> list[Envelope]:
    """Random legal histories generated by running decisions against the fold."""
    events: list[Event] = [submitted(max_attempts=draw(st.integers(1, 3)), timeout_sec=draw(st.sampled_from([None, 5.0])))]
    snap = fold(None, history(*events))
    assert snap is not None
    for _ in range(draw(st.integers(0, 12))):
        if snap.terminal:
            break
        options: list[list[Event]] = []
        if snap.status is RunStatus.PENDING:
            options.append(decide.claim_run(snap, run_id="r1", attempt=snap.attempt, worker_id="w", lease_seconds=1.0, tasks=["a", "b"]))
            options.append(decide.request_cancel(snap, run_id="r1", now=1.0))
        else:
            t = draw(_task_names)
            a = snap.attempt
            options += [
                [TaskStarted(attempt=a, task=t, started_at=1.0)],
                [TaskCompleted(attempt=a, task=t, ended_at=2.0, output=draw(st.integers()))],
                [TaskFailed(attempt=a, task=t, ended_at=2.0, error="e", reason=draw(st.sampled_from([None, "timeout"])))],
                [TaskRetryScheduled(attempt=a, task=t, try_number=1, max_tries=3, error="e", delay_sec=0.5, failed_at=1.5)],
                decide.expire_run(snap, run_id="r1", now=draw(st.sampled_from([1.0, 200.0]))) or [TaskStarted(attempt=a, task=t, started_at=1.0)],
                decide.request_cancel(snap, run_id="r1", now=1.0) or [TaskStarted(attempt=a, task=t, started_at=1.0)],
                decide.mark_worker_lost(snap, run_id="r1", attempt=a, detected_by="c", now=3.0),
                decide.finish_run(snap, run_id="r1", attempt=a, worker_id="w", outcome=draw(st.sampled_from(["COMPLETED", "FAILED", "CANCELLED"])), now=4.0),
            ]
        chosen = draw(st.sampled_from(options))
        events += chosen
        snap = fold(None, history(*events))
        assert snap is not None
    return history(*events)


@settings(max_examples=150, deadline=None)
@given(legal_histories(), st.data())
def test_folding_in_chunks_equals_folding_at_once(envs: list[Envelope], data: st.DataObject) -> None:
    whole = fold(None, envs)
    cut = data.draw(st.integers(0, len(envs)))
    head = fold(None, envs[:cut])
    assert fold(head, envs[cut:]) == whole
    # replay parks a folded run as its unbounded encoding and folds on from the decoded value
    parked = decode_snapshot(encode_snapshot(head, max_bytes=0)) if head is not None else None
    assert fold(parked, envs[cut:]) == whole


@settings(max_examples=100, deadline=None)
@given(legal_histories())
def test_reapplying_events_is_a_no_op(envs: list[Envelope]) -> None:
    whole = fold(None, envs)
    assert fold(whole, envs) == whole
    assert whole is not None and whole.version == len(envs)


@settings(max_examples=100, deadline=None)
@given(legal_histories())
def test_codec_round_trips(envs: list[Envelope]) -> None:
    for env in envs:
        assert decode_envelope(encode_envelope(env), stream_seq=env.stream_seq) == env
    snap = fold(None, envs)
    assert snap is not None
    assert decode_snapshot(encode_snapshot(snap)) == snap
    assert encode_snapshot(decode_snapshot(encode_snapshot(snap))) == encode_snapshot(snap)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (json.dumps({"type": "run.exploded", "data": {}}).encode(), "unknown event type"),
        (json.dumps({"type": "run.submitted", "data": {"flow_name": 3}}).encode(), "malformed"),
        (json.dumps({"type": "run.submitted", "type_version": 9, "data": {}}).encode(), "newer"),
    ],
)
def test_corrupt_events_are_named(raw: bytes, match: str) -> None:
    with pytest.raises(CorruptStreamError, match=match):
        decode_envelope(raw, stream_seq=1)


def test_oversized_snapshot_drops_task_records_deterministically() -> None:
    big = TaskCompleted(attempt=1, task="a", ended_at=2.0, output="x" * 5000)
    snap = fold(None, history(*HAPPY[:2], big))
    assert snap is not None
    raw = encode_snapshot(snap, max_bytes=1000)
    doc = json.loads(raw)
    assert doc["task_records"] == {} and doc["task_records_truncated"] is True and doc["tasks"] == {"a": "SUCCEEDED", "b": "PENDING"}
    assert raw == encode_snapshot(snap, max_bytes=1000)


def test_a_work_item_survives_its_wire_round_trip() -> None:
    """The work item has one typed home: what the dispatcher encodes, the worker decodes as is."""
    from pyoco_es.core.work import InvalidWorkItem, WorkItem

    item = WorkItem.for_attempt(submitted(), run_id="r1", attempt=2, run_version=3, run_last_stream_seq=9)
    assert WorkItem.from_json(item.to_json()) == item
    snap = item.pending_snapshot()
    assert snap is not None and snap.version == 3 and snap.last_stream_seq == 9 and snap.attempt == 2
    with pytest.raises(InvalidWorkItem) as info:
        WorkItem.from_json(b'{"run_id": "r1", "attempt": 1}')
    assert (info.value.run_id, info.value.attempt) == ("r1", 1)
