"""Cross-site and content-type checks, run before any route (Quart's and the fast path's).

Without them any web page the operator visits could submit runs: a browser sends a
``text/plain`` POST or a multipart form cross-site without a CORS preflight (issue 10).  So:

- a state-changing request (POST, PUT, PATCH, DELETE) whose ``Origin`` is not the gateway's own
  (the request's ``Host``) nor listed in ``PYOCO_HTTP_ALLOWED_ORIGINS``, or that a browser marks
  ``Sec-Fetch-Site: cross-site`` without an allowed ``Origin``, is a 403 saying why;
- a body the route does not take is a 415 (JSON routes take ``application/json`` only).

Requests without ``Origin`` and ``Sec-Fetch-Site`` (curl, the CLIs, pyoco-server's client) are
not browsers' cross-site requests and pass.  Listed origins also get CORS answers, so a
dashboard served from there can call the API.

A gateway bound to a loopback address also checks ``Host`` on every request: a page whose own
name resolves to 127.0.0.1 (DNS rebinding) would otherwise be "same-origin" and could read and
write.  Only ``localhost``, loopback addresses, the hosts of listed origins and
``PYOCO_HTTP_ALLOWED_HOSTS`` are served there (403 naming the setting).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from typing import ClassVar, Final
from urllib.parse import urlsplit

from ..core.errors import ValidationError

UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON: Final = "application/json"
MULTIPART: Final = "multipart/form-data"
# What each body-taking route accepts (method, route rule) -> media types.  Routes not listed
# ignore any body (POST /runs/{id}/cancel, like pyoco-server).
BODY_TYPES: Final[dict[tuple[str, str], frozenset[str]]] = {
    ("POST", "/runs"): frozenset({JSON}),
    ("POST", "/runs/yaml"): frozenset({MULTIPART}),
    ("POST", "/runs/batch"): frozenset({JSON}),
    ("POST", "/runs/cancel"): frozenset({JSON}),
    ("PATCH", "/workers/<worker_id>"): frozenset({JSON}),
    ("POST", "/wheels"): frozenset({MULTIPART}),
}
CORS_HEADERS: Final = "Content-Type, Idempotency-Key, Last-Event-ID, X-API-Key"
_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}


class CrossSiteRefused(ValidationError):
    """A browser sent a state-changing request from a site that is not allowed."""

    http_status: ClassVar[int] = 403


class UnsupportedMediaType(ValidationError):
    """The request body's content type is not one the route takes."""

    http_status: ClassVar[int] = 415


@functools.lru_cache(maxsize=256)  # browsers repeat the same few origins
def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None if it is not one."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and str(port) != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


def allowed_origins(configured: Iterable[str]) -> frozenset[str]:
    """The configured list, normalised (``*`` kept as is; unparseable entries dropped)."""
    out = set()
    for item in configured:
        if item.strip() == "*":
            out.add("*")
        elif (norm := normalize_origin(item)) is not None:
            out.add(norm)
    return frozenset(out)


LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or a Host name) is local: ``localhost`` or a loopback IP."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(configured: Iterable[str], origins: frozenset[str], *, bind_host: str) -> frozenset[str] | None:
    """Host names the gateway answers to (lower case, no port), or None for any.

    Bound to loopback: local names, the configured ones and the listed origins' hosts.  Bound
    elsewhere: only the configured ones (plus the origins' hosts) when some are configured.
    """
    names = {h.strip().lower() for h in configured if h.strip()}
    if "*" in names or (not names and not is_loopback(bind_host)):
        return None
    if is_loopback(bind_host):
        names |= LOOPBACK_HOSTS
    names.update(urlsplit(o).hostname or "" for o in origins if o != "*")
    return frozenset(names - {""})


@functools.lru_cache(maxsize=256)
def _host_name(host: str) -> str:
    try:
        return (urlsplit(f"http://{host.strip()}").hostname or "").lower()
    except ValueError:
        return ""


