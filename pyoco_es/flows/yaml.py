"""Strict ``flow.yaml`` parsing (contract §1.3), shared by the gateway and the worker.

One function, :func:`parse_workflow_yaml`, turns the uploaded bytes into a :class:`WorkflowDoc` or
raises an error whose message names the exact problem (``tasks.a.callable: ...``, with the YAML
line when known).  The graph is validated here too (:mod:`pyoco_es.flows.graph`), so a bad graph
is a 422 at submit time.

Hardening beyond pyoco-server:

* ``yaml.SafeLoader`` only, and every node's tag must be a plain YAML type: ``!!python/...`` and
  other custom tags, ``!!binary``, ``!!set`` are refused; timestamps stay strings (params must be
  JSON).
* Aliases are capped, and the document's *expanded* size is bounded, so an alias bomb
  ("billion laughs") is refused before anything is built.  Nesting depth is capped.
* Duplicate mapping keys and non-string keys are refused (PyYAML would silently keep the last
  one / produce ``True`` for ``on:``).
* Non-finite floats are refused (they are not JSON).
* ``$env.NAME`` inputs only for names listed in ``runtime.expose_env``.
* ``callable`` must look like ``module.path:attr`` of public names (no part may start with ``_``:
  no ``__builtins__``/``__globals__`` walks).  Whether the module may be imported, and whether
  the object it names is defined there, is the worker's decision (``--allow-module``, see
  :mod:`pyoco_es.worker.trust`), not the document's.
* ``$node.<task>.output...`` inputs may not walk private (``_``) attributes either.

``pipes:`` (pyoco 0.7+) is accepted as an extension: a mapping of pipe name to graph text.

Results are cached by sha256 of the raw bytes (parsing is pure), so resubmitting the same file
costs a hash and a dict lookup.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import attrs
import yaml

from ..core.errors import PayloadTooLarge, ValidationError
from .graph import FLOW_NAME, GraphPlan, plan_graph
from .policy import RETRY_KEYS, TaskPolicy, check_timeout, parse_policy

MAX_ALIASES: Final = 100
MAX_DEPTH: Final = 64
MAX_EXPANDED_NODES: Final = 100_000
CACHE_SIZE: Final = 512

FORBIDDEN_TOP: Final = ("flows", "discovery")
TOP_KEYS: Final = ("version", "flow", "tasks", "runtime", "pipes")
FLOW_KEYS: Final = ("graph", "defaults")
TASK_KEYS: Final = ("callable", "inputs", "outputs", *RETRY_KEYS)  # retries...: a pyoco-es extension
RUNTIME_KEYS: Final = ("expose_env", "timeout_sec")

TASK_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_INPUT_RE: Final = re.compile(r"^\$env\.(.*)$")
ENV_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PUBLIC_NAME: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def callable_path_problem(path: str) -> str | None:
    """Why ``path`` can never be a valid ``callable:`` (None if its shape is fine).  The gateway
    answers 422 for it; the worker checks it again before importing anything."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        return "must be `module.path:function`"
    for part in (*module.split("."), *attr.split(".")):
        if not part:
            return "must be `module.path:function` (an empty name between dots)"
        if part.startswith("_"):
            return f"`{part}`: every part must be a public name (no leading `_`)"
        if not _PUBLIC_NAME.fullmatch(part):
            return f"`{part}`: names may only contain letters, digits and `_`"
    return None

_PLAIN_TAGS: Final = frozenset(
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq")
)
_TIMESTAMP_TAG: Final = "tag:yaml.org,2002:timestamp"


@attrs.frozen(kw_only=True)
class TaskSpec:
    """One ``tasks.<name>`` entry."""

    name: str
    callable: str
    inputs: dict[str, Any] = attrs.field(factory=dict)
    outputs: tuple[str, ...] = ()
    policy: TaskPolicy | None = None  # retries and timeout (:mod:`.policy`)

    @property
    def module(self) -> str:
        return self.callable.split(":", 1)[0]


