"""The upload routes' multipart parser (pure; the HTTP behaviour is covered by test_gateway_errors)."""

from __future__ import annotations

import tracemalloc

import httpx
import pytest

from pyoco_es.core.errors import ValidationError
from pyoco_es.gateway.multipart import parse_form


def encoded(files: dict[str, tuple[str, bytes]] | None, data: dict[str, str]) -> tuple[bytes, str]:
    """A body exactly as httpx (pyoco-server's own client library) sends it."""
    req = httpx.Request("POST", "http://x/runs/yaml", files=files, data=data)
    return req.read(), req.headers["Content-Type"]


def test_fields_and_files_round_trip() -> None:
    yaml = b"flow:\r\n  graph: a\r\n--not-a-boundary\r\n" + bytes(range(256))
    body, ctype = encoded({"workflow": ("../../etc/flow.yaml", yaml)}, {"flow_name": "main", "tag": "tag-ü"})
    form = parse_form(body, ctype)
    assert form.fields == {"flow_name": "main", "tag": "tag-ü"}
    assert form.files["workflow"].data == yaml
    assert form.files["workflow"].filename == "../../etc/flow.yaml"  # reported only, never a path


def test_urlencoded_form_has_fields_and_no_files() -> None:
    body, ctype = encoded(None, {"flow_name": "main"})
    assert parse_form(body, ctype).fields == {"flow_name": "main"} and parse_form(body, ctype).files == {}


@pytest.mark.parametrize(
    "body, ctype, match",
    [
        (b"{}", "application/json", "expected a multipart/form-data upload"),
        (b"--x\r\n", "multipart/form-data", "without a valid boundary"),
        (b"garbage", "multipart/form-data; boundary=b", "never appears"),
        (b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue', "multipart/form-data; boundary=b", "closing boundary"),
        (b"--b\r\nno separator--b--", "multipart/form-data; boundary=b", "no header/body separator"),
        (b"--b\r\nX: y\r\n\r\nv\r\n--b--\r\n", "multipart/form-data; boundary=b", "Content-Disposition"),
        (b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n\xff\r\n--b--\r\n', "multipart/form-data; boundary=b", "not UTF-8"),
    ],
)
def test_malformed_uploads_are_named(body: bytes, ctype: str, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        parse_form(body, ctype)


def test_in_place_keeps_the_file_as_the_body_cut_down() -> None:
    """The wheel route's parse: the file's content is the body object itself afterwards (no copy
    beside it), the fields are read, other files dropped; a bytes body cannot be cut."""
    wheel = b"PK\x03\x04" + bytes(range(256)) * 4000 + b"\r\n--not-the-boundary"
    encoded_body, ctype = encoded({"other": ("x.bin", b"other file"), "wheel": ("demo-1.0-py3-none-any.whl", wheel)}, {"tags": "a,b"})
    body = bytearray(encoded_body)
    tracemalloc.start()
    try:
        form = parse_form(body, ctype, in_place="wheel")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert form.files["wheel"].data is body and body == wheel
    assert form.files["wheel"].filename == "demo-1.0-py3-none-any.whl"
    assert form.fields == {"tags": "a,b"} and set(form.files) == {"wheel"}
    assert peak < len(wheel) // 10, peak  # nothing of the file's size was allocated
    with pytest.raises(TypeError, match="bytearray"):
        parse_form(encoded_body, ctype, in_place="wheel")
    assert parse_form(bytearray(encoded_body), ctype, in_place="missing").files == {}
