"""Objects an allowed module may hold: its own code, and re-exports of dangerous things."""

from __future__ import annotations

import functools
import os
import subprocess
from builtins import eval as evaluate  # noqa: F401 - builtins.eval re-exported
from os import system  # noqa: F401 - os.system re-exported
from subprocess import Popen  # noqa: F401 - a class from a module that is never allowed
from pathlib import Path  # noqa: F401 - a class from a module that is never allowed

from pyoco import task

CONFIG = {"key": "value"}  # a builtin dict: CONFIG.get is a builtin method


def ok(x: int = 1) -> int:
    return x + 1


@task
def decorated(x: int = 1) -> int:
    return x * 2


class Runner:
    """Defined here: calling it, its methods or an instance runs code defined here."""

    def run(self, x: int = 1) -> int:
        return x

    @classmethod
    def make(cls, x: int = 1) -> int:
        return x

    def __call__(self, x: int = 1) -> int:
        return x


runner = Runner()


class Shell(subprocess.Popen):  # type: ignore[type-arg]
    """Defined here, but calling it runs subprocess.Popen's constructor."""


shell = functools.partial(os.system, "true")  # a partial of os.system
double = functools.partial(ok, x=2)  # a partial of this module's own function
bound_system = Runner.__init__  # noqa: PLW0127 - object.__init__ slot wrapper reached through a class
listing = [1, 2]  # listing.append is a builtin method of a builtin instance