@attrs.frozen(kw_only=True, eq=False)
class WorkflowDoc:
    """A validated ``flow.yaml``.  Treat it as immutable (it may be shared through the cache)."""

    sha256: str
    size: int
    text: str
    version: int
    graph: str
    flow_defaults: dict[str, Any]
    tasks: Mapping[str, TaskSpec]
    expose_env: tuple[str, ...] = ()
    pipes: Mapping[str, str] = attrs.field(factory=dict)
    plan: GraphPlan
    timeout_sec: float | None = None  # runtime.timeout_sec: the run's deadline unless the request sets one

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks the flow runs (graph order), as ``run.claimed`` lists them."""
        return self.plan.task_names


_cache: OrderedDict[str, WorkflowDoc] = OrderedDict()


def parse_workflow_yaml(raw: bytes, *, max_bytes: int) -> WorkflowDoc:
    """Validate an uploaded ``flow.yaml``.

    Raises:
        PayloadTooLarge: ``raw`` is longer than ``max_bytes`` (when ``max_bytes > 0``).
        ValidationError: anything else; the message names the key path (and line) at fault.
    """
    if max_bytes > 0 and len(raw) > max_bytes:
        raise PayloadTooLarge(f"workflow too large: {len(raw)} bytes (limit {max_bytes})")
    sha = hashlib.sha256(raw).hexdigest()
    hit = _cache.get(sha)
    if hit is not None:
        _cache.move_to_end(sha)
        return attrs.evolve(hit, flow_defaults=copy.deepcopy(hit.flow_defaults))
    doc = _parse(raw, sha)
    _cache[sha] = doc
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return attrs.evolve(doc, flow_defaults=copy.deepcopy(doc.flow_defaults))


# -- loading ------------------------------------------------------------------------------------


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """libyaml's parser (when available) with PyYAML's safe constructor; the document is composed
    by :func:`_compose`, which limits aliases and nesting as it goes."""


def _line(mark: Any) -> str:  # noqa: ANN401
    return f" (line {mark.line + 1})" if mark is not None else ""


def _compose(loader: Any) -> yaml.Node | None:  # noqa: ANN401, C901
    """Build the node graph from parser events, iteratively (no recursion, so no stack limit to
    hit), counting aliases and refusing nesting deeper than ``MAX_DEPTH`` and recursive aliases."""
    loader.get_event()  # StreamStart
    if loader.check_event(yaml.StreamEndEvent):
        return None
    loader.get_event()  # DocumentStart
    anchors: dict[str, yaml.Node] = {}
    stack: list[list[Any]] = []  # [collection node, pending mapping key]
    open_nodes: set[int] = set()
    root: yaml.Node | None = None
    aliases = 0

    def attach(node: yaml.Node) -> None:
        nonlocal root
        if not stack:
            root = node
            return
        top = stack[-1]
        parent = top[0]
        if isinstance(parent, yaml.SequenceNode):
            parent.value.append(node)
        elif top[1] is None:
            top[1] = node
        else:
            parent.value.append((top[1], node))
            top[1] = None

    def remember(anchor: str | None, node: yaml.Node) -> None:
        if anchor is not None:
            anchors[anchor] = node

    while True:
        event = loader.get_event()
        if isinstance(event, yaml.DocumentEndEvent):
            break
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise ValidationError(f"yaml: too many aliases (more than {MAX_ALIASES}){_line(event.start_mark)}")
            node = anchors.get(event.anchor)
            if node is None:
                raise ValidationError(f"yaml: undefined alias `{event.anchor}`{_line(event.start_mark)}")
            if id(node) in open_nodes:
                raise ValidationError(f"yaml: recursive alias `{event.anchor}`{_line(event.start_mark)}")
            attach(node)
        elif isinstance(event, yaml.ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
            node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
            remember(event.anchor, node)
            attach(node)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise ValidationError(f"yaml: nesting deeper than {MAX_DEPTH} levels{_line(event.start_mark)}")
            kind = yaml.SequenceNode if isinstance(event, yaml.SequenceStartEvent) else yaml.MappingNode
            tag = event.tag
            if tag is None or tag == "!":
                tag = loader.resolve(kind, None, event.implicit)
            node = kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
            remember(event.anchor, node)
            attach(node)
            stack.append([node, None])
            open_nodes.add(id(node))
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            node = stack.pop()[0]
            node.end_mark = event.end_mark
            open_nodes.discard(id(node))
    if not loader.check_event(yaml.StreamEndEvent):
        event = loader.peek_event()
        raise ValidationError(f"yaml: expected a single document{_line(event.start_mark)}")
    return root


def _load(text: str) -> tuple[Any, Any]:
    loader = _Loader(text)
    try:
        node = _compose(loader)
        if node is None:
            raise ValidationError("yaml: the document is empty")
        _check_nodes(node)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise ValidationError(f"yaml: {problem}{_line(mark)}") from exc
    except yaml.YAMLError as exc:
        raise ValidationError(f"yaml: {exc}") from exc
    except RecursionError as exc:
        raise ValidationError(f"yaml: nesting too deep (more than {MAX_DEPTH} levels)") from exc
    except ValueError as exc:  # a scalar Python cannot convert, e.g. an integer of >4300 digits (issue 10)
        raise ValidationError(f"yaml: a value cannot be converted: {str(exc)[:120]}") from exc
    finally:
        loader.dispose()
    return data, node


def _check_nodes(root: yaml.Node) -> None:
    """Tags, duplicate / non-string keys and the expanded size, before constructing anything."""
    sizes: dict[int, int] = {}

    def expanded(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > MAX_DEPTH:
            raise ValidationError(f"yaml: nesting deeper than {MAX_DEPTH} levels{_line(node.start_mark)}")
        sizes[key] = 1  # cycles (recursive aliases) count once and are refused below
        tag = node.tag
        if tag not in _PLAIN_TAGS and tag != _TIMESTAMP_TAG:
            raise ValidationError(f"yaml: tag `{tag}` is not allowed{_line(node.start_mark)}")
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                if k.tag == "tag:yaml.org,2002:merge":
                    raise ValidationError(f"yaml: merge keys (`<<`) are not allowed{_line(k.start_mark)}")
                if not isinstance(k, yaml.ScalarNode) or k.tag != "tag:yaml.org,2002:str":
                    shown = k.value if isinstance(k, yaml.ScalarNode) else "<collection>"
                    raise ValidationError(
                        f"yaml: mapping key `{shown}` must be a string (quote it){_line(k.start_mark)}"
                    )
                if k.value in seen:
                    raise ValidationError(f"yaml: duplicate key `{k.value}`{_line(k.start_mark)}")
                seen.add(k.value)
                total += expanded(k, depth + 1) + expanded(v, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += expanded(item, depth + 1)
        if total > MAX_EXPANDED_NODES:
            raise ValidationError(
                f"yaml: the document expands to more than {MAX_EXPANDED_NODES} nodes (alias bomb?)"
                f"{_line(node.start_mark)}"
            )
        sizes[key] = total
        return total

    expanded(root, 0)


# Timestamps stay strings: params and inputs must be JSON.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != _TIMESTAMP_TAG]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# -- schema -------------------------------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _key_lines(node: yaml.Node | None) -> dict[str, tuple[int, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: (k.start_mark.line + 1, v) for k, v in node.value}


def _at(path: str, lines: dict[str, tuple[int, yaml.Node]], key: str) -> str:
    info = lines.get(key)
    return f"{path} (line {info[0]})" if info else path


def _unknown(path: str, data: Mapping[str, Any], allowed: tuple[str, ...], lines: dict[str, tuple[int, yaml.Node]]) -> None:
    for key in data:
        if key not in allowed:
            where = _at(f"{path}.{key}" if path else key, lines, key)
            raise ValidationError(f"{where}: unknown key (allowed: {', '.join(allowed)})")


def _json_safe(value: Any, path: str) -> None:  # noqa: ANN401
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"{path}: {value} is not a JSON number")
    if isinstance(value, dict):
        for k, v in value.items():
            _json_safe(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _json_safe(v, f"{path}[{i}]")


def _runtime(data: Mapping[str, Any], top: dict[str, tuple[int, yaml.Node]]) -> tuple[tuple[str, ...], float | None]:
    """``runtime:``: the environment names the document may read, and the run's deadline."""
    runtime = data.get("runtime", {}) or {}
    runtime_lines = _key_lines(top["runtime"][1]) if "runtime" in top else {}
    if not isinstance(runtime, dict):
        raise ValidationError(f"{_at('runtime', top, 'runtime')}: must be a mapping, not {_type_name(runtime)}")
    _unknown("runtime", runtime, RUNTIME_KEYS, runtime_lines)
    expose = runtime.get("expose_env", []) or []
    if not isinstance(expose, list) or not all(isinstance(x, str) for x in expose):
        raise ValidationError(f"{_at('runtime.expose_env', runtime_lines, 'expose_env')}: must be a list of strings")
    for name in expose:
        if not ENV_NAME_RE.fullmatch(name):
            raise ValidationError(
                f"{_at('runtime.expose_env', runtime_lines, 'expose_env')}: {name[:100]!r} is not an environment "
                f"variable name (letters, digits, _)"
            )
    expose_env = tuple(expose)
    run_timeout = runtime.get("timeout_sec")
    if run_timeout is not None:
        run_timeout = check_timeout(run_timeout, _at("runtime.timeout_sec", runtime_lines, "timeout_sec"))
    return expose_env, run_timeout


