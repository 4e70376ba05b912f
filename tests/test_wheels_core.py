"""The pure wheel rules (core/wheels.py): names, tags, the version policy, archives, headers."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest
from packaging.tags import Tag

from pyoco_es.core import wheels
from pyoco_es.core.wheels import InvalidWheel, WheelConflict

from wheelmaker import make_wheel


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ("", wheels.INVALID_NAME),
        ("demo.zip", wheels.INVALID_NAME),
        ("../demo-1.0-py3-none-any.whl", wheels.INVALID_NAME),
        ("a/demo-1.0-py3-none-any.whl", wheels.INVALID_NAME),
        ("a\\demo-1.0-py3-none-any.whl", wheels.INVALID_NAME),
        ("demo\x00-1.0-py3-none-any.whl", wheels.INVALID_NAME),
        ("demo-1.0-py3-none-any.whl\n", None),  # stripped, as upstream
        ("..-1.0-py3-none-any.whl", wheels.INVALID_NAME),
        ("demo-1..0-py3-none-any.whl", wheels.INVALID_NAME),
        ("x" * 300 + "-1.0-py3-none-any.whl", wheels.INVALID_NAME),
        ("demo-1.0.whl", wheels.INVALID_FILENAME),
        ("demo-notaversion-py3-none-any.whl", wheels.INVALID_FILENAME),
        ("-demo-1.0-py3-none-any.whl", wheels.INVALID_FILENAME),
        ("_demo-1.0-py3-none-any.whl", wheels.INVALID_FILENAME),
    ],
)
def test_names_are_refused_with_upstream_details(raw: str, detail: str | None) -> None:
    if detail is None:
        assert wheels.parse_name(raw).filename == raw.strip()
        return
    with pytest.raises(InvalidWheel) as err:
        wheels.parse_name(raw)
    assert err.value.message == detail
    assert err.value.http_status == 422


def test_a_name_parses_to_canonical_package_and_version() -> None:
    w = wheels.parse_name("Demo_Pkg-1.2.0rc1-py3-none-any.whl")
    assert (w.distribution, w.version_text) == ("demo-pkg", "1.2.0rc1")
    assert Tag("py3", "none", "any") in w.tags
    assert wheels.is_compatible(w, [Tag("py3", "none", "any")])
    assert not wheels.is_compatible(wheels.parse_name("demo-1.0-cp39-cp39-win_amd64.whl"), [Tag("py3", "none", "any")])


def test_tags_csv_as_upstream() -> None:
    assert wheels.parse_tags(None) == ()
    assert wheels.parse_tags(" a, b,,a ,c ") == ("a", "b", "c")
    for bad in ("a.b", "a b", "ü", "x" * 129, ",".join(f"t{i}" for i in range(65))):
        with pytest.raises(InvalidWheel, match="^invalid wheel tags$"):
            wheels.parse_tags(bad)


def test_headers_round_trip_and_read_leniently() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    headers = wheels.object_headers(sha256_hex=sha.upper(), tags=["a", "b"])
    assert headers == {"content-type": "application/octet-stream", "sha256": sha, "x-pyoco-wheel-tags": "a,b"}
    assert wheels.tags_from_headers(headers) == ("a", "b")
    assert wheels.sha256_from_headers({"Sha256": sha.encode()}) == sha
    assert wheels.tags_from_headers({"X-Pyoco-Wheel-Tags": ["c"]}) == ("c",)
    assert wheels.tags_from_headers({"x-pyoco-wheel-tags": "bad tag"}) == ()
    assert wheels.sha256_from_headers({"sha256": "nothex"}) is None
    assert wheels.tags_from_headers(None) == () and "x-pyoco-wheel-tags" not in wheels.object_headers(sha256_hex=sha, tags=[])
    assert wheels.digest_to_hex(wheels.hex_to_digest(sha)) == sha
    assert wheels.digest_to_hex("SHA-256=!!") is None and wheels.digest_to_hex(None) is None


def test_version_policy() -> None:
    stored = ["demo-1.0-py3-none-any.whl", "demo-2.0-py3-none-any.whl", "other-9.0-py3-none-any.whl", "junk.whl", "x.txt"]
    wheels.check_new_version(wheels.parse_name("demo-2.1-py3-none-any.whl"), stored)
    wheels.check_new_version(wheels.parse_name("other_thing-0.1-py3-none-any.whl"), stored)
    with pytest.raises(WheelConflict, match="^wheel version already exists; bump version$"):
        wheels.check_new_version(wheels.parse_name("Demo-2.0.0-py3-none-any.whl"), stored)
    with pytest.raises(WheelConflict, match="^wheel version must be greater than existing latest version$"):
        wheels.check_new_version(wheels.parse_name("demo-1.5-py3-none-any.whl"), stored)


def test_selection_helpers() -> None:
    names = ["demo-1.0-py3-none-any.whl", "demo-1.10-py3-none-any.whl", "demo-1.9-py3-none-any.whl", "b-1-py3-none-any.whl"]
    newest = wheels.newest_by_distribution(wheels.parse_name(n) for n in names)
    assert {k: v.filename for k, v in newest.items()} == {"demo": "demo-1.10-py3-none-any.whl", "b": "b-1-py3-none-any.whl"}
    assert wheels.tags_match((), ["cpu"]) and wheels.tags_match(("cpu", "gpu"), ["gpu"])
    assert not wheels.tags_match(("gpu",), ["cpu"])


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def test_a_good_archive_is_inspected() -> None:
    name, data = make_wheel("demo-pkg", "1.0.0")
    found = wheels.inspect_archive(data, wheels.parse_name(name))
    assert (found.dist_info, found.metadata_version, found.summary) == ("demo_pkg-1.0.0.dist-info", "1.0.0", "A test wheel")


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"extra_members": {"../evil.py": b"x"}}, "member '../evil.py' escapes the archive"),
        ({"extra_members": {"demo_pkg/../../evil.py": b"x"}}, "escapes the archive"),
        ({"extra_members": {"/etc/evil": b"x"}}, "member '/etc/evil' is an absolute path"),
        ({"extra_members": {"C:evil": b"x"}}, "is an absolute path"),
        ({"extra_members": {"..\\evil.py": b"x"}}, "escapes the archive"),
        ({"extra_members": {"a\x01b": b"x"}}, "has a control character in its name"),
        ({"metadata_name": "other"}, "METADATA Name 'other' does not match the filename"),
        ({"metadata_version": "9.9"}, "METADATA Version '9.9' does not match the filename"),
    ],
)
def test_bad_archives_name_the_problem(kwargs: dict[str, object], problem: str) -> None:
    name, data = make_wheel("demo-pkg", "1.0.0", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidWheel) as err:
        wheels.inspect_archive(data, wheels.parse_name(name))
    assert err.value.message.startswith("invalid wheel archive: ")
    assert problem in err.value.message


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"not a zip at all", "not a zip file"),
        (b"", "not a zip file"),
        (b"PK\x03\x04" + b"\x00" * 40, "not a zip file"),
        (_zip({"demo_pkg/__init__.py": b""}), "no *.dist-info/METADATA"),
        (_zip({"a-1.dist-info/METADATA": b"", "b-1.dist-info/METADATA": b""}), "more than one *.dist-info"),
        (_zip({"other-1.0.dist-info/METADATA": b"Name: other\nVersion: 1.0\n"}), "does not belong to package 'demo'"),
    ],
)
def test_non_wheels_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidWheel) as err:
        wheels.inspect_archive(data, wheels.parse_name("demo-1.0-py3-none-any.whl"))
    assert problem in err.value.message


def test_history_document_has_upstream_fields() -> None:
    doc = wheels.history_document(
        event_id="e1", occurred_at=1.5, action="upload", wheel_name="demo-1.0-py3-none-any.whl", tags=("a",),
        size_bytes=3, sha256_hex="AB", replace=True, tenant_id=None, api_key_id=None, source={"remote_addr": "1.2.3.4"},
    )
    assert set(doc) == {"event_id", "occurred_at", "action", "wheel_name", "tags", "size_bytes", "sha256_hex", "replace", "actor", "source"}
    assert doc["sha256_hex"] == "ab" and doc["actor"] == {"tenant_id": None, "api_key_id": None}
    assert wheels.history_key(1.5, "e1") == "0000000001500_e1"
    assert wheels.parse_action(" Upload ") == "upload" and wheels.parse_action("") is None
    with pytest.raises(InvalidWheel, match="^invalid action$"):
        wheels.parse_action("purge")


def test_a_bytearray_wheel_is_read_in_place() -> None:
    """An upload is held as a bytearray (the request body cut down to the file): the archive
    check reads it through BufferFile, the same answers as for bytes, and BufferFile behaves as
    a read-only seekable file over the same memory (no copy: a change to the bytes shows)."""
    from pyoco_es.core.bufferfile import BufferFile

    name, data = make_wheel("demo", "1.0")
    held = bytearray(data)
    assert wheels.inspect_archive(held, wheels.parse_name(name)) == wheels.inspect_archive(data, wheels.parse_name(name))
    with pytest.raises(InvalidWheel, match="not a zip file"):
        wheels.inspect_archive(bytearray(b"not a zip"), wheels.parse_name(name))
    buf = bytearray(b"0123456789")
    with BufferFile(buf) as f:
        assert f.read(3) == b"012" and f.tell() == 3
        assert f.seek(-2, io.SEEK_END) == 8 and f.read() == b"89" and f.read(5) == b""
        f.seek(1)
        buf[1] = ord("x")
        assert f.read(2) == b"x2"
        chunk = bytearray(4)
        f.seek(7)
        assert f.readinto(chunk) == 3 and chunk[:3] == b"789"
        with pytest.raises(ValueError):
            f.seek(-1)
    buf.append(0)  # closed: the memory is released (a bytearray with a live view cannot grow)
