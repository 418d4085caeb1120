"""sheepdog: a Redis-backed job runner with live progress for GeneNetwork's GEMMA scans."""

import importlib.machinery
import importlib.util
import sys
import types
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


class _Deferred(types.ModuleType):
    """Stands in for a submodule until something asks it for a name: then it loads
    the real one and becomes it. Its spec and path are its own, so the import system
    (and a submodule of it being imported) does not load it."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__spec__.name  # type: ignore[union-attr]
        if sys.modules.get(name) is self:
            del sys.modules[name]
            real = importlib.import_module(name)
            self.__dict__.update({k: v for k, v in vars(real).items()
                                  if k not in ("__spec__", "__path__")})
            sys.modules[name] = real
        return getattr(sys.modules[name], attr)


def _defer(name: str) -> None:
    """Have a submodule of an installed package load on its first use, not when its
    package is imported: redis-py's __init__ imports its asyncio client (asyncio
    included, ~70 ms here), which no sheepdog command uses. A no-op if the package is
    loaded already, or the submodule cannot be found."""
    parent = name.rpartition(".")[0]
    if name in sys.modules or parent in sys.modules:
        return
    top = importlib.util.find_spec(parent)  # a top-level package: found, not imported
    if top is None or not top.submodule_search_locations:
        return
    spec = importlib.machinery.PathFinder.find_spec(name, list(top.submodule_search_locations))
    if spec is None or spec.loader is None:
        return
    module = _Deferred(name)
    module.__spec__ = spec
    module.__path__ = list(spec.submodule_search_locations or [])
    sys.modules[name] = module


_defer("redis.asyncio")
