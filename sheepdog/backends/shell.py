"""Run tasks on a host over ssh, streaming their output back as it comes.

On the host, under its work directory:
    store/blobs/<sha>          inputs by content hash (sent once, compressed by ssh)
    store/tasks/<task id>/     published outputs (+ .complete), reused by later pieces
    scratch/<task id>.<nonce>/ where a piece runs; published by one rename
    lib/sheepdog-<sha>.zip     sheepdog's own Python steps, sent once per version
"""

from __future__ import annotations

import hashlib
import io
import stat
import threading
import uuid
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import ssh
from ..cache import Store
from ..errors import BackendError, SheepdogError
from ..hosts import Host
from ..logs import LineSplitter
from ..models import Task
from .base import Backend, OutputSink, StatusUpdate, Submission, render_argv

PGID_FILE = ".sheepdog.pgid"


@lru_cache(maxsize=1)
def step_code() -> tuple[str, bytes]:
    """(sha256, zip) of the sheepdog package, for `python3 -m sheepdog...` on a host."""
    root = Path(__file__).resolve().parent.parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*.py")):
            info = zipfile.ZipInfo(str(Path("sheepdog") / path.relative_to(root)),
                                   date_time=(2020, 1, 1, 0, 0, 0))
            z.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def remote_workdir(host: Host, conn: ssh.Connection) -> str:
    """The host's sheepdog directory: the inventory's `workdir`, else ~/.cache/sheepdog."""
    if host.workdir:
        return host.workdir
    _, out, _ = conn.run('printf %s "$HOME"')
    return f"{out.strip()}/.cache/sheepdog"


def wrap(argv: list[str], workdir: str, env: dict[str, str], profile: str = "",
         pythonpath: str = "") -> str:
    """The remote shell line: cd, environment, own process group, exec. All quoted."""
    q = ssh.quote
    parts = [f"mkdir -p {q([workdir])} && cd {q([workdir])} || exit 97"]
    if profile:
        parts.append(f". {q([profile + '/etc/profile'])}")
    if pythonpath:
        parts.append(f"export PYTHONPATH={q([pythonpath])}")
    for name, value in env.items():
        parts.append(f"export {name}={q([value])}")
    # a new session: cancel kills the whole group, and it outlives no one's terminal
    inner = 'echo $$ > ' + PGID_FILE + '; exec "$0" "$@"'
    parts.append(f"exec setsid -w sh -c {q([inner])} {q(argv)}")
    return "; ".join(parts)


