"""The HTTP API fuzzed from its own OpenAPI document, against a real gateway + NATS + worker.

Two sources of requests, both read from the ``/openapi.json`` the gateway serves:

- schemathesis (on Hypothesis) draws valid and schema-violating requests for every operation;
- our own Hypothesis strategies put hostile values into every parameter and body field the
  document names: lone surrogates, NUL and control characters, newline-terminated ids, NATS
  wildcards, huge and non-finite numbers, deep nesting, long strings, broken YAML.

Every answer must be below 500, and afterwards the gateway and the worker must still serve: a
normal run still completes.  The bounded run is part of the normal suite; for a longer one set
``PYOCO_FUZZ_EXAMPLES`` (examples per strategy, default 1000: ~30 s), e.g.
``PYOCO_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_api.py``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
import re
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import schemathesis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from pyoco_es.config import Settings
from pyoco_es.gateway.app import create_app
from pyoco_es.gateway.openapi import OPERATIONS, app_routes, openapi_document
from pyoco_es.testing.stack import open_stack
from test_gateway_support import FLOW_YAML, submit_yaml, wait_status

EXAMPLES = int(os.environ.get("PYOCO_FUZZ_EXAMPLES") or 1000)
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)

HOSTILE_TEXT = [
    "\ud800", "a\udfffb", "\x00", "a\x00b", "run\n", "run\r\n", "\n", "a.b c>", "*", ">", "a.>", "$KV.x", "..",
    "../../etc/passwd", "%00", "%0A", "\u202egnp.exe", "<script>alert(1)</script>", "' OR 1=1 --", "x" * 5000,
    "日本語", "\ufeff", "\x1b[31m", "1e400", "NaN", "-1", "0", "99999999999999999999999", "",
]
# raw JSON values (bytes, so they can hold what Python's json would not write)
HOSTILE_JSON = [
    b'"\\ud800"', b'"\\u0000"', b'"a.b c>"', b"1e400", b"-1e400", b"NaN", b"Infinity", b"9" * 5000, b"-" + b"9" * 80,
    b"[" * 970 + b"]" * 970, b"[" * 70 + b"]" * 70, b'{"\\ud800": 1}', b"null", b"true", b"[]", b"{}", b'"' + b"x" * 300_000 + b'"',
    b'"' + b"y" * 600_000 + b'"', b"0.1", b"-0", b'"\\n"', b'["a", {"b": [1, 2.5, null]}]',
]
HOSTILE_YAML = [
    FLOW_YAML, b"", b"\x00", b"\xff\xfe", b"a: [" * 200, b"a: &a [*a]", b"x: 1" + b"1" * 5000,
    FLOW_YAML.replace(b"x: 1", b"x: .inf"), FLOW_YAML.replace(b"x: 1", b'x: "\\ud800"'),
    FLOW_YAML.replace(b"examples.tasks:add_one", b"os:system"), b"version: 1\nflow: {graph: 'a >> b'}\n",
]


def _text() -> st.SearchStrategy[str]:
    return st.sampled_from(HOSTILE_TEXT) | st.text(st.characters(codec=None, categories=None), max_size=40)


def _json_value() -> st.SearchStrategy[bytes]:
    return st.sampled_from(HOSTILE_JSON) | _text().map(lambda s: json.dumps(s).encode())


@st.composite
def _hostile_request(draw: st.DrawFn, doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """One request to an operation of ``doc`` with hostile values in the fields it declares, and
    whether the operation answers a stream."""
    path, methods = draw(st.sampled_from(sorted(doc["paths"].items())))
    method, op = draw(st.sampled_from(sorted(methods.items())))
    url, query, headers = path, {}, {}
    for param in op.get("parameters", []):
        value = draw(_text())
        if param["in"] == "path":
            url = url.replace("{" + param["name"] + "}", quote(value.encode("utf-8", "surrogatepass"), safe=""))
        elif param["in"] == "query" and draw(st.booleans()):
            query[param["name"]] = value.encode("utf-8", "surrogatepass").decode("latin-1")
        elif param["in"] == "header" and draw(st.booleans()):
            headers[param["name"]] = value.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"").strip() or b"x"
    url = re.sub(r"\{[^}]+\}", "x", url)
    request: dict[str, Any] = {"method": method.upper(), "url": url, "params": query, "headers": headers}
    sse = _is_sse(doc, method, path)
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        schema = content["application/json"]["schema"]
        props = doc["components"]["schemas"]["RunSubmit"]["properties"] if "$ref" in schema else schema.get("properties", {})
        fields = draw(st.lists(st.sampled_from(sorted(props) + ["params", "extra"]), max_size=4, unique=True))
        body = b"{" + b",".join(json.dumps(f).encode() + b":" + draw(_json_value()) for f in fields) + b"}"
        request["content"] = draw(st.sampled_from([body, b"{" + b'"flow_name": "x", "params": {"v": ' + draw(_json_value()) + b"}}"]))
        headers["Content-Type"] = b"application/json"
    elif "multipart/form-data" in content:
        boundary = "fuzzb0undary"
        parts = []
        for name in draw(st.lists(st.sampled_from(["workflow", "flow_name", "tag", "other"]), max_size=4, unique=True)):
            data = draw(st.sampled_from(HOSTILE_YAML)) if name == "workflow" else draw(_text()).encode("utf-8", "surrogatepass")
            filename = b'; filename="f.yaml"' if name == "workflow" else b""
            parts.append(b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"' + filename + b"\r\n\r\n" + data + b"\r\n")
        request["content"] = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}".encode()
    if draw(st.integers(0, 9)) == 0:  # a browser from another site, or a body of another type
        headers["Origin"] = draw(st.sampled_from([b"http://evil.example", b"null", b"http://127.0.0.1:1"]))
    if "content" in request and draw(st.integers(0, 9)) == 0:
        headers["Content-Type"] = draw(st.sampled_from([b"text/plain", b"application/x-www-form-urlencoded", b"application/json; charset=utf-8"]))
    return request, sse


def _send(client: httpx.Client, request: dict[str, Any], sse: bool, seen: Counter[tuple[str, int]]) -> None:
    try:
        if sse:
            with client.stream(**request) as response:
                status, text = response.status_code, "" if response.status_code < 300 else response.read().decode("utf-8", "replace")
        else:
            response = client.request(**request)
            status, text = response.status_code, response.text
    except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError, TypeError, ValueError):
        return  # the client library refused to send it: nothing reached the gateway
    seen[(request["method"], status)] += 1
    assert status < 500, (request["method"], request["url"], status, text[:500])
    assert "Traceback" not in text


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8", "surrogatepass")


def _is_sse(doc: dict[str, Any], method: str, path: str) -> bool:
    return "text/event-stream" in doc["paths"][path][method.lower()]["responses"]["200"].get("content", {})


def _fuzz(base_url: str, doc: dict[str, Any], seen: Counter[tuple[str, int]]) -> None:
    """Runs in a thread: the gateway keeps serving on the test's Trio loop meanwhile."""
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    with httpx.Client(base_url=base_url, timeout=20.0) as client:

        @FUZZ_SETTINGS
        @given(case=cases)
        def from_schema(case: Any) -> None:  # noqa: ANN401 - schemathesis' Case
            kwargs = case.as_transport_kwargs(base_url=base_url)
            request: dict[str, Any] = {"method": kwargs["method"], "url": kwargs["url"]}
            request["headers"] = {k: v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v for k, v in kwargs.get("headers", {}).items()
                                  if k.lower() not in ("connection", "accept-encoding")}
            request["params"] = {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in (kwargs.get("params") or {}).items()}
            for key in ("json", "files", "data"):
                if kwargs.get(key) is not None:
                    request[key] = kwargs[key]
            if "files" in request:  # requests-style parts whose content may be any JSON value
                request["files"] = [(name, (part[0], _as_bytes(part[1]), *part[2:])) for name, part in request["files"]]
            if isinstance(request.get("data"), (bytes, str)):
                request["content"] = request.pop("data")
            _send(client, request, _is_sse(doc, case.method, case.path), seen)

        @FUZZ_SETTINGS
        @given(drawn=_hostile_request(doc))
        def hostile(drawn: tuple[dict[str, Any], bool]) -> None:
            _send(client, *drawn, seen)

        from_schema()
        hostile()


