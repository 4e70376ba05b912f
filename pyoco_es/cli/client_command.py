"""How every pyoco-client command runs: errors translated in one place at the top (usage
errors, HTTP and transport failures, exception groups), Ctrl-C as a cancellation, and an open
:class:`~.client_http.Api` handed to the command."""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import asyncclick as click
import trio

from .client_errors import ERR_UNEXPECTED, EXIT_INTERRUPTED, EXIT_OK, INPUT_MESSAGE, ERR_INPUT, CliError
from .client_http import ClientSettings, open_api


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


EXIT_BROKEN_PIPE: Final = 141  # 128 + SIGPIPE, what a shell reports for a tool whose reader left


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (tests capture it): nothing to silence
        pass


def _translate(exc: BaseException) -> BaseException:
    """Map what a command raised to what asyncclick should see (CliError, Exit) or re-raise."""
    leaves = list(_leaves(exc))
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        return click.exceptions.Exit(EXIT_INTERRUPTED)
    if any(isinstance(e, BrokenPipeError) for e in leaves):
        # Whoever read our output stopped (`pyoco-client logs RUN --follow | head`): end quietly, as
        # a Unix tool killed by SIGPIPE does (exit 141), with stdout pointed away from the pipe so
        # the interpreter's last flush cannot fail again.
        _silence_stdout()
        return click.exceptions.Exit(EXIT_BROKEN_PIPE)
    for e in leaves:
        if isinstance(e, (click.ClickException, click.exceptions.Exit, click.Abort)):
            return e
    for e in leaves:
        if isinstance(e, Exception):
            if os.environ.get("PYOCO_CLIENT_DEBUG"):
                return exc
            return CliError(
                ERR_UNEXPECTED,
                f"{type(e).__name__}: {e}",
                hint="set PYOCO_CLIENT_DEBUG=1 to see the traceback, and please report it",
            )
    return exc


def _usage_error(exc: click.UsageError) -> CliError:
    ctx = exc.ctx
    usage = ctx.get_usage().removeprefix("Usage: ").strip() if ctx is not None else None
    path = ctx.command_path if ctx is not None else "pyoco-client"
    return CliError(ERR_INPUT, INPUT_MESSAGE, reason=exc.format_message(), usage=usage, hint=f"{path} -h")


class ClientCommand(click.Command):
    """A command whose parse errors and failures come out in pyoco-server's error shape."""

    async def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return await super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_error(exc) from exc

    async def invoke(self, ctx: click.Context) -> Any:
        try:
            return await super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BaseException as exc:  # translated and re-raised: KeyboardInterrupt → 130, groups unwrapped
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc


class ClientGroup(click.Group):
    """The client group: usage errors (unknown command or flag) in pyoco-server's error shape."""

    command_class = ClientCommand

    async def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return await super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            assert exc.ctx is not None
            click.echo(exc.ctx.get_help())
            raise click.exceptions.Exit(EXIT_OK) from exc
        except click.UsageError as exc:
            raise _usage_error(exc) from exc

    async def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return await super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _usage_error(exc) from exc


async def _cancel_on_sigint(scope: trio.CancelScope, *, task_status: trio.TaskStatus[trio.Event] = trio.TASK_STATUS_IGNORED) -> None:
    """Cancel ``scope`` on the first SIGINT; the event it reports says whether that happened.  A
    second SIGINT (the receiver is gone by then) interrupts at once, as Trio does by default."""
    interrupted = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        task_status.started(interrupted)
        async for _ in signals:
            interrupted.set()
            scope.cancel()
            return


def api_command(fn: Callable[..., Awaitable[int | None]]) -> Callable[..., Awaitable[None]]:
    """Run ``fn(api, **params)`` with an open :class:`Api`; its int result is the exit status."""

    @functools.wraps(fn)
    @click.pass_context
    async def wrapper(ctx: click.Context, /, **kwargs: Any) -> None:
        settings = ctx.find_object(ClientSettings)
        assert settings is not None, "the client group's callback sets ClientSettings"
        code: int | None = None
        # Ctrl-C cancels the command at its next checkpoint, like any cancellation, instead of
        # a KeyboardInterrupt raised wherever the signal lands (inside an HTTP stream's
        # generator, say, which then prints a traceback while being finalized).
        async with trio.open_nursery() as nursery:
            interrupted = await nursery.start(_cancel_on_sigint, nursery.cancel_scope)
            async with open_api(settings) as api:
                code = await fn(api, **kwargs)
            nursery.cancel_scope.cancel()
        if interrupted.is_set():
            raise click.exceptions.Exit(EXIT_INTERRUPTED)
        if code:
            raise click.exceptions.Exit(code)

    return wrapper

