"""pyoco-es: an event-sourced, pyoco-server compatible execution backend for pyoco workflows."""

from __future__ import annotations

__version__ = "0.1.0"
