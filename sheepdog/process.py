"""One process pump for every piece: local processes, GEMMA inside a step, remote
channels. Standard library only: this module runs on hosts too.

A reader thread reads one output stream to EOF (not to the exit status, so no output
is lost) and hands complete lines to a sink. If the sink fails (Redis gone for a
moment) the reader keeps the error for the piece and goes on draining, so the program
never blocks on a full pipe while its heartbeat makes it look alive.
"""

from __future__ import annotations

import codecs
import ctypes
import errno
import functools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from .defaults import KILL_GRACE, LOG_MAX_LINE, WATCH_POLL

# Receives a piece's output: (stream name, complete lines). A sink may also have a
# `raw(stream, chunk)` method: then it gets the exact bytes too, before any splitting.
OutputSink = Callable[[str, list[str]], None]

CHUNK = 65536
_PR_SET_PDEATHSIG = 1


class LineSplitter:
    """Turns raw output chunks into lines; a `\\r` redraw (a progress bar) ends a line too.

    Only new data is searched for line breaks, so a long line costs linear time.
    """

    def __init__(self, max_line: int = LOG_MAX_LINE) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []  # the line being built (no break in it yet)
        self._size = 0  # its length, kept or not
        self._cr = False  # the last piece ends with a \r that may be half of \r\n
        self._last = ""
        self._max = max_line

    def feed(self, chunk: bytes) -> list[str]:
        new = self._decoder.decode(chunk)
        if not new:
            return []
        if not self._cr and "\n" not in new and "\r" not in new:
            room = self._max - self._size
            if room > 0:  # past the longest line kept, the rest is only counted
                self._pieces.append(new[:room])
            self._size += len(new)
            return []
        dropped = self._size - sum(map(len, self._pieces))
        text = "".join(self._pieces) + new
        parts = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        rest = parts.pop()
        self._cr = text.endswith("\r")
        if self._cr:  # keep the \r: the next chunk may start with its \n
            rest = parts.pop() + "\r" if parts else "\r"
        self._pieces = [rest] if rest else []
        self._size = len(rest)
        return self._keep(parts, dropped)

    def flush(self) -> list[str]:
        dropped = self._size - sum(map(len, self._pieces))
        rest = ("".join(self._pieces) + self._decoder.decode(b"", final=True)).rstrip("\r")
        self._pieces, self._cr, self._size = [], False, 0
        return self._keep([rest], dropped)

    def _keep(self, parts: list[str], dropped: int = 0) -> list[str]:
        out = []
        for i, part in enumerate(parts):
            length = len(part) + (dropped if i == 0 else 0)
            if length > self._max:
                part = part[:self._max] + f" …[line cut: {length:,d} characters]"
            line = part.rstrip()
            # redraws repeat the same bar: one copy is enough
            if line.strip() and line != self._last:
                out.append(line)
                self._last = line
        return out


class GuardedSink:
    """A sink that keeps its first failure instead of raising it into the reader (or
    step) that called it; later lines are dropped, the piece reports the failure."""

    def __init__(self, sink: OutputSink) -> None:
        self._sink = sink
        self._raw: Callable[[str, bytes], None] | None = getattr(sink, "raw", None)
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def raw(self, stream: str, chunk: bytes) -> None:
        """The exact bytes, for a sink that keeps them (see OutputSink)."""
        if self._raw is None or not chunk or self.error is not None:
            return
        try:
            self._raw(stream, chunk)
        except Exception as e:  # noqa: BLE001
            with self._lock:
                if self.error is None:
                    self.error = e

    def __call__(self, stream: str, lines: list[str]) -> None:
        if not lines or self.error is not None:
            return
        try:
            self._sink(stream, lines)
        except Exception as e:  # noqa: BLE001  whatever it is, the piece must hear of it
            with self._lock:
                if self.error is None:
                    self.error = e

    def failure(self) -> str:
        """Why output was lost, or '' if none was."""
        if self.error is None:
            return ""
        return f"its output could not be recorded: {type(self.error).__name__}: {self.error}"


class Reader(threading.Thread):
    """Reads one stream to EOF into a guarded sink."""

    def __init__(self, read: Callable[[int], bytes], stream: str, sink: GuardedSink,
                 close: Callable[[], object] | None = None) -> None:
        super().__init__(name=f"reader-{stream}", daemon=True)
        self._read, self.stream, self._sink, self._close = read, stream, sink, close

    def run(self) -> None:
        splitter = LineSplitter()
        try:
            while True:
                try:
                    chunk = self._read(CHUNK)
                except (OSError, ValueError):  # closed under us: the stream is over
                    break
                if not chunk:
                    break
                self._sink.raw(self.stream, chunk)
                self._sink(self.stream, splitter.feed(chunk))
            self._sink(self.stream, splitter.flush())
        finally:
            if self._close is not None:
                self._close()


