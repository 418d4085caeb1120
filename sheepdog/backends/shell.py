"""Run pieces on a host over ssh, streaming their output back as it comes.

The host's directory (staging, fetching, the environment) is remote.RemoteDir's; this
module only starts a piece there, watches its channel and stops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..cache import Cache
from ..config import Settings
from ..errors import BackendError, ConfigError
from ..hosts import Host, resolve
from ..models import Task
from ..process import GuardedSink, read_both
from ..remote import RemoteDir
from .base import Backend, OutputSink, StatusUpdate, Submission, render_argv


@dataclass(frozen=True)
class ShellSettings:
    """What the shell backend needs: the host (ssh config + inventory)."""

    host: Host

    @classmethod
    def for_task(cls, task: Task, settings: Settings) -> ShellSettings:
        if not task.host:
            raise ConfigError("--backend shell needs --host HOST")
        return cls(resolve(task.host, settings.inventory))


class ShellBackend(Backend):
    """One host over ssh; the connection is shared by every piece sent there."""

    name = "shell"
    needs_host = True

    def __init__(self, host: Host, cache: Cache) -> None:
        self.host = host
        self.remote = RemoteDir(host, cache)

    @classmethod
    def open(cls, task: Task, settings: Settings, cache: Cache) -> ShellBackend:
        return cls(ShellSettings.for_task(task, settings).host, cache)

    def close(self) -> None:
        self.remote.close()

    def submit(self, task: Task, sink: OutputSink) -> Submission:
        staged = self.remote.stage(task)
        piece_dir = self.remote.piece_dir(task)
        argv = render_argv(task.argv, self.remote.resolver(task, staged, piece_dir))
        sent = self.remote.sent_bytes
        sink("sheepdog", [f"{task.name}: staged {sent:,d} bytes to {self.host.name}"
                          + (" (everything was already there)" if sent == 0 else "")])
        channel = self.remote.start(argv, piece_dir, task.env, staged["lib"])
        guarded = GuardedSink(sink)
        readers = read_both(channel.recv, channel.recv_stderr, guarded)
        return Submission(task=task, handle=channel, workdir=piece_dir,
                          extra={"readers": readers, "sink": guarded})

    def wait(self, active: list[Submission], seconds: float) -> None:
        active[0].handle.status_event.wait(seconds)

    def poll(self, active: list[Submission]) -> Iterator[StatusUpdate]:
        for sub in active:
            channel = sub.handle
            if channel.exit_status_ready():
                for r in sub.extra["readers"]:
                    r.join()
                yield self._finish(sub, channel.recv_exit_status())
            elif not channel.get_transport().is_active():
                yield StatusUpdate(sub.task.id, None, f"the ssh connection to "
                                   f"{self.host.name} was lost while the piece ran", lost=True)

    def _finish(self, sub: Submission, code: int) -> StatusUpdate:
        task = sub.task
        if code < 0:
            return StatusUpdate(task.id, None, f"the remote command on {self.host.name} "
                                "ended without an exit status (connection lost?)", lost=True)
        lost_output = sub.extra["sink"].failure()
        if lost_output:
            return StatusUpdate(task.id, code, lost_output, lost=task.cacheable)
        if code != 0 or not task.cacheable:
            return StatusUpdate(task.id, code, "" if code == 0 else f"exit code {code}")
        try:
            self.remote.publish(task, sub.workdir)
        except BackendError as e:
            return StatusUpdate(task.id, code, str(e))
        return StatusUpdate(task.id, 0)

    def cancel(self, active: list[Submission]) -> None:
        for sub in active:
            self.remote.kill_group(sub.workdir)
            sub.handle.close()


BACKEND = ShellBackend
