"""Run pieces as Slurm batch jobs, with sbatch here or on a login node over ssh.

The batch script records the piece's exit status in a file, so state is read without
Slurm accounting; squeue only tells a piece the cluster lost (NODE_FAIL, PREEMPTED, or
gone without a word) from one still waiting. All of a cluster's pieces are watched
together (`Monitor`): one look at their files and one squeue per cycle, whatever their
number. Every Slurm command has a time limit, and transient failures are retried with
back-off until a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ... import ssh
from ...cache import Cache
from ...config import Settings
from ...defaults import (
    SLURM_CALL_TIMEOUT,
    SLURM_DEADLINE,
    SLURM_FILES_EVERY,
    SLURM_SQUEUE_EVERY,
    SLURM_SQUEUE_MAX_PAUSE,
)
from ...errors import BackendError, SheepdogError
from ...hosts import Host, resolve
from ...models import Task
from ...process import LineSplitter
from ...remote import RemoteDir
from ..base import Backend, OutputSink, StatusUpdate, Submission, local_resolver, render_argv
from . import commands as cmd


@dataclass(frozen=True)
class SlurmSettings:
    """The Slurm backend's settings: the login host (none: this machine) and the
    inventory's `partition`, `account` and `time_limit` for that host."""

    host: Host | None = None
    partition: str = ""
    account: str = ""
    time_limit: str = ""

    @classmethod
    def for_task(cls, task: Task, settings: Settings) -> SlurmSettings:
        host = resolve(task.host, settings.inventory) if task.host else None
        options = host.options if host else {}
        return cls(host, *(str(options.get(k) or "") for k in ("partition", "account",
                                                                 "time_limit")))


# Reads files from offsets on a host, for all pieces at once: one command per cycle.
_READ_FILES = """
import base64, json, sys
out = []
for path, offset in json.loads(sys.argv[1]):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            out.append(base64.b64encode(f.read(1 << 20)).decode())
    except OSError:
        out.append("")
print(json.dumps(out))
"""


class Runner:
    """Where Slurm's commands run and the pieces' files live: here, or on the login
    host through its RemoteDir."""

    def __init__(self, remote: RemoteDir | None) -> None:
        self.remote = remote

    def run(self, argv: list[str]) -> tuple[int, str, str]:
        if self.remote is not None:
            try:
                return self.remote.run_in_env(argv, timeout=SLURM_CALL_TIMEOUT)
            except BackendError as e:
                return 1, "", f"Socket timed out: {e}"
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=SLURM_CALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            return 1, "", f"Socket timed out: {argv[0]} took over {SLURM_CALL_TIMEOUT:g}s"
        except OSError as e:
            return 127, "", f"{argv[0]}: {e.strerror or e} (is the Slurm client installed?)"
        return done.returncode, done.stdout, done.stderr

    def write(self, path: str, text: str) -> None:
        if self.remote is not None:
            self.remote.write_text(path, text)
        else:
            Path(path).write_text(text)

    def read_files(self, wanted: list[tuple[str, int]]) -> list[bytes]:
        """The bytes of each (path, offset); b'' for a file not there (yet)."""
        if not wanted:
            return []
        if self.remote is None:
            return [_read_local(path, offset) for path, offset in wanted]
        code, out, err = self.remote.run_in_env(
            ["python3", "-c", _READ_FILES, json.dumps(wanted)], timeout=SLURM_CALL_TIMEOUT)
        if code != 0:
            raise BackendError(f"cannot read the pieces' files: {err.strip()[:300]}",
                               self.remote.host.name)
        return [base64.b64decode(b) for b in json.loads(out)]


