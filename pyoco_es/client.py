"""Python clients of the gateway's HTTP API, with pyoco-server 0.5.1's ``PyocoHttpClient`` names.

``PyocoHttpClient`` is synchronous (httpx.Client) and ``AsyncPyocoHttpClient`` is its Trio
twin (httpx.AsyncClient): the same method names, arguments and return shapes as
``pyoco_server.PyocoHttpClient``, so a script moves with an import change
(docs/library.md).  Each request is described once (``_Call``) and sent by either client.

A non-2xx answer raises :class:`PyocoHttpError`, a subclass of ``httpx.HTTPStatusError``
(what pyoco-server's ``raise_for_status`` raises), whose message carries the server's
``detail``.  The wheel methods talk to the gateway's ``/wheels`` registry
(``download_wheel`` is ours: pyoco-server's client has none).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from typing import Any, Final
from urllib.parse import quote

import attrs
import httpx
import trio

from .cli.client_http import REQUEST_TIMEOUT, TERMINAL_STATUSES, SseParser, describe_body

__all__ = ["AsyncPyocoHttpClient", "FeatureNotAvailable", "PyocoHttpClient", "PyocoHttpError"]

# How often cancel_run(wait=True) re-reads the run (pyoco-server's interval), and its default wait.
CANCEL_POLL_SEC: Final = 0.25
CANCEL_WAIT_DEFAULT_SEC: Final = 30
_WATCH_TIMEOUT: Final = httpx.Timeout(REQUEST_TIMEOUT.connect, read=None)


class PyocoHttpError(httpx.HTTPStatusError):
    """The gateway answered 4xx/5xx; ``detail`` is its error body made readable."""

    def __init__(self, response: httpx.Response) -> None:
        self.detail = describe_body(response)
        request = response.request
        message = f"HTTP {response.status_code} {request.method} {request.url.path}"
        super().__init__(f"{message}: {self.detail}" if self.detail else message, request=request, response=response)


class FeatureNotAvailable(NotImplementedError):
    """A pyoco-server method whose feature pyoco-es does not have (yet): the message names it."""


@attrs.frozen
class _Call:
    """One request, described once for both clients."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    files: Any = None
    data: Mapping[str, str] | None = None


