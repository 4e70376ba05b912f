"""The wheels resource, pyoco-server 0.5.1's routes (contract §1.12):

- ``GET /wheels``: the registry, by name;
- ``POST /wheels``: upload (multipart: the file in ``wheel``, ``tags`` CSV, ``replace`` bool);
- ``GET /wheels/history``: uploads and deletes, newest first (``limit``, ``wheel_name``, ``action``);
- ``GET /wheels/{wheel_name}``: download (``application/octet-stream``, attachment);
- ``DELETE /wheels/{wheel_name}``.

Wheels are shared by every tenant, as upstream (an API key is still needed in api_key mode: the
auth layer guards every route not named public).  The rules live in :mod:`.wheel_registry` and
``core/wheels.py``; this module reads requests and writes answers.

An upload's body may be up to ``PYOCO_WHEEL_MAX_BYTES`` (plus room for the form), far above the
gateway's limit for other bodies, so :func:`allow_uploads` raises the limit for this one route
only; a body announced larger is refused with 413 before any of it is read, and one that turns
out larger (chunked) is cut off at the limit.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Final

import trio
from quart import Blueprint, Response, current_app, request
from quart.wrappers import Request
from werkzeug.exceptions import RequestEntityTooLarge, RequestTimeout

from ..config import Settings
from ..core import wheels
from ..core.errors import PayloadTooLarge
from ..nats.wheelstore import WheelStore
from .answer import json_response
from .context import MULTIPART_SLACK, caller, current_gateway
from .multipart import parse_form
from .params import RequestInvalid, field_error, query_bool, query_int
from .wheel_registry import Actor, WheelRegistry, name_or_not_found, request_source

UPLOAD_RULE: Final = "/wheels"
REGISTRY_KEY: Final = "pyoco.wheels"

blueprint = Blueprint("wheels", __name__)


def upload_body_limit(settings: Settings) -> int | None:
    """The largest ``POST /wheels`` body: the wheel cap plus the form's slack (None: no cap)."""
    return settings.wheel_max_bytes + MULTIPART_SLACK if settings.wheel_max_bytes > 0 else None


def allow_uploads(app: Any, settings: Settings) -> None:  # noqa: ANN401 - a QuartTrio app
    """Give ``POST /wheels`` its own body limit (every other route keeps the app's)."""
    limit = upload_body_limit(settings)
    base: type[Request] = app.request_class

    class WheelUploadRequest(base):  # type: ignore[valid-type,misc]
        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
            if method == "POST" and path.rstrip("/") == UPLOAD_RULE:
                kwargs["max_content_length"] = limit
            super().__init__(method, scheme, path, *args, **kwargs)

    app.request_class = WheelUploadRequest


def registry() -> WheelRegistry:
    """This app's registry (made on first use)."""
    found = current_app.extensions.get(REGISTRY_KEY)
    if found is None:
        gw = current_gateway()
        store = WheelStore(gw.nats, bucket=gw.settings.wheel_object_store_bucket, history_bucket=gw.settings.wheel_history_kv_bucket)
        found = WheelRegistry(store, max_bytes=gw.settings.wheel_max_bytes, producer=gw.producer.id, clock=gw.clock)
        current_app.extensions[REGISTRY_KEY] = found
    return found  # type: ignore[no-any-return]


def _actor() -> Actor:
    source = request_source(
        remote_addr=request.remote_addr,
        headers={k.lower(): v for k, v in request.headers.items()},
        scheme=request.scheme,
    )
    return Actor(principal=caller(), source=source)


async def _upload_body() -> bytearray:
    """The body, read as it arrives into one bytearray: the wheel is then cut out of it in place
    (``parse_form(in_place=...)``), so the upload is held once.  ``get_data`` would hold it twice
    at its end (Quart's buffer and the ``bytes`` made of it), and the form's copy of the file a
    second time."""
    limit = upload_body_limit(current_gateway().settings)
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(wheels.TOO_LARGE)  # refused before reading any of it
    # Grown as the bytes arrive, never allocated from the announced size: bytearray(n) writes
    # all n bytes at once, so a client announcing the limit and sending nothing would pin it
    # (large blocks grow in place here, by mremap: ~1.0-1.3x the upload at peak).
    body = bytearray()
    with trio.move_on_after(math.inf if request.body_timeout is None else request.body_timeout) as waited:
        try:
            async for chunk in request.body:  # what arrived since the last chunk (Quart's buffer is emptied)
                if limit is not None and len(body) + len(chunk) > limit:  # Quart's own cap sees only its buffer
                    raise PayloadTooLarge(wheels.TOO_LARGE)
                body += chunk
        except RequestEntityTooLarge:
            raise PayloadTooLarge(wheels.TOO_LARGE) from None
    if waited.cancelled_caught:
        raise RequestTimeout()
    return body


@blueprint.get("/wheels")
async def list_wheels() -> Response:
    current_gateway().require_nats()
    return json_response(await registry().list())


@blueprint.post("/wheels")
async def upload_wheel() -> Response:
    gw = current_gateway()
    body = await _upload_body()
    form = await trio.to_thread.run_sync(functools.partial(parse_form, body, request.headers.get("Content-Type"), in_place="wheel"))
    del body  # now the wheel's bytes (or dropped, when there is no wheel field)
    part = form.files.get("wheel")
    if part is None:
        raise RequestInvalid([field_error("missing", ("body", "wheel"), "Field required: wheel (the .whl file, multipart)")])
    replace = query_bool(form.fields, "replace", default=True, where="body")
    reg = registry()
    upload = await reg.check(
        filename=part.filename, data=part.data, tags=form.fields.get("tags"), replace=replace, content_type=part.content_type
    )
    await gw.await_nats()  # bad input is refused (4xx) even while NATS is away
    return json_response(await reg.upload(upload, actor=_actor()))


@blueprint.get("/wheels/history")
async def wheel_history() -> Response:
    current_gateway().require_nats()
    args = request.args
    items = await registry().history(
        limit=query_int(args, "limit", default=100, lo=1, hi=500),
        wheel_name=args.get("wheel_name"),
        action=args.get("action"),
    )
    return json_response(items)


@blueprint.get("/wheels/<wheel_name>")
async def download_wheel(wheel_name: str) -> Response:
    current_gateway().require_nats()
    obj, data = await registry().read(wheel_name)
    headers = {
        "Content-Disposition": f'attachment; filename="{obj.name}"',  # the name matched NAME_RE: no quotes
        "X-Content-Type-Options": "nosniff",
    }
    if obj.sha256_hex:
        headers["X-Pyoco-Wheel-Sha256"] = obj.sha256_hex
    return Response(data, status=200, headers=headers, content_type="application/octet-stream")


@blueprint.delete("/wheels/<wheel_name>")
async def delete_wheel(wheel_name: str) -> Response:
    name = name_or_not_found(wheel_name)
    await current_gateway().await_nats()
    return json_response(await registry().delete(name, actor=_actor()))
