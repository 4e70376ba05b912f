"""Wheel registry rules in pyoco-server 0.5.1's terms (contract §1.12, §2.4–2.5, §4.9).

Pure: no I/O, no clock, no randomness (times and ids are passed in).  Both sides of the registry
use it: the gateway (``/wheels``: names, tags, the version policy, archive checks, history
documents) and the worker's sync (selection by tag and version, compatibility, object headers).

Names and versions are parsed with ``packaging`` (PEP 427 filenames, PEP 440 versions), the same
functions pyoco-server calls, so both accept and order exactly the same wheels.

Errors carry pyoco-server's ``detail`` strings: ``InvalidWheel`` (422), ``WheelConflict`` (409),
``WheelNotFound`` (404).  Archive problems (our addition: upstream stores any bytes) are 422 with
a detail that names the problem, e.g. ``"invalid wheel archive: member '../x' escapes the
archive"``.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import io
import re
import zipfile
from collections.abc import Iterable, Mapping
from email.parser import HeaderParser, Parser
from typing import ClassVar, Final

import attrs
from packaging.tags import Tag
from packaging.utils import InvalidWheelFilename as _PackagingInvalidWheelFilename
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from . import bufferfile
from .errors import DomainError, ValidationError

NAME_RE: Final = re.compile(r"[A-Za-z0-9._+-]+\.whl")  # fullmatch only (pyoco-server's _WHEEL_NAME_RE)
TAG_RE: Final = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch only (pyoco-server's _WHEEL_TAG_RE)
PROJECT_RE: Final = re.compile(r"[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]")  # PEP 508 name, fullmatch
NAME_MAX: Final = 255  # a file name a worker can write on any common filesystem; upstream has no cap
TAG_MAX: Final = 128  # as a run's routing tag (gateway/params.py TAG_MAX)
TAGS_MAX_ITEMS: Final = 64
MEMBERS_MAX: Final = 100_000  # entries in one archive
MEMBER_NAME_MAX: Final = 4096
METADATA_MAX_BYTES: Final = 4 * 1024 * 1024  # METADATA read to check Name/Version, never more

# Object store headers, exactly as pyoco-server writes them (contract §2.4).
TAGS_HEADER: Final = "x-pyoco-wheel-tags"
SHA256_HEADER: Final = "sha256"
CONTENT_TYPE_HEADER: Final = "content-type"
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
DIGEST_PREFIX: Final = "SHA-256="  # the object store's digest: "SHA-256=" + urlsafe base64 of the sha256

ACTIONS: Final = ("upload", "delete")

# pyoco-server's detail strings (contract §1.12), one place.
INVALID_NAME: Final = "invalid wheel name"
INVALID_FILENAME: Final = "invalid wheel filename"
INVALID_TAGS: Final = "invalid wheel tags"
INVALID_ACTION: Final = "invalid action"
TOO_LARGE: Final = "wheel too large"
NOT_FOUND: Final = "wheel not found"
SAME_VERSION: Final = "wheel version already exists; bump version"
OLDER_VERSION: Final = "wheel version must be greater than existing latest version"
ALREADY_EXISTS: Final = "wheel already exists"


class InvalidWheel(ValidationError):
    """A wheel name, filename, tag list, history filter or archive is refused (422, upstream's detail)."""


class WheelConflict(DomainError):
    """An upload breaks the version policy or ``replace=false`` (409, upstream's detail)."""


class WheelNotFound(DomainError):
    """No (valid) wheel by that name (404 ``"wheel not found"``)."""

    http_status: ClassVar[int] = 404

    def __init__(self) -> None:
        super().__init__(NOT_FOUND)


@attrs.frozen(kw_only=True)
class WheelName:
    """A parsed wheel filename (PEP 427).

    ``distribution`` is the canonical project name (PEP 503: ``Foo_Bar`` → ``foo-bar``), the key
    of the version policy and of sync's "newest per package".
    """

    filename: str
    distribution: str
    version: Version
    build: tuple[()] | tuple[int, str]
    tags: frozenset[Tag]

    @property
    def version_text(self) -> str:
        return str(self.version)

    def sort_key(self) -> tuple[Version, str]:
        """Newest last: by version, ties broken by the larger filename (as upstream's sync)."""
        return (self.version, self.filename)


@attrs.frozen(kw_only=True)
class WheelArchive:
    """What ``inspect_archive`` found in a wheel's bytes."""

    members: int
    dist_info: str  # e.g. "demo_pkg-1.0.0.dist-info"
    metadata_name: str
    metadata_version: str
    summary: str


def normalize_name(raw: object) -> str:
    """The wheel name with surrounding whitespace removed (as upstream).

    Raises:
        InvalidWheel: ``"invalid wheel name"`` when it does not match ``NAME_RE`` (so no path
            separator, NUL or other control character), contains ``..`` (never part of a PEP 427
            name) or is longer than ``NAME_MAX``.
    """
    name = str(raw or "").strip()
    if len(name) > NAME_MAX or NAME_RE.fullmatch(name) is None or ".." in name:
        raise InvalidWheel(INVALID_NAME)
    return name


def is_valid_name(raw: object) -> bool:
    """True for a name ``normalize_name`` keeps unchanged (what ``GET /wheels`` lists)."""
    try:
        return normalize_name(raw) == raw
    except InvalidWheel:
        return False


def parse_name(raw: object) -> WheelName:
    """Parse a wheel filename.

    Raises:
        InvalidWheel: ``"invalid wheel name"`` (see ``normalize_name``), or ``"invalid wheel
            filename"`` when it is not a PEP 427 filename with a PEP 440 version and a PEP 508
            project name.
    """
    name = normalize_name(raw)
    try:
        dist, version, build, tags = parse_wheel_filename(name)
    except (_PackagingInvalidWheelFilename, InvalidVersion, ValueError) as exc:
        raise InvalidWheel(INVALID_FILENAME) from exc
    if PROJECT_RE.fullmatch(name.split("-", 1)[0]) is None:
        raise InvalidWheel(INVALID_FILENAME)
    return WheelName(filename=name, distribution=str(dist), version=version, build=build, tags=frozenset(tags))


def try_parse_name(raw: object) -> WheelName | None:
    """``parse_name`` or None: for listing a store that may hold anything."""
    try:
        return parse_name(raw)
    except InvalidWheel:
        return None


def stored_name(name: str) -> WheelName | None:
    """The wheel a stored object's name is, or None: the name must parse and already be in the
    form ``normalize_name`` keeps.  The registry's version policy and the worker's sync both
    read a store this way, so they see the same wheels."""
    wheel = try_parse_name(name)
    return wheel if wheel is not None and wheel.filename == name else None


def parse_tags(raw: str | None) -> tuple[str, ...]:
    """A comma-separated tag list: blanks dropped, duplicates removed, order kept (as upstream).

    Raises:
        InvalidWheel: ``"invalid wheel tags"`` when a tag is not ``[A-Za-z0-9_-]+``, longer than
            ``TAG_MAX``, or there are more than ``TAGS_MAX_ITEMS``.
    """
    if raw is None:
        return ()
    out: list[str] = []
    for part in str(raw).split(","):
        tag = part.strip()
        if not tag:
            continue
        if len(tag) > TAG_MAX or TAG_RE.fullmatch(tag) is None:
            raise InvalidWheel(INVALID_TAGS)
        if tag not in out:
            out.append(tag)
    if len(out) > TAGS_MAX_ITEMS:
        raise InvalidWheel(INVALID_TAGS)
    return tuple(out)


def format_tags(tags: Iterable[str]) -> str:
    return ",".join(tags)


def header_value(headers: Mapping[str, object] | None, name: str) -> str | None:
    """An object header's value, the one lookup both sides use: the exact name, then Title-Case
    (upstream's lookup), then UPPER-CASE; a list of values (Go clients, nats-py) gives its first;
    bytes are decoded.  None when absent or ``headers`` is not a mapping."""
    if not isinstance(headers, Mapping):
        return None
    raw = None
    for key in (name, name.title(), name.upper()):
        raw = headers.get(key)
        if raw is not None:
            break
    if isinstance(raw, list | tuple):
        raw = raw[0] if raw else None
    if raw is None:
        return None
    if isinstance(raw, bytes | bytearray):
        return bytes(raw).decode("utf-8", errors="replace")
    return str(raw)


def tags_from_headers(headers: Mapping[str, object] | None) -> tuple[str, ...]:
    """The tags an object carries, as the registry lists them: () when absent or when any tag is
    invalid (as upstream's server)."""
    raw = header_value(headers, TAGS_HEADER)
    if raw is None:
        return ()
    try:
        return parse_tags(raw)
    except InvalidWheel:
        return ()


def worker_tags_from_headers(headers: Mapping[str, object] | None) -> frozenset[str]:
    """The tags an object carries, as a worker's sync reads them: invalid entries dropped, the
    rest kept (as upstream's worker, which is more lenient than its server)."""
    raw = header_value(headers, TAGS_HEADER) or ""
    return frozenset(t for t in (p.strip() for p in raw.split(",")) if t and TAG_RE.fullmatch(t))


def sha256_from_headers(headers: Mapping[str, object] | None) -> str | None:
    """The hex sha256 an object carries, lowercased; None when absent or not 64 hex digits."""
    raw = header_value(headers, SHA256_HEADER)
    if raw is None:
        return None
    value = raw.strip().lower()
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def object_headers(*, sha256_hex: str, tags: Iterable[str], content_type: str | None = None) -> dict[str, str]:
    """The object's meta headers as upstream's upload writes them (tags only when there are any)."""
    headers = {CONTENT_TYPE_HEADER: content_type or DEFAULT_CONTENT_TYPE, SHA256_HEADER: sha256_hex.lower()}
    tag_list = list(tags)
    if tag_list:
        headers[TAGS_HEADER] = format_tags(tag_list)
    return headers


def digest_to_hex(digest: str | None) -> str | None:
    """``"SHA-256=<urlsafe b64>"`` (the object store's digest; the prefix in any case) as hex; None
    when not in that form or not 32 bytes."""
    if not digest or digest[: len(DIGEST_PREFIX)].upper() != DIGEST_PREFIX:
        return None
    b64 = digest[len(DIGEST_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def hex_to_digest(sha256_hex: str) -> str:
    """The object store's digest string for a hex sha256."""
    return DIGEST_PREFIX + base64.urlsafe_b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def check_new_version(new: WheelName, existing: Iterable[str]) -> None:
    """Upstream's version policy against the names already stored (invalid names ignored).

    Raises:
        WheelConflict: ``"wheel version already exists; bump version"`` when the same package
            already has this version; ``"wheel version must be greater than existing latest
            version"`` when it has a newer one.
    """
    newest: Version | None = None
    for name in existing:
        other = stored_name(name)
        if other is None or other.distribution != new.distribution:
            continue
        if other.version == new.version:
            raise WheelConflict(SAME_VERSION)
        if newest is None or other.version > newest:
            newest = other.version
    if newest is not None and new.version < newest:
        raise WheelConflict(OLDER_VERSION)


def tags_match(wheel_tags: Iterable[str], worker_tags: Iterable[str]) -> bool:
    """A wheel is for a worker when it has no tags, or shares one with the worker (contract §4.9)."""
    wanted = set(wheel_tags)
    return not wanted or not wanted.isdisjoint(worker_tags)


def is_compatible(wheel: WheelName, supported: Iterable[Tag]) -> bool:
    """True when one of the wheel's platform tags is among the interpreter's ``supported`` tags
    (pass ``packaging.tags.sys_tags()``)."""
    return not wheel.tags.isdisjoint(supported)


def newest_by_distribution(wheels: Iterable[WheelName]) -> dict[str, WheelName]:
    """The newest wheel of each package (``WheelName.sort_key``), keyed by canonical name."""
    out: dict[str, WheelName] = {}
    for wheel in wheels:
        best = out.get(wheel.distribution)
        if best is None or wheel.sort_key() > best.sort_key():
            out[wheel.distribution] = wheel
    return out


def member_problem(name: str) -> str | None:
    """Why an archive member name is unsafe to extract, or None.  Refused: empty, NUL or other
    control characters, absolute paths (``/x``, ``\\x``, ``C:x``), any ``..`` component, over
    ``MEMBER_NAME_MAX`` characters."""
    if not name:
        return "has an empty name"
    if len(name) > MEMBER_NAME_MAX:
        return "has a name that is too long"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "has a control character in its name"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "escapes the archive"
    return None


def _archive_error(problem: str) -> InvalidWheel:
    return InvalidWheel(f"invalid wheel archive: {problem}")


def _member_label(name: str) -> str:
    shown = name[:80].encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return f"member '{shown}'"


def _read_metadata(zf: zipfile.ZipFile, member: str) -> str:
    with zf.open(member) as fh:
        data = fh.read(METADATA_MAX_BYTES + 1)
    if len(data) > METADATA_MAX_BYTES:
        raise _archive_error(f"{member} is larger than {METADATA_MAX_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def _dist_info_dir(names: list[str], wheel: WheelName) -> str:
    """The one top-level ``*.dist-info`` directory holding METADATA, named for this wheel's package."""
    found = sorted({n.split("/", 1)[0] for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")})
    if not found:
        raise _archive_error("no *.dist-info/METADATA")
    if len(found) > 1:
        raise _archive_error(f"more than one *.dist-info directory ({', '.join(found[:3])})")
    dist_info = found[0]
    stem = dist_info[: -len(".dist-info")]
    if canonicalize_name(stem.split("-", 1)[0]) != wheel.distribution:
        raise _archive_error(f"{dist_info} does not belong to package {wheel.distribution!r}")
    return dist_info


def inspect_archive(data: bytes | bytearray, wheel: WheelName) -> WheelArchive:
    """Check that ``data`` is a wheel for ``wheel`` a worker can safely install.

    Checks: a readable zip; at most ``MEMBERS_MAX`` members, each with a safe relative name
    (``member_problem``); one top-level ``<name>-<version>.dist-info/METADATA`` whose ``Name``
    and ``Version`` match the filename (pip refuses a mismatch at install time, on every worker).

    Raises:
        InvalidWheel: ``"invalid wheel archive: <what is wrong>"``.
    """
    try:
        zf = zipfile.ZipFile(bufferfile.reader(data))  # read in place: no copy of the upload
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise _archive_error("not a zip file") from exc
    with zf:
        names = zf.namelist()
        if len(names) > MEMBERS_MAX:
            raise _archive_error(f"more than {MEMBERS_MAX} members")
        for name in names:
            problem = member_problem(name)
            if problem is not None:
                raise _archive_error(f"{_member_label(name)} {problem}")
        dist_info = _dist_info_dir(names, wheel)
        try:
            text = _read_metadata(zf, f"{dist_info}/METADATA")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, OSError, EOFError) as exc:
            raise _archive_error(f"{dist_info}/METADATA cannot be read ({exc.__class__.__name__})") from exc
    meta = HeaderParser().parsestr(text)
    meta_name = str(meta.get("Name") or "").strip()
    meta_version = str(meta.get("Version") or "").strip()
    if canonicalize_name(meta_name) != wheel.distribution:
        raise _archive_error(f"METADATA Name {meta_name[:80]!r} does not match the filename")
    try:
        same_version = Version(meta_version) == wheel.version
    except InvalidVersion:
        same_version = False
    if not same_version:
        raise _archive_error(f"METADATA Version {meta_version[:80]!r} does not match the filename")
    return WheelArchive(
        members=len(names),
        dist_info=dist_info,
        metadata_name=meta_name,
        metadata_version=meta_version,
        summary=str(meta.get("Summary") or "").strip(),
    )


def history_key(occurred_at: float, event_id: str) -> str:
    """The history KV key: 13-digit zero-padded epoch milliseconds, ``_``, the event id (§2.5)."""
    return f"{int(occurred_at * 1000):013d}_{event_id}"


def history_document(
    *,
    event_id: str,
    occurred_at: float,
    action: str,
    wheel_name: str,
    tags: Iterable[str],
    size_bytes: int | None,
    sha256_hex: str | None,
    replace: bool | None,
    tenant_id: str | None,
    api_key_id: str | None,
    source: Mapping[str, str | None],
) -> dict[str, object]:
    """One history entry, field for field as upstream's ``pyoco_wheel_history`` value (§2.5)."""
    return {
        "event_id": event_id,
        "occurred_at": occurred_at,
        "action": action,
        "wheel_name": wheel_name,
        "tags": list(tags),
        "size_bytes": size_bytes,
        "sha256_hex": sha256_hex.lower() if sha256_hex else None,
        "replace": replace,
        "actor": {"tenant_id": tenant_id, "api_key_id": api_key_id},
        "source": dict(source),
    }


def parse_action(raw: str | None) -> str | None:
    """A history ``action`` filter: None when blank.

    Raises:
        InvalidWheel: ``"invalid action"`` for anything but upload/delete (any case).
    """
    if raw is None or not raw.strip():
        return None
    action = raw.strip().lower()
    if action not in ACTIONS:
        raise InvalidWheel(INVALID_ACTION)
    return action


def history_sort_key(item: Mapping[str, object]) -> tuple[float, str]:
    """Upstream's history order key (sort descending): ``(occurred_at, event_id)``."""
    at = item.get("occurred_at")
    return (float(at) if isinstance(at, int | float) else 0.0, str(item.get("event_id") or ""))


# -- the registry's events (``pyoco.evt.audit.wheel``) -----------------------------------------

EVENT_TYPES: Final = {"upload": "wheel.uploaded", "delete": "wheel.deleted"}
EVENT_TYPE_VERSION: Final = 1
HISTORY_FIELDS: Final = ("event_id", "occurred_at", "action", "wheel_name", "tags", "size_bytes", "sha256_hex", "replace", "actor", "source")


def event_document(history: Mapping[str, object], *, wheel: WheelName, nuid: str, producer: str) -> dict[str, object]:
    """The registry event for a history entry: the entry's fields plus ``type``, the package,
    its version, the object's ``nuid`` and the gateway that wrote it."""
    action = str(history["action"])
    return {
        "type": EVENT_TYPES[action],
        "type_version": EVENT_TYPE_VERSION,
        **history,
        "package": wheel.distribution,
        "version": wheel.version_text,
        "nuid": nuid,
        "producer": producer,
    }


def history_from_event(event: Mapping[str, object]) -> dict[str, object] | None:
    """The ``/wheels/history`` item of a registry event (upstream's fields plus ``package`` and
    ``version``); None for an event that is not a wheel upload or delete."""
    if event.get("action") not in ACTIONS or not isinstance(event.get("wheel_name"), str):
        return None
    item = {k: event.get(k) for k in HISTORY_FIELDS}
    item["package"] = event.get("package")
    item["version"] = event.get("version")
    return item


def live_wheels(events: Iterable[Mapping[str, object]]) -> dict[str, Mapping[str, object]]:
    """Fold registry events, oldest first: the wheels they say exist, name → its upload event."""
    live: dict[str, Mapping[str, object]] = {}
    for event in events:
        name = event.get("wheel_name")
        if not isinstance(name, str):
            continue
        if event.get("action") == "upload":
            live[name] = event
        elif event.get("action") == "delete":
            live.pop(name, None)
    return live


# -- the client's upload preflight (pyoco-server 0.5.1's pyoco-client, contract §5.3) ----------

DOC_URL_LABELS: Final = frozenset({"documentation", "docs", "doc", "usage"})
USAGE_DOC_MIN_CHARS: Final = 80


def _count_entry_points(text: str) -> int:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return sum(len(parser.options(section)) for section in parser.sections())


def preflight(data: bytes, *, require_entry_points: bool = True, require_usage_doc: bool = True) -> tuple[list[str], list[str]]:
    """Upstream's ``wheel-upload`` checks on a wheel's bytes: ``(errors, warnings)``, worded as
    pyoco-server's client words them (METADATA Name/Version, usage documentation, entry points,
    an empty Summary; a body that is not a zip)."""
    errors: list[str] = []
    warnings: list[str] = []
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = zf.namelist()
            meta_member = next((m for m in members if m.endswith(".dist-info/METADATA")), None)
            if meta_member is None:
                return ["missing dist-info/METADATA"], warnings
            meta = Parser().parsestr(zf.read(meta_member).decode("utf-8", errors="replace"))
            if not str(meta.get("Name") or "").strip():
                errors.append("METADATA Name is missing")
            if not str(meta.get("Version") or "").strip():
                errors.append("METADATA Version is missing")
            if not str(meta.get("Summary") or "").strip():
                warnings.append("METADATA Summary is empty")
            description = str(meta.get_payload() or "").strip()
            urls = [str(v) for v in meta.get_all("Project-URL") or []]
            has_docs_url = any(
                label.strip().lower() in DOC_URL_LABELS and url.strip() for label, _, url in (u.partition(",") for u in urls)
            )
            if not (len(description) >= USAGE_DOC_MIN_CHARS or has_docs_url):
                if require_usage_doc:
                    errors.append(
                        "usage documentation is missing (need METADATA description>=80 chars or Project-URL: Documentation,...)"
                    )
                else:
                    warnings.append("usage documentation seems missing")
            ep_member = next((m for m in members if m.endswith(".dist-info/entry_points.txt")), None)
            count = 0
            if ep_member is not None:
                try:
                    count = _count_entry_points(zf.read(ep_member).decode("utf-8", errors="replace"))
                except configparser.Error:
                    errors.append("dist-info/entry_points.txt format is invalid")
            if count <= 0 and require_entry_points:
                errors.append("entry_points are missing (dist-info/entry_points.txt)")
            elif count <= 0:
                warnings.append("entry_points are missing")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError):
        errors.append("wheel file is not a valid zip archive")
    return errors, warnings
