"""What a submitted document may reach in a run process: callables and environment names.

Everything in a request is untrusted (DESIGN.md, "Trust boundary"; issue 10 items 1 and 2).  The
worker operator decides two lists, and this module enforces them:

* ``--allow-module PREFIX``: a YAML ``callable:`` may only resolve to an object *defined* in an
  allowed module.  The object itself is checked (its ``__module__``; for classes every base, for
  bound methods the function and its owner, for ``functools.partial`` the wrapped function), not
  the dotted path that reached it, so ``examples.tasks:os.system`` and a re-export
  (``from os import system`` in an allowed module) are refused.  Every step of the path must be a
  public name (no leading ``_``: that rules out ``__globals__``/``__builtins__`` walks and the
  usual ``import os as _os`` aliases), and a step may not pass through a module outside the
  allowed prefixes.  :data:`NEVER_MODULES` can never be allowed, even when named; ``*`` allows any
  module except those and the standard library.
* ``--expose-env NAME``: the only environment names a YAML run may read (``$env.NAME`` inputs and
  templates).  A document asking for another name fails the run, naming the variable.

Named flows from a ``--flow-resolver`` are the operator's code and are not checked here.  No
trio, no NATS: the run process (:mod:`pyoco_es.worker.child`) imports this.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
import types
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Final

from ..flows.yaml import ENV_NAME_RE, callable_path_problem

ALLOW_ALL: Final = "*"

# Modules whose functions run commands, load or evaluate code, deserialize objects, or reach into
# the interpreter, the file system or the network.  A prefix also covers its submodules.
NEVER_MODULES: Final = frozenset(
    {
        "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess",
        "_posixsubprocess", "importlib", "imp", "zipimport", "pkgutil", "runpy", "site", "ctypes",
        "_ctypes", "cffi", "pickle", "_pickle", "cPickle", "copyreg", "shelve", "marshal", "dill",
        "cloudpickle", "jsonpickle", "joblib", "yaml", "shutil", "pty", "tty", "termios", "socket",
        "_socket", "ssl", "multiprocessing", "_multiprocessing", "concurrent", "threading",
        "_thread", "asyncio", "signal", "_signal", "resource", "fcntl", "mmap", "code", "codeop",
        "pdb", "bdb", "timeit", "trace", "profile", "cProfile", "pydoc", "webbrowser", "gc",
        "inspect", "io", "_io", "pathlib", "tempfile", "glob", "fileinput", "tarfile", "zipfile",
        "logging.config", "distutils", "ensurepip", "venv", "pip", "setuptools", "pkg_resources",
        "pyoco", "pyoco_es", "trio", "nats",
    }
)
# Never reachable through "*" either: the interpreter's own library (sys.stdlib_module_names).
_STDLIB: Final = frozenset(getattr(sys, "stdlib_module_names", ()))
_PART: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a public identifier
_RULE: Final = "(--allow-module / PYOCO_ALLOWED_MODULES)"
NEVER_RULE: Final = "can never be allowed (it can run commands, load or evaluate code, or reach files, the network or the interpreter)"


class RefusedCallable(Exception):
    """A ``callable:`` the worker will not import or call; the message names the callable and the rule."""


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def never_allowed(module: str) -> bool:
    """``module`` (or a package it is inside) is on :data:`NEVER_MODULES`."""
    return any(_within(module, never) for never in NEVER_MODULES)


def module_allowed(module: str, allowed: Sequence[str]) -> bool:
    """``module`` equals an allowed prefix or is inside it (``pkg`` allows ``pkg.sub``, not
    ``pkg_evil``); never a :data:`NEVER_MODULES` module; ``*`` allows any other module outside
    the standard library."""
    if not module or never_allowed(module):
        return False
    for prefix in allowed:
        prefix = prefix.strip()
        if prefix == ALLOW_ALL:
            if module.split(".", 1)[0] not in _STDLIB:
                return True
        elif prefix and _within(module, prefix):
            return True
    return False


def check_allowed_modules(allowed: Iterable[str]) -> tuple[str, ...]:
    """Validate the operator's ``--allow-module`` prefixes (at worker start).

    Raises:
        ValueError: a prefix is not a dotted module name, or names a module that can never be
            allowed (``os``, ``subprocess``, ``builtins``, ...); the message names it.
    """
    out: list[str] = []
    for raw in allowed:
        prefix = raw.strip()
        if not prefix:
            continue
        if prefix != ALLOW_ALL:
            if not all(_PART.fullmatch(part) for part in prefix.split(".")):
                raise ValueError(
                    f"--allow-module {prefix!r}: expected a dotted module name of public identifiers, or '*'"
                )
            if never_allowed(prefix):
                raise ValueError(
                    f"--allow-module {prefix!r}: this module {NEVER_RULE}; allow the package that holds your task "
                    f"functions instead"
                )
        if prefix not in out:
            out.append(prefix)
    return tuple(out)


def check_env_names(names: Iterable[str]) -> tuple[str, ...]:
    """Validate the operator's ``--expose-env`` names.

    Raises:
        ValueError: a name is not an environment variable name.
    """
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if not ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"--expose-env {name!r}: expected an environment variable name (letters, digits, _)")
        if name not in out:
            out.append(name)
    return tuple(out)


def _home(obj: object) -> str | None:
    """The module an object was defined in: a module's own name, a class's or function's
    ``__module__``, an instance's class's module."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        module = getattr(obj, "__module__", None)
        return module if isinstance(module, str) else None
    module = getattr(type(obj), "__module__", None)
    return module if isinstance(module, str) else None


