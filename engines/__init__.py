"""Engines: the Engine interface, its backends (one file each) and the engine bundle reader. No torch."""

from anomalygpt_edge.engines.base import (
    BackendOptions,
    Engine,
    EngineError,
    TensorSpec,
    available_backends,
    backend_options,
    create_engine,
)
from anomalygpt_edge.engines.bundle import BundleError, EngineBundle

__all__ = [
    "BackendOptions",
    "BundleError",
    "Engine",
    "EngineBundle",
    "EngineError",
    "TensorSpec",
    "available_backends",
    "backend_options",
    "create_engine",
]
