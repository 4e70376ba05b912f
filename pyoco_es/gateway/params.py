"""Request validation: query parameters and JSON bodies, with FastAPI-shaped 422 errors.

pyoco-server answers bad input that FastAPI/pydantic catches with
``{"detail": [{"type", "loc", "msg", "input"}, ...]}`` (contract §1.0); its own checks use a
string detail.  ``RequestInvalid`` carries either, and the message always says what to fix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import ClassVar, Final, cast

from ..core.errors import ValidationError
from ..core.events import JSONValue

TAG_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_TRUE: Final = {"1", "true", "yes", "on", "t", "y"}
_FALSE: Final = {"0", "false", "no", "off", "f", "n"}


class RequestInvalid(ValidationError):
    """The request is malformed; ``detail`` is what goes into the response body."""

    http_status: ClassVar[int] = 422

    def __init__(self, detail: str | list[dict[str, JSONValue]]) -> None:
        super().__init__(detail if isinstance(detail, str) else "; ".join(str(d["msg"]) for d in detail))
        self.detail = detail


def field_error(kind: str, loc: tuple[str | int, ...], msg: str, value: object = None) -> dict[str, JSONValue]:
    shown = cast(JSONValue, value) if _jsonable(value) else repr(value)
    return {"type": kind, "loc": list[JSONValue](loc), "msg": msg, "input": shown}


def _jsonable(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def invalid(kind: str, loc: tuple[str | int, ...], msg: str, value: object = None) -> RequestInvalid:
    return RequestInvalid([field_error(kind, loc, msg, value)])


def query_int(args: Mapping[str, str], name: str, *, default: int, lo: int, hi: int) -> int:
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise invalid("int_parsing", ("query", name), f"{name} must be an integer between {lo} and {hi}", raw) from None
    if value < lo:
        raise invalid("greater_than_equal", ("query", name), f"{name} must be >= {lo} (got {value})", raw)
    if value > hi:
        raise invalid("less_than_equal", ("query", name), f"{name} must be <= {hi} (got {value})", raw)
    return value


def query_float(args: Mapping[str, str], name: str) -> float | None:
    raw = args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        raise invalid("float_parsing", ("query", name), f"{name} must be a number (unix seconds)", raw) from None
    if not math.isfinite(value):
        raise invalid("finite_number", ("query", name), f"{name} must be a finite number", raw)
    return value


def query_bool(args: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise invalid("bool_parsing", ("query", name), f"{name} must be true or false", raw)


def query_str(args: Mapping[str, str], name: str, *, max_len: int = 256) -> str | None:
    raw = args.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_len:
        raise invalid("string_too_long", ("query", name), f"{name} must be at most {max_len} characters", raw[:64])
    return raw


def parse_json_body(raw: bytes) -> object:
    """Decode a JSON request body.

    Raises:
        RequestInvalid: the body is empty or not valid JSON (says where).
    """
    if not raw.strip():
        raise invalid("missing", ("body",), "a JSON request body is required", None)
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise invalid("json_invalid", ("body",), "request body is not UTF-8 JSON", None) from None
    except json.JSONDecodeError as exc:
        raise invalid(
            "json_invalid", ("body", exc.pos), f"JSON decode error: {exc.msg} at line {exc.lineno} column {exc.colno}", None
        ) from None


def check_tag(value: object, loc: tuple[str | int, ...]) -> str:
    if not isinstance(value, str):
        raise invalid("string_type", loc, "tag must be a string", value)
    if not TAG_RE.match(value):
        raise invalid(
            "string_pattern_mismatch",
            loc,
            "tag must match ^[A-Za-z0-9_-]+$ (letters, digits, '_' and '-'; no dots or spaces)",
            value,
        )
    if len(value) > 128:
        raise invalid("string_too_long", loc, "tag must be at most 128 characters", value[:64])
    return value
