"""Request validation: every field's type, length and character set, with FastAPI-shaped 422s.

pyoco-server answers bad input that FastAPI/pydantic catches with
``{"detail": [{"type", "loc", "msg", "input"}, ...]}`` (contract §1.0); its own checks use a
string detail.  ``RequestInvalid`` carries either, and the message always says what to fix.

The rules live here once and are used by both the Quart routes and the fast path
(:mod:`.fastpath`), and they are what :mod:`.openapi` documents.  The gateway refuses what it
cannot store faithfully or what would be dangerous where the value ends up (issue 10):

- names (flow_name) go into events, KV snapshots, logs and the dashboard: printable text
  (no control characters, no lone surrogates), at most ``FLOW_NAME_MAX`` characters;
- tags become NATS subject tokens: ``[A-Za-z0-9_-]`` only (no ``.``, ``*``, ``>``, space);
- params are JSON that must round-trip exactly: finite numbers, integers under
  ``INT_ABS_LIMIT``, no lone surrogates in keys or strings, nesting at most ``PARAMS_MAX_DEPTH``,
  and the whole at most ``PYOCO_MAX_PARAMS_BYTES`` (413).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import ClassVar, Final, cast

from ..core.codec import dumps
from ..core.errors import PayloadTooLarge, PyocoError, ValidationError
from ..core.events import JSONObject, JSONValue
from ..flows.policy import check_timeout

TAG_RE: Final = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch only: `^...$` passes "tag\n"
TAG_MAX: Final = 128
RUN_ID_MAX: Final = 128
WORKER_ID_MAX: Final = 256
IDEMPOTENCY_KEY_MAX: Final = 255
TAGS_MAX_ITEMS: Final = 64
FLOW_NAME_MAX: Final = 256
QUERY_STR_MAX: Final = 256
PARAMS_MAX_DEPTH: Final = 64  # pyoco-server has none; ~970 levels crashed the encoder (issue 10)
INT_ABS_LIMIT: Final = 10**64  # |n| below this; Python refuses >4300 digits with a ValueError
_TRUE: Final = {"1", "true", "yes", "on", "t", "y"}
_FALSE: Final = {"0", "false", "no", "off", "f", "n"}


class RequestInvalid(ValidationError):
    """The request is malformed; ``detail`` is what goes into the response body."""

    http_status: ClassVar[int] = 422

    def __init__(self, detail: str | list[dict[str, JSONValue]]) -> None:
        super().__init__(detail if isinstance(detail, str) else "; ".join(str(d["msg"]) for d in detail))
        self.detail = detail


class ResourceNotFound(PyocoError):
    """What the request names does not exist (a worker, the dashboard's files); the message is
    the answer's ``detail``.  Runs have their own :class:`~pyoco_es.core.errors.RunNotFound`."""

    http_status: ClassVar[int] = 404


def field_error(kind: str, loc: tuple[str | int, ...], msg: str, value: object = None) -> dict[str, JSONValue]:
    return {"type": kind, "loc": list[JSONValue](loc), "msg": msg, "input": _shown(value)}


def _shown(value: object) -> JSONValue:
    """The offending input as the answer echoes it: small and always encodable (a NaN, a huge
    integer or a 1 MB string in the input must not turn a 422 into a 500 or a 1 MB answer)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value[:256]
    if isinstance(value, int):
        return value if -INT_ABS_LIMIT < value < INT_ABS_LIMIT else "<integer too large>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, dict)):
        try:
            text = dumps(value).decode("ascii")
        except (ValueError, TypeError, RecursionError):
            return repr(value)[:256]
        return cast(JSONValue, value) if len(text) <= 1024 else text[:256] + "..."
    return repr(value)[:256]


def invalid(kind: str, loc: tuple[str | int, ...], msg: str, value: object = None) -> RequestInvalid:
    return RequestInvalid([field_error(kind, loc, msg, value)])


def check_run_timeout(value: object, loc: tuple[str | int, ...]) -> float | None:
    """A submit's ``timeout_sec`` (issue 16): absent or null is no deadline; otherwise seconds
    after submission, a number above 0 and at most a month.  A form field (text) is parsed first.

    Raises:
        RequestInvalid: naming ``timeout_sec``.
    """
    if value is None or value == "":
        return None
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise invalid("float_parsing", loc, "timeout_sec must be a number of seconds", value) from None
    try:
        return check_timeout(number, "timeout_sec")
    except ValidationError as exc:
        raise invalid("value_error", loc, exc.message, value) from None


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


def query_bool(args: Mapping[str, str], name: str, *, default: bool, where: str = "query") -> bool:
    """A boolean query parameter (or, with ``where="body"``, form field) as pyoco-server reads it."""
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise invalid("bool_parsing", (where, name), f"{name} must be true or false", raw)


def query_str(args: Mapping[str, str], name: str, *, max_len: int = QUERY_STR_MAX) -> str | None:
    raw = args.get(name)
    if raw is None or raw == "":
        return None
    return check_text(raw, ("query", name), max_len=max_len)


def faithful(value: str) -> bool:
    """Whether ``value`` can be stored as UTF-8 (no lone surrogates such as ``"\\ud800"``, which
    JSON allows and which crashed the worker encoding it; issue 10)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: object, loc: tuple[str | int, ...], *, max_len: int, what: str | None = None) -> str:
    """A printable string of 1..``max_len`` characters (no control characters, no lone surrogates).

    Raises:
        RequestInvalid: naming ``loc`` and the rule broken.
    """
    name = what or str(loc[-1])
    if not isinstance(value, str):
        raise invalid("string_type", loc, f"{name} must be a string", value)
    if not value:
        raise invalid("string_too_short", loc, f"{name} must have at least 1 character", value)
    if len(value) > max_len:
        raise invalid("string_too_long", loc, f"{name} must be at most {max_len} characters (got {len(value)})", value[:64])
    if not value.isprintable():
        # isprintable() is False for control characters (NUL, newline, ESC), lone surrogates,
        # format characters and separators other than the ASCII space.
        bad = next(c for c in value if not c.isprintable())
        raise invalid(
            "string_pattern_mismatch",
            loc,
            f"{name} must be printable text: character U+{ord(bad):04X} at position {value.index(bad)} is not allowed "
            "(no control characters, line breaks or lone surrogates)",
            value[:64].encode("unicode_escape").decode("ascii"),
        )
    return value