class ShellBackend(Backend):
    """One host over ssh; the connection is shared by every task sent there."""

    name = "shell"

    def __init__(self, host: Host, store: Store) -> None:
        self.host = host
        self.store = store
        self._workdir = ""
        self._sftp: Any = None
        self.sent_bytes = 0

    def sftp(self) -> Any:
        if self._sftp is None:
            self._sftp = self.conn().open_sftp()
        return self._sftp

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None

    # -- the host's layout
    def conn(self) -> ssh.Connection:
        return ssh.get(self.host)

    def workdir(self) -> str:
        if not self._workdir:
            self._workdir = remote_workdir(self.host, self.conn())
        return self._workdir

    def _missing(self, paths: list[str]) -> set[str]:
        if not paths:
            return set()
        script = "for f in " + ssh.quote(paths) + '; do test -e "$f" || echo "$f"; done'
        code, out, err = self.conn().run(script)
        if code != 0:
            raise BackendError(f"cannot look into {self.workdir()}: {err.strip()}", self.host.name)
        return set(out.split())

    def _put(self, data: io.BufferedIOBase | io.BytesIO, remote: str) -> None:
        """Upload to a temporary name, then rename: a half-sent file is never used."""
        sftp = self.sftp()
        tmp = f"{remote}.{uuid.uuid4().hex[:8]}.part"
        try:
            self.conn().run(f"mkdir -p {ssh.quote([str(Path(remote).parent)])}")
            attrs = sftp.putfo(data, tmp)
            self.sent_bytes += attrs.st_size or 0
            sftp.posix_rename(tmp, remote)
        except OSError as e:
            raise BackendError(f"cannot send {remote}: {e}", self.host.name) from e

    def _stage(self, task: Task) -> dict[str, str]:
        """Send what the task reads that the host lacks; returns remote paths by key."""
        wd = self.workdir()
        blobs = {sha: f"{wd}/store/blobs/{sha}" for sha in task.inputs.values()}
        deps = {tid: f"{wd}/store/tasks/{tid}" for tid in task.deps
                if any(isinstance(a, dict) and a.get("dep") == tid for a in task.argv)}
        code_sha, code = step_code()
        lib = f"{wd}/lib/sheepdog-{code_sha[:16]}.zip"
        missing = self._missing([*blobs.values(), *[d + "/.complete" for d in deps.values()],
                                 lib])
        for sha, remote in blobs.items():
            if remote in missing:
                with open(self.store.blob(sha), "rb") as f:
                    self._put(f, remote)
        for tid, remote in deps.items():
            if remote + "/.complete" in missing:
                self._send_dir(self.store.task_dir(tid), remote)
        if lib in missing:
            self._put(io.BytesIO(code), lib)
        return {"lib": lib, **blobs, **{f"dep:{t}": d for t, d in deps.items()}}

    def _send_dir(self, local: Path, remote: str) -> None:
        if not local.is_dir():
            raise BackendError(f"needed outputs {local.name[:12]} are not in the local cache")
        part = f"{remote}.{uuid.uuid4().hex[:8]}.part"
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                self._put(f, f"{part}/{path.relative_to(local)}")
        q = ssh.quote
        self.conn().run(f"touch {q([part + '/.complete'])} && "
                        f"(mv -T {q([part])} {q([remote])} 2>/dev/null || rm -rf {q([part])})")

    @staticmethod
    def resolver(task: Task, staged: dict[str, str], scratch: str) -> Any:
        """Placeholders to paths on the host (see _stage)."""

        def resolve(item: dict[str, Any]) -> str:
            if "input" in item:
                return staged[task.inputs[item["input"]]]
            if "dep" in item:
                return f"{staged['dep:' + item['dep']]}/{item['file']}"
            if "out" in item:
                return f"{scratch}/{item['out']}"
            if "python" in item:
                return "python3"
            raise BackendError(f"task '{task.name}' has an unknown placeholder {item!r}")

        return resolve

    # -- the contract
    def submit(self, task: Task, sink: OutputSink) -> Submission:
        self.sent_bytes = 0
        staged = self._stage(task)
        wd = self.workdir()
        scratch = (f"{wd}/scratch/{task.id}.{uuid.uuid4().hex[:8]}" if task.cacheable
                   else f"{wd}/jobs/{task.nonce}")

        argv = render_argv(task.argv, self.resolver(task, staged, scratch))
        sink("sheepdog", [
            f"{task.name}: staged {self.sent_bytes:,d} bytes to {self.host.name}"
            + (" (everything was already there)" if self.sent_bytes == 0 else "")])
        command = wrap(argv, scratch, {**self.host.env, **task.env}, self.host.guix_profile,
                       staged["lib"])
        channel = self.conn().start(command)
        readers = [threading.Thread(target=self._pump, args=(channel, err, sink), daemon=True)
                   for err in (False, True)]
        for r in readers:
            r.start()
        return Submission(task=task, handle=channel, workdir=scratch,
                          extra={"readers": readers})

    @staticmethod
    def _pump(channel: Any, stderr: bool, sink: OutputSink) -> None:
        splitter = LineSplitter()
        name = "stderr" if stderr else "stdout"
        read = channel.recv_stderr if stderr else channel.recv
        while True:
            try:
                chunk = read(65536)
            except OSError:
                break
            if not chunk:
                break
            sink(name, splitter.feed(chunk))
        sink(name, splitter.flush())

    def wait(self, active: list[Submission], seconds: float) -> None:
        active[0].handle.status_event.wait(seconds)

    def poll(self, active: list[Submission]) -> Iterator[StatusUpdate]:
        for sub in active:
            channel = sub.handle
            if channel.exit_status_ready():
                for r in sub.extra["readers"]:
                    r.join()
                yield self._finish(sub, channel.recv_exit_status())
            elif not sub.handle.get_transport().is_active():
                yield StatusUpdate(sub.task.id, None, f"the ssh connection to "
                                   f"{self.host.name} was lost while the piece ran", lost=True)

    def _finish(self, sub: Submission, code: int) -> StatusUpdate:
        task = sub.task
        if code < 0:
            return StatusUpdate(task.id, None, f"the remote command on {self.host.name} "
                                "ended without an exit status (connection lost?)", lost=True)
        if code != 0 or not task.cacheable:
            return StatusUpdate(task.id, code, "" if code == 0 else f"exit code {code}")
        local = self.store.scratch(task.id)
        try:
            self._fetch_dir(sub.workdir, local)
            self.store.publish(task.id, local, task.outputs, task.complete_when)
        except (SheepdogError, OSError) as e:
            self.store.discard(local)
            return StatusUpdate(task.id, code, str(e))
        q = ssh.quote
        target = f"{self.workdir()}/store/tasks/{task.id}"
        parent = str(Path(target).parent)
        self.conn().run(f"rm -f {q([sub.workdir + '/' + PGID_FILE])}; touch "
                        f"{q([sub.workdir + '/.complete'])}; mkdir -p {q([parent])}"
                        f"; mv -T {q([sub.workdir])} {q([target])} 2>/dev/null || "
                        f"rm -rf {q([sub.workdir])}")
        return StatusUpdate(task.id, 0)

    def _fetch_dir(self, remote: str, local: Path) -> None:
        sftp = self.sftp()
        for entry in sftp.listdir_attr(remote):
            if entry.filename == PGID_FILE:
                continue
            src, dst = f"{remote}/{entry.filename}", local / entry.filename
            if stat.S_ISDIR(entry.st_mode or 0):
                dst.mkdir()
                self._fetch_dir(src, dst)
            else:
                sftp.get(src, str(dst))

    def cancel(self, active: list[Submission]) -> None:
        for sub in active:
            pgid = f"{sub.workdir}/{PGID_FILE}"
            script = (f"p=$(cat {ssh.quote([pgid])} 2>/dev/null) && kill -TERM -- -$p; "
                      f"sleep 2; [ -n \"$p\" ] && kill -KILL -- -$p 2>/dev/null; true")
            try:
                self.conn().run(script, timeout=30)
            except SheepdogError:
                pass  # the host is gone: nothing left to stop from here
            sub.handle.close()
