"""The gateway stays in rooms a newcomer can hold in mind (issue 12): no function over 120
lines, no class over 400, no module over 600, and no import cycle among its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pyoco_es.gateway

GATEWAY = Path(pyoco_es.gateway.__file__).parent
MODULES = sorted(GATEWAY.glob("*.py"))


def _span(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined, no-any-return]


def test_no_function_class_or_module_is_too_big() -> None:
    too_big = []
    for path in MODULES:
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > 600:
            too_big.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _span(node) > 120:
                too_big.append(f"{path.name}: {node.name}() {_span(node)} lines")
            elif isinstance(node, ast.ClassDef) and _span(node) > 400:
                too_big.append(f"{path.name}: class {node.name} {_span(node)} lines")
    assert too_big == []


def test_no_import_cycle_among_gateway_modules() -> None:
    imports: dict[str, set[str]] = {}
    for path in MODULES:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    names.add(node.module.split(".")[0])
                else:
                    names.update(alias.name for alias in node.names)
        imports[path.stem] = {n for n in names if (GATEWAY / f"{n}.py").exists()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in imports.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert [m for m in imports if reaches(m, m, {m})] == []
