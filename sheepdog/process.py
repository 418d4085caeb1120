"""One process pump for every piece: local processes, GEMMA inside a step, remote
channels. Standard library only: this module runs on hosts too.

A reader thread reads one output stream to EOF (not to the exit status, so no output
is lost) and hands complete lines to a sink. If the sink fails (Redis gone for a
moment) the reader keeps the error for the piece and goes on draining, so the program
never blocks on a full pipe while its heartbeat makes it look alive.
"""

from __future__ import annotations

import _thread
import codecs
import contextlib
import ctypes
import errno
import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .defaults import KILL_GRACE, LOG_MAX_LINE, WATCH_POLL

# Receives a piece's output: (stream name, complete lines). A sink may also have a
# `raw(stream, chunk)` method: then it gets the exact bytes too, before any splitting.
OutputSink = Callable[[str, list[str]], None]



class RawSink(Protocol):
    """A sink that also takes the exact bytes, before any splitting."""

    def __call__(self, stream: str, lines: list[str]) -> None: ...

    def raw(self, stream: str, chunk: bytes) -> None: ...


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


def own_signals() -> None:
    """Undo SIGINT and SIGQUIT ignored by whoever started this process (a shell runs
    `cmd &` that way): ignored signals stay ignored across exec, so every piece would
    inherit it, and GEMMA, which stops itself with SIGINT on a singular matrix, would go
    on and report a success. Handled signals are reset to their default in a child."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


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
    if not find_program(program, cwd, (env or os.environ).get("PATH", os.defpath)):
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


def _descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int, reap: bool = True) -> int:
    """Kill a process and everything it started (in a group shared with others, so not
    by group); its exit status (0 unreaped, for a Popen to reap)."""
    for target in [pid, *_descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return os.waitpid(pid, 0)[1] if reap else 0


# SIGPIPE is ignored in Python: an item gets the defaults, as Popen's restore_signals does
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def find_program(program: str, cwd: str, path: str) -> str:
    """Where a program is, as exec would find it ('' if nowhere)."""
    found = (os.path.join(cwd, program) if "/" in program else shutil.which(program, path=path))
    if not found or not os.access(found, os.X_OK) or os.path.isdir(found):
        return ""
    return found


# one PATH search per run-many chunk, not per item (fourteen stat calls each, measured):
# its items share their working directory, and the chunk's process is short-lived
_found = functools.lru_cache(maxsize=64)(find_program)


def _program(program: str, cwd: str, path: str) -> str:
    """find_program, remembered; by PATH alone where the directory cannot matter (a
    bare name, every PATH entry absolute), so pieces each in a scratch directory of
    their own search PATH once, not once each."""
    if "/" not in program and all(d and os.path.isabs(d) for d in path.split(os.pathsep)):
        cwd = ""
    return _found(program, cwd, path)


@functools.cache
def _devnull() -> int:
    """One /dev/null for every item's stdin (close-on-exec here; dup2 gives it to each)."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


# Kills the process groups it was told of ("+ PGID", "- PGID" lines) once its input ends:
# when the process that started them died, SIGKILL included (nothing else holds the pipe).
# (dash's kill takes no "--": a negative number after the signal is a group.)
_KEEPER = ('$1 == "+" { g[$2] = 1; next } $1 == "-" { delete g[$2]; next } '
           'END { for (k in g) system("kill -9 -" k " 2>/dev/null") }')


class _Keeper:
    """One awk per process, keeping its light items' groups: they die with it, as a
    guarded Process's do (GUARD), without a shell and setpriv started for each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._owner = 0
        self._pid = 0

    def tell(self, line: str) -> bool:
        """Send a line; False when no keeper can run here (no awk)."""
        with self._lock:
            if self._fd is None or self._owner != os.getpid():  # none yet, or forked
                self._fd, self._pid = self._start(self._pid)
                self._owner = os.getpid()
            if self._fd < 0:
                return False
            try:
                os.write(self._fd, line.encode())
            except OSError:  # it died (killed by hand): the next line starts another
                os.close(self._fd)
                self._fd = None
                return False
            return True

    @staticmethod
    def _start(last: int) -> tuple[int, int]:
        """(the new keeper's input, its pid); (-1, 0) if none can start."""
        if last:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(last, os.WNOHANG)  # the one that died: no zombie left
        awk = shutil.which("awk") or ""
        if not awk:
            return -1, 0
        read, write = os.pipe()  # both close-on-exec: no item holds the keeper's input
        try:
            pid = os.posix_spawn(awk, ["awk", _KEEPER], {"PATH": os.defpath}, setsid=True,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, read, 0),
                                               (os.POSIX_SPAWN_DUP2, _devnull(), 1)])
        except OSError:
            os.close(write)
            return -1, 0
        finally:
            os.close(read)
        return write, pid