def read_both(stdout: Callable[[int], bytes], stderr: Callable[[int], bytes],
              sink: GuardedSink) -> list[Reader]:
    """Start a reader for each of a program's two output streams."""
    readers = [Reader(stdout, "stdout", sink), Reader(stderr, "stderr", sink)]
    for r in readers:
        r.start()
    return readers


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In the child: get `sig` if the worker dies, so a re-run never races a ghost."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass  # not Linux: the heartbeat still notices the lost worker


# A piece's program runs under this shell, the leader of its process group: if the
# worker dies, the kernel sends the shell SIGUSR2 (die_with_parent), and the shell kills
# the whole group, grandchildren included. Otherwise it only waits and passes the code on.
# The shell would export a PWD of its own: dropped unless the environment had one ($1).
GUARD = 'trap "kill -KILL 0" USR2; [ "$1" = 1 ] || unset PWD; shift; "$@" & wait $!'


@functools.cache
def _setpriv() -> str:
    """util-linux's setpriv, if it can set the parent-death signal here ('' if not)."""
    found = shutil.which("setpriv") or ""
    if not found:
        return ""
    try:
        probe = subprocess.run([found, "--pdeathsig", "KILL", "--", "true"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return found if probe.returncode == 0 else ""


def _guarded(argv: list[str], cwd: str, env: dict[str, str] | None) -> list[str]:
    """argv under GUARD; a program that cannot be found fails here, as exec would."""
    program = argv[0]
    path = (env or os.environ).get("PATH", os.defpath)
    found = (os.path.join(cwd, program) if "/" in program else shutil.which(program, path=path))
    if not found or not os.access(found, os.X_OK) or os.path.isdir(found):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    had_pwd = "1" if "PWD" in (os.environ if env is None else env) else "0"
    return ["/bin/sh", "-c", GUARD, "sheepdog-piece", had_pwd, *argv]


def kill_group(pgid: int, grace: float = KILL_GRACE) -> None:
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
        time.sleep(WATCH_POLL / 4)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def shell_code(returncode: int) -> int:
    """Killed by signal N reads as 128+N, as a shell reports it."""
    return returncode if returncode >= 0 else 128 - returncode


class Process:
    """A program in its own process group, its output pumped into a sink."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str] | None,
                 sink: OutputSink, whole_group: bool = False) -> None:
        """`whole_group`: the program may start processes of its own; they all die with
        the worker too (see GUARD)."""
        self.sink = GuardedSink(sink)
        sig = signal.SIGKILL
        if whole_group:
            argv = _guarded(argv, cwd, env)
            sig = signal.SIGUSR2
        death: Callable[[], None] | None = functools.partial(die_with_parent, sig)
        setpriv = _setpriv()
        if setpriv:
            # the same prctl, set by setpriv after a vfork: a preexec_fn forces a full
            # fork of the worker, 3 ms more per process (measured here)
            argv = [setpriv, "--pdeathsig", signal.Signals(sig).name.removeprefix("SIG"),
                    "--", *argv]
            death = None
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=death)
        out: Any = self.popen.stdout  # BufferedReader: read1 returns what is there now
        err: Any = self.popen.stderr
        self.readers = read_both(out.read1, err.read1, self.sink)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code once the program exited and all its output was read."""
        if self.popen.poll() is None:
            return None
        for r in self.readers:
            r.join()
        return shell_code(self.popen.returncode)

    def wait(self, seconds: float) -> None:
        """Block up to `seconds`, returning as soon as the program ends."""
        # a reader ends when the program closes its output, normally at its exit:
        # joining wakes at once, where Popen.wait with a timeout polls (up to 50 ms late)
        deadline = time.monotonic() + seconds
        for r in self.readers:
            r.join(max(0.0, deadline - time.monotonic()))
        if not any(r.is_alive() for r in self.readers):
            try:
                self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def kill(self, grace: float = KILL_GRACE) -> None:
        """Stop the whole group and reap it."""
        kill_group(self.popen.pid, grace)
        self.popen.wait()
        for r in self.readers:
            r.join()

    def failure(self) -> str:
        """Why some output was lost ('' if none was)."""
        return self.sink.failure()