def _refuse(path: str, lead: str, module: str | None, allowed: Sequence[str]) -> RefusedCallable:
    """``callable 'P' refused: <lead>module 'M' ...`` naming the rule that refused it."""
    if module is None:
        return RefusedCallable(f"callable '{path}' refused: {lead or 'it is '}not defined in a module")
    if never_allowed(module):
        rule = NEVER_RULE
    elif ALLOW_ALL in allowed and module.split(".", 1)[0] in _STDLIB:
        rule = "is in the standard library, which '*' does not allow (name it with --allow-module)"
    else:
        rule = f"is not in the allowed modules {_RULE}"
    if lead:
        return RefusedCallable(f"callable '{path}' refused: {lead}module '{module}', which {rule}")
    return RefusedCallable(f"callable '{path}' refused: module '{module}' {rule}")


def _check_class(path: str, cls: type, allowed: Sequence[str]) -> None:
    for base in cls.__mro__:
        if base is object:
            continue
        if not module_allowed(base.__module__, allowed):
            shown = "it" if base is cls else f"its base class '{base.__qualname__}'"
            raise _refuse(path, f"{shown} is defined in ", base.__module__, allowed)


def _check_target(path: str, obj: object, allowed: Sequence[str], depth: int = 0) -> None:
    """What calling ``obj`` really runs must be defined in an allowed module."""
    if depth > 8:
        raise RefusedCallable(f"callable '{path}' refused: too many layers of wrapping")
    if isinstance(obj, functools.partial):
        _check_target(path, obj.func, allowed, depth + 1)
    elif isinstance(obj, types.MethodType):
        _check_target(path, obj.__func__, allowed, depth + 1)
        owner = obj.__self__
        _check_class(path, owner if isinstance(owner, type) else type(owner), allowed)
    elif isinstance(obj, type):
        _check_class(path, obj, allowed)
    elif isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
        module = _home(obj)
        if module is None or not module_allowed(module, allowed):
            raise _refuse(path, "it is defined in ", module, allowed)
    else:  # a callable instance: calling it runs its class's __call__
        _check_class(path, type(obj), allowed)


def resolve_callable(path: str, allowed: Sequence[str], *, unwrap: Callable[[Any], Any] = lambda o: o) -> Callable[..., Any]:  # noqa: ANN401
    """Import ``module.path:attr.path`` under the operator's allow-list and return the callable.

    ``unwrap`` turns a task object (pyoco ``Task``/``TaskWrapper``) into its function; the
    function is what is checked.

    Raises:
        RefusedCallable: the shape is invalid, a module on the way is not allowed, a step is
            private, the import or a step fails, or the resolved object is not defined in an
            allowed module; the message names the callable and the rule.
    """
    problem = callable_path_problem(path)
    if problem is not None:
        raise RefusedCallable(f"callable '{path}' refused: {problem}")
    module_name, attr = path.split(":", 1)
    if not module_allowed(module_name, allowed):
        raise _refuse(path, "", module_name, allowed)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a build error
        raise RefusedCallable(f"callable '{path}': cannot import module '{module_name}': {type(exc).__name__}: {exc}") from exc
    if not module_allowed(obj.__name__, allowed):  # sys.modules may hold another module under this name
        raise _refuse(path, f"'{module_name}' is ", obj.__name__, allowed)
    parts = attr.split(".")
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise RefusedCallable(f"callable '{path}': module '{module_name}' has no attribute '{attr}'") from exc
        # The last step is checked for what it really is below (after unwrapping a pyoco task).
        if i < len(parts) - 1 or isinstance(obj, types.ModuleType):
            home = _home(obj)
            if home is None or not module_allowed(home, allowed):
                lead = f"'{part}' is " if isinstance(obj, types.ModuleType) else f"'{part}' is defined in "
                raise _refuse(path, lead, home, allowed)
    obj = unwrap(obj)
    if not callable(obj):
        raise RefusedCallable(f"callable '{path}' is not callable ({type(obj).__name__})")
    _check_target(path, obj, allowed)
    return obj  # type: ignore[no-any-return]


def missing_env(asked: Collection[str], exposed: Collection[str]) -> list[str]:
    """The names a document asks for that the worker does not expose (in the document's order)."""
    return [name for name in dict.fromkeys(asked) if name not in exposed]


def env_refusal(names: Sequence[str]) -> str:
    """The run's failure text: names only, never a value."""
    listed = ", ".join(f"'{n}'" for n in names)
    noun = "variable" if len(names) == 1 else "variables"
    return (
        f"environment {noun} {listed} not exposed by this worker: the worker operator decides which names a "
        f"run may read (pyoco-worker --expose-env NAME / PYOCO_WORKER_EXPOSE_ENV)"
    )


def exposed_values(names: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The exposed names that are set, with their values (what ``$env`` may see)."""
    return {name: environ[name] for name in names if name in environ}


__all__ = [
    "ALLOW_ALL",
    "NEVER_MODULES",
    "RefusedCallable",
    "callable_path_problem",
    "check_allowed_modules",
    "check_env_names",
    "env_refusal",
    "exposed_values",
    "missing_env",
    "module_allowed",
    "never_allowed",
    "resolve_callable",
]
