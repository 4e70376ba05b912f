"""The Trio ⇄ asyncio bridge (pyoco_es/nats/bridge.py) under Ctrl-C."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_ctrl_c_between_queueing_a_call_and_waiting_for_it_is_a_clean_keyboard_interrupt() -> None:
    """A SIGINT that lands while ``call`` has queued its work but not yet waits for it: the
    KeyboardInterrupt arrives through the wait (as a cancel does), and the answer to that call
    never reschedules the task later, when it waits on another call (before the fix: a
    TrioInternalError, seen on Ctrl-C during ``pyoco-es replay``, or the wrong answer)."""
    program = textwrap.dedent(
        """
        import asyncio, signal, trio
        from pyoco_es.nats.bridge import AsyncioThread

        async def value(v, delay):
            await asyncio.sleep(delay)
            return v

        async def main():
            bridge = AsyncioThread(name="t")
            real = bridge.loop.call_soon_threadsafe
            first = [True]

            def ring_then_go(cb, *args):
                handle = real(cb, *args)
                if first[0]:
                    first[0] = False
                    signal.raise_signal(signal.SIGINT)  # inside call(), before it waits
                return handle

            bridge.loop.call_soon_threadsafe = ring_then_go
            try:
                await bridge.call(value, "first", 0.05)
                print("no-interrupt")
            except KeyboardInterrupt:
                print("interrupted")
            print("second=" + await bridge.call(value, "second", 0.3))
            await trio.sleep(0.3)  # any stray answer would land meanwhile
            bridge.stop()

        trio.run(main)
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["interrupted", "second=second"], (done.stdout, done.stderr)
