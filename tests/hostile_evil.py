"""Prefix confusion: ``--allow-module tests.hostile`` must not allow this module."""


def run(x: int = 1) -> int:
    return x
