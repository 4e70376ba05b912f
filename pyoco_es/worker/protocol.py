"""The parent ↔ child pipe protocol: length-prefixed JSON frames on private file descriptors.

pyoco swaps ``sys.stdout`` per run, so the protocol never uses stdout.  A frame is a 4-byte
big-endian length followed by that many bytes of UTF-8 JSON (an object with ``op`` from parent to
child, ``ev`` from child to parent).

Parent → child: ``prepare`` (run_id, flow_name, params, yaml text and/or sha256), ``go``,
``abort``, ``cancel`` (all with run_id).

Child → parent: ``prepared`` (tasks) or ``prepare_failed`` (reason, error); while running
``task.started`` / ``task.completed`` / ``task.failed`` (the event payloads, ready to wrap);
finally ``done`` (outcome COMPLETED | FAILED | CANCELLED, error, traceback).
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final

HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = 64 * 1024 * 1024

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=repr).encode


def encode_frame(msg: dict[str, Any]) -> bytes:
    body = _dumps(msg).encode("utf-8")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed bytes, pop complete messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes exceeds the limit")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            out.append(json.loads(bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return out
