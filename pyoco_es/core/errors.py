"""The one error tree of pyoco-es.

Every error carries an ``http_status`` hint (like h11's ``error_status_hint``) so the gateway maps
errors to responses in one handler, without guessing.
"""

from __future__ import annotations

from typing import ClassVar, Final


class PyocoError(Exception):
    """Root of every error pyoco-es raises on purpose."""

    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DomainError(PyocoError):
    """A command is not allowed in the run's current state (the caller's fault, or a lost race)."""

    http_status: ClassVar[int] = 409


class RunNotFound(DomainError):
    """The run has no events at all."""

    http_status: ClassVar[int] = 404

    def __init__(self, run_id: str) -> None:
        super().__init__("run not found")
        self.run_id = run_id


class IllegalTransition(DomainError):
    """An event does not apply to the run's state (raised by decisions before anything is appended)."""


class RunAlreadyExists(DomainError):
    """``run.submitted`` was decided for a run id that already has events.

    ``same_request`` tells an idempotent retry (same request fingerprint) from a reused key.
    """

    def __init__(self, run_id: str, *, same_request: bool) -> None:
        super().__init__(
            "run already exists"
            if same_request
            else "Idempotency-Key was already used for a different request; use a new key"
        )
        self.run_id = run_id
        self.same_request = same_request


class StaleAttempt(DomainError):
    """A worker acted for an attempt it no longer owns (fencing): it must stop that run."""

    def __init__(self, run_id: str, attempt: int, current: int, status: str) -> None:
        super().__init__(
            f"attempt {attempt} of run {run_id} is no longer current "
            f"(current attempt {current}, status {status})"
        )
        self.run_id = run_id
        self.attempt = attempt
        self.current = current
        self.status = status


class ConcurrencyConflict(DomainError):
    """An append lost an optimistic-concurrency race: re-read the run and decide again."""

    def __init__(self, subject: str, expected: int, *, appended: int = 0) -> None:
        super().__init__(f"wrong last sequence on {subject} (expected {expected})")
        self.subject = subject
        self.expected = expected
        self.appended = appended  # events of the same append that were stored before the conflict


class ValidationError(PyocoError):
    """A request or document is malformed; the message names the exact problem."""

    http_status: ClassVar[int] = 422


class PayloadTooLarge(ValidationError):
    """A request body or upload exceeds its configured limit."""

    http_status: ClassVar[int] = 413


class CorruptStreamError(PyocoError):
    """An event on the stream cannot be decoded or folded: unknown type, bad JSON, a gap or an
    illegal transition.  The run is marked as not projectable; other runs are unaffected."""

    def __init__(self, message: str, *, run_id: str | None = None, seq: int | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.seq = seq


class InfraError(PyocoError):
    """The infrastructure (NATS) failed; the operation may be retried later."""

    http_status: ClassVar[int] = 503


class EventLogUnavailable(InfraError):
    """The event stream could not be reached or did not acknowledge in time."""


class OutcomeUnknown(EventLogUnavailable):
    """An append was sent but no answer came back within the wait: it may or may not be stored.

    Re-sending the same events (same ids) is safe: one already stored is found, never stored
    twice; a submit retried with the same ``Idempotency-Key`` returns the same run.
    """

    def __init__(self, message: str, *, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject
        self.run_id: str | None = None  # set by the gateway for a submit (so a client can look)


class WritesRefused(InfraError):
    """JetStream refused to store a message for lack of resources (disk or account limits
    full: "insufficient resources", "maximum bytes exceeded").  Nothing was stored."""


class SnapshotStoreUnavailable(InfraError):
    """A KV bucket could not be reached."""


# The failures worth retrying with backoff: the infrastructure did not answer (an outage, a
# reconnect, a timeout).  Everything else, WritesRefused and PayloadTooLarge included, is an
# answer, and retrying it returns the same answer.  Shells catch this list, never the root.
TRANSIENT_ERRORS: Final[tuple[type[PyocoError], ...]] = (EventLogUnavailable, SnapshotStoreUnavailable)