def check_host(host: str | None, hosts: frozenset[str] | None) -> None:
    """Refuse a request whose ``Host`` is not one a loopback-bound gateway answers to.

    Raises:
        CrossSiteRefused: the name is not local nor listed (DNS rebinding).
    """
    if hosts is None:
        return
    name = _host_name(host or "")
    if name in hosts or ("localhost" in hosts and is_loopback(name)):
        return
    raise CrossSiteRefused(
        f"request for host {(host or '(none)')[:100]!r} refused: this gateway listens on a loopback address and "
        "answers only to localhost and loopback addresses (a web page could reach it through a DNS name that "
        "resolves to 127.0.0.1). Behind a proxy that passes its own Host, list that name in PYOCO_HTTP_ALLOWED_HOSTS"
    )


def _same_host(origin: str, host: str | None) -> bool:
    if not host:
        return False
    scheme = origin.split("://", 1)[0]
    own = normalize_origin(f"{scheme}://{host.strip()}")
    return own == origin


def check_request(
    method: str,
    rule: str | None,
    header: Callable[[str], str | None],
    allowed: frozenset[str],
) -> None:
    """Refuse a cross-site state change (403) or a body of the wrong type (415).

    Args:
        rule: the matched route rule (``/runs/<run_id>/cancel``), None when no route matched.
        header: looks a request header up by its lower-case name.
        allowed: from :func:`allowed_origins`.

    Raises:
        CrossSiteRefused: a browser request from another site (names the setting to change).
        UnsupportedMediaType: the content type is not one the route takes.
    """
    if method not in UNSAFE_METHODS:
        return
    origin = header("origin")
    if origin is not None or header("sec-fetch-site") == "cross-site":
        norm = normalize_origin(origin) if origin is not None else None
        if not ("*" in allowed or (norm is not None and (norm in allowed or _same_host(norm, header("host"))))):
            shown = (origin or "(none)")[:200].encode("unicode_escape").decode("ascii")
            raise CrossSiteRefused(
                f"cross-site request refused: {method} from origin {shown} "
                f"(Sec-Fetch-Site: {(header('sec-fetch-site') or '-')[:40]}) is not this gateway's own origin. "
                "To allow a dashboard served elsewhere, list its origin (scheme://host:port) in "
                "PYOCO_HTTP_ALLOWED_ORIGINS; clients that are not browsers send no Origin header"
            )
    takes = BODY_TYPES.get((method, rule)) if rule is not None else None
    if takes is not None:
        raw = header("content-type")
        media = (raw or "").split(";", 1)[0].strip().lower()
        if media not in takes:
            raise UnsupportedMediaType(
                f"unsupported content type {(raw or '(none)')[:100]!r} for {method} {rule}: "
                f"send {' or '.join(sorted(takes))}"
                + (" (e.g. curl -H 'Content-Type: application/json' -d '{...}')" if JSON in takes else
                   " (e.g. curl -F wheel=@demo-1.0-py3-none-any.whl)" if rule == "/wheels" else
                   " (e.g. curl -F workflow=@flow.yaml -F flow_name=main)")
            )


def cors_headers(origin: str | None, allowed: frozenset[str], *, preflight: bool) -> dict[str, str]:
    """CORS response headers for a listed origin (none for the gateway's own or others)."""
    if origin is None or not allowed:
        return {}
    norm = normalize_origin(origin)
    if "*" not in allowed and (norm is None or norm not in allowed):
        return {}
    out = {"Access-Control-Allow-Origin": origin.strip(), "Vary": "Origin"}
    if preflight:
        out["Access-Control-Allow-Methods"] = "GET, POST, PATCH, OPTIONS"
        out["Access-Control-Allow-Headers"] = CORS_HEADERS
        out["Access-Control-Max-Age"] = "600"
    return out


__all__ = [
    "BODY_TYPES",
    "CrossSiteRefused",
    "UnsupportedMediaType",
    "allowed_hosts",
    "allowed_origins",
    "check_host",
    "check_request",
    "is_loopback",
    "cors_headers",
    "normalize_origin",
]
