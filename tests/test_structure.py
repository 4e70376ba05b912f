"""Issue 12's structure rules, measured by an ``ast`` walk over ``pyoco_es/`` so they stay true.

No function over 120 lines, no class over 400, no module over 600; no shell package (gateway,
conductor, worker) imports another shell (the CLI may: it wires them); no import cycle between
modules (imports inside functions count: they still tie the modules together).

Known exceptions are listed once, in ``ALLOWED`` below, with the size measured when they were
listed and the issue that removes them.  An entry may only shrink: a listed item that grows past
its measure fails, and an entry that no longer applies fails too, so the list is pruned as the
splits merge.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyoco_es"
MAX_FUNCTION, MAX_CLASS, MAX_MODULE = 120, 400, 600
SHELLS = ("gateway", "conductor", "worker")

# Known exceptions: (kind, dotted name) -> (lines measured, the issue that removes it).
# kind is "function", "class", "module", "shell-import" (importer -> imported) or "cycle"
# (the sorted modules of one cycle, joined by " <-> ").
ALLOWED: dict[tuple[str, str], tuple[int, str]] = {}


def _modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text(), filename=str(path))


MODULES = {name: (path, tree) for name, path, tree in _modules()}


def _sizes() -> Iterator[tuple[str, str, int]]:
    """(kind, dotted name, lines) for every module, class and function (methods and nested
    functions named through their holders)."""
    for name, (path, tree) in MODULES.items():
        yield "module", name, len(path.read_text().splitlines())

        def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str, int]]:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    kind = "class" if isinstance(child, ast.ClassDef) else "function"
                    assert child.end_lineno is not None
                    yield kind, f"{prefix}.{child.name}", child.end_lineno - child.lineno + 1
                    yield from visit(child, f"{prefix}.{child.name}")
                else:
                    yield from visit(child, prefix)

        yield from visit(tree, name)


def _imports(name: str, tree: ast.Module) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its body."""
    is_package = MODULES[name][0].name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target in MODULES:
                found.add(target)
    return found


GRAPH = {name: _imports(name, tree) for name, (_, tree) in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    return found


def _shell(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SHELLS else None


def _violations() -> dict[tuple[str, str], int]:
    limits = {"function": MAX_FUNCTION, "class": MAX_CLASS, "module": MAX_MODULE}
    found = {(kind, name): size for kind, name, size in _sizes() if size > limits[kind]}
    for importer, imported in GRAPH.items():
        for target in imported:
            if _shell(importer) and _shell(target) and _shell(importer) != _shell(target):
                found["shell-import", f"{importer} -> {target}"] = 0
    for component in _cycles():
        found["cycle", " <-> ".join(component)] = len(component)
    return found


VIOLATIONS = _violations()


@pytest.mark.parametrize("kind", ["function", "class", "module", "shell-import", "cycle"])
def test_nothing_breaks_the_structure_rules_beyond_the_allow_list(kind: str) -> None:
    new = {key: size for key, size in VIOLATIONS.items() if key[0] == kind and key not in ALLOWED}
    assert not new, f"new {kind} violations (split them, or list them in ALLOWED with an issue): {new}"
    grown = {key: (size, ALLOWED[key][0]) for key, size in VIOLATIONS.items() if key[0] == kind and key in ALLOWED and size > ALLOWED[key][0]}
    assert not grown, f"{kind}s listed in ALLOWED grew past their measure (now, listed): {grown}"


def test_the_allow_list_lists_only_what_still_breaks_a_rule() -> None:
    stale = sorted(key for key in ALLOWED if key not in VIOLATIONS)
    assert not stale, f"these no longer break a rule: remove them from ALLOWED: {stale}"


def test_the_walk_sees_the_package() -> None:
    """The measures read real code (a wrong path would make every rule pass vacuously)."""
    assert "pyoco_es.core.fold" in MODULES and "pyoco_es.core.events" in GRAPH["pyoco_es.core.fold"]


@pytest.mark.parametrize("port", ["EventLog", "SnapshotStore", "WorkQueue", "ProcessRecorder"])
def test_the_nats_client_implements_every_port(port: str) -> None:
    """Every method a port names exists on ``NatsClient`` with the same parameters (names,
    kinds, defaults), so a shell typed against the port runs on the adapter."""
    import inspect

    from pyoco_es import ports
    from pyoco_es.nats.client import NatsClient

    protocol = getattr(ports, port)
    members = [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    assert members
    for name in members:
        want = inspect.signature(getattr(protocol, name)).parameters
        have = inspect.signature(getattr(NatsClient, name)).parameters
        assert [(p.name, p.kind, p.default) for p in have.values()] == [(p.name, p.kind, p.default) for p in want.values()], name