_keeper = _Keeper()

_CLONE_FS = 0x200  # unshare(2): this thread's working directory becomes its own


@functools.cache
def _unshare() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return None


def own_directory() -> bool:
    """Give the calling thread a working directory of its own (Linux), so that it can
    move to its items' directory and start them there by posix_spawn (which cannot
    change directory itself, here) without moving the rest of the worker. False where
    it cannot: then it must not chdir."""
    unshare = _unshare()
    return unshare is not None and unshare(_CLONE_FS) == 0


def _spawn(argv: list[str], cwd: str, env: dict[str, str],
           own_group: bool = False, child_cwd: bool = False) -> tuple[int, int, int]:
    """Start a program by posix_spawn (vfork + exec: a tenth of Popen's cost here; the GIL
    let go meanwhile: posix_spawn_nogil); (pid, stdout fd, stderr fd). Python's pipes are
    close-on-exec, so the program keeps only the ends given to it. It starts in the calling
    thread's working directory (map's `run-many`, a single-threaded process of its own,
    moved there; `run`, a thread of its own directory: see own_directory), in this process's
    group, or with `own_group` in a group of its own, kept so that it dies with this process
    (see _Keeper). With `child_cwd` (where spawn_moves_child()) the child itself moves
    to `cwd` before its exec, and any thread may start it."""
    path = env.get("PATH", os.defpath)
    # a program not found is looked for again next time: it may be there by then; one
    # found before but gone since (moved, reinstalled) is looked for again now
    found = _program(argv[0], cwd, path)
    if not found or not os.access(found, os.X_OK):
        _found.cache_clear()
        found = find_program(argv[0], cwd, path)
    if not found:
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = posix_spawn_nogil(found, argv, env, [(_devnull(), 0), (out_w, 1), (err_w, 2)],
                                _DEFAULT_SIGNALS, setsid=own_group,
                                cwd=cwd if child_cwd else None)
    except OSError:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return pid, out_r, err_r


def light_groups() -> bool:
    """Can items run in light groups of their own here (run_light's own_group)?"""
    return _keeper.tell("")


def run_light(argv: list[str], cwd: str, env: dict[str, str], timeout: float,
              output: RawSink, stop: threading.Event,
              own_group: bool = False, child_cwd: bool = False) -> tuple[str, int | None]:
    """A tiny program to its end, cheaply, read by one poll loop without threads; a
    timeout or `stop` kills it, all it started too. (status, exit code). Most items of a
    big chunk print nothing: line splitting starts with the first byte.

    It starts in the calling thread's working directory, which must be `cwd` (see
    _spawn). By default it stays in this process's group (map's `run-many`: a process of
    its own, whose group dies with the worker); `own_group` (map's in-process `run`, on a
    worker's thread): in a group of its own, which dies with the worker (light_groups()
    says whether it can here). With `child_cwd` (where spawn_moves_child()) the child
    moves to `cwd` itself and the caller stays where it is."""
    try:
        pid, out_fd, err_fd = _spawn(argv, cwd, env, own_group, child_cwd)
    except OSError as e:
        output("stderr", [f"cannot start {argv[0]!r}: {e.strerror or e}"])
        return "failed", 127
    if own_group:
        _keeper.tell(f"+ {pid}\n")
    try:
        status = _pump(pid, out_fd, err_fd, timeout, output, stop, own_group)
    finally:
        if own_group:
            _keeper.tell(f"- {pid}\n")
    if isinstance(status, str):
        return status, None
    code = shell_code(os.waitstatus_to_exitcode(status))
    return ("success" if code == 0 else "failed"), code


