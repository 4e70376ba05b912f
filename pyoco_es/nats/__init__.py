"""The NATS adapter: the only package that imports asyncio or nats.

nats-py is asyncio-only.  It runs here on a stdlib asyncio loop in one dedicated thread
(:mod:`.bridge`); Trio code calls in through :class:`.client.NatsClient`, crossing once per call
or per batch.  See ``docs/architecture.md`` ("The bridge") for why this beats trio-asyncio.
"""
