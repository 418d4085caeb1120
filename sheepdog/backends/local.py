"""Run tasks as local processes, each in its own process group."""

from __future__ import annotations

import ctypes
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
            proc: subprocess.Popen[bytes] = sub.handle
            if proc.poll() is None:
                continue
            for r in sub.extra["readers"]:
                r.join()
            yield self._finish(sub, proc.returncode)

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
            kill_group(sub.handle.pid)
            sub.handle.wait()
            if sub.extra.get("scratch"):
                self.store.discard(sub.extra["scratch"])
