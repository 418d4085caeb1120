"""Backends by name: each is one module (or package) of sheepdog.backends that sets
`BACKEND` to its class. Adding a backend touches its own module and its tests only.

Listing names imports nothing (a remote backend pulls in paramiko); a backend's module
is imported when a task first asks for it.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from ..cache import Cache
from ..config import Settings
from ..errors import ConfigError
from ..models import Task
from .base import Backend

_NOT_BACKENDS = {"base", "registry"}


@cache
def names() -> tuple[str, ...]:
    """Every backend's name, without importing any."""
    found = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
             if m.name not in _NOT_BACKENDS and not m.name.startswith("_")]
    return tuple(sorted(found))


@cache
def backend_class(name: str) -> type[Backend]:
    """The class of the backend called `name`; ConfigError lists the known ones."""
    if name not in names():
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(names())}")
    module = importlib.import_module(f"{__package__}.{name}")
    backend: type[Backend] = module.BACKEND
    return backend


def check(name: str, host: str | None) -> None:
    """Refuse a backend that does not exist, or that needs a host and got none."""
    if backend_class(name or "local").needs_host and not host:
        raise ConfigError(f"--backend {name} needs --host HOST")


def open_backend(task: Task, settings: Settings, cache: Cache) -> Backend:
    """A ready backend for the task (its `backend` field, default local)."""
    return backend_class(task.backend or "local").open(task, settings, cache)