def _parse(raw: bytes, sha: str) -> WorkflowDoc:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"yaml: not valid UTF-8 (byte {exc.start})") from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise ValidationError("yaml: the document is empty")
    if "\x00" in text:
        raise ValidationError("yaml: contains a NUL character")
    data, root = _load(text)
    if not isinstance(data, dict):
        raise ValidationError(f"yaml: the root must be a mapping, not {_type_name(data)}")
    top = _key_lines(root)
    for key in FORBIDDEN_TOP:
        if key in data:
            hint = "use a single `flow:`" if key == "flows" else "list task callables under `tasks:`"
            raise ValidationError(f"{_at(key, top, key)}: not supported in flow.yaml ({hint})")
    _unknown("", data, TOP_KEYS, top)

    version_raw = data.get("version", 1)
    if isinstance(version_raw, bool) or not isinstance(version_raw, (int, str)):
        raise ValidationError(f"{_at('version', top, 'version')}: must be an integer")
    try:
        version = int(version_raw)
    except ValueError as exc:
        raise ValidationError(f"{_at('version', top, 'version')}: must be an integer") from exc

    if "flow" not in data:
        raise ValidationError("flow: required")
    flow = data["flow"]
    if not isinstance(flow, dict):
        raise ValidationError(f"{_at('flow', top, 'flow')}: must be a mapping, not {_type_name(flow)}")
    flow_lines = _key_lines(top["flow"][1]) if "flow" in top else {}
    _unknown("flow", flow, FLOW_KEYS, flow_lines)
    graph = flow.get("graph")
    if not isinstance(graph, str) or not graph.strip():
        raise ValidationError(f"{_at('flow.graph', flow_lines, 'graph')}: required, a non-empty string")
    defaults = flow.get("defaults", {})
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, dict):
        raise ValidationError(f"{_at('flow.defaults', flow_lines, 'defaults')}: must be a mapping, not {_type_name(defaults)}")
    _json_safe(defaults, "flow.defaults")

    expose_env, run_timeout = _runtime(data, top)

    pipes = data.get("pipes", {}) or {}
    if not isinstance(pipes, dict) or not all(isinstance(v, str) for v in pipes.values()):
        raise ValidationError(f"{_at('pipes', top, 'pipes')}: must map pipe names to graph strings")

    tasks_raw = data.get("tasks", {}) or {}
    if not isinstance(tasks_raw, dict):
        raise ValidationError(f"{_at('tasks', top, 'tasks')}: must be a mapping, not {_type_name(tasks_raw)}")
    task_lines = _key_lines(top["tasks"][1]) if "tasks" in top else {}
    tasks: dict[str, TaskSpec] = {}
    for name, spec in tasks_raw.items():
        path = f"tasks.{name}"
        if not TASK_NAME_RE.fullmatch(name) or name == FLOW_NAME:
            raise ValidationError(
                f"{_at(path, task_lines, name)}: task names must be identifiers (letters, digits, _) "
                f"and not `{FLOW_NAME}`"
            )
        if not isinstance(spec, dict):
            raise ValidationError(f"{_at(path, task_lines, name)}: must be a mapping, not {_type_name(spec)}")
        spec_lines = _key_lines(task_lines[name][1]) if name in task_lines else {}
        _unknown(path, spec, TASK_KEYS, spec_lines)
        fn = spec.get("callable")
        if fn is None:
            raise ValidationError(f"{_at(path, task_lines, name)}: `callable` is required (`module:function`)")
        problem = callable_path_problem(fn.strip()) if isinstance(fn, str) else "must be `module.path:function`"
        if problem is not None:
            raise ValidationError(f"{_at(path + '.callable', spec_lines, 'callable')}: {problem}, got {fn!r}"[:400])
        inputs = spec.get("inputs", {}) or {}
        if not isinstance(inputs, dict):
            raise ValidationError(f"{_at(path + '.inputs', spec_lines, 'inputs')}: must be a mapping, not {_type_name(inputs)}")
        for key, value in inputs.items():
            _json_safe(value, f"{path}.inputs.{key}")
            if isinstance(value, str):
                m = ENV_INPUT_RE.fullmatch(value)
                if m and m.group(1) not in expose_env:
                    raise ValidationError(
                        f"{path}.inputs.{key}: `{value}` reads an environment variable that is not listed in "
                        f"runtime.expose_env"
                    )
                if value.startswith("$node.") and any(p.startswith("_") for p in value.split(".")[3:]):
                    raise ValidationError(f"{path}.inputs.{key}: `{value}` may not read private (`_`) attributes")
        outputs = spec.get("outputs", []) or []
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise ValidationError(f"{_at(path + '.outputs', spec_lines, 'outputs')}: must be a list of strings")
        policy = parse_policy(spec, lambda key, p=path, lines=spec_lines: _at(f"{p}.{key}", lines, key))
        tasks[name] = TaskSpec(name=name, callable=fn.strip(), inputs=inputs, outputs=tuple(outputs), policy=policy)

    plan = plan_graph(graph, list(tasks), pipes=pipes, expose_env=expose_env)
    return WorkflowDoc(
        sha256=sha,
        size=len(raw),
        text=text,
        version=version,
        graph=graph,
        flow_defaults=defaults,
        tasks=tasks,
        expose_env=expose_env,
        pipes=pipes,
        plan=plan,
        timeout_sec=run_timeout,
    )


__all__ = ["TaskSpec", "WorkflowDoc", "parse_workflow_yaml"]
