"""Runs removed by retention: ``GET /runs/{id}`` answers 410 Gone with where the run's archive
is (from the ``pyoco_archived`` bucket the archiver writes), instead of 404."""

from __future__ import annotations

import json
from typing import ClassVar

from ..core.errors import DomainError, PyocoError, RunNotFound
from ..core.events import JSONObject
from ..nats import subjects
from .context import Gateway, check_tenant
from .snapshot import read_existing, valid_run_id


class RunArchived(DomainError):
    http_status: ClassVar[int] = 410

    def __init__(self, run_id: str, record: JSONObject) -> None:
        super().__init__(
            f"run {run_id} was archived and removed (retention): its history is in {record.get('file')} "
            f"under {record.get('directory')} (head hash {record.get('head')}); read it with "
            f"`pyoco-es events --archive FILE {run_id}`"
        )


async def read_or_gone(gw: Gateway, run_id: str) -> JSONObject:
    """:func:`.snapshot.read_existing`, but an archived run is a 410 (for its tenant only).

    Raises:
        RunArchived: the run was archived; RunNotFound: it never existed (or is another tenant's).
    """
    try:
        return await read_existing(gw, run_id)
    except RunNotFound:
        if not valid_run_id(run_id):  # never a subject made of client text (a bad one ends the NATS connection)
            raise
        try:
            entry = await gw.nats.kv_get(subjects.ARCHIVED_BUCKET, run_id)
            record = json.loads(entry.value) if entry is not None and entry.value else None
        except (PyocoError, ValueError):
            record = None
        if not isinstance(record, dict) or "head" not in record:
            raise
        check_tenant(record, run_id)
        raise RunArchived(run_id, record) from None
