"""Shared fixtures: a real nats-server per test (random loopback ports, temp store dir)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pyoco_es.nats.client import NatsClient, open_nats
from pyoco_es.nats.embedded import EmbeddedNats
from pyoco_es.nats.resources import ensure_resources


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A private nats-server with JetStream; ~40 ms to start, so every test gets its own."""
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nats(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    """A connected client with pyoco-es's streams and buckets created."""
    async with open_nats(nats_server.url, name="test") as client:
        await ensure_resources(client)
        yield client
