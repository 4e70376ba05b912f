"""Which registry wheels a worker installs, and the ``wheel_sync`` record it reports.

pyoco-server 0.5.1's rules (contract §4.9), as pure functions over what the object store
``pyoco_wheels`` lists: keep the wheel names the registry lists (``wheels.stored_name``); keep a wheel whose ``x-pyoco-wheel-tags``
intersect the worker's tags, or that has no tags (it is for every worker); skip (and report) a
wheel whose platform tags the interpreter cannot run; per distribution keep only the highest
version (ties broken by the larger file name).

Beyond pyoco-server: a wheel's bytes are checked against the sha256 the registry recorded, and a
wheel whose top-level modules would shadow the run process's own (the standard library,
``pyoco``, ``pyoco_es``) is refused, so a wheel can never replace the allow-list
(``worker/trust.py``) or the runner itself.

Pure: no trio, no NATS.  Wheel names, object headers, digests and member names are read by the
registry's functions in ``core/wheels.py`` (one parser for both sides).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
from packaging.tags import Tag
from packaging.version import Version

from . import wheels

STATUS_MAX_ITEMS: Final = 50  # pyoco-server caps every list of the record at 50
ERROR_MAX_CHARS: Final = 2000
# Top-level names a synced wheel may not ship: the run process's own packages.
RUNNER_PACKAGES: Final = frozenset({"pyoco", "pyoco_es"})


@attrs.frozen(kw_only=True)
class StoredWheel:
    """One object of the registry's object store, as listed (no bytes).  Names, headers and
    digests are read with the registry's own functions (``core/wheels.py``)."""

    name: str
    nuid: str
    size: int
    digest: str  # the object store's own "SHA-256=<urlsafe base64>"
    headers: Mapping[str, object] = attrs.field(factory=dict)

    @property
    def tags(self) -> frozenset[str]:
        """The wheel's worker tags (invalid entries dropped, as pyoco-server's worker does)."""
        return wheels.worker_tags_from_headers(self.headers)

    @property
    def sha256(self) -> str | None:
        """The hex sha256 the registry recorded (header ``sha256``), if well-formed."""
        return wheels.sha256_from_headers(self.headers)

    @property
    def digest_sha256(self) -> str | None:
        """The object store's digest as hex, if it is a SHA-256 digest."""
        return wheels.digest_to_hex(self.digest)


@attrs.frozen(kw_only=True)
class Candidate:
    """A wheel selected for this worker: the newest version of its distribution."""

    wheel: StoredWheel
    package: str  # the normalized distribution name
    version: Version


@attrs.frozen(kw_only=True)
class Selection:
    chosen: tuple[Candidate, ...]  # one per distribution, sorted by name
    skipped_incompatible: tuple[dict[str, Any], ...]


def select_wheels(objects: Iterable[StoredWheel], worker_tags: Collection[str], supported: Collection[Tag]) -> Selection:
    """pyoco-server's selection (module docstring): newest matching version per distribution."""
    mine = set(worker_tags)
    best: dict[str, Candidate] = {}
    skipped: list[dict[str, Any]] = []
    for obj in objects:
        parsed = wheels.stored_name(obj.name)
        if parsed is None:
            continue
        tags = obj.tags
        if tags and mine.isdisjoint(tags):
            continue
        dist, version, file_tags = parsed.distribution, parsed.version, parsed.tags
        if file_tags and not any(t in supported for t in file_tags):
            skipped.append({"wheel_name": obj.name, "package_name": dist, "package_version": str(version), "reason": "unsupported_wheel_tags"})
            continue
        prev = best.get(dist)
        if prev is None or version > prev.version or (version == prev.version and obj.name > prev.wheel.name):
            best[dist] = Candidate(wheel=obj, package=dist, version=version)
    return Selection(chosen=tuple(best[k] for k in sorted(best)), skipped_incompatible=tuple(skipped))


def verify_sha256(wheel: StoredWheel, actual: str) -> str | None:
    """Why the downloaded bytes (hex sha256 ``actual``) are not the registry's wheel, or None."""
    for what, expected in (("the registry's sha256", wheel.sha256), ("the object store's digest", wheel.digest_sha256)):
        if expected is not None and expected != actual:
            return f"sha256 mismatch: {what} is {expected}, the downloaded bytes hash to {actual}"
    return None


def top_level_names(members: Iterable[str]) -> set[str]:
    """The importable top-level names a wheel's zip members install (``.dist-info`` and
    ``.data`` directories excluded)."""
    out: set[str] = set()
    for member in members:
        norm = member.replace("\\", "/")
        first = norm.split("/", 1)[0]
        if not first or first.endswith((".dist-info", ".data")):
            continue
        name = first if "/" in norm else first.split(".", 1)[0]  # a package dir, or a module file
        if name:
            out.add(name)
    return out


