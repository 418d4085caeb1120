"""Run pieces as Slurm batch jobs, with sbatch here or on a login node over ssh.

The batch script records the piece's exit status in a file, so state is read without
Slurm accounting; squeue (and scontrol) only tell a piece the cluster lost (NODE_FAIL,
PREEMPTED, or gone without a word) from one still waiting. Every Slurm command has a
time limit, and transient failures are retried with back-off until a deadline.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import ssh
from ..cache import Store
from ..config import Settings
from ..errors import BackendError, SheepdogError
from ..hosts import Host
from ..logs import LineSplitter
from ..models import Task
from . import slurm_cmd as cmd
from .base import Backend, OutputSink, StatusUpdate, Submission, local_resolver, render_argv

CALL_TIMEOUT = 20.0
DEADLINE = 120.0
SQUEUE_EVERY = 2.0


class SlurmBackend(Backend):
    """Slurm on this machine (shared filesystem) or on `host` through ssh."""

    name = "slurm"

    def __init__(self, host: Host | None, store: Store, settings: Settings) -> None:
        self.host = host
        self.store = store
        self.settings = settings
        self.shell: Any = None
        if host is not None:
            from .shell import ShellBackend

            self.shell = ShellBackend(host, store)

    # -- running Slurm's commands, here or there
    def call(self, argv: list[str], what: str) -> str:
        """Run a Slurm command with a time limit; retry transient failures until DEADLINE."""
        deadline = time.monotonic() + DEADLINE
        pause = 0.5
        while True:
            code, out, err = self._run(argv)
            if code == 0:
                return out
            if not cmd.transient(err) or time.monotonic() + pause > deadline:
                where = self.host.name if self.host else "this machine"
                raise BackendError(f"{what} failed on {where}: {err.strip() or out.strip()}"
                                   [:300])
            time.sleep(pause)
            pause = min(pause * 2, 8.0)

    def _run(self, argv: list[str]) -> tuple[int, str, str]:
        if self.shell is not None:
            host = self.shell.host
            prefix = "".join(f"export {k}={ssh.quote([v])}; " for k, v in host.env.items())
            if host.guix_profile:
                prefix = f". {ssh.quote([host.guix_profile + '/etc/profile'])}; " + prefix
            try:
                return self.shell.conn().run(prefix + ssh.quote(argv), timeout=CALL_TIMEOUT)
            except BackendError as e:
                return 1, "", f"Socket timed out: {e}"
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=CALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            return 1, "", f"Socket timed out: {argv[0]} took over {CALL_TIMEOUT:g}s"
        except OSError as e:
            return 127, "", f"{argv[0]}: {e.strerror or e} (is the Slurm client installed?)"
        return done.returncode, done.stdout, done.stderr

    def _write(self, path: str, text: str) -> None:
        if self.shell is not None:
            import io

            self.shell._put(io.BytesIO(text.encode()), path)
        else:
            Path(path).write_text(text)

    def _read_from(self, path: str, offset: int) -> bytes:
        if self.shell is not None:
            code, out, _ = self.shell.conn().run(
                f"tail -c +{offset + 1} {ssh.quote([path])} 2>/dev/null", timeout=CALL_TIMEOUT)
            return out.encode() if code == 0 else b""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return b""

    # -- the contract
    def submit(self, task: Task, sink: OutputSink) -> Submission:
        if self.shell is not None:
            staged = self.shell._stage(task)
            wd = self.shell.workdir()
            workdir = (f"{wd}/scratch/{task.id}.{uuid.uuid4().hex[:8]}" if task.cacheable
                       else f"{wd}/jobs/{task.nonce}")
            control = workdir
            self.shell.conn().run(f"mkdir -p {ssh.quote([workdir])}")
            resolve = self.shell.resolver(task, staged, workdir)
            profile, pythonpath, env = (self.shell.host.guix_profile, staged["lib"],
                                        {**self.shell.host.env, **task.env})
        else:
            # the piece's script, output and exit status live in a private directory;
            # a plain command still runs where the user asked
            control = str(self.store.scratch(task.id))
            workdir = control if task.cacheable else (task.cwd or os.getcwd())
            resolve = local_resolver(task, lambda s: str(self.store.blob(s)),
                                     lambda t: str(self.store.task_dir(t)), control)
            profile, pythonpath, env = "", "", dict(task.env)
        argv = render_argv(task.argv, resolve)
        name = f"sd-{task.id[:12]}"
        script = f"{control}/.sheepdog.sbatch"
        self._write(script, cmd.job_script(task.name, name, workdir, argv, env, profile,
                                           pythonpath, control))
        partition = self.host.partition if self.host else ""
        account = self.host.account if self.host else ""
        job_id = cmd.parse_sbatch(self.call(cmd.sbatch_argv(
            script, workdir, name, partition, account, control=control), "sbatch"))
        sink("sheepdog", [f"{task.name}: Slurm job {job_id}"])
        return Submission(task=task, handle=job_id, workdir=control, extra={
            "sink": sink, "offsets": {cmd.OUT_FILE: 0, cmd.ERR_FILE: 0},
            "splitters": {cmd.OUT_FILE: LineSplitter(), cmd.ERR_FILE: LineSplitter()},
            "next_squeue": time.monotonic() + SQUEUE_EVERY, "pause": SQUEUE_EVERY})

    def _follow(self, sub: Submission, final: bool = False) -> None:
        """New bytes of the job's output files into the job log, as they are written."""
        for name, stream in ((cmd.OUT_FILE, "stdout"), (cmd.ERR_FILE, "stderr")):
            chunk = self._read_from(f"{sub.workdir}/{name}", sub.extra["offsets"][name])
            sub.extra["offsets"][name] += len(chunk)
            lines = sub.extra["splitters"][name].feed(chunk)
            if final:
                lines += sub.extra["splitters"][name].flush()
            sub.extra["sink"](stream, lines)

    def _exit_status(self, sub: Submission) -> int | None:
        raw = self._read_from(f"{sub.workdir}/{cmd.EXIT_FILE}", 0).strip()
        return int(raw) if raw.isdigit() else None

    def poll(self, active: list[Submission]) -> Iterator[StatusUpdate]:
        for sub in active:
            self._follow(sub)
            code = self._exit_status(sub)
            if code is not None:
                self._follow(sub, final=True)
                yield self._finish(sub, code)
                continue
            if time.monotonic() < sub.extra["next_squeue"]:
                continue
            lost = self._lost(sub)
            if lost:
                self._follow(sub, final=True)
                yield StatusUpdate(sub.task.id, None, lost, lost=True)

    def _lost(self, sub: Submission) -> str:
        """Why the cluster lost a piece that wrote no exit status, or '' if it did not."""
        try:
            states = cmd.parse_squeue(self.call(cmd.squeue_argv([sub.handle]), "squeue"))
        except SheepdogError:
            # the controller is not answering: look again later, less often
            sub.extra["pause"] = min(sub.extra["pause"] * 2, 60.0)
            sub.extra["next_squeue"] = time.monotonic() + sub.extra["pause"]
            return ""
        sub.extra["pause"] = SQUEUE_EVERY
        sub.extra["next_squeue"] = time.monotonic() + SQUEUE_EVERY
        state = states.get(sub.handle)
        if state is None:
            if self._exit_status(sub) is not None:
                return ""
            return f"Slurm job {sub.handle} vanished without an exit status"
        if state.state in cmd.LOST:
            return f"Slurm job {sub.handle} ended {state.state} ({state.reason})"
        if state.state not in cmd.ACTIVE and self._exit_status(sub) is None:
            # ended but the script never ran to the end: killed, timed out, out of memory
            return (f"Slurm job {sub.handle} ended {state.state} ({state.reason}) before the "
                    "piece did")
        return ""

    def _finish(self, sub: Submission, code: int) -> StatusUpdate:
        task = sub.task
        if code != 0 or not task.cacheable:
            if self.shell is None:
                self.store.discard(Path(sub.workdir))
            return StatusUpdate(task.id, code, "" if code == 0 else f"exit code {code}")
        if self.shell is not None:
            return self.shell._finish(sub, code)
        try:
            self.store.publish(task.id, Path(sub.workdir), task.outputs, task.complete_when)
        except SheepdogError as e:
            self.store.discard(Path(sub.workdir))
            return StatusUpdate(task.id, code, str(e))
        return StatusUpdate(task.id, 0)

    def wait(self, active: list[Submission], seconds: float) -> None:
        time.sleep(min(seconds, 0.25))

    def cancel(self, active: list[Submission]) -> None:
        ids = [s.handle for s in active]
        try:
            self.call(["scancel", *ids], "scancel")
        except SheepdogError:
            pass  # nothing more can be done from here; squeue will say what became of it
        for sub in active:
            if self.shell is None:
                self.store.discard(Path(sub.workdir))

    def close(self) -> None:
        if self.shell is not None:
            self.shell.close()
