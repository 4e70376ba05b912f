"""An example ``--flow-resolver``: named flows built in Python (``examples.flows:resolve``)."""

from __future__ import annotations

from pyoco.core.models import Flow, Task
from pyoco.dsl.syntax import TaskWrapper

from . import tasks


def _hello() -> Flow:
    # Fresh Task objects per build: pyoco stores dependency edges on them.
    add_one = TaskWrapper(Task(func=tasks.add_one, name="add_one"))
    to_text = TaskWrapper(Task(func=tasks.to_text, name="to_text", inputs={"value": "$node.add_one.output"}))
    flow = Flow(name="hello")
    flow >> add_one >> to_text
    return flow


def _sleepy() -> Flow:
    flow = Flow(name="sleepy")
    flow >> TaskWrapper(Task(func=tasks.ignore_cancel, name="sleep"))
    return flow


FLOWS = {"hello": _hello, "sleepy": _sleepy}


def resolve(name: str) -> Flow:
    """Raise KeyError for unknown flows (the worker turns that into ``flow_not_found``)."""
    return FLOWS[name]()
