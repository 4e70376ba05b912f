"""`pyoco-es replay` never leaves its scratch bucket behind, not even when interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import trio

from pyoco_es.core import decide
from pyoco_es.core.codec import encode_envelope
from pyoco_es.core.errors import PyocoError
from pyoco_es.core.events import Producer, RunSubmitted
from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.nats import subjects
from pyoco_es.nats.client import NatsClient
from pyoco_es.nats.embedded import EmbeddedNats

PYOCO_ES = str(Path(sys.executable).parent / "pyoco-es")
SCRATCH = subjects.kv_stream("pyoco_runs_replay")


async def _exists(nats: NatsClient, stream: str) -> bool:
    try:
        await nats.stream_info(stream)
    except PyocoError:
        return False
    return True


async def test_ctrl_c_during_replay_removes_the_scratch_bucket(nats_server: EmbeddedNats, nats: NatsClient) -> None:
    # Enough runs that writing the scratch bucket (one put per run) takes a while.
    producer = Producer(kind="gateway", id="seed")
    items = []
    for i in range(4000):
        run_id = str(uuid.uuid4())
        event = RunSubmitted(flow_name="f", params={"i": i}, tag="default", tags=(), submitted_at=1.0)
        (env,) = decide.stamp(None, [event], run_id=run_id, producer=producer, now=1.0, new_id=lambda: str(uuid.uuid4()))
        items.append((subjects.run_events_subject(run_id), encode_envelope(env), None, None))
    await nats.publish_many(items)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")}
    with trio.fail_after(120):  # a hang guard; the test is paced by what it observes
        proc = await trio.lowlevel.open_process(
            [PYOCO_ES, "replay", "--nats-url", nats_server.url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **tied_to_this_process(env)
        )
        try:
            while not await _exists(nats, SCRATCH):  # replay has folded and is writing its bucket
                assert proc.poll() is None, "replay finished before it could be interrupted"
                await trio.sleep(0.01)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        err = (await proc.stderr.receive_some(65536) or b"").decode()
        await proc.stderr.aclose()
    assert proc.returncode != 0 and time.monotonic() - started < 30
    assert not await _exists(nats, SCRATCH), err
    assert "Traceback" not in err, err
    assert await _exists(nats, subjects.kv_stream(subjects.RUNS_BUCKET))
