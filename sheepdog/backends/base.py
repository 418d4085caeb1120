"""The backend contract, after snakemake's executor interface.

The caller (worker.py) owns the store writes, retries and back-off; a backend only
starts a task, reports on the ones it started, and stops them.
"""

from __future__ import annotations

import abc
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..cache import Cache
from ..config import Settings
from ..errors import BackendError
from ..models import ArgvItem, Task
from ..process import OutputSink

__all__ = ["Backend", "OutputSink", "StatusUpdate", "Submission", "local_resolver",
           "render_argv"]


@dataclass
class Submission:
    """A task a backend has started; `handle` is the backend's own (a Popen, a Slurm id)."""

    task: Task
    handle: Any = None
    workdir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Work that runs on the watching thread itself when watching begins (a short Python
    # step: no thread of its own to start and hand over to); it is given a function
    # that says when it must stop, and looks at it between its units of work.
    here: Callable[[Callable[[], bool]], None] | None = None


@dataclass(frozen=True)
class StatusUpdate:
    """A submission that has ended: exit code, or an error saying why there is none."""

    task_id: str
    exit_code: int | None
    error: str = ""
    lost: bool = False  # the backend lost the piece (host or link down): worth running again


class Backend(abc.ABC):
    """Runs tasks somewhere; see the module docstring for who owns what."""

    name = "abstract"
    needs_host = False  # True: a task must name the host it runs on

    @classmethod
    @abc.abstractmethod
    def open(cls, task: Task, settings: Settings, cache: Cache) -> Backend:
        """A backend ready for this task, built from its own settings (its settings
        dataclass reads what it needs from the task, the settings and the inventory)."""

    @abc.abstractmethod
    def submit(self, task: Task, sink: OutputSink) -> Submission:
        """Stage the task's inputs, start it, and stream its output into sink."""

    @abc.abstractmethod
    def poll(self, active: list[Submission]) -> Iterator[StatusUpdate]:
        """One batched look at the active submissions; yields those that ended."""

    @abc.abstractmethod
    def cancel(self, active: list[Submission]) -> None:
        """Stop these submissions and everything they started."""

    def wait(self, active: list[Submission], seconds: float) -> None:
        """Block up to `seconds`, returning early if a submission may have ended."""
        time.sleep(seconds)

    def close(self) -> None:  # noqa: B027  most backends hold nothing to release
        """Release connections; the backend is not used again."""


def render_argv(argv: list[ArgvItem], resolve: Callable[[dict[str, Any]], str]) -> list[str]:
    """A task's argv with every placeholder replaced by the path resolve() gives it."""
    out = []
    for item in argv:
        out.append(item if isinstance(item, str) else resolve(item))
    return out


def local_resolver(task: Task, blob: Callable[[str], str], dep_dir: Callable[[str], str],
                   scratch: str, python: str = sys.executable) -> Callable[[dict[str, Any]], str]:
    """Placeholder resolution given where inputs, dependencies and scratch live."""

    def resolve(item: dict[str, Any]) -> str:
        if "input" in item:
            name = item["input"]
            if name not in task.inputs:
                raise BackendError(f"piece '{task.name}' names unknown input {name!r}")
            return blob(task.inputs[name])
        if "dep" in item:
            return f"{dep_dir(item['dep'])}/{item['file']}"
        if "out" in item:
            return f"{scratch}/{item['out']}"
        if "python" in item:
            return python
        raise BackendError(f"piece '{task.name}' has an unknown argv placeholder {item!r}")

    return resolve
