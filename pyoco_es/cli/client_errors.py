"""pyoco-client's error shape and exit codes (contract §5.3), in one place.

Every expected failure becomes a :class:`CliError`, which asyncclick prints through
:meth:`CliError.show` (never a traceback) and turns into the exit status.  The layout is
pyoco-server's::

    ERR-PYOCO-0018: invalid command line input
    - reason: --params must be JSON object (got a list)
    - usage: pyoco-client submit [OPTIONS]
    - hint: pyoco-client submit --params '{"x": 1}'
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import IO, Final

import asyncclick as click

# Exit codes.  0 and 1 and 130 are pyoco-server's; 2, 3 and 4 are pyoco-es additions, used
# only when a command waits for a run to end (watch --until-terminal, submit --wait/--watch).
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_RUN_FAILED: Final = 2
EXIT_RUN_CANCELLED: Final = 3
EXIT_WAIT_TIMEOUT: Final = 4
EXIT_INTERRUPTED: Final = 130

OUTCOME_EXIT_CODES: Final = {
    "COMPLETED": EXIT_OK,
    "FAILED": EXIT_RUN_FAILED,
    "CANCELLED": EXIT_RUN_CANCELLED,
}

ERR_INPUT: Final = "ERR-PYOCO-0018"
ERR_HTTP: Final = "ERR-PYOCO-HTTP"
ERR_CANCEL: Final = "ERR-PYOCO-CANCEL"
ERR_WAIT: Final = "ERR-PYOCO-WAIT"
ERR_UNEXPECTED: Final = "ERR-PYOCO-UNEXPECTED"

INPUT_MESSAGE: Final = "invalid command line input"


class CliError(click.ClickException):
    """An expected failure, printed as ``CODE: message`` plus ``- key: value`` lines.

    Args:
        code: the ``ERR-…`` identifier.
        message: the one-line summary.
        reason: what exactly went wrong.
        usage: the command's usage line (input errors).
        hint: how to fix it.
    """

    exit_code = EXIT_ERROR

    def __init__(
        self,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        usage: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.usage = usage
        self.hint = hint

    def lines(self) -> Iterator[str]:
        yield f"{self.code}: {self.message}"
        for key in ("reason", "usage", "hint"):
            value = getattr(self, key)
            if value:
                yield f"- {key}: {value}"

    def format_message(self) -> str:
        return "\n".join(self.lines())

    def show(self, file: IO[str] | None = None) -> None:
        click.echo(self.format_message(), file=file or sys.stderr)


class WaitTimeout(CliError):
    """``--wait``/``--watch``/``--until-terminal`` gave up before the run ended: exit 4."""

    exit_code = EXIT_WAIT_TIMEOUT


def input_error(reason: str, *, hint: str | None = None, usage: str | None = None) -> CliError:
    """A bad flag, bad JSON, missing file…: ``ERR-PYOCO-0018``, exit 1."""
    return CliError(ERR_INPUT, INPUT_MESSAGE, reason=reason, usage=usage, hint=hint)