def shadowed_modules(members: Iterable[str], stdlib: Collection[str]) -> list[str]:
    """Top-level names in the wheel that would shadow the run process's own modules."""
    return sorted(n for n in top_level_names(members) if n in RUNNER_PACKAGES or n in stdlib)


def unsafe_members(members: Iterable[str]) -> list[str]:
    """Zip members that are never written anywhere: the registry's rule (``wheels.member_problem``:
    absolute paths, ``..`` components, control characters, empty or overlong names)."""
    return [m for m in members if wheels.member_problem(m) is not None]


@attrs.frozen(kw_only=True)
class WheelRef:
    """Which code a run process had: one installed wheel (recorded on ``run.claimed``)."""

    package: str
    version: str
    sha256: str
    wheel_name: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.package, "version": self.version, "sha256": self.sha256, "wheel_name": self.wheel_name}


@attrs.frozen(kw_only=True)
class InstalledWheel:
    """A wheel installed (``pip install --target``) into its own directory ``path``."""

    ref: WheelRef
    path: str
    nuid: str
    installed_at: float

    def to_json(self) -> dict[str, Any]:
        """One ``installed_wheels`` item (pyoco-server's keys plus ``sha256_hex``)."""
        return {
            "wheel_name": self.ref.wheel_name,
            "package_name": self.ref.package,
            "package_version": self.ref.version,
            "installed_at": self.installed_at,
            "nuid": self.nuid,
            "sha256_hex": self.ref.sha256,
        }


@attrs.frozen(kw_only=True)
class CodeGeneration:
    """The synced code one run process imports: its wheels' directories go first on its path.
    A process keeps the generation it started with; a new generation means new processes."""

    number: int = 0
    installed: tuple[InstalledWheel, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(w.path for w in self.installed)

    @property
    def wheels(self) -> tuple[dict[str, str], ...]:
        return tuple(w.ref.to_json() for w in self.installed)


NO_CODE: Final = CodeGeneration()


def initial_state(*, enabled: bool) -> dict[str, Any]:
    """``wheel_sync`` before the first pass (pyoco-server's shape, plus ``failed_wheels``)."""
    return {
        "enabled": enabled,
        "last_result": "idle" if enabled else "disabled",
        "last_attempt_at": None,
        "last_success_at": None,
        "last_synced_at": None,
        "last_error": None,
        "selected_count": 0,
        "updated_count": 0,
        "removed_count": 0,
        "skipped_incompatible_count": 0,
        "selected_wheels": [],
        "updated_wheels": [],
        "removed_wheels": [],
        "skipped_incompatible": [],
        "installed_wheels": [],
        "failed_wheels": [],
        "generation": 0,
    }


def pass_state(
    previous: Mapping[str, Any],
    *,
    attempted_at: float,
    finished_at: float,
    selection: Selection | None,
    updated: Sequence[str],
    removed: Sequence[str],
    installed: Sequence[dict[str, Any]],
    failed: Sequence[dict[str, Any]],
    generation: int,
    error: str | None = None,
) -> dict[str, Any]:
    """The record after one pass.  ``error`` (the store could not be read) or any failed wheel
    makes it ``error``: the previous code stays in use, ``last_success_at`` is kept."""
    cap = STATUS_MAX_ITEMS
    first_error = error or (f"{failed[0]['wheel_name']}: {failed[0]['error']}" if failed else None)
    out = dict(previous)
    out.update(
        enabled=True,
        last_result="error" if first_error else "ok",
        last_attempt_at=attempted_at,
        last_error=first_error[:ERROR_MAX_CHARS] if first_error else None,
        installed_wheels=list(installed)[:cap],
        failed_wheels=list(failed)[:cap],
        generation=generation,
    )
    if not first_error:
        out.update(last_success_at=finished_at, last_synced_at=finished_at)
    if selection is not None:
        selected = [c.wheel.name for c in selection.chosen]
        out.update(
            selected_count=len(selected),
            selected_wheels=selected[:cap],
            updated_count=len(updated),
            updated_wheels=sorted(updated)[:cap],
            removed_count=len(removed),
            removed_wheels=sorted(removed)[:cap],
            skipped_incompatible_count=len(selection.skipped_incompatible),
            skipped_incompatible=list(selection.skipped_incompatible)[:cap],
        )
    return out


__all__ = [
    "NO_CODE",
    "Candidate",
    "CodeGeneration",
    "InstalledWheel",
    "STATUS_MAX_ITEMS",
    "Selection",
    "StoredWheel",
    "WheelRef",
    "initial_state",
    "pass_state",
    "select_wheels",
    "shadowed_modules",
    "top_level_names",
    "unsafe_members",
    "verify_sha256",
]
