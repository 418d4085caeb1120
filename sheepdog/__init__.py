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
            parent, _, child = name.rpartition(".")
            if getattr(sys.modules.get(parent), child, None) is self:
                setattr(sys.modules[parent], child, real)
        return getattr(sys.modules[name], attr)


def _defer(name: str) -> None:
    """Have a submodule load on its first use, not when something imports it: redis-py
    imports its asyncio client (~70 ms here), which no sheepdog command uses, and
    importlib.metadata (~11 ms) for a version string it asks for only when a connection
    says hello. A no-op if it is loaded already, or cannot be found."""
    parent = name.rpartition(".")[0]
    if name in sys.modules:
        return
    if parent in sys.modules:  # (importlib is: it imports the rest)
        where = list(getattr(sys.modules[parent], "__path__", []))
    else:  # a top-level package: found, not imported
        top = importlib.util.find_spec(parent)
        where = list(top.submodule_search_locations or []) if top else []
    if not where:
        return
    spec = importlib.machinery.PathFinder.find_spec(name, where)
    if spec is None or spec.loader is None:
        return
    module = _Deferred(name)
    module.__spec__ = spec
    module.__path__ = list(spec.submodule_search_locations or [])
    sys.modules[name] = module
    if parent in sys.modules:  # as an import would: `import importlib.metadata` uses it
        setattr(sys.modules[parent], name.rpartition(".")[2], module)


_defer("redis.asyncio")
_defer("importlib.metadata")
