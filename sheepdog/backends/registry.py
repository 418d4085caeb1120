"""Opening the backend a task names (local is handled by the worker itself)."""

from __future__ import annotations

from ..cache import Store
from ..config import Settings
from ..errors import ConfigError
from ..hosts import resolve
from ..models import Task
from .base import Backend


def open_backend(task: Task, settings: Settings, store: Store) -> Backend:
    if task.backend == "shell":
        from .shell import ShellBackend

        return ShellBackend(resolve(task.host, settings.inventory), store)
    if task.backend == "slurm":
        from .slurm import SlurmBackend

        host = resolve(task.host, settings.inventory) if task.host else None
        return SlurmBackend(host, store, settings)
    raise ConfigError(f"unknown backend {task.backend!r}")
