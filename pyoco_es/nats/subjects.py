"""Every NATS subject, stream, bucket and consumer name pyoco-es uses is built here."""

from __future__ import annotations

import re
from typing import Final

EVENTS_STREAM: Final = "PYOCO_EVENTS"
WORK_STREAM: Final = "PYOCO_WORK"
DLQ_STREAM: Final = "PYOCO_DLQ"
LOGS_STREAM: Final = "PYOCO_LOGS"  # task output, one subject per run (never the event history)
RUNS_BUCKET: Final = "pyoco_runs"
WORKERS_BUCKET: Final = "pyoco_workers"
AUTH_BUCKET: Final = "pyoco_auth"  # API key records (PYOCO_AUTH_KV_BUCKET), as pyoco-server keeps them
API_KEY_PREFIX: Final = "api_keys."  # the records' keys in the auth bucket
WHEELS_BUCKET: Final = "pyoco_wheels"  # the wheel object store (PYOCO_WHEEL_OBJECT_STORE_BUCKET), as pyoco-server's
WHEEL_HISTORY_BUCKET: Final = "pyoco_wheel_history"  # pyoco-server's wheel history KV (PYOCO_WHEEL_HISTORY_KV_BUCKET)

EVENTS_PREFIX: Final = "pyoco.evt"
RUN_EVENTS_WILDCARD: Final = "pyoco.evt.run.*"
API_KEY_AUDIT_SUBJECT: Final = "pyoco.evt.audit.api_key"  # key created/revoked (the projector reads only pyoco.evt.run.*)
WORKER_AUDIT_SUBJECT: Final = "pyoco.evt.audit.worker"  # worker hidden/shown (PATCH /workers/{id})
RUN_ARCHIVED_SUBJECT: Final = "pyoco.evt.audit.run_archived"  # a run archived then removed (retention)
ARCHIVED_BUCKET: Final = "pyoco_archived"  # run_id -> where its archive is (GET /runs/{id} answers 410)
DLQ_AUDIT_SUBJECT: Final = "pyoco.evt.audit.dlq"  # dead letter resubmitted/dropped
WHEEL_AUDIT_SUBJECT: Final = "pyoco.evt.audit.wheel"  # wheel uploaded/deleted: the registry's history
WORK_PREFIX: Final = "pyoco.work"
DLQ_PREFIX: Final = "pyoco.dlq"
LOGS_PREFIX: Final = "pyoco.logs"

PROJECTOR_DURABLE: Final = "pyoco_projector"
DISPATCHER_DURABLE: Final = "pyoco_dispatcher"

TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch only: `^...$` passes "id\n"


def is_token(value: str) -> bool:
    """A single subject token: what run ids, tags and worker ids must be."""
    return TOKEN_RE.fullmatch(value) is not None


def run_events_subject(run_id: str) -> str:
    return f"{EVENTS_PREFIX}.run.{run_id}"


def run_logs_subject(run_id: str) -> str:
    """The subject of a run's task output in ``PYOCO_LOGS`` (chunks of lines, see nats/logs.py)."""
    return f"{LOGS_PREFIX}.{run_id}"


def run_id_from_subject(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def work_subject(tag: str, prefix: str = WORK_PREFIX) -> str:
    return f"{prefix}.{tag}"


WORK_DURABLE_PREFIX: Final = "pyoco_es_work_"
# pyoco-server 0.5's per-tag work consumer name (and ours before the rename): a pyoco-server
# worker binds ``pyoco_workers_<tag>``.  Ours differ, so such a worker cannot share our work
# queue; resource healing deletes any consumer of this name on the work stream (docs/library.md).
FOREIGN_WORK_DURABLE_PREFIX: Final = "pyoco_workers_"


def work_durable(tag: str) -> str:
    """Shared by every worker serving ``tag`` (not pyoco-server's name: see above)."""
    return f"{WORK_DURABLE_PREFIX}{tag}"


def dlq_subject(tag: str, prefix: str = DLQ_PREFIX) -> str:
    return f"{prefix}.{tag}"


def work_msg_id(run_id: str, attempt: int) -> str:
    return f"{run_id}:{attempt}"


def kv_subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def direct_get_subject(stream: str) -> str:
    return f"$JS.API.DIRECT.GET.{stream}"


def obj_stream(bucket: str) -> str:
    """The stream behind an object store bucket (nats-py's and the Go client's layout)."""
    return f"OBJ_{bucket}"


def obj_subjects(bucket: str) -> list[str]:
    """An object store's chunk and meta subjects."""
    return [f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"]


def ack_metadata(reply: str) -> tuple[int, int, int]:
    """(stream seq, num delivered, num pending) from a JetStream ack subject (v1 and v2 forms)."""
    t = reply.split(".")
    if len(t) == 9:
        return int(t[5]), int(t[4]), int(t[8])
    return int(t[7]), int(t[6]), int(t[10])
