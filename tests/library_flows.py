"""The flow resolver of the library-API tests: pyoco-server's example flow ``main`` (copied
verbatim in ``tests/upstream_examples/hello_flow.py``) plus the ``examples`` flows."""

from __future__ import annotations

from typing import Any

from examples import flows

from .upstream_examples import hello_flow


def resolve(name: str) -> Any:
    if name == "main":
        return hello_flow.resolve_flow(name)
    return flows.resolve(name)
