"""Safe ``graph:`` parsing: pyoco's DSL or the operator form, never ``exec``.

pyoco-server runs a YAML flow's graph string with ``exec``, so its users write Python operator
graphs (``flow >> a >> (b & c) >> d``, ``(a | b) >> c``).  pyoco 0.7+ has a safe parser of its own
(``pyoco.dsl.graph``) with ``switch``/``repeat``/``foreach``/``until``/``pipe`` blocks and
``node: task`` aliases, but no ``&``, ``|``, parentheses or ``flow``.  We accept both:

* **Operator form.**  The text is parsed with :mod:`ast` (never evaluated).  Only names of declared
  tasks, ``flow`` (as the left end of a ``>>`` chain), ``>>``, ``&``, ``|`` and parentheses are
  allowed; several lines are several statements sharing one ``flow`` (as under ``exec``, a later
  ``flow >> x`` continues from the previous chain's tail).  The result is a list of edges, replayed
  on fresh pyoco ``Task`` objects with pyoco's own operators at every build.
* **DSL form.**  Anything else that pyoco's parser accepts (``pyoco.dsl.graph``).

A plain ``a >> b >> c`` means the same in both.  Only tasks the graph names are part of the flow:
a task declared under ``tasks:`` but never named does not run (pyoco-server runs it as an extra
root; this is a deliberate difference).

Everything here runs at submit time (the gateway turns a :class:`ValidationError` into a 422) and
again in the worker's child process, so a bad graph never fails minutes later inside a worker.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Collection, Mapping
from typing import Final

import attrs
from pyoco.core.models import Flow, Task
from pyoco.dsl import graph as pyoco_graph
from pyoco.dsl.syntax import Branch, TaskWrapper

from ..core.errors import ValidationError

FLOW_NAME: Final = "flow"
MAX_GRAPH_NODES: Final = 10_000

_OP_SYMBOLS: Final[dict[type[ast.AST], str]] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.MatMult: "@",
    ast.Div: "/",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.FloorDiv: "//",
}
_ALLOWED_OPS: Final = (ast.RShift, ast.BitAnd, ast.BitOr)
_DSL_HINT: Final = re.compile(r"\b(?:switch|repeat|foreach|until|pipe)\s*\(|[{}]|\b\w+\s*:\s*\w")
_TEMPLATE: Final = re.compile(r"\{\{(.*?)\}\}", re.S)
_ENV_REF: Final = re.compile(r"(?<![\w.])\$?env\.([A-Za-z_]\w*)")  # `$env.X` or a bare `env.X` expression
_PRIVATE_STEP: Final = re.compile(r"\w\._")  # `results.a._x`, `$ctx.__class__`: a walk into private attributes
_ALLOWED_DESCRIPTION: Final = "only declared task names, `flow`, `>>`, `&`, `|` and parentheses are allowed"


@attrs.frozen(kw_only=True)
class GraphPlan:
    """A validated graph: what a build needs, without any pyoco objects (so it can be cached).

    ``task_names`` are the flow's runtime task names in order of appearance (DSL aliases
    included).  ``declared`` are the ``tasks:`` entries the flow uses (what a build must
    import).  ``edges`` and ``any_join`` describe the operator form; ``graph``/``pipes`` are kept
    for the DSL form, which pyoco builds itself.
    """

    form: str  # "operator" | "dsl"
    task_names: tuple[str, ...]
    edges: tuple[tuple[str, str], ...] = ()
    any_join: frozenset[str] = frozenset()
    graph: str = ""
    pipes: Mapping[str, str] = attrs.field(factory=dict)
    declared: tuple[str, ...] = ()


def plan_graph(
    graph: str,
    declared: Collection[str],
    *,
    pipes: Mapping[str, str] | None = None,
    expose_env: Collection[str] = (),
) -> GraphPlan:
    """Parse and validate ``graph`` against the declared task names.

    Raises:
        ValidationError: the message starts with ``graph`` and names the offending token (and its
            line, for the operator form).
    """
    if not graph.strip():
        raise ValidationError("graph: must not be empty")
    try:
        tree: ast.Module | None = ast.parse(graph, mode="exec")
        syntax_error: SyntaxError | None = None
    except SyntaxError as exc:
        tree, syntax_error = None, exc
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        raise ValidationError(f"graph: cannot be parsed ({type(exc).__name__})") from exc
    if tree is not None:
        bad = _first_disallowed(tree, graph)
        if bad is None:
            return _plan_operator(tree, graph, declared)
        try:
            return _plan_dsl(graph, declared, pipes or {}, expose_env)
        except ValidationError:
            raise ValidationError(bad) from None
    if _DSL_HINT.search(graph) or not re.search(r"[&|()]|\bflow\b", graph):
        return _plan_dsl(graph, declared, pipes or {}, expose_env)
    assert syntax_error is not None
    raise ValidationError(_describe_syntax_error(syntax_error))


def build_flow(plan: GraphPlan, make_task: Callable[[str], Task], *, flow_name: str = "main") -> Flow:
    """Build a pyoco ``Flow`` from ``plan`` with fresh ``Task`` objects from ``make_task``.

    ``make_task(name)`` must return a new ``Task`` every call: pyoco stores edges on the Task
    objects, so reusing them across builds leaves stale dependencies behind.

    Raises:
        ValidationError: pyoco refused the graph (should not happen for a validated plan).
    """
    if plan.form == "dsl":
        tasks = {name: make_task(name) for name in plan.declared}
        try:
            return pyoco_graph.build_flow_from_graph(
                graph=plan.graph, tasks=tasks, pipes=dict(plan.pipes), flow_name=flow_name
            )
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"graph: {exc}") from exc
    wrappers = {name: TaskWrapper(make_task(name)) for name in plan.task_names}
    flow = Flow(name=flow_name)
    for name in plan.task_names:
        flow.add_task(wrappers[name].task)
    for source, target in plan.edges:
        if target in plan.any_join:
            Branch([wrappers[source]]) >> wrappers[target]  # sets trigger_policy="ANY"
        else:
            wrappers[source] >> wrappers[target]
    return flow


# -- operator form ------------------------------------------------------------------------------


def _where(node: ast.AST) -> str:
    line = getattr(node, "lineno", None)
    col = getattr(node, "col_offset", None)
    if line is None:
        return ""
    return f" at line {line}, column {(col or 0) + 1}"


def _segment(text: str, node: ast.AST) -> str:
    seg = ast.get_source_segment(text, node) or type(node).__name__
    seg = " ".join(seg.split())
    return seg if len(seg) <= 60 else seg[:57] + "..."


def _first_disallowed(tree: ast.Module, text: str) -> str | None:
    """Describe the first node outside the operator grammar, or None when all are allowed."""
    count = 0
    for node in ast.walk(tree):
        count += 1
        if count > MAX_GRAPH_NODES:
            return f"graph: too large (more than {MAX_GRAPH_NODES} syntax nodes)"
        if isinstance(node, (ast.Module, ast.Expr, ast.Load)) or isinstance(node, _ALLOWED_OPS):
            continue
        if isinstance(node, ast.Name):
            continue
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, _ALLOWED_OPS):
                continue
            symbol = _OP_SYMBOLS.get(type(node.op), type(node.op).__name__)
            return f"graph: operator `{symbol}`{_where(node)} is not allowed: {_ALLOWED_DESCRIPTION}"
        if isinstance(node, ast.operator):
            continue  # reported with its BinOp
        if isinstance(node, ast.stmt):
            return (
                f"graph: `{_segment(text, node)}`{_where(node)} is a statement "
                f"({type(node).__name__}): {_ALLOWED_DESCRIPTION}"
            )
        kind = {
            ast.Call: "a function call",
            ast.Attribute: "an attribute access",
            ast.Constant: "a literal",
            ast.Subscript: "a subscript",
        }.get(type(node), type(node).__name__)
        return f"graph: `{_segment(text, node)}`{_where(node)} is {kind}: {_ALLOWED_DESCRIPTION}"
    return None


@attrs.define
class _Frag:
    heads: list[str]
    tails: list[str]
    or_join: bool = False
    is_flow: bool = False


def _dedupe(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _plan_operator(tree: ast.Module, text: str, declared: Collection[str]) -> GraphPlan:
    declared_set = set(declared)
    used: dict[str, None] = {}
    edges: dict[tuple[str, str], None] = {}
    any_join: set[str] = set()
    flow_tail: list[str] = []

    def ev(node: ast.AST) -> _Frag:
        if isinstance(node, ast.Name):
            if node.id == FLOW_NAME:
                return _Frag([], list(flow_tail), is_flow=True)
            if node.id not in declared_set:
                known = ", ".join(sorted(declared_set)) or "none"
                raise ValidationError(
                    f"graph: unknown task '{node.id}'{_where(node)} (declared tasks: {known})"
                )
            used.setdefault(node.id)
            return _Frag([node.id], [node.id])
        assert isinstance(node, ast.BinOp)
        left, right = ev(node.left), ev(node.right)
        if right.is_flow:
            raise ValidationError(
                f"graph: `flow`{_where(node.right)} may only start a `>>` chain (`flow >> a >> b`)"
            )
        if isinstance(node.op, ast.RShift):
            for tail in left.tails:
                for head in right.heads:
                    if tail == head:
                        raise ValidationError(f"graph: task '{tail}' depends on itself{_where(node)}")
                    edges.setdefault((tail, head))
                    if left.or_join:
                        any_join.add(head)
            heads = left.heads if (left.heads or left.is_flow) else right.heads
            tails = right.tails or left.tails
            return _Frag(_dedupe(heads), _dedupe(tails), right.or_join, left.is_flow)
        if left.is_flow:
            sym = "&" if isinstance(node.op, ast.BitAnd) else "|"
            raise ValidationError(
                f"graph: `{sym}`{_where(node)} applied to a `flow >> ...` chain; `&` and `|` bind "
                f"more loosely than `>>` in Python, so write `flow >> a >> (b {sym} c)`"
            )
        return _Frag(
            _dedupe(left.heads + right.heads),
            _dedupe(left.tails + right.tails),
            or_join=isinstance(node.op, ast.BitOr),
        )

    for stmt in tree.body:
        assert isinstance(stmt, ast.Expr)
        frag = ev(stmt.value)
        if frag.is_flow:
            flow_tail = frag.tails
    if not used:
        raise ValidationError("graph: names no task")
    _check_acyclic(list(used), list(edges))
    return GraphPlan(
        form="operator",
        task_names=tuple(used),
        declared=tuple(used),
        edges=tuple(edges),
        any_join=frozenset(any_join),
        graph=text,
    )


def _check_acyclic(names: list[str], edges: list[tuple[str, str]]) -> None:
    out: dict[str, list[str]] = {n: [] for n in names}
    for a, b in edges:
        out[a].append(b)
    state: dict[str, int] = {}
    for root in names:
        if state.get(root):
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        state[root] = 1
        while stack:
            node, i = stack[-1]
            if i < len(out[node]):
                stack[-1] = (node, i + 1)
                nxt = out[node][i]
                if state.get(nxt) == 1:
                    cycle = path[path.index(nxt) :] + [nxt]
                    raise ValidationError(f"graph: cycle {' >> '.join(cycle)}")
                if not state.get(nxt):
                    state[nxt] = 1
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                state[node] = 2
                stack.pop()
                path.pop()


def _describe_syntax_error(exc: SyntaxError) -> str:
    where = f" at line {exc.lineno}, column {exc.offset}" if exc.lineno else ""
    near = ""
    if exc.text and exc.offset:
        line = exc.text.rstrip("\n")
        token = line[max(0, exc.offset - 1) :].split()[0] if line[max(0, exc.offset - 1) :].split() else ""
        if token:
            near = f" near `{token[:40]}`"
    return f"graph: invalid operator expression{where}{near} ({exc.msg}); {_ALLOWED_DESCRIPTION}"


# -- pyoco DSL form -----------------------------------------------------------------------------


def _placeholder(name: str) -> Callable[[], None]:
    def placeholder() -> None:
        return None

    placeholder.pyoco_es_base = name  # type: ignore[attr-defined]
    return placeholder


def _plan_dsl(
    graph: str, declared: Collection[str], pipes: Mapping[str, str], expose_env: Collection[str]
) -> GraphPlan:
    try:
        parsed = pyoco_graph.parse_graph(graph)
        resolved = pyoco_graph.resolve_pipe_refs(parsed, dict(pipes))
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValidationError(f"graph: {exc}") from exc
    report = pyoco_graph.validate_graph_terms(resolved)
    if report.errors:
        raise ValidationError(f"graph: {report.errors[0]}")
    _check_templates(graph, pipes, expose_env)
    dummy = {name: Task(func=_placeholder(name), name=name) for name in declared}
    try:
        flow = pyoco_graph.build_flow_from_graph(graph=graph, tasks=dummy, pipes=dict(pipes), flow_name="check")
    except (ValueError, TypeError, KeyError) as exc:
        msg = str(exc)
        if msg.startswith("Task not found: "):
            name = msg[len("Task not found: ") :]
            known = ", ".join(sorted(declared)) or "none"
            raise ValidationError(f"graph: unknown task '{name}' (declared tasks: {known})") from exc
        raise ValidationError(f"graph: {msg}") from exc
    names = sorted((t.name for t in flow.tasks), key=lambda n: (_first_pos(graph, n), n))
    if not names:
        raise ValidationError("graph: names no task")
    bases = {t.func.pyoco_es_base for t in flow.tasks}  # type: ignore[attr-defined]
    used = tuple(name for name in declared if name in bases)
    return GraphPlan(form="dsl", task_names=tuple(names), graph=graph, pipes=dict(pipes), declared=used)


def _first_pos(text: str, name: str) -> int:
    m = re.search(rf"\b{re.escape(name)}\b", text)
    return m.start() if m else len(text)


def _check_templates(graph: str, pipes: Mapping[str, str], expose_env: Collection[str]) -> None:
    """pyoco evaluates ``{{...}}`` (and bare ``switch``/``until``/``foreach`` expressions, where
    ``env.NAME`` means ``$env.NAME``) with a restricted ``eval`` that can read any environment
    variable and walk attributes; allow only ``$env`` names listed in ``runtime.expose_env`` (the
    worker then checks them against its own ``--expose-env``), no private or dunder steps and no
    ``**``."""
    allowed = set(expose_env)
    for source in (graph, *pipes.values()):
        for m in _TEMPLATE.finditer(source):
            expr = m.group(1)
            if "__" in expr:
                raise ValidationError(f"graph: expression `{{{{{expr.strip()}}}}}` may not use `__` names")
            if "**" in expr:
                raise ValidationError(f"graph: expression `{{{{{expr.strip()}}}}}` may not use `**`")
        step = _PRIVATE_STEP.search(source)
        if step is not None:
            raise ValidationError(f"graph: `{step.group(0)}...` may not read private (`_`) attributes")
        for env in _ENV_REF.finditer(source):
            if env.group(1) not in allowed:
                raise ValidationError(f"graph: `$env.{env.group(1)}` is not listed in runtime.expose_env")


__all__ = ["GraphPlan", "build_flow", "plan_graph"]
