"""``PYOCO_NATS_URL`` as a list: one server or a cluster's nodes, comma-separated.

``nats://a:4222,nats://b:4222,nats://c:4222`` names three nodes of one cluster: the client
connects to any of them and fails over to the others (it also learns the rest of the cluster
from the server).  nats-py takes a list, not that string (given the string it fails with
``nats: invalid connect url option``), so every connection goes through :func:`split_nats_urls`.
A bad item is reported by itself before anything connects.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from ..core.errors import InfraError

SCHEMES: Final = ("nats", "tls", "ws", "wss")
_WEBSOCKET: Final = frozenset({"ws", "wss"})


class NatsUrlError(InfraError):
    """``PYOCO_NATS_URL`` / ``--nats-url`` is not a comma-separated list of NATS server URLs."""


def split_nats_urls(text: str) -> list[str]:
    """The server URLs in ``text`` (comma-separated; blanks around items are ignored).

    An item without a scheme gets ``nats://`` (``host:port`` works, as in nats-py), one without a
    port gets 4222 (websocket URLs keep theirs).

    Raises:
        NatsUrlError: empty, a bad item (named), or websocket and plain URLs mixed (nats-py
            refuses that mix too).
    """
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise NatsUrlError(f"no NATS server URL in {text!r}")
    out = [_one(item) for item in items]
    kinds = {urlsplit(u).scheme in _WEBSOCKET for u in out}
    if len(kinds) > 1:
        raise NatsUrlError(f"NATS URLs {text!r} mix websocket (ws://, wss://) and plain (nats://, tls://) servers")
    return out


def _one(item: str) -> str:
    url = item if "://" in item else f"nats://{item}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise NatsUrlError(f"bad NATS server URL {item!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise NatsUrlError(f"bad NATS server URL {item!r}: the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    if not parts.hostname:
        raise NatsUrlError(f"bad NATS server URL {item!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise NatsUrlError(f"bad NATS server URL {item!r}: a server URL has no path or query (separate servers with commas)")
    if port is None and parts.scheme not in _WEBSOCKET:
        url = f"{url.rstrip('/')}:4222"
    return url.rstrip("/")

