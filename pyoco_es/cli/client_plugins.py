"""Which synced wheels (pyoco-server calls them plugins) workers and runs have, as text:
``pyoco-client workers --output plugins`` (one row per installed wheel, pyoco-server's columns)
and the ``wheels`` of a ``run.claimed`` event in ``pyoco-client events``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

PLUGIN_COLUMNS: Final = ("worker_id", "state", "tags", "package", "version", "wheel_name")


def _tags(item: Mapping[str, Any]) -> str:
    raw = item.get("tags")
    tags = [str(t).strip() for t in raw if str(t).strip()] if isinstance(raw, list) else []
    return ",".join(tags) or "-"


def plugin_rows(items: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """One row per installed wheel of each worker; a worker without any gets one row of ``-``."""
    rows: list[list[Any]] = []
    for item in items:
        head = [str(item.get("worker_id") or "-"), str(item.get("state") or "-"), _tags(item)]
        sync = item.get("wheel_sync")
        wheels = sync.get("installed_wheels") if isinstance(sync, Mapping) else None
        wheels = [w for w in wheels if isinstance(w, Mapping)] if isinstance(wheels, list) else []
        if not wheels:
            rows.append([*head, "-", "-", "-"])
        for w in wheels:
            rows.append([*head, str(w.get("package_name") or "-"), str(w.get("package_version") or "-"), str(w.get("wheel_name") or "-")])
    return rows


def wheels_text(value: Any) -> str:
    """``name@version(sha8)`` for each wheel record of a ``run.claimed`` event."""
    if not isinstance(value, list):
        return str(value)
    parts = []
    for w in value:
        if isinstance(w, Mapping):
            parts.append(f"{w.get('name', '?')}@{w.get('version', '?')}({str(w.get('sha256') or '')[:8]})")
    return ",".join(parts)


__all__ = ["PLUGIN_COLUMNS", "plugin_rows", "wheels_text"]