class Spawned:
    """A piece's program started by posix_spawn straight into a group of its own, which
    the keeper holds (it dies with the worker, SIGKILL included), its output read by one
    thread's poll loop: what Process does with setpriv, a guard shell, Popen and two
    reader threads, for two programs, a fork and two threads less on every piece.
    Where glibc's posix_spawn can move the child to its directory, the caller starts it
    and its reader takes over without a handshake: every thread start a piece waits for
    is a wait for the GIL, which a busy worker's other threads hold.
    `usable()` says whether it can run here (Linux, awk for the keeper)."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str],
                 sink: OutputSink) -> None:
        self.sink = GuardedSink(sink)
        self.code: int | None = None
        self.pid = 0
        self._fds = (-1, -1)
        self._stop = threading.Event()
        self._over = False
        self._ended = threading.Lock()  # held until the output is read and the code known
        self._ended.acquire()
        if spawn_moves_child():
            try:
                self._started(*_spawn(argv, cwd, env, own_group=True, child_cwd=True))
            except BaseException:
                self._ended.release()
                raise
            try:
                _thread.start_new_thread(self._read, ())
            except BaseException:  # no reader (no thread to be had): nothing runs unwatched
                _end(self.pid, own_group=True)
                for fd in self._fds:
                    os.close(fd)
                _keeper.tell(f"- {self.pid}\n")
                self._ended.release()
                raise
            return
        started = threading.Event()
        failed: list[OSError] = []

        def run() -> None:
            try:  # posix_spawn starts it in this thread's working directory
                if not own_directory():
                    raise OSError(errno.ENOSYS, "no working directory of its own")
                os.chdir(cwd)
                self._started(*_spawn(argv, cwd, env, own_group=True))
            except OSError as e:
                failed.append(e)
                self._over = True
                self._ended.release()
                started.set()
                return
            started.set()
            self._read()

        _thread.start_new_thread(run, ())
        started.wait()
        if failed:
            raise failed[0]

    def _started(self, pid: int, out_fd: int, err_fd: int) -> None:
        self.pid, self._fds = pid, (out_fd, err_fd)
        _keeper.tell(f"+ {pid}\n")

    def _read(self) -> None:
        """The program's output to its end, then its exit code."""
        try:
            status = _pump(self.pid, *self._fds, 0, self.sink, self._stop, True)
            self.code = 137 if isinstance(status, str) else shell_code(
                os.waitstatus_to_exitcode(status))
        finally:
            if self.code is None:  # a failure in here: the piece fails, not hangs
                self.code = 1
            _keeper.tell(f"- {self.pid}\n")
            self._over = True
            self._ended.release()

    @staticmethod
    def usable() -> bool:
        return _unshare() is not None and light_groups()

    def poll(self) -> int | None:
        """The exit code once the program exited and all its output was read."""
        return self.code if self._over else None

    def wait(self, seconds: float | None = None) -> None:
        """Block up to `seconds` (None: until it ends), returning as soon as it ends."""
        if self._ended.acquire(timeout=-1 if seconds is None else max(0.0, seconds)):
            self._ended.release()

    def kill(self, grace: float = KILL_GRACE) -> None:
        """Stop the whole group (SIGTERM, SIGKILL after `grace`) and reap it."""
        kill_group(self.pid, grace)
        self._stop.set()  # a child that left the group and holds the output open
        self.wait()

    def failure(self) -> str:
        """Why some output was lost ('' if none was)."""
        return self.sink.failure()


