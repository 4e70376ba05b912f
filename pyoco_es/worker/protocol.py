"""The parent ↔ child pipe protocol: length-prefixed JSON frames on private file descriptors.

pyoco swaps ``sys.stdout`` per run, so the protocol never uses stdout.  A frame is a 4-byte
big-endian length followed by that many bytes of UTF-8 JSON (an object with ``op`` from parent to
child, ``ev`` from child to parent).

Parent → child: ``prepare`` (run_id, flow_name, params, yaml text and/or sha256), ``go``,
``abort``, ``cancel`` (all with run_id).

Child → parent: ``prepared`` (tasks) or ``prepare_failed`` (reason, error); while running
``task.started`` / ``task.completed`` / ``task.failed`` (the event payloads, ready to wrap);
finally ``done`` (outcome COMPLETED | FAILED | CANCELLED, error, traceback).

Frames are ASCII JSON (``\\uXXXX`` escapes), so every Python string crosses the pipe faithfully,
a lone surrogate included (issue 10 #3: UTF-8 encoding one crashed the worker).  A frame that
is not a JSON object (garbage from a task writing to the pipe, NaN) is a
:class:`ProtocolError`, never an arbitrary exception.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final

from ..core.codec import loads

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
