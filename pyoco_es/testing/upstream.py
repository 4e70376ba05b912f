"""Running pyoco-server 0.5.1's own worker (for comparisons and compatibility tests).

Its worker hangs on CPython 3.11: when a run ends it cancels its heartbeat task and awaits it,
and 3.11's ``asyncio.wait_for`` can swallow that cancellation (CPython gh-86296, fixed in 3.12).
:data:`WORKER_SHIM` is a ``python -c`` program that first gives ``asyncio.wait_for`` 3.12's
semantics, then runs ``pyoco_server.worker_cli`` with the remaining arguments
(reference/pyoco-server-measured.md).
"""

from __future__ import annotations

from typing import Final

WORKER_SHIM: Final = """
import runpy, sys, asyncio  # (a program for pyoco-server's interpreter; pyoco-es itself keeps asyncio in pyoco_es/nats)
async def wait_for(fut, timeout):
    if timeout is None:
        return await fut
    async with asyncio.timeout(timeout):
        return await fut
asyncio.wait_for = wait_for
sys.argv = ["pyoco-worker", *sys.argv[1:]]
runpy.run_module("pyoco_server.worker_cli", run_name="__main__")
"""
