"""Text for task values and errors in the run process: total, whatever a task returns or raises."""

from __future__ import annotations


def describe(value: object) -> str:
    """``repr(value)``, or a placeholder when even that raises (task values may be anything)."""
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not lose the task's record
        return f"<unrepresentable {type(value).__name__}>"


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` for a task's exception, even when its ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001
        text = f"<str() of this {type(exc).__name__} raised>"
    return f"{type(exc).__name__}: {text}"


__all__ = ["describe", "describe_error"]