def _end(pid: int, own_group: bool) -> None:
    if not own_group:
        kill_tree(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _pump(pid: int, out_fd: int, err_fd: int, timeout: float, output: RawSink,
          stop: threading.Event, own_group: bool) -> int | str:
    """Read a light item's output to its end; its wait status, or why it was stopped."""
    streams = {out_fd: "stdout", err_fd: "stderr"}
    splitters: dict[str, LineSplitter] = {}
    deadline = time.monotonic() + timeout if timeout > 0 else None
    poller = select.poll()
    poller.register(out_fd, select.POLLIN)
    poller.register(err_fd, select.POLLIN)
    try:
        while streams:
            wait = WATCH_POLL if deadline is None else max(
                0.0, min(WATCH_POLL, deadline - time.monotonic()))
            for fd, _ in poller.poll(wait * 1000):
                chunk = os.read(fd, 65536)
                name = streams[fd]
                if not chunk:
                    poller.unregister(fd)
                    del streams[fd]
                    if name in splitters:
                        output(name, splitters[name].flush())
                    continue
                output.raw(name, chunk)
                splitter = splitters.get(name) or splitters.setdefault(name, LineSplitter())
                output(name, splitter.feed(chunk))
            if stop.is_set():
                _end(pid, own_group)
                return "cancelled"
            if deadline is not None and time.monotonic() > deadline:
                _end(pid, own_group)
                output("stderr", [f"timed out after {timeout:g}s"])
                return "timeout"
        return os.waitpid(pid, 0)[1]
    finally:
        os.close(out_fd)
        os.close(err_fd)


def capture(argv: list[str], cwd: str | os.PathLike[str] | None = None,
            env: dict[str, str] | None = None, together: bool = False,
            stop: threading.Event | None = None, timeout: float | None = None
            ) -> tuple[int, str, str]:
    """A short program run to its end with its output kept, as a step runs GEMMA:
    (exit code, stdout, stderr; with `together`, stderr is in stdout). It stays in this
    process's group, so it dies with the worker; `stop` kills its tree (exit code -1),
    and so does `timeout` (TimeoutError). OSError if it cannot start."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if together else subprocess.PIPE)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=None if stop is None and deadline is None
                                        else WATCH_POLL)
            break
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                kill_tree(proc.pid, reap=False)
                proc.communicate()
                raise TimeoutError(f"{argv[0]} did not end within {timeout:g}s") from None
            if stop is not None and stop.is_set():
                kill_tree(proc.pid, reap=False)
                proc.communicate()
                return -1, "", "cancelled"
    decode = functools.partial(bytes.decode, errors="replace")
    return shell_code(proc.returncode), decode(out or b""), decode(err or b"")


# ---------------------------------------------------------------- posix_spawn, GIL let go
# Python's os.posix_spawn keeps the GIL while the child is made and execs (vfork: until
# exec, a few tenths of a millisecond here), so every other thread of a worker (its other
# slots, a pull worker's reports and claims) waits for each program started. glibc's own
# posix_spawn called through ctypes lets them run; where it cannot be had (another libc),
# os.posix_spawn is used as before.

# glibc's flag values (spawn.h); POSIX_SPAWN_SETSID since glibc 2.26
_SETSIGDEF = 0x04
_SETSID = 0x80
_ROOM = 1024  # bytes for glibc's opaque structures (80, 336 and 128 on x86-64)


class _Libc:
    """glibc's spawn functions. posix_spawn lets the GIL go (a CDLL function): it waits
    for the child's exec. The others take a few instructions and keep it (PyDLL): each
    let-go is a moment for another thread to take the GIL and this one to wait for it
    back, a dozen times a program started."""

    def __init__(self) -> None:
        free = ctypes.CDLL(None, use_errno=True)
        self._held = ctypes.PyDLL(None, use_errno=True)
        self.posix_spawn = free.posix_spawn
        self.posix_spawn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p,
                                     ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_char_p),
                                     ctypes.POINTER(ctypes.c_char_p)]
        self.posix_spawn.restype = ctypes.c_int
        self._held.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._held, name)


@functools.cache
def _spawn_lib() -> _Libc | None:
    """glibc's spawn functions, or None where they are not glibc's."""
    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        return None
    try:
        return _Libc()
    except (OSError, AttributeError):
        return None


@functools.cache
def spawn_moves_child() -> bool:
    """Can posix_spawn_nogil move the child to its directory (glibc 2.29 and later)?"""
    libc = _spawn_lib()
    return libc is not None and hasattr(libc, "posix_spawn_file_actions_addchdir_np")


_Snapshot = tuple[dict[bytes, bytes], dict[str, str]]
_environ: _Snapshot | None = None


def environment() -> dict[str, str]:
    """os.environ as a dict (not to be changed: copy it), decoded again only when it
    changed: a copy decodes every name and value in Python, a tenth of what a worker
    spent on a tiny piece. Changes are seen by comparing the bytes os.environ keeps
    (CPython's, compared in C); where it keeps none, a fresh copy."""
    global _environ
    raw = getattr(os.environ, "_data", None)
    known = _environ
    if isinstance(raw, dict) and known is not None and known[0] == raw:
        return known[1]
    decoded = dict(os.environ)
    if isinstance(raw, dict):
        _environ = (dict(raw), decoded)
    return decoded


@functools.lru_cache(maxsize=1024)
def _env_entry(name: str, value: str) -> bytes | None:
    """NAME=VALUE as a child's environment holds it, encoded once for the names and
    values every piece gets; None for one it cannot hold as given (os.posix_spawn then
    says why)."""
    if "=" in name or not name or "\0" in name or "\0" in value:
        return None
    return os.fsencode(f"{name}={value}")


def _c_strings(values: Sequence[bytes]) -> Any:
    """A NULL-ended array of C strings; a NUL inside one would end it early: refused, as
    os.posix_spawn refuses it."""
    if any(b"\0" in v for v in values):
        raise ValueError("embedded null byte")
    return (ctypes.c_char_p * (len(values) + 1))(*values, None)


def posix_spawn_nogil(path: str, argv: Sequence[str], env: dict[str, str],
                      dup2: Sequence[tuple[int, int]], default_signals: Sequence[int] = (),
                      setsid: bool = False, cwd: str | None = None) -> int:
    """Start `path` with `argv` and `env`, each (fd, target) of `dup2` made the child's
    target fd, `default_signals` at their default disposition, in a session of its own
    with `setsid`, moved to `cwd` before its exec if given (only where
    spawn_moves_child()); the pid (OSError as os.posix_spawn raises it)."""
    libc = _spawn_lib()
    if cwd is not None and not spawn_moves_child():
        raise OSError(errno.ENOSYS, "posix_spawn cannot change directory here", path)
    entries = list(map(_env_entry, env.keys(), env.values()))
    if libc is None or None in entries:  # the latter: refused in Python's own words
        return os.posix_spawn(path, list(argv), env, setsigdef=tuple(default_signals),
                              setsid=setsid,
                              file_actions=[(os.POSIX_SPAWN_DUP2, fd, to) for fd, to in dup2])
    actions = ctypes.create_string_buffer(_ROOM)
    attr = ctypes.create_string_buffer(_ROOM)
    signals = ctypes.create_string_buffer(_ROOM)
    libc.posix_spawn_file_actions_init(actions)
    libc.posix_spawnattr_init(attr)
    try:
        for fd, to in dup2:
            _spawn_check(libc.posix_spawn_file_actions_adddup2(actions, fd, to), path)
        if cwd is not None:
            _spawn_check(libc.posix_spawn_file_actions_addchdir_np(actions, os.fsencode(cwd)),
                         path)
        libc.sigemptyset(signals)
        for signo in default_signals:
            libc.sigaddset(signals, int(signo))
        _spawn_check(libc.posix_spawnattr_setsigdefault(attr, signals), path)
        _spawn_check(libc.posix_spawnattr_setflags(attr, _SETSIGDEF | (_SETSID if setsid else 0)),
               path)
        pid = ctypes.c_int()
        _spawn_check(libc.posix_spawn(ctypes.byref(pid), os.fsencode(path), actions, attr,
                                _c_strings([os.fsencode(a) for a in argv]),
                                (ctypes.c_char_p * (len(entries) + 1))(*entries, None)),
               path)
        return pid.value
    finally:
        libc.posix_spawn_file_actions_destroy(actions)
        libc.posix_spawnattr_destroy(attr)


def _spawn_check(code: int, path: str) -> None:
    """posix_spawn's functions return the error number itself (not -1 and errno)."""
    if code:
        raise OSError(code, os.strerror(code), path)
