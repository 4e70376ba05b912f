"""Build small wheels in memory for tests (no setuptools, no build step).

``make_wheel("demo-pkg", "1.0.0", modules={"demo_pkg/__init__.py": "def task(ctx): return 1\\n"})``
returns ``(filename, bytes)`` of a pure-Python wheel pip installs: ``<pkg>/...`` files,
``<dist>-<ver>.dist-info/METADATA``, ``WHEEL``, ``RECORD`` (with real hashes) and, when asked,
``entry_points.txt``.  The keyword options make the bad ones tests need (wrong METADATA, unsafe
member names, no RECORD, an impossible ``Requires-Python``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

LONG_DESCRIPTION = "Usage: import the package and call its task functions from a flow's callable: entries.\n"


def dist_stem(dist: str) -> str:
    """The filename form of a distribution name (PEP 427: runs of -_. become _)."""
    return re.sub(r"[-_.]+", "_", dist)


def wheel_filename(dist: str, version: str, tag: str = "py3-none-any") -> str:
    return f"{dist_stem(dist)}-{version}-{tag}.whl"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode("ascii").rstrip("=")
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(
    dist: str,
    version: str,
    *,
    modules: Mapping[str, str] | None = None,
    tag: str = "py3-none-any",
    summary: str = "A test wheel",
    description: str = LONG_DESCRIPTION,
    entry_points: str | None = "[pyoco.tasks]\ntask = {pkg}:task\n",
    requires_python: str | None = None,
    metadata_name: str | None = None,
    metadata_version: str | None = None,
    extra_members: Mapping[str, bytes] | None = None,
    record: bool = True,
) -> tuple[str, bytes]:
    """A wheel as ``(filename, bytes)``.

    Args:
        dist: the distribution name (``demo-pkg``); the import package defaults to its stem.
        modules: path in the archive → source text; default ``<pkg>/__init__.py`` with a ``task``.
        entry_points: ``entry_points.txt`` text (``{pkg}`` is replaced), or None for none.
        metadata_name / metadata_version: write these into METADATA instead (a mismatch test).
        extra_members: raw members added as they are (e.g. ``"../evil.py"``).
        record: False leaves RECORD out (pip refuses such a wheel: an install failure).
    """
    pkg = dist_stem(dist).lower()
    stem = f"{dist_stem(dist)}-{version}"
    info = f"{stem}.dist-info"
    files: dict[str, bytes] = {}
    for path, text in (modules or {f"{pkg}/__init__.py": f"VERSION = {version!r}\n\n\ndef task(ctx=None):\n    return VERSION\n"}).items():
        files[path] = text.encode()
    meta = [
        "Metadata-Version: 2.1",
        f"Name: {metadata_name if metadata_name is not None else dist}",
        f"Version: {metadata_version if metadata_version is not None else version}",
        f"Summary: {summary}",
    ]
    if requires_python:
        meta.append(f"Requires-Python: {requires_python}")
    files[f"{info}/METADATA"] = ("\n".join(meta) + "\n\n" + description).encode()
    files[f"{info}/WHEEL"] = f"Wheel-Version: 1.0\nGenerator: wheelmaker\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
    if entry_points is not None:
        files[f"{info}/entry_points.txt"] = entry_points.replace("{pkg}", pkg).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        for path, data in (extra_members or {}).items():
            zf.writestr(zipfile.ZipInfo(path), data)
        if record:
            lines = [_record_line(p, d) for p, d in files.items()] + [f"{info}/RECORD,,"]
            zf.writestr(f"{info}/RECORD", "\n".join(lines) + "\n")
    return wheel_filename(dist, version, tag), buf.getvalue()


def write_wheel(directory: Path, dist: str, version: str, **kwargs: object) -> Path:
    """``make_wheel`` written to ``directory``; returns the file's path."""
    name, data = make_wheel(dist, version, **kwargs)  # type: ignore[arg-type]
    path = directory / name
    path.write_bytes(data)
    return path
