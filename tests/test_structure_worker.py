"""The worker's rooms stay small and its arrows point down (issue 12), measured by an ast walk."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyoco_es"
WORKER_FILES = sorted((PACKAGE / "worker").glob("*.py"))
SHELLS = ("gateway", "conductor", "worker")


@pytest.mark.parametrize("path", WORKER_FILES, ids=lambda p: p.name)
def test_no_worker_module_function_or_class_outgrows_its_room(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= 600, f"{path.name} is over 600 lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = 400 if isinstance(node, ast.ClassDef) else 120
            assert size <= limit, f"{path.name}: {node.name} is {size} lines (limit {limit})"


def _imported_shells(path: Path) -> set[str]:
    """The shell packages ``path`` imports (relative or absolute), other than its own."""
    own = path.parent.name
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 2 and parts[0] in SHELLS:
                out.add(parts[0])
            elif node.level == 0 and parts[0] == "pyoco_es" and len(parts) > 1 and parts[1] in SHELLS:
                out.add(parts[1])
    return out - {own}


@pytest.mark.parametrize("shell", SHELLS)
def test_the_worker_and_the_other_shells_never_import_each_other(shell: str) -> None:
    """Shells import the core's types (the work item, the worker record), never each other."""
    others = {s for s in SHELLS if s != shell} if shell == "worker" else {"worker"}
    for path in sorted((PACKAGE / shell).glob("*.py")):
        assert not _imported_shells(path) & others, f"{path.relative_to(PACKAGE)} imports {_imported_shells(path) & others}"
