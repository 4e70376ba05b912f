"""The parent ↔ child pipe protocol: length-prefixed JSON frames on private file descriptors.

pyoco swaps ``sys.stdout`` per run, so the protocol never uses stdout.  A frame is a 4-byte
big-endian length followed by that many bytes of UTF-8 JSON (an object with ``op`` from parent to
child, ``ev`` from child to parent).

Parent → child: ``prepare`` (run_id, flow_name, params, yaml text and/or sha256), ``go``,
``abort``, ``cancel`` (all with run_id): the :data:`Command` classes below, the one place these
frames are built.

Child → parent: ``prepared`` (tasks) or ``prepare_failed`` (reason, error); while running
``task.started`` / ``task.completed`` / ``task.failed`` / ``task.retry_scheduled`` (the event
payloads, ready to wrap; ``task.failed`` has ``reason: timeout`` when the task's own timeout
failed it) and ``task.try`` (task, try_number, timeout_sec: a timed try started, see
:mod:`.timeouts`); finally ``done`` (outcome COMPLETED | FAILED | CANCELLED, error, traceback, and
``reason: timeout`` when a task's timeout failed the run).

Frames are ASCII JSON (``\\uXXXX`` escapes), so every Python string crosses the pipe faithfully,
a lone surrogate included (issue 10 #3: UTF-8 encoding one crashed the worker).  A frame that
is not a JSON object (garbage from a task writing to the pipe, NaN) is a
:class:`ProtocolError`, never an arbitrary exception.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Container
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from ..core.codec import loads

if TYPE_CHECKING:  # the child imports this module: keep its start light
    from ..core.work import WorkItem

HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = 64 * 1024 * 1024

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=repr).encode


class ProtocolError(ValueError):
    """The other side sent something that is not a frame of this protocol."""


def encode_frame(msg: dict[str, Any]) -> bytes:
    """One frame.

    Raises:
        ValueError: ``msg`` holds NaN/infinity or a value ``repr`` cannot describe.
    """
    body = _dumps(msg).encode("ascii")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse one frame's body.

    Raises:
        ProtocolError: not UTF-8 JSON, not an object, or NaN/Infinity.
    """
    try:
        msg = loads(body)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"undecodable frame ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame is a JSON {type(msg).__name__}, not an object")
    return msg


@attrs.frozen(kw_only=True)
class Prepare:
    """Build the run's flow (parse and validate YAML, import the allowed callables); the child
    answers ``prepared`` (task names) or ``prepare_failed``.  The YAML text is left out when the
    child has built this document (by sha256) before."""

    OP: ClassVar[str] = "prepare"
    run_id: str
    flow_name: str
    params: dict[str, Any]
    document: bool = False  # a YAML run (``sha256`` and maybe ``yaml`` follow)
    sha256: str | None = None
    yaml: str | None = None

    @classmethod
    def for_item(cls, item: WorkItem, *, known_docs: Container[str]) -> Prepare:
        if item.workflow_yaml is None:
            return cls(run_id=item.run_id, flow_name=item.flow_name, params=item.params)
        sha = item.workflow_yaml_sha256
        known = bool(sha) and sha in known_docs
        return cls(
            run_id=item.run_id,
            flow_name=item.flow_name,
            params=item.params,
            document=True,
            sha256=sha,
            yaml=None if known else item.workflow_yaml,
        )

    def to_json(self) -> dict[str, Any]:
        cmd: dict[str, Any] = {"op": self.OP, "run_id": self.run_id, "flow_name": self.flow_name, "params": self.params}
        if self.document:
            cmd["sha256"] = self.sha256
            if self.yaml is not None:
                cmd["yaml"] = self.yaml
        return cmd


@attrs.frozen
class _RunCommand:
    """A command that names only its run."""

    OP: ClassVar[str]
    run_id: str

    def to_json(self) -> dict[str, Any]:
        return {"op": self.OP, "run_id": self.run_id}


@attrs.frozen
class Go(_RunCommand):
    """Start the prepared run (dropped by the child if its prepare failed)."""

    OP: ClassVar[str] = "go"


@attrs.frozen
class Abort(_RunCommand):
    """Forget the prepared run (its claim failed or it is obsolete)."""

    OP: ClassVar[str] = "abort"


@attrs.frozen
class Cancel(_RunCommand):
    """Cancel the running run cooperatively (pyoco's ``Engine.cancel``)."""

    OP: ClassVar[str] = "cancel"


Command = Prepare | Go | Abort | Cancel


class FrameDecoder:
    """Incremental decoder: feed bytes, pop complete messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Raises:
            ProtocolError: an oversized or undecodable frame (the stream is unusable after it).
        """
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ProtocolError(f"frame of {size} bytes exceeds the limit")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            out.append(decode_body(bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return out
