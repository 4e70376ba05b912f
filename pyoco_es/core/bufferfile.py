"""A read-only file over a bytearray (or any bytes-like object) that copies nothing.

``io.BytesIO`` shares the memory of a ``bytes`` object but copies anything else; a wheel upload
is held as a bytearray (the request body cut down to the file in place, hundreds of MiB at most),
and ``zipfile`` and the object store read it through this instead.
"""

from __future__ import annotations

import io
import os
from typing import Any


class BufferFile(io.RawIOBase):
    """Seekable, read-only, over ``data``'s memory (which must not change size meanwhile)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # noqa: ANN401 - any writable buffer
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._view.release()
        super().close()


def reader(data: bytes | bytearray) -> io.RawIOBase | io.BytesIO:
    """A file over ``data`` without a copy: ``io.BytesIO`` for ``bytes`` (it shares them), else a
    :class:`BufferFile`."""
    return io.BytesIO(data) if isinstance(data, bytes) else BufferFile(data)
