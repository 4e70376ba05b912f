"""A small multipart/form-data parser for the upload routes.

werkzeug's decoder (what Quart uses) compiles a regular expression per request from the random
boundary; that cost ~1.9 ms of CPU per ``POST /runs/yaml`` here, more than the rest of the
submit.  Bodies are already capped (``MAX_CONTENT_LENGTH``), so this parses the whole body at
once: find each ``CRLF--boundary``, read each part's headers, keep fields and files apart.
File names are only reported, never used as paths.  A wheel upload (hundreds of MiB) keeps its
file as the body itself, cut down to it in place (``in_place``), so it is held once.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import attrs
from werkzeug.http import parse_options_header

from ..core.errors import ValidationError


@attrs.frozen
class Upload:
    filename: str
    content_type: str | None
    data: bytes | bytearray


@attrs.frozen
class Form:
    fields: dict[str, str]
    files: dict[str, Upload]


def _parts(body: bytes | bytearray, boundary: bytes) -> Iterator[tuple[bytes | bytearray, int, int] | None]:
    """Each part's headers and where its content starts and ends in ``body``, in order, then
    None at the closing boundary.  Found by index, never by splitting: no copy of a content is
    made here (an upload may be hundreds of MiB: ``PYOCO_WHEEL_MAX_BYTES``).
    """
    delim = b"--" + boundary
    sep = b"\r\n" + delim
    if body.startswith(delim):
        pos = len(delim)
    else:
        found = body.find(sep)
        if found < 0:
            raise ValidationError("malformed multipart upload: the boundary never appears in the body")
        pos = found + len(sep)
    while True:
        if body.startswith(b"--", pos):
            yield None
            return
        nxt = body.find(sep, pos)
        end = len(body) if nxt < 0 else nxt
        head_end = body.find(b"\r\n\r\n", pos, end)
        if head_end < 0:
            raise ValidationError("malformed multipart upload: a part has no header/body separator")
        yield body[pos:head_end], head_end + 4, end
        if nxt < 0:
            return
        pos = nxt + len(sep)


def parse_form(body: bytes | bytearray, content_type: str | None, *, in_place: str | None = None) -> Form:
    """Parse a ``multipart/form-data`` body.

    ``in_place``: the file field whose content is ``body`` itself afterwards, cut down to it in
    place (``body`` must then be a bytearray; the form's other files are dropped), instead of a
    copy beside the body.

    Raises:
        ValidationError: not multipart, no boundary, or a malformed part (the message says which).
    """
    if in_place is not None and not isinstance(body, bytearray):
        raise TypeError("parse_form(in_place=...) cuts the body down: it must be a bytearray")
    mimetype, options = parse_options_header(content_type or "")
    if mimetype == "application/x-www-form-urlencoded":
        # A form without any file (curl -d, httpx data=...): its fields, and no files.
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise ValidationError("form body is not UTF-8 text") from None
        return Form(dict(reversed(pairs)), {})
    if mimetype != "multipart/form-data":
        raise ValidationError(
            f"expected a multipart/form-data upload (got {mimetype or 'no content type'}): "
            "send the workflow file as the form field 'workflow', e.g. curl -F workflow=@flow.yaml -F flow_name=main"
        )
    boundary = options.get("boundary", "").encode("latin-1")
    if not boundary or len(boundary) > 200:
        raise ValidationError("multipart upload without a valid boundary in its Content-Type")
    fields: dict[str, str] = {}
    files: dict[str, Upload] = {}
    closed = False
    kept: tuple[str, str | None, int, int] | None = None  # in_place's (filename, content type, start, end)
    for part in _parts(body, boundary):
        if part is None:
            closed = True
            break
        head, start, end = part
        disposition = ctype = None
        for line in head.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                continue
            key = name.strip().lower()
            if key == b"content-disposition":
                disposition = value.strip().decode("utf-8", "replace")
            elif key == b"content-type":
                ctype = value.strip().decode("latin-1")
        kind, params = parse_options_header(disposition or "")
        if kind != "form-data" or "name" not in params:
            raise ValidationError("malformed multipart upload: a part lacks 'Content-Disposition: form-data; name=...'")
        field = params["name"]
        if "filename" in params:
            if in_place is None:
                files.setdefault(field, Upload(params["filename"], ctype, body[start:end]))
            elif field == in_place and kept is None:
                kept = (params["filename"], ctype, start, end)
        else:
            try:
                fields.setdefault(field, body[start:end].decode("utf-8"))
            except UnicodeDecodeError:
                raise ValidationError(f"form field {field!r} is not UTF-8 text") from None
    if not closed:
        raise ValidationError("malformed multipart upload: the closing boundary is missing (truncated body?)")
    if kept is not None and in_place is not None and isinstance(body, bytearray):
        filename, ctype, start, end = kept
        del body[end:]
        del body[:start]  # a bytearray drops its head by moving its start: no copy
        files[in_place] = Upload(filename, ctype, body)
    return Form(fields, files)
