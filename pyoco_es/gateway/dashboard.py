"""The dashboard: ``/`` (index.html in the operator's language) and ``/static/...``."""

from __future__ import annotations

import locale
import os
from typing import Final

import trio
from quart import Blueprint, Response, send_from_directory
from werkzeug.exceptions import NotFound

from .context import current_gateway
from .params import ResourceNotFound

LANG_PLACEHOLDER: Final = "__PYOCO_DASHBOARD_LANG_VALUE__"

blueprint = Blueprint("dashboard", __name__)


@blueprint.get("/")
async def dashboard() -> Response:
    gw = current_gateway()
    return await static_page("index.html", "dashboard", {LANG_PLACEHOLDER: resolve_dashboard_lang(gw.settings.dashboard_lang)})


async def static_page(name: str, what: str, replace: dict[str, str], headers: dict[str, str] | None = None) -> Response:
    """An HTML page of the static directory with its placeholders filled in.

    Raises:
        ResourceNotFound: the file is missing (``<what> not found``).
    """
    try:
        text = await trio.Path(current_gateway().static_dir / name).read_text(encoding="utf-8")
    except OSError:
        raise ResourceNotFound(f"{what} not found") from None
    for placeholder, value in replace.items():
        text = text.replace(placeholder, value)
    return Response(text, content_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache", **(headers or {})})


@blueprint.get("/static/<path:filename>")
async def static(filename: str) -> Response:
    gw = current_gateway()
    if "\x00" in filename or "\\" in filename or len(filename) > 255:
        raise NotFound()
    try:
        return await send_from_directory(gw.static_dir, filename)
    except (OSError, ValueError):  # e.g. a name too long for the file system (found by the fuzzer)
        raise NotFound() from None


def resolve_dashboard_lang(setting: str, env: dict[str, str] | None = None) -> str:
    """``ja`` or ``en`` from PYOCO_DASHBOARD_LANG, else from the locale (contract §6.2)."""
    value = (setting or "auto").strip().lower()
    if value.startswith("ja"):
        return "ja"
    if value.startswith("en"):
        return "en"
    env = dict(os.environ) if env is None else env
    candidates = [env.get(name, "") for name in ("LC_ALL", "LANGUAGE", "LC_MESSAGES", "LANG")]
    try:
        candidates.append(locale.getlocale()[0] or "")
    except ValueError:  # pragma: no cover - broken locale settings
        pass
    for cand in candidates:
        c = cand.strip().lower()
        if c.startswith("ja"):
            return "ja"
        if c.startswith("en"):
            return "en"
    return "en"
