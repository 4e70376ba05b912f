"""The pure core: events, the run state machine, the fold and the decisions.

Nothing in this package does I/O or imports trio, nats, quart or click; a test enforces it.
Time and identifiers are always passed in by the caller.
"""