def check_flow_name(value: object, loc: tuple[str | int, ...]) -> str:
    return check_text(value, loc, max_len=FLOW_NAME_MAX, what="flow_name")


class _HugeInt:
    """What the JSON parser makes of an integer literal too long to keep (reported with its path)."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str) -> object:
    return int(text) if len(text) <= 80 else _HugeInt(len(text))


def json_loads(raw: bytes) -> object:
    """``json.loads`` that never raises anything but :class:`RequestInvalid`: NaN/Infinity
    literals parse to floats and huge integers to a marker, both refused with their path by
    :func:`check_params`.

    Raises:
        RequestInvalid: not UTF-8 JSON, empty, or nested deeper than the parser can go.
    """
    if not raw.strip():
        raise invalid("missing", ("body",), "a JSON request body is required", None)
    try:
        return json.loads(raw, parse_int=_parse_int, parse_constant=float)
    except RecursionError:
        raise invalid("json_invalid", ("body",), f"JSON is nested too deeply (at most {PARAMS_MAX_DEPTH} levels)", None) from None
    except UnicodeDecodeError:
        raise invalid("json_invalid", ("body",), "request body is not UTF-8 JSON", None) from None
    except json.JSONDecodeError as exc:
        raise invalid(
            "json_invalid", ("body", exc.pos), f"JSON decode error: {exc.msg} at line {exc.lineno} column {exc.colno}", None
        ) from None
    except ValueError as exc:  # pragma: no cover - defensive: the hooks above cover the known cases
        raise invalid("json_invalid", ("body",), f"JSON value out of range: {exc}", None) from None


def check_params(params: JSONObject, loc: tuple[str | int, ...], *, max_bytes: int) -> None:
    """``params`` can be stored and read back exactly, and is not too big.

    The common case costs one C-level encode and a walk over the containers; only a request
    that fails it is walked again to name the path at fault.

    Raises:
        RequestInvalid: a non-finite number, an integer too large, a string or key that is not
            valid Unicode, a value that is not JSON, nesting deeper than ``PARAMS_MAX_DEPTH``
            (the message names the path).
        PayloadTooLarge: the params' JSON (UTF-8) is over ``max_bytes`` (names PYOCO_MAX_PARAMS_BYTES).
    """
    try:
        # allow_nan=False refuses inf/nan, encode() a lone surrogate, the encoder a non-JSON value.
        size = len(_strict(params).encode("utf-8"))
        suspicious = _deep_or_huge(params)
    except (ValueError, TypeError, RecursionError):
        suspicious = True
    if suspicious:
        _locate_problem(params, loc)
        raise invalid("json_type", loc, "params must be a JSON object of JSON values", None)  # pragma: no cover
    if max_bytes > 0 and size > max_bytes:
        raise PayloadTooLarge(f"params too large: {size} bytes of JSON, the limit is {max_bytes} bytes (PYOCO_MAX_PARAMS_BYTES)")


def _deep_or_huge(params: JSONObject) -> bool:
    """Nesting over the limit or an integer over INT_ABS_LIMIT anywhere (containers walked only)."""
    stack: list[tuple[object, int]] = [(params, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > PARAMS_MAX_DEPTH:
            return True
        for item in value.values() if type(value) is dict else value:  # type: ignore[union-attr]
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1))
            elif kind is int and not -INT_ABS_LIMIT < item < INT_ABS_LIMIT:  # type: ignore[operator]
                return True
    return False


def _locate_problem(params: JSONObject, loc: tuple[str | int, ...]) -> None:
    """Raise :class:`RequestInvalid` naming the first value of ``params`` that cannot be stored."""
    stack: list[tuple[object, tuple[str | int, ...]]] = [(params, loc)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, str):
            if not faithful(value):
                raise invalid("string_unicode", at, "strings must be valid Unicode text (a lone UTF-16 surrogate cannot be stored)", value[:64].encode("unicode_escape").decode("ascii"))
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if not -INT_ABS_LIMIT < value < INT_ABS_LIMIT:
                raise invalid("int_too_large", at, "integers must have at most 64 digits (send big numbers as strings)", None)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise invalid("finite_number", at, f"numbers must be finite ({value!r} cannot be stored as JSON)", None)
        elif isinstance(value, (dict, list)):
            if len(at) - len(loc) >= PARAMS_MAX_DEPTH:
                raise invalid("too_deep", at, f"params are nested more than {PARAMS_MAX_DEPTH} levels deep", None)
            if isinstance(value, dict):
                for k, v in value.items():
                    if not isinstance(k, str):
                        raise invalid("dict_key_type", at, "object keys must be strings", repr(k)[:64])
                    if not faithful(k):
                        raise invalid("string_unicode", (*at, k.encode("unicode_escape").decode("ascii")[:64]), "object keys must be valid Unicode text (a lone UTF-16 surrogate cannot be stored)", None)
                    stack.append((v, (*at, k)))
            else:
                stack.extend((v, (*at, i)) for i, v in enumerate(value))
        elif isinstance(value, _HugeInt):
            raise invalid("int_too_large", at, f"integers must have at most 64 digits (got {value.digits}; send big numbers as strings)", None)
        else:
            raise invalid("json_type", at, f"params must be JSON values (got {type(value).__name__})", None)


_strict = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def check_tag(value: object, loc: tuple[str | int, ...], *, what: str = "tag") -> str:
    """A routing tag or a ``tags`` item: a NATS subject token of 1..``TAG_MAX`` characters."""
    if not isinstance(value, str):
        raise invalid("string_type", loc, f"{what} must be a string", value)
    if len(value) > TAG_MAX:
        raise invalid("string_too_long", loc, f"{what} must be at most {TAG_MAX} characters", value[:64])
    if not TAG_RE.fullmatch(value):
        raise invalid(
            "string_pattern_mismatch",
            loc,
            f"{what} must match ^[A-Za-z0-9_-]+$ (letters, digits, '_' and '-'; no dots, spaces or wildcards)",
            value[:64].encode("unicode_escape").decode("ascii") if not faithful(value) else value[:64],
        )
    return value


def idempotency_key(key: str | None) -> str | None:
    """The ``Idempotency-Key`` header's value, validated (None when absent).

    Raises:
        RequestInvalid: blank, too long or not printable.
    """
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not (key.isascii() and key.isprintable()):
        raise invalid(
            "idempotency_key",
            ("header", "Idempotency-Key"),
            f"Idempotency-Key must be 1..{IDEMPOTENCY_KEY_MAX} printable ASCII characters (e.g. a UUID)",
            key[:64],
        )
    return key
