"""Running one claimed piece on its backend to its end, the same for every worker.

A Redis worker (worker.py) and a pull worker (pull.py) differ in how they claim a
piece, keep it theirs and record its end; how it runs, streams its output, is
stopped (cancelled, timed out, handed back) and what its outcome is, is this module's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .backends import registry
from .backends.base import Backend, StatusUpdate, Submission
from .cache import Cache
from .config import Settings
from .defaults import WATCH_POLL
from .errors import SheepdogError
from .models import Task

log = logging.getLogger(__name__)

RELEASED = "released"  # Outcome.error of a piece stopped because its worker is leaving


@dataclass
class Outcome:
    exit_code: int | None
    error: str = ""
    lost: bool = False


class LineWriter(Protocol):
    """Where a piece's lines go (logs.LogWriter to Redis, or a pull worker's batches)."""

    lost: str

    def write(self, stream: str, lines: list[str]) -> None: ...

    def flush(self) -> None: ...


class RawSink(Protocol):
    def append(self, stream: str, chunk: bytes) -> None: ...

    def flush(self) -> None: ...


class PieceOutput:
    """Where a running piece's output goes: its jobs' logs, the stderr tail quoted in
    its error, and for a capturing piece the exact bytes (see process.OutputSink)."""

    def __init__(self, writer: LineWriter, raw: RawSink | None) -> None:
        self.writer = writer
        self.raw_writer = raw
        self.tail: deque[str] = deque(maxlen=6)
        # stdout lines that say error: some programs print their own there (GEMMA's
        # "error! unrecognized option") while stderr only has their banner
        self.errors: deque[str] = deque(maxlen=3)

    def __call__(self, stream: str, lines: list[str]) -> None:
        if stream == "stderr":
            self.tail.extend(lines)
        else:
            self.errors.extend(line for line in lines if "error" in line.lower())
        self.writer.write(stream, lines)

    def raw(self, stream: str, chunk: bytes) -> None:
        if self.raw_writer is not None:
            self.raw_writer.append(stream, chunk)

    def flush(self) -> None:
        self.writer.flush()
        if self.raw_writer is not None:
            self.raw_writer.flush()


def explain(outcome: Outcome, output: PieceOutput) -> Outcome:
    """The outcome with its error said in full: the exit code, the program's own error
    lines from stdout, the last stderr lines."""
    if outcome.exit_code not in (0, None) and not outcome.error:
        outcome.error = f"exit code {outcome.exit_code}"
    said = [*output.errors, *(line for line in output.tail if line not in output.errors)]
    if outcome.error and said and outcome.exit_code not in (None, 0):
        outcome.error += ": " + " | ".join(said)
    return outcome


def run(task: Task, settings: Settings, cache: Cache, output: PieceOutput,
        revoked: threading.Event, leaving: threading.Event) -> Outcome:
    """Run the task on its backend until it ends, is revoked (cancelled, taken from
    this worker), times out, or its worker leaves (Outcome error RELEASED)."""
    try:
        backend = registry.open_backend(task, settings, cache)
    except SheepdogError as e:
        return Outcome(None, str(e))
    try:
        sub = backend.submit(task, output)
        return _watch(backend, sub, task, output, _Stopper(task, revoked, leaving))
    except SheepdogError as e:
        return Outcome(None, str(e))
    except Exception as e:  # a backend's bug fails the piece, loudly, not the worker
        log.exception("task %s failed inside sheepdog", task.id)
        return Outcome(None, f"internal error in the {task.backend} backend: "
                             f"{type(e).__name__}: {e}")
    finally:
        backend.close()


TIMEOUT_CODE = 124  # what timeout(1) exits with when it killed the command


class _Stopper:
    """Why a running piece must stop now ('' if it may go on)."""

    def __init__(self, task: Task, revoked: threading.Event, leaving: threading.Event) -> None:
        self.task, self.revoked, self.leaving = task, revoked, leaving
        self.deadline = time.monotonic() + task.timeout if task.timeout > 0 else None

    def reason(self) -> str:
        if self.revoked.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"timed out after {self.task.timeout:g}s"
        if self.leaving.is_set():
            return RELEASED
        return ""


def _watch(backend: Backend, sub: Submission, task: Task, output: PieceOutput,
           stop: _Stopper) -> Outcome:
    """Watch a started piece to its end; whatever goes wrong while watching (a backend
    error, a bug) stops the submission, so nothing runs on unwatched."""
    try:
        return _watch_loop(backend, sub, output, stop)
    except BaseException:
        try:
            backend.cancel([sub])
        except Exception as e:  # noqa: BLE001  the original failure is the one to report
            log.warning("task %s: could not cancel after a failure: %s", task.id, e)
        raise


def _watch_loop(backend: Backend, sub: Submission, output: PieceOutput,
                stop: _Stopper) -> Outcome:
    deadline = stop.deadline
    if sub.here is not None:  # it runs now, on this thread, and looks at stop itself
        sub.here(_Looks(stop, output))
        why = stop.reason()
        now = list(backend.poll([sub]))
        if now and (now[0].exit_code == 0 or not why):
            return Outcome(now[0].exit_code, now[0].error, now[0].lost)
        if why:  # stopped midway: the reason is its outcome, not the step's failure
            return _stopped(backend, sub, why)
    while True:
        ended: list[StatusUpdate] = list(backend.poll([sub]))
        if ended:
            return Outcome(ended[0].exit_code, ended[0].error, ended[0].lost)
        why = stop.reason()
        if why:
            return _stopped(backend, sub, why)
        output.flush()  # quiet output still reaches readers within a fraction of a second
        wait = WATCH_POLL if deadline is None else min(
            WATCH_POLL, max(0.001, deadline - time.monotonic()))
        backend.wait([sub], wait)


class _Looks:
    """What a piece that runs on its watcher's thread is given to look at between its
    units of work: whether it must stop; and, as the watch loop would, its quiet output
    flushed every WATCH_POLL (a pull worker's lines wait for it)."""

    def __init__(self, stop: _Stopper, output: PieceOutput) -> None:
        self.stop, self.output = stop, output
        self.flush_at = time.monotonic() + WATCH_POLL

    def __call__(self) -> bool:
        now = time.monotonic()
        if now >= self.flush_at:
            self.output.flush()
            self.flush_at = now + WATCH_POLL
        return bool(self.stop.reason())


def _stopped(backend: Backend, sub: Submission, why: str) -> Outcome:
    backend.cancel([sub])
    # a timeout's exit code is timeout(1)'s, so `run --timeout` says it as a shell would
    return Outcome(TIMEOUT_CODE if why.startswith("timed out") else None, why)