def _read_local(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(1 << 20)
    except FileNotFoundError:
        return b""


@dataclass
class Watched:
    """What the monitor knows of one piece between two looks."""

    control: str
    submitted: float
    offsets: dict[str, int] = field(default_factory=lambda: {cmd.OUT_FILE: 0, cmd.ERR_FILE: 0})
    fresh: dict[str, bytes] = field(default_factory=lambda: {cmd.OUT_FILE: b"",
                                                              cmd.ERR_FILE: b""})
    exit_code: int | None = None


class Monitor:
    """One cluster's pieces, watched together by whichever worker thread looks first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pieces: dict[str, Watched] = {}
        self.files_at = 0.0
        self.squeue_at = 0.0  # when the states below were taken (monotonic)
        self.next_squeue = 0.0
        self.pause = SLURM_SQUEUE_EVERY
        self.states: dict[str, cmd.JobState] = {}

    def add(self, job_id: str, control: str) -> None:
        with self.lock:
            self.pieces[job_id] = Watched(control, time.monotonic())

    def remove(self, job_id: str) -> None:
        with self.lock:
            self.pieces.pop(job_id, None)

    def refresh(self, backend: SlurmBackend) -> None:
        """New output and exit files of every piece (every SLURM_FILES_EVERY), and one
        squeue for all of them (every SLURM_SQUEUE_EVERY, backing off while the
        controller does not answer)."""
        with self.lock:
            now = time.monotonic()
            if self.pieces and now - self.files_at >= SLURM_FILES_EVERY:
                self.files_at = now
                self._read_files(backend.runner)
            if self.pieces and now >= self.next_squeue:
                self._squeue(backend)

    def _read_files(self, runner: Runner) -> None:
        ids = list(self.pieces)
        wanted: list[tuple[str, int]] = []
        for jid in ids:
            w = self.pieces[jid]
            wanted += [(f"{w.control}/{cmd.OUT_FILE}", w.offsets[cmd.OUT_FILE]),
                       (f"{w.control}/{cmd.ERR_FILE}", w.offsets[cmd.ERR_FILE]),
                       (f"{w.control}/{cmd.EXIT_FILE}", 0)]
        got = runner.read_files(wanted)
        for i, jid in enumerate(ids):
            w = self.pieces[jid]
            out, err, code = got[3 * i:3 * i + 3]
            for name, chunk in ((cmd.OUT_FILE, out), (cmd.ERR_FILE, err)):
                w.offsets[name] += len(chunk)
                w.fresh[name] += chunk
            if code.strip().isdigit():
                w.exit_code = int(code.strip())

    def _squeue(self, backend: SlurmBackend) -> None:
        taken = time.monotonic()
        try:
            self.states = cmd.parse_squeue(backend.call(cmd.squeue_argv(list(self.pieces)),
                                                        "squeue"))
        except SheepdogError:
            # the controller is not answering: look again later, less often
            self.pause = min(self.pause * 2, SLURM_SQUEUE_MAX_PAUSE)
            self.next_squeue = time.monotonic() + self.pause
            return
        self.squeue_at = taken
        self.pause = SLURM_SQUEUE_EVERY
        self.next_squeue = time.monotonic() + SLURM_SQUEUE_EVERY

    def take(self, job_id: str) -> tuple[bytes, bytes, int | None]:
        """A piece's new output since the last take, and its exit code if it wrote one."""
        with self.lock:
            w = self.pieces[job_id]
            out, err = w.fresh[cmd.OUT_FILE], w.fresh[cmd.ERR_FILE]
            w.fresh = {cmd.OUT_FILE: b"", cmd.ERR_FILE: b""}
            return out, err, w.exit_code

    def verdict(self, job_id: str) -> tuple[str, cmd.JobState | None] | None:
        """('missing'|'state', state) from an squeue taken after the piece was
        submitted; None while there is no such squeue yet."""
        with self.lock:
            w = self.pieces[job_id]
            if self.squeue_at < w.submitted:
                return None
            state = self.states.get(job_id)
            return ("missing", None) if state is None else ("state", state)


_monitors: dict[str, Monitor] = {}
_monitors_lock = threading.Lock()


def monitor_for(host: Host | None) -> Monitor:
    """The one monitor of a cluster (its login host's name; '' for this machine)."""
    key = host.name if host else ""
    with _monitors_lock:
        return _monitors.setdefault(key, Monitor())


class SlurmBackend(Backend):
    """Slurm on this machine (shared filesystem) or on `host` through ssh."""

    name = "slurm"

    def __init__(self, settings: SlurmSettings, cache: Cache,
                 runner: Runner | None = None) -> None:
        self.settings = settings
        self.host = settings.host
        self.cache = cache
        self.remote = RemoteDir(settings.host, cache) if settings.host else None
        self.runner = runner or Runner(self.remote)
        self.monitor = monitor_for(settings.host)

    @classmethod
    def open(cls, task: Task, settings: Settings, cache: Cache) -> SlurmBackend:
        return cls(SlurmSettings.for_task(task, settings), cache)

    def call(self, argv: list[str], what: str) -> str:
        """Run a Slurm command; retry transient failures until SLURM_DEADLINE."""
        deadline = time.monotonic() + SLURM_DEADLINE
        pause = 0.5
        while True:
            code, out, err = self.runner.run(argv)
            if code == 0:
                return out
            if not cmd.transient(err) or time.monotonic() + pause > deadline:
                where = self.host.name if self.host else "this machine"
                raise BackendError(f"{what} failed on {where}: {err.strip() or out.strip()}"
                                   [:300])
            time.sleep(pause)
            pause = min(pause * 2, 8.0)

    # -- the contract
    def submit(self, task: Task, sink: OutputSink) -> Submission:
        if self.remote is not None:
            staged = self.remote.stage(task)
            workdir = control = self.remote.piece_dir(task)
            self.remote.run(f"mkdir -p {ssh.quote([workdir])}")
            resolve = self.remote.resolver(task, staged, workdir)
            profile, pythonpath = self.remote.host.guix_profile, staged["lib"]
            env = {**self.remote.host.env, **task.env}
        else:
            # the piece's script, output and exit status live in a private directory;
            # a plain command still runs where the user asked
            control = str(self.cache.scratch(task.id))
            workdir = control if task.cacheable else (task.cwd or os.getcwd())
            resolve = local_resolver(task, lambda s: str(self.cache.blob(s)),
                                     lambda t: str(self.cache.task_dir(t)), control)
            profile, pythonpath, env = "", "", dict(task.env)
        argv = render_argv(task.argv, resolve)
        name = f"sd-{task.id[:12]}"
        script = f"{control}/.sheepdog.sbatch"
        self.runner.write(script, cmd.job_script(task.name, name, workdir, argv, env, profile,
                                                 pythonpath, control))
        s = self.settings
        job_id = cmd.parse_sbatch(self.call(cmd.sbatch_argv(
            script, workdir, name, s.partition, s.account, s.time_limit, control=control,
            cores=task.cores, ram_mb=task.ram_mb),
            "sbatch"))
        sink("sheepdog", [f"{task.name}: Slurm job {job_id}"])
        self.monitor.add(job_id, control)
        return Submission(task=task, handle=job_id, workdir=control, extra={
            "sink": sink, "splitters": {cmd.OUT_FILE: LineSplitter(),
                                        cmd.ERR_FILE: LineSplitter()}})

    def _deliver(self, sub: Submission, out: bytes, err: bytes, final: bool = False) -> None:
        """New output bytes into the job log, as they are written."""
        raw = getattr(sub.extra["sink"], "raw", None)
        for name, stream, chunk in ((cmd.OUT_FILE, "stdout", out), (cmd.ERR_FILE, "stderr", err)):
            if raw is not None and chunk:
                raw(stream, chunk)
            lines = sub.extra["splitters"][name].feed(chunk)
            if final:
                lines += sub.extra["splitters"][name].flush()
            sub.extra["sink"](stream, lines)

    def poll(self, active: list[Submission]) -> Iterator[StatusUpdate]:
        self.monitor.refresh(self)
        for sub in active:
            out, err, code = self.monitor.take(sub.handle)
            self._deliver(sub, out, err, final=code is not None)
            if code is not None:
                self.monitor.remove(sub.handle)
                killed = self._killed(sub, code)
                if killed:
                    yield StatusUpdate(sub.task.id, None, killed, lost=True)
                else:
                    yield self._finish(sub, code)
                continue
            lost = self._lost(sub)
            if lost:
                self.monitor.remove(sub.handle)
                self._deliver(sub, b"", b"", final=True)
                yield StatusUpdate(sub.task.id, None, lost, lost=True)

    def _exit_status(self, sub: Submission) -> int | None:
        raw = self.runner.read_files([(f"{sub.workdir}/{cmd.EXIT_FILE}", 0)])[0].strip()
        return int(raw) if raw.isdigit() else None

    def _killed(self, sub: Submission, code: int) -> str:
        """Why the cluster ended a piece whose script recorded a death by signal, or ''.

        Slurm signals a job's processes one by one: the command may die before its
        script does, which then records 143 for what was the cluster's doing (scancel,
        time limit, memory). The controller has the job's final state by then.
        """
        if code <= 128:
            return ""
        try:
            state = cmd.parse_scontrol(self.call(cmd.scontrol_argv(sub.handle), "scontrol"))
        except SheepdogError:
            return ""  # no word from the controller: the exit code stands
        if state is None or state.state not in cmd.ENDED_BY_CLUSTER:
            return ""
        return (f"Slurm job {sub.handle} ended {state.state} ({state.reason}) before the "
                "piece did")

    def _lost(self, sub: Submission) -> str:
        """Why the cluster lost a piece that wrote no exit status, or '' if it did not."""
        verdict = self.monitor.verdict(sub.handle)
        if verdict is None:
            return ""
        kind, state = verdict
        if state is not None and state.state in cmd.ACTIVE:
            return ""
        # it may have written its exit status since the files were read: look once more
        if self._exit_status(sub) is not None:
            return ""
        if state is None:
            return f"Slurm job {sub.handle} vanished without an exit status"
        if state.state in cmd.LOST:
            return f"Slurm job {sub.handle} ended {state.state} ({state.reason})"
        # ended but the script never ran to the end: killed, timed out, out of memory
        return (f"Slurm job {sub.handle} ended {state.state} ({state.reason}) before the "
                "piece did")

    def _finish(self, sub: Submission, code: int) -> StatusUpdate:
        task = sub.task
        if code != 0 or not task.cacheable:
            if self.remote is None:
                self.cache.discard(Path(sub.workdir))
            return StatusUpdate(task.id, code, "" if code == 0 else f"exit code {code}")
        try:
            if self.remote is not None:
                self.remote.publish(task, sub.workdir)
            else:
                self.cache.publish(task.id, Path(sub.workdir), task.outputs,
                                   task.complete_when)
        except SheepdogError as e:
            if self.remote is None:
                self.cache.discard(Path(sub.workdir))
            return StatusUpdate(task.id, code, str(e))
        return StatusUpdate(task.id, 0)

    def wait(self, active: list[Submission], seconds: float) -> None:
        time.sleep(min(seconds, SLURM_FILES_EVERY))

    def cancel(self, active: list[Submission]) -> None:
        ids = [s.handle for s in active]
        for job_id in ids:
            self.monitor.remove(job_id)
        try:
            self.call(["scancel", *ids], "scancel")
        except SheepdogError:
            pass  # nothing more can be done from here; squeue will say what became of it
        for sub in active:
            if self.remote is None:
                self.cache.discard(Path(sub.workdir))

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()


BACKEND = SlurmBackend
