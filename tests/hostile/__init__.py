"""Hostile shapes for the callable allow-list tests (tests/test_security_callables.py).

Everything here is reachable under ``--allow-module tests.hostile``; only what is *defined* here
(and runs code defined here) may be called.
"""
