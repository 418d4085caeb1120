"""Run tasks as local processes, each in its own process group."""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..cache import Store
from ..errors import BackendError, SheepdogError
from ..logs import LineSplitter
from ..models import Task
from .base import Backend, OutputSink, StatusUpdate, Submission, local_resolver, render_argv

_PR_SET_PDEATHSIG = 1
_KILL_GRACE = 3.0


def _die_with_parent() -> None:
    """In the child: be killed if the worker dies, so a re-run never races a ghost."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the heartbeat still notices the lost worker


def pump(pipe: IO[bytes], stream: str, sink: OutputSink) -> None:
    """Read a pipe to EOF (not to the exit status, so no output is lost) into sink."""
    splitter = LineSplitter()
    while chunk := pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536):
        sink(stream, splitter.feed(chunk))
    sink(stream, splitter.flush())
    pipe.close()


def kill_group(pgid: int, grace: float = _KILL_GRACE) -> None:
    """SIGTERM the whole group, then SIGKILL whatever is left after the grace period."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# Python steps that may run inside the worker instead of a new interpreter: saves the
# interpreter and numpy start-up (a third of a second) on every such short piece. Long
# ones (a batch of permutations) run as processes: they would only fight over the GIL.
IN_PROCESS = {"sheepdog.gemma.ops": {"kinship", "loco-lmm", "gather", "perm-prepare",
                                     "perm-gather"}}


class InProcess:
    """A Python step running on a thread of this worker."""

    def __init__(self, module: str, args: list[str], workdir: Path, sink: OutputSink) -> None:
        self.stop = threading.Event()
        self.code: int | None = None
        main = importlib.import_module(module).main

        def run() -> None:
            try:
                self.code = main(args, workdir=workdir, emit=lambda s: sink("stdout", [s]),
                                 complain=lambda s: sink("stderr", [s]), stop=self.stop)
            except Exception as e:  # a bug in a step must fail the task, not the worker
                sink("stderr", [f"ERROR: {type(e).__name__}: {e}"])
                self.code = 1

        self.thread = threading.Thread(target=run, name=f"step-{module}", daemon=True)
        self.thread.start()


def in_process_module(task: Task) -> str | None:
    argv = task.argv
    if (task.cacheable and len(argv) > 3 and isinstance(argv[0], dict) and "python" in argv[0]
            and argv[1] == "-m" and argv[3] in IN_PROCESS.get(str(argv[2]), ())):
        return str(argv[2])
    return None


class LocalBackend(Backend):
    """This machine. Cacheable tasks run in a private scratch dir and are published on success."""

    name = "local"

    def __init__(self, store: Store) -> None:
        self.store = store

    def _environment(self, task: Task) -> dict[str, str]:
        base = {} if task.clean_env else dict(os.environ)
        base.update(task.env)
        return base

    def submit(self, task: Task, sink: OutputSink) -> Submission:
        scratch = self.store.scratch(task.id) if task.cacheable else None
        resolve = local_resolver(
            task,
            blob=lambda sha: str(self.store.blob(sha)),
            dep_dir=lambda tid: str(self.store.task_dir(tid)),
            scratch=str(scratch or ""),
        )
        argv = render_argv(task.argv, resolve)
        cwd = str(scratch) if scratch else (task.cwd or os.getcwd())
        if not argv:
            raise BackendError(f"task '{task.name}' has an empty command")
        module = in_process_module(task)
        if module and scratch:
            step = InProcess(module, argv[3:], scratch, sink)
            return Submission(task=task, handle=step, workdir=cwd, extra={"scratch": scratch})
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=self._environment(task), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as e:
            if scratch:
                self.store.discard(scratch)
            raise BackendError(f"cannot start {argv[0]!r}: {e.strerror or e}") from e
        readers = [threading.Thread(target=pump, args=(pipe, name, sink), daemon=True)
                   for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
        for r in readers:
            r.start()
        return Submission(task=task, handle=proc, workdir=cwd,
                          extra={"readers": readers, "scratch": scratch})

    def poll(self, active: list[Submission]) -> Iterator[StatusUpdate]:
        for sub in active:
            if isinstance(sub.handle, InProcess):
                if not sub.handle.thread.is_alive():
                    yield self._finish(sub, sub.handle.code if sub.handle.code is not None else 1)
                continue
            proc: subprocess.Popen[bytes] = sub.handle
            if proc.poll() is None:
                continue
            for r in sub.extra["readers"]:
                r.join()
            yield self._finish(sub, proc.returncode)

    def wait(self, active: list[Submission], seconds: float) -> None:
        if isinstance(active[0].handle, InProcess):
            active[0].handle.thread.join(seconds)
            return
        # a reader ends when the process closes its output, normally at its exit: joining
        # wakes at once, where Popen.wait with a timeout polls (up to 50 ms late)
        deadline = time.monotonic() + seconds
        for r in active[0].extra["readers"]:
            r.join(max(0.0, deadline - time.monotonic()))
        if not any(r.is_alive() for r in active[0].extra["readers"]):
            try:
                active[0].handle.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def _finish(self, sub: Submission, code: int) -> StatusUpdate:
        task, scratch = sub.task, sub.extra.get("scratch")
        exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128+N, like a shell
        if scratch is None:
            return StatusUpdate(task.id, exit_code)
        if code != 0:
            self.store.discard(scratch)
            return StatusUpdate(task.id, exit_code, f"exit code {exit_code}")
        try:
            self.store.publish(task.id, Path(scratch), task.outputs, task.complete_when)
        except SheepdogError as e:
            self.store.discard(scratch)
            return StatusUpdate(task.id, exit_code, str(e))
        return StatusUpdate(task.id, 0)

    def cancel(self, active: list[Submission]) -> None:
        for sub in active:
            if isinstance(sub.handle, InProcess):
                sub.handle.stop.set()  # steps check it between units of work
                sub.handle.thread.join()
                self.store.discard(sub.extra["scratch"])
                continue
            kill_group(sub.handle.pid)
            sub.handle.wait()
            if sub.extra.get("scratch"):
                self.store.discard(sub.extra["scratch"])
