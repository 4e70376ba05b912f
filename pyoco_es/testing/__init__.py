"""Test helpers shipped with pyoco-es (like ``trio.testing``): start a whole stack in-process."""
