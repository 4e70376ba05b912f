"""Example flows and tasks for pyoco-es (used by the docs and the tests)."""