def test_the_document_covers_exactly_the_routes() -> None:
    """Generated from the app's URL map: a route without an entry fails here, and no entry is stale."""
    app = create_app(None, Settings())  # type: ignore[arg-type] - routes only, never served
    routes = app_routes(app.url_map)
    doc = openapi_document(routes)
    assert set(routes) == set(OPERATIONS)
    for (method, rule), op in OPERATIONS.items():
        if method in ("POST", "PATCH") and rule not in ("/runs/<run_id>/cancel", "/dlq/<int:dlq_id>/resubmit"):  # bodyless
            assert "requestBody" in op, (method, rule)
        for param in op["parameters"]:
            assert param["schema"], (method, rule, param)
    runs = doc["paths"]["/runs"]["post"]
    assert runs["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RunSubmit"}
    assert doc["components"]["schemas"]["RunSubmit"]["properties"]["flow_name"]["maxLength"] == 256
    assert "multipart/form-data" in doc["paths"]["/runs/yaml"]["post"]["requestBody"]["content"]
    # keys off (this app, the fuzzed gateway): no scheme, no route asks for one
    assert "securitySchemes" not in doc["components"]
    assert not [op for methods in doc["paths"].values() for op in methods.values() if "security" in op]


async def test_fuzzed_requests_never_get_a_5xx_and_the_system_keeps_serving(tmp_path: Path) -> None:
    settings_ = Settings(sse_heartbeat_interval=0.2)
    async with open_stack(tmp_path, settings=settings_, worker=True) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30.0) as client:
            doc = (await client.get("/openapi.json")).json()
            with trio.fail_after(600):
                seen: Counter[tuple[str, int]] = Counter()
                await trio.to_thread.run_sync(partial(_fuzz, stack.url, doc, seen))
            print(sorted(seen.items()))
            # the requests reached the routes: accepted submits, refusals of every kind
            assert {("POST", 200), ("POST", 403), ("POST", 415), ("POST", 422), ("GET", 200), ("GET", 404), ("PATCH", 404)} <= set(seen), seen
            with trio.fail_after(60):
                assert (await client.get("/health")).status_code == 200
                assert (await client.get("/ready")).status_code == 200
                r = await submit_yaml(client, FLOW_YAML)
                assert r.status_code == 200, r.text
                await wait_status(client, r.json()["run_id"], "COMPLETED", timeout=50)
