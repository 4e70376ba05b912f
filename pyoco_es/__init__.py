"""pyoco-es: an event-sourced, pyoco-server compatible execution backend for pyoco workflows.

The library API (docs/library.md) carries pyoco-server's names: ``PyocoHttpClient`` and its
Trio twin ``AsyncPyocoHttpClient`` (``pyoco_es.client``); ``PyocoNatsWorker``,
``NatsBackendConfig``, ``ensure_resources`` and ``configure_logging`` (``pyoco_es.backend``).  They are imported on first use, so
``import pyoco_es`` stays light and no module of the package imports them back (no cycle).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module defining it
_LAZY: dict[str, str] = {
    "PyocoHttpClient": "pyoco_es.client",
    "AsyncPyocoHttpClient": "pyoco_es.client",
    "PyocoHttpError": "pyoco_es.client",
    "FeatureNotAvailable": "pyoco_es.client",
    "NatsBackendConfig": "pyoco_es.backend",
    "PyocoNatsWorker": "pyoco_es.backend",
    "WorkerStopped": "pyoco_es.backend",
    "ensure_resources": "pyoco_es.backend",
    "configure_logging": "pyoco_es.backend",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from .backend import NatsBackendConfig as NatsBackendConfig
    from .backend import PyocoNatsWorker as PyocoNatsWorker
    from .backend import WorkerStopped as WorkerStopped
    from .backend import configure_logging as configure_logging
    from .backend import ensure_resources as ensure_resources
    from .client import AsyncPyocoHttpClient as AsyncPyocoHttpClient
    from .client import FeatureNotAvailable as FeatureNotAvailable
    from .client import PyocoHttpClient as PyocoHttpClient
    from .client import PyocoHttpError as PyocoHttpError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyoco_es' has no attribute {name!r}")
    return getattr(import_module(module), name)
