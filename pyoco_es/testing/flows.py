"""Small workflows for tests and benchmarks: a one-task flow document and its submission through
``POST /runs/yaml`` (pyoco-server's multipart upload)."""

from __future__ import annotations

import json
from collections.abc import Mapping

import httpx


def one_task_flow(task: str, callable_: str, defaults: Mapping[str, object]) -> str:
    """A flow of one task ``task`` calling ``callable_`` (``"module:function"``) with ``defaults``
    (JSON is YAML, so any JSON value is kept as is)."""
    return f"""\
version: 1
flow:
  graph: |
    {task}
  defaults: {json.dumps(dict(defaults))}
tasks:
  {task}: {{callable: "{callable_}"}}
"""


async def submit_yaml(http: httpx.AsyncClient, text: str | bytes, *, flow_name: str = "main") -> str:
    """Submit a flow document; its run id.

    Raises:
        AssertionError: the gateway did not answer 200 (its status and body in the message).
    """
    r = await http.post("/runs/yaml", files={"workflow": ("flow.yaml", text)}, data={"flow_name": flow_name})
    if r.status_code != 200:
        raise AssertionError(f"POST /runs/yaml answered {r.status_code}: {r.text}")
    return str(r.json()["run_id"])
