"""sheepdog: a Redis-backed job runner with live progress for GeneNetwork's GEMMA scans."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Executor", "__version__"]


def __getattr__(name: str) -> Any:
    # imported on first use: code run on hosts imports this package, and must not need
    # redis-py there
    if name == "Executor":
        from .executor import Executor

        return Executor
    raise AttributeError(f"module 'sheepdog' has no attribute {name!r}")
