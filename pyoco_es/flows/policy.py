"""Task retries and timeouts: the policy a task runs under, and its ``flow.yaml`` keys (issue 16).

pyoco's ``Task`` carries ``retries`` and ``timeout_sec`` but its YAML loader refuses them, its
retries sleep a fixed 0.1 s and leave no trace, and its timeout does not stop the task.  pyoco-es
accepts, as an extension of ``flow.yaml`` (every pyoco-server document stays valid)::

    tasks:
      fetch:
        callable: "mytasks:fetch"
        retries: 3                # tries after the first (default 0)
        retry_delay_sec: 1        # before the first retry (default 1)
        retry_backoff: 2          # each further delay is multiplied by this (default 2)
        retry_max_delay_sec: 30   # delays never exceed this (default: no cap)
        timeout_sec: 10           # per try; the run process stops the task when it passes
    runtime:
      timeout_sec: 600            # the run's deadline, counted from its submission

Named flows get the same from attributes set on their pyoco tasks (``t.task.retries = 3``,
``t.task.timeout_sec = 10``, ``t.task.retry_delay_sec = 0.5`` ...): :func:`policy_of`.

Pure: no trio, no NATS (the gateway, the worker and its run processes import it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from ..core.errors import ValidationError

RETRY_KEYS: Final = ("retries", "retry_delay_sec", "retry_backoff", "retry_max_delay_sec", "timeout_sec")
MAX_RETRIES: Final = 100
MAX_SECONDS: Final = 31 * 24 * 3600.0  # a month: any delay or timeout beyond is a typo
MAX_BACKOFF: Final = 100.0


@attrs.frozen(kw_only=True)
class TaskPolicy:
    """How a task is tried: ``retries`` more times after a failed try, waiting
    ``retry_delay_sec * retry_backoff ** (n - 1)`` (capped by ``retry_max_delay_sec``) after
    try ``n``; each try stopped after ``timeout_sec``."""

    retries: int = 0
    retry_delay_sec: float = 1.0
    retry_backoff: float = 2.0
    retry_max_delay_sec: float | None = None
    timeout_sec: float | None = None

    @property
    def trivial(self) -> bool:
        """Nothing to do: no retries and no timeout (the run process leaves such tasks alone)."""
        return self.retries == 0 and self.timeout_sec is None

    @property
    def max_tries(self) -> int:
        return self.retries + 1

    def delay(self, try_number: int) -> float:
        """Seconds to wait after failed try ``try_number`` (1-based) before the next one."""
        delay = self.retry_delay_sec * self.retry_backoff ** (try_number - 1)
        if self.retry_max_delay_sec is not None:
            delay = min(delay, self.retry_max_delay_sec)
        return min(delay, MAX_SECONDS)


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: object, where: str, *, lo: float, hi: float, integer: bool = False, zero: bool = True) -> float:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValidationError(f"{where}: must be {kind}, got {type(value).__name__} {_brief(value)}")
    # Bounds first: math.isfinite(10**400) raises OverflowError; comparisons never do.
    if value < lo or value > hi or (isinstance(value, float) and not math.isfinite(value)) or (not zero and value == 0):
        bound = "greater than 0" if not zero else f"at least {lo:g}"
        raise ValidationError(f"{where}: must be {kind} {bound} and at most {hi:.0f}, got {_brief(value)}")
    return value


def check_timeout(value: object, where: str) -> float:
    """A ``timeout_sec`` (a task's or a run's): a number of seconds above 0, at most a month.

    Raises:
        ValidationError: naming ``where``.
    """
    return float(_number(value, where, lo=0.0, hi=MAX_SECONDS, zero=False))


def parse_policy(spec: Mapping[str, Any], where: Callable[[str], str]) -> TaskPolicy | None:
    """The policy of one ``tasks.<name>`` mapping, or None when it sets none of the keys.

    ``where(key)`` names a key in messages (``tasks.fetch.retries (line 7)``).

    Raises:
        ValidationError: a key of the wrong type or out of range.
    """
    if not any(k in spec for k in RETRY_KEYS):
        return None
    kwargs: dict[str, Any] = {}
    if spec.get("retries") is not None:
        kwargs["retries"] = int(_number(spec["retries"], where("retries"), lo=0, hi=MAX_RETRIES, integer=True))
    if spec.get("retry_delay_sec") is not None:
        kwargs["retry_delay_sec"] = float(_number(spec["retry_delay_sec"], where("retry_delay_sec"), lo=0.0, hi=MAX_SECONDS))
    if spec.get("retry_backoff") is not None:
        kwargs["retry_backoff"] = float(_number(spec["retry_backoff"], where("retry_backoff"), lo=1.0, hi=MAX_BACKOFF))
    if spec.get("retry_max_delay_sec") is not None:
        kwargs["retry_max_delay_sec"] = float(_number(spec["retry_max_delay_sec"], where("retry_max_delay_sec"), lo=0.0, hi=MAX_SECONDS))
    if spec.get("timeout_sec") is not None:
        kwargs["timeout_sec"] = check_timeout(spec["timeout_sec"], where("timeout_sec"))
    return TaskPolicy(**kwargs)


def policy_of(task: Any) -> TaskPolicy | None:  # noqa: ANN401 - a pyoco Task
    """The policy a pyoco ``Task`` carries in its attributes (``retries``, ``timeout_sec`` are
    pyoco's own fields; ``retry_delay_sec``, ``retry_backoff``, ``retry_max_delay_sec`` may be set
    on it too), or None when trivial.  A YAML task gets them from :func:`apply_policy`.

    Raises:
        ValidationError: an attribute of the wrong type or out of range (the run fails to build).
    """
    if not getattr(task, "retries", 0) and getattr(task, "timeout_sec", None) is None:
        return None  # the common case, checked first: every task of every run comes here
    spec = {k: getattr(task, k, None) for k in RETRY_KEYS}
    if not spec["retries"]:
        spec.pop("retries")
    policy = parse_policy({k: v for k, v in spec.items() if v is not None}, lambda key: f"task {task.name!r}: {key}")
    return None if policy is None or policy.trivial else policy


def apply_policy(task: Any, policy: TaskPolicy | None) -> Any:  # noqa: ANN401 - a pyoco Task
    """Set ``policy`` on a pyoco ``Task`` (the attributes :func:`policy_of` reads); returns it."""
    if policy is not None:
        for key in RETRY_KEYS:
            setattr(task, key, getattr(policy, key))
    return task


__all__ = ["RETRY_KEYS", "TaskPolicy", "apply_policy", "check_timeout", "parse_policy", "policy_of"]