def _filters(status: str | None, flow: str | None, tag: str | None, full: bool, limit: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, value in (("status", status), ("flow", flow), ("tag", tag)):
        if value:
            params[name] = value
    if full:
        params["include"] = "full"
    if limit is not None:
        params["limit"] = limit
    return params


def _submit(flow_name: str, params: dict[str, Any] | None, tag: str | None, tags: list[str] | None) -> _Call:
    payload: dict[str, Any] = {"flow_name": flow_name, "params": params or {}}
    if tag is not None:
        payload["tag"] = tag
    if tags is not None:
        payload["tags"] = tags
    return _Call("POST", "/runs", json=payload)


def _submit_yaml(workflow_yaml: str, flow_name: str, tag: str) -> _Call:
    files = {"workflow": ("flow.yaml", workflow_yaml.encode("utf-8"), "application/x-yaml")}
    return _Call("POST", "/runs/yaml", files=files, data={"flow_name": flow_name, "tag": tag})


def _list_vnext(
    status: str | None,
    flow: str | None,
    tag: str | None,
    full: bool,
    limit: int | None,
    updated_after: float | None,
    cursor: str | None,
    workflow_yaml_sha256: str | None,
) -> _Call:
    params = _filters(status, flow, tag, full, limit)
    if updated_after is not None:
        params["updated_after"] = updated_after
    if cursor:
        params["cursor"] = cursor
    if workflow_yaml_sha256:
        params["workflow_yaml_sha256"] = workflow_yaml_sha256
    return _Call("GET", "/runs", params=params)


def _wheel_history(limit: int | None, wheel_name: str | None, action: str | None) -> _Call:
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = int(limit)
    if wheel_name:
        params["wheel_name"] = str(wheel_name)
    if action:
        params["action"] = str(action)
    return _Call("GET", "/wheels/history", params=params)


def _upload_wheel(filename: str, data: bytes, replace: bool, tags: list[str] | None) -> _Call:
    form = {"replace": "true" if replace else "false"}
    if tags:
        form["tags"] = ",".join(str(t).strip() for t in tags if str(t).strip())
    return _Call("POST", "/wheels", files={"wheel": (filename, data, "application/octet-stream")}, data=form)


def _wheel_path(wheel_name: str) -> str:
    return "/wheels/" + quote(wheel_name, safe="")


def _workers(scope: str | None, state: str | None, include_hidden: bool | None, limit: int | None) -> _Call:
    params: dict[str, Any] = {}
    if scope:
        params["scope"] = scope
    if state:
        params["state"] = state
    if include_hidden is not None:
        params["include_hidden"] = "true" if include_hidden else "false"
    if limit is not None:
        params["limit"] = int(limit)
    return _Call("GET", "/workers", params=params)


def _watch(run_id: str, include_records: bool, since: float | None, timeout_sec: int | None) -> _Call:
    params: dict[str, Any] = {}
    if include_records:
        params["include"] = "records"
    if since is not None:
        params["since"] = since
    if timeout_sec is not None:
        params["timeout_sec"] = timeout_sec
    return _Call("GET", f"/runs/{run_id}/watch", params=params)


def _items(body: Any) -> list[dict[str, Any]]:
    """list_runs: the items, whether the server answered a list or ``{"items": …}``."""
    if isinstance(body, dict):
        items = body.get("items")
        return items if isinstance(items, list) else []
    return body if isinstance(body, list) else []


def _page(body: Any) -> dict[str, Any]:
    """list_runs_vnext: always ``{"items", "next_cursor"}``."""
    return {"items": body, "next_cursor": None} if isinstance(body, list) else dict(body)


def _is_terminal(snap: Any) -> bool:
    return isinstance(snap, dict) and str(snap.get("status") or "").upper() in TERMINAL_STATUSES


def _headers(api_key: str | None, api_key_header: str) -> dict[str, str]:
    headers = {"User-Agent": "pyoco-es client"}
    if api_key:
        headers[api_key_header] = api_key
    return headers


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise PyocoHttpError(response)
    return response


class PyocoHttpClient:
    """Synchronous client; pyoco-server's ``PyocoHttpClient`` with the same methods.

    Args:
        base_url: the gateway, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``api_key_header`` (``X-API-Key``) on every request when given.

    Every method raises :class:`PyocoHttpError` on a 4xx/5xx answer and ``httpx.TransportError``
    when the gateway cannot be reached.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, api_key_header: str = "X-API-Key") -> None:
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=_headers(api_key, api_key_header), timeout=REQUEST_TIMEOUT)

    def __enter__(self) -> PyocoHttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _send(self, call: _Call) -> httpx.Response:
        response = self._client.request(call.method, call.path, params=call.params, json=call.json, files=call.files, data=call.data)
        return _checked(response)

    def _json(self, call: _Call) -> Any:
        return self._send(call).json()

    def submit_run(self, flow_name: str, params: dict[str, Any] | None = None, *, tag: str | None = None, tags: list[str] | None = None) -> dict[str, Any]:
        """POST /runs; returns ``{"run_id", "status"}``."""
        return self._json(_submit(flow_name, params, tag, tags))  # type: ignore[no-any-return]

    def submit_run_yaml(self, workflow_yaml: str, *, flow_name: str, tag: str) -> dict[str, Any]:
        """POST /runs/yaml with the document as ``flow.yaml``; returns ``{"run_id", "status"}``."""
        return self._json(_submit_yaml(workflow_yaml, flow_name, tag))  # type: ignore[no-any-return]

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._json(_Call("GET", f"/runs/{run_id}"))  # type: ignore[no-any-return]

    def get_run_with_records(self, run_id: str) -> dict[str, Any]:
        return self._json(_Call("GET", f"/runs/{run_id}", params={"include": "records"}))  # type: ignore[no-any-return]

    def cancel_run(self, run_id: str, *, wait: bool = False, timeout_sec: int | None = None) -> dict[str, Any]:
        """POST /runs/{id}/cancel; with ``wait``, re-read until terminal.

        Raises:
            TimeoutError: ``wait`` and the run is not terminal after ``timeout_sec`` (default 30).
        """
        snap: dict[str, Any] = self._json(_Call("POST", f"/runs/{run_id}/cancel"))
        deadline = time.monotonic() + max(1, int(timeout_sec) if timeout_sec is not None else CANCEL_WAIT_DEFAULT_SEC)
        while wait and not _is_terminal(snap):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"cancel wait timeout for run_id={run_id}")
            time.sleep(CANCEL_POLL_SEC)
            snap = self.get_run(run_id)
        return snap

    def list_runs(self, *, status: str | None = None, flow: str | None = None, tag: str | None = None, full: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        return _items(self._json(_Call("GET", "/runs", params=_filters(status, flow, tag, full, limit))))

    def list_runs_vnext(
        self,
        *,
        status: str | None = None,
        flow: str | None = None,
        tag: str | None = None,
        full: bool = False,
        limit: int | None = None,
        updated_after: float | None = None,
        cursor: str | None = None,
        workflow_yaml_sha256: str | None = None,
    ) -> dict[str, Any]:
        """GET /runs as a page: ``{"items", "next_cursor"}``."""
        return _page(self._json(_list_vnext(status, flow, tag, full, limit, updated_after, cursor, workflow_yaml_sha256)))

    def watch_run(self, run_id: str, *, include_records: bool = False, since: float | None = None, timeout_sec: int | None = None) -> Iterator[dict[str, Any]]:
        """GET /runs/{id}/watch: yields ``{"event", "data"}`` (plus ``id``, the run's event seq)."""
        call = _watch(run_id, include_records, since, timeout_sec)
        with self._client.stream("GET", call.path, params=call.params, timeout=_WATCH_TIMEOUT) as response:
            if response.status_code >= 400:
                response.read()
                raise PyocoHttpError(response)
            parser = SseParser()
            for line in response.iter_lines():
                event = parser.feed(line.rstrip("\r"))
                if event is not None:
                    yield event.to_json()

    def get_tasks(self, run_id: str) -> dict[str, Any]:
        return self._json(_Call("GET", f"/runs/{run_id}/tasks"))  # type: ignore[no-any-return]

    def get_workers(self, *, scope: str | None = None, state: str | None = None, include_hidden: bool | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        return self._json(_workers(scope, state, include_hidden, limit))  # type: ignore[no-any-return]

    def patch_worker_hidden(self, worker_id: str, *, hidden: bool) -> dict[str, Any]:
        return self._json(_Call("PATCH", f"/workers/{worker_id}", json={"hidden": bool(hidden)}))  # type: ignore[no-any-return]

    def get_metrics(self) -> str:
        """GET /metrics: the Prometheus text."""
        return self._send(_Call("GET", "/metrics")).text

    def list_wheels(self) -> list[dict[str, Any]]:
        """GET /wheels: the registry, by name."""
        return self._json(_Call("GET", "/wheels"))  # type: ignore[no-any-return]

    def list_wheel_history(self, *, limit: int | None = None, wheel_name: str | None = None, action: str | None = None) -> list[dict[str, Any]]:
        """GET /wheels/history: uploads and deletes, newest first."""
        return self._json(_wheel_history(limit, wheel_name, action))  # type: ignore[no-any-return]

    def upload_wheel(self, *, filename: str, data: bytes, replace: bool = True, tags: list[str] | None = None) -> dict[str, Any]:
        """POST /wheels (409 when the package already has this or a newer version)."""
        return self._json(_upload_wheel(filename, data, replace, tags))  # type: ignore[no-any-return]

    def download_wheel(self, wheel_name: str) -> bytes:
        """GET /wheels/{name}: the wheel's bytes."""
        return self._send(_Call("GET", _wheel_path(wheel_name))).content

    def delete_wheel(self, wheel_name: str) -> dict[str, Any]:
        """DELETE /wheels/{name}."""
        return self._json(_Call("DELETE", _wheel_path(wheel_name)))  # type: ignore[no-any-return]


class AsyncPyocoHttpClient:
    """The Trio client: :class:`PyocoHttpClient`'s methods as coroutines (``watch_run`` is an
    async context manager giving a channel).  Use ``async with AsyncPyocoHttpClient(url) as client:`` or call ``aclose()``."""

    def __init__(self, base_url: str, *, api_key: str | None = None, api_key_header: str = "X-API-Key") -> None:
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_headers(api_key, api_key_header), timeout=REQUEST_TIMEOUT)

    async def __aenter__(self) -> AsyncPyocoHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        response = await self._client.request(call.method, call.path, params=call.params, json=call.json, files=call.files, data=call.data)
        return _checked(response)

    async def _json(self, call: _Call) -> Any:
        return (await self._send(call)).json()

    async def submit_run(self, flow_name: str, params: dict[str, Any] | None = None, *, tag: str | None = None, tags: list[str] | None = None) -> dict[str, Any]:
        return await self._json(_submit(flow_name, params, tag, tags))  # type: ignore[no-any-return]

    async def submit_run_yaml(self, workflow_yaml: str, *, flow_name: str, tag: str) -> dict[str, Any]:
        return await self._json(_submit_yaml(workflow_yaml, flow_name, tag))  # type: ignore[no-any-return]

    async def get_run(self, run_id: str) -> dict[str, Any]:
        return await self._json(_Call("GET", f"/runs/{run_id}"))  # type: ignore[no-any-return]

    async def get_run_with_records(self, run_id: str) -> dict[str, Any]:
        return await self._json(_Call("GET", f"/runs/{run_id}", params={"include": "records"}))  # type: ignore[no-any-return]

    async def cancel_run(self, run_id: str, *, wait: bool = False, timeout_sec: int | None = None) -> dict[str, Any]:
        """As :meth:`PyocoHttpClient.cancel_run`; the wait follows the run's watch stream."""
        snap: dict[str, Any] = await self._json(_Call("POST", f"/runs/{run_id}/cancel"))
        if not wait or _is_terminal(snap):
            return snap
        with trio.move_on_after(max(1, int(timeout_sec) if timeout_sec is not None else CANCEL_WAIT_DEFAULT_SEC)):
            while not _is_terminal(snap):
                async with self.watch_run(run_id) as frames:
                    async for frame in frames:
                        data = frame.get("data")
                        if isinstance(data, dict) and _is_terminal(data.get("snapshot")):
                            break
                snap = await self.get_run(run_id)
            return snap
        raise TimeoutError(f"cancel wait timeout for run_id={run_id}")

    async def list_runs(self, *, status: str | None = None, flow: str | None = None, tag: str | None = None, full: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        return _items(await self._json(_Call("GET", "/runs", params=_filters(status, flow, tag, full, limit))))

    async def list_runs_vnext(
        self,
        *,
        status: str | None = None,
        flow: str | None = None,
        tag: str | None = None,
        full: bool = False,
        limit: int | None = None,
        updated_after: float | None = None,
        cursor: str | None = None,
        workflow_yaml_sha256: str | None = None,
    ) -> dict[str, Any]:
        return _page(await self._json(_list_vnext(status, flow, tag, full, limit, updated_after, cursor, workflow_yaml_sha256)))

    @trio.as_safe_channel
    async def watch_run(self, run_id: str, *, include_records: bool = False, since: float | None = None, timeout_sec: int | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """GET /runs/{id}/watch as a channel of ``{"event", "data", "id"}`` frames.

        ``async with client.watch_run(run_id) as frames: async for frame in frames: ...``; leaving
        the block (even mid-stream) closes the connection.
        """
        call = _watch(run_id, include_records, since, timeout_sec)
        async with self._client.stream("GET", call.path, params=call.params, timeout=_WATCH_TIMEOUT) as response:
            if response.status_code >= 400:
                await response.aread()
                raise PyocoHttpError(response)
            parser = SseParser()
            async for line in response.aiter_lines():
                event = parser.feed(line.rstrip("\r"))
                if event is not None:
                    yield event.to_json()

    async def get_tasks(self, run_id: str) -> dict[str, Any]:
        return await self._json(_Call("GET", f"/runs/{run_id}/tasks"))  # type: ignore[no-any-return]

    async def get_workers(self, *, scope: str | None = None, state: str | None = None, include_hidden: bool | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        return await self._json(_workers(scope, state, include_hidden, limit))  # type: ignore[no-any-return]

    async def patch_worker_hidden(self, worker_id: str, *, hidden: bool) -> dict[str, Any]:
        return await self._json(_Call("PATCH", f"/workers/{worker_id}", json={"hidden": bool(hidden)}))  # type: ignore[no-any-return]

    async def get_metrics(self) -> str:
        return (await self._send(_Call("GET", "/metrics"))).text

    async def list_wheels(self) -> list[dict[str, Any]]:
        return await self._json(_Call("GET", "/wheels"))  # type: ignore[no-any-return]

    async def list_wheel_history(self, *, limit: int | None = None, wheel_name: str | None = None, action: str | None = None) -> list[dict[str, Any]]:
        return await self._json(_wheel_history(limit, wheel_name, action))  # type: ignore[no-any-return]

    async def upload_wheel(self, *, filename: str, data: bytes, replace: bool = True, tags: list[str] | None = None) -> dict[str, Any]:
        return await self._json(_upload_wheel(filename, data, replace, tags))  # type: ignore[no-any-return]

    async def download_wheel(self, wheel_name: str) -> bytes:
        return (await self._send(_Call("GET", _wheel_path(wheel_name)))).content

    async def delete_wheel(self, wheel_name: str) -> dict[str, Any]:
        return await self._json(_Call("DELETE", _wheel_path(wheel_name)))  # type: ignore[no-any-return]
