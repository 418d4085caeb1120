"""Run tasks as local processes, each in its own process group."""

from __future__ import annotations

import _thread
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..cache import Cache
from ..config import Settings
from ..errors import BackendError, SheepdogError
from ..models import Task
from ..process import GuardedSink, Process, Spawned, environment
from .base import Backend, OutputSink, StatusUpdate, Submission, local_resolver, render_argv


class InProcess:
    """A Python step run inside this worker: on the thread that watches it (`here`: no
    thread to start, no hand-over waiting for the GIL that the worker's busy threads
    hold), or, if it is waited for without that, on a thread of its own."""

    def __init__(self, main: Any, args: list[str], workdir: Path, sink: OutputSink) -> None:
        self.main, self.args, self.workdir = main, args, workdir
        self.stop = threading.Event()
        self.code: int | None = None
        self.sink = GuardedSink(sink)
        self.over = False
        self._begun = False
        self._ended = threading.Lock()  # held while the step runs
        self._ended.acquire()

    def here(self, stopped: Callable[[], bool]) -> None:
        """Run the step to its end on this thread; `stopped` (or cancel) stops it."""
        if not self._begin():
            return
        self._run(_Either(self.stop, stopped))

    def _begin(self) -> bool:
        with _starting:
            begun, self._begun = self._begun, True
        return not begun

    def _run(self, stop: Any) -> None:
        out = self.sink
        try:
            self.code = self.main(self.args, workdir=self.workdir,
                                  emit=lambda s: out("stdout", [s]),
                                  complain=lambda s: out("stderr", [s]), stop=stop)
        except Exception as e:  # a bug in a step must fail the task, not the worker
            out("stderr", [f"ERROR: {type(e).__name__}: {e}"])
            self.code = 1
        finally:
            self.over = True
            self._ended.release()

    def cancel(self) -> None:
        """Stop the step (steps look between their units of work) and wait for its end."""
        self.stop.set()
        if not self._begin():
            self.wait()

    def wait(self, seconds: float | None = None) -> None:
        """Until the step ends, or `seconds` (None: for as long as it takes)."""
        if self._begin():  # not run here: it runs on a thread of its own
            _thread.start_new_thread(self._run, (self.stop,))
        if self._ended.acquire(timeout=-1 if seconds is None else max(0.0, seconds)):
            self._ended.release()


_starting = threading.Lock()


class _Either:
    """A step's stop: cancelled, or told by its watcher (cancelled, timed out, leaving)."""

    def __init__(self, stop: threading.Event, stopped: Callable[[], bool]) -> None:
        self._stop, self._stopped = stop, stopped

    def is_set(self) -> bool:
        return self._stop.is_set() or self._stopped()

    def wait(self, seconds: float) -> bool:
        return self._stop.wait(seconds) or self._stopped()


def in_process_main(task: Task) -> Any:
    """The main() of a sheepdog Python step that may run inside the worker, or None.

    A step module lists such operations in its IN_PROCESS set: running them on a thread
    saves the interpreter and numpy start-up (a third of a second) on every short
    piece. Long ones (a batch of permutations) run as processes: they would only fight
    over the GIL.
    """
    argv = task.argv
    if not (task.cacheable and len(argv) > 3 and isinstance(argv[0], dict)
            and "python" in argv[0] and argv[1] == "-m"
            and str(argv[2]).startswith("sheepdog.")):
        return None
    name = str(argv[2])
    module = _steps.get(name)
    if module is None:  # looked up once: import_module costs a short piece 2% each time
        module = _steps[name] = importlib.import_module(name)
    return module.main if argv[3] in getattr(module, "IN_PROCESS", ()) else None


_steps: dict[str, Any] = {}  # step modules by name, each whole once imported


class LocalBackend(Backend):
    """This machine. Cacheable tasks run in a private scratch dir and are published on success."""

    name = "local"

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    @classmethod
    def open(cls, task: Task, settings: Settings, cache: Cache) -> LocalBackend:
        return cls(cache)

    def _environment(self, task: Task) -> dict[str, str]:
        base = {} if task.clean_env else dict(environment())
        base.update(task.env)
        return base

    def submit(self, task: Task, sink: OutputSink) -> Submission:
        scratch = self.cache.scratch(task.id) if task.cacheable else None
        resolve = local_resolver(
            task,
            blob=lambda sha: str(self.cache.blob(sha)),
            dep_dir=lambda tid: str(self.cache.task_dir(tid)),
            scratch=str(scratch or ""),
        )
        argv = render_argv(task.argv, resolve)
        cwd = str(scratch) if scratch else (task.cwd or os.getcwd())
        if not argv:
            raise BackendError(f"piece '{task.name}' has an empty command")
        main = in_process_main(task) if scratch else None
        if main is not None and scratch:
            step = InProcess(main, argv[3:], scratch, sink)
            return Submission(task=task, handle=step, workdir=cwd, extra={"scratch": scratch},
                              here=step.here)
        try:
            # started by posix_spawn where it can be: a third of the CPU per short piece
            proc: Process | Spawned = (
                Spawned(argv, cwd, self._environment(task), sink) if Spawned.usable()
                else Process(argv, cwd, self._environment(task), sink, whole_group=True))
        except OSError as e:
            if scratch:
                self.cache.discard(scratch)
            raise BackendError(f"cannot start {argv[0]!r}: {e.strerror or e}") from e
        return Submission(task=task, handle=proc, workdir=cwd, extra={"scratch": scratch})

    def poll(self, active: list[Submission]) -> Iterator[StatusUpdate]:
        for sub in active:
            if isinstance(sub.handle, InProcess):
                if sub.handle.over:
                    step_code = sub.handle.code if sub.handle.code is not None else 1
                    yield self._finish(sub, step_code, sub.handle.sink.failure())
                continue
            code = sub.handle.poll()
            if code is not None:
                yield self._finish(sub, code, sub.handle.failure())

    def wait(self, active: list[Submission], seconds: float) -> None:
        active[0].handle.wait(seconds)

    def _finish(self, sub: Submission, exit_code: int, lost_output: str = "") -> StatusUpdate:
        task, scratch = sub.task, sub.extra.get("scratch")
        if lost_output:  # the run itself may be fine, but its log is not whole: run again
            if scratch is not None:
                self.cache.discard(scratch)
            # a command is not run twice for its log's sake: it may have side effects
            return StatusUpdate(task.id, exit_code, lost_output, lost=task.cacheable)
        if scratch is None:
            return StatusUpdate(task.id, exit_code)
        if exit_code != 0:
            self.cache.discard(scratch)
            return StatusUpdate(task.id, exit_code, f"exit code {exit_code}")
        try:
            self.cache.publish(task.id, scratch, task.outputs, task.complete_when)
        except SheepdogError as e:
            self.cache.discard(scratch)
            return StatusUpdate(task.id, exit_code, str(e))
        return StatusUpdate(task.id, 0)

    def cancel(self, active: list[Submission]) -> None:
        for sub in active:
            if isinstance(sub.handle, InProcess):
                sub.handle.cancel()
                self.cache.discard(sub.extra["scratch"])
                continue
            sub.handle.kill()
            if sub.extra.get("scratch"):
                self.cache.discard(sub.extra["scratch"])


BACKEND = LocalBackend
