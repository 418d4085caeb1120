"""A host's sheepdog directory, reached over ssh: used by every backend that runs
pieces on another machine (shell, Slurm through a login node).

On the host, under its work directory:
    store/blobs/<sha>          inputs by content hash (sent once, compressed by ssh)
    store/tasks/<task id>/     published outputs (+ .complete), reused by later pieces
    scratch/<task id>.<nonce>/ where a piece runs; published by one rename
    jobs/<job id>/             where a plain command runs (never cached)
    lib/sheepdog-<sha>.zip     sheepdog's own Python steps, sent once per version

Everything sent to the remote shell is quoted here; the environment prefix (Guix
profile, PYTHONPATH, variables) is built by `setup_lines` and nowhere else.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import stat
import uuid
import zipfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import paramiko

from . import ssh
from .cache import Cache
from .defaults import REMOTE_KILL_TIMEOUT
from .errors import BackendError, SheepdogError
from .hosts import Host
from .models import Task

PGID_FILE = ".sheepdog.pgid"
CONTROL_FILES = frozenset({PGID_FILE})  # sheepdog's own, never fetched as outputs


def check_env_names(env: dict[str, str], host: str = "") -> None:
    """Variable names go into `export NAME=...` unquoted: they must be identifiers."""
    for name in env:
        if not name.isidentifier() or not name.isascii():
            raise BackendError(f"environment variable name {name!r} is not a valid name",
                               host or None)


def setup_lines(profile: str, pythonpath: str, env: dict[str, str]) -> list[str]:
    """The shell lines that give a piece its environment: the Guix profile first, then
    sheepdog's own code, then the variables; every value quoted."""
    check_env_names(env)
    lines = []
    if profile:
        lines.append(f". {ssh.quote([profile + '/etc/profile'])}")
    if pythonpath:
        lines.append(f"export PYTHONPATH={ssh.quote([pythonpath])}")
    lines += [f"export {name}={ssh.quote([value])}" for name, value in env.items()]
    return lines


def prefix(profile: str, env: dict[str, str], pythonpath: str = "") -> str:
    """setup_lines as a prefix for one command line ('' when there is nothing to set)."""
    lines = setup_lines(profile, pythonpath, env)
    return "".join(f"{line}; " for line in lines)


@lru_cache(maxsize=1)
def step_code() -> tuple[str, bytes]:
    """(sha256, zip) of the sheepdog package, for `python3 -m sheepdog...` on a host.

    The steps run there import only the standard library, numpy and Pillow (a test
    checks their import graph), so a host needs nothing else installed."""
    root = Path(__file__).resolve().parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            info = zipfile.ZipInfo(f"sheepdog/{rel}", date_time=(2020, 1, 1, 0, 0, 0))
            z.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def wrap(argv: list[str], workdir: str, env: dict[str, str], profile: str = "",
         pythonpath: str = "") -> str:
    """The remote shell line: cd, environment, own process group, exec. All quoted."""
    q = ssh.quote
    parts = [f"mkdir -p {q([workdir])} && cd {q([workdir])} || exit 97"]
    parts += setup_lines(profile, pythonpath, env)
    # a new session: cancel kills the whole group, and it outlives no one's terminal
    inner = 'echo $$ > ' + PGID_FILE + '; exec "$0" "$@"'
    parts.append(f"exec setsid -w sh -c {q([inner])} {q(argv)}")
    return "; ".join(parts)


def safe_name(name: str, host: str) -> str:
    """A file name fetched back from a host: one plain component, never a path."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise BackendError(f"refusing to fetch an output named {name!r}", host)
    return name


class RemoteDir:
    """sheepdog's directory on one host: the shared connection, staging by hash,
    fetching outputs, running commands inside the host's environment."""

    def __init__(self, host: Host, cache: Cache) -> None:
        self.host = host
        self.cache = cache
        self._workdir = ""
        self._sftp: Any = None
        self._made: set[str] = set()  # directories known to exist there
        self.sent_bytes = 0

    # -- the connection
    def conn(self) -> ssh.Connection:
        return ssh.get(self.host)

    def sftp(self) -> Any:
        if self._sftp is None:
            self._sftp = self.conn().open_sftp()
        return self._sftp

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None

    def run(self, command: str, timeout: float = ssh.COMMAND_TIMEOUT) -> tuple[int, str, str]:
        """A shell line on the host, to its end: (exit code, stdout, stderr)."""
        return self.conn().run(command, timeout=timeout)

    def run_in_env(self, argv: list[str], timeout: float = ssh.COMMAND_TIMEOUT
                   ) -> tuple[int, str, str]:
        """A program run inside the host's profile and environment, every word quoted."""
        return self.run(prefix(self.host.guix_profile, self.host.env) + ssh.quote(argv),
                        timeout=timeout)

    def start(self, argv: list[str], workdir: str, env: dict[str, str],
              pythonpath: str = "") -> Any:
        """Start a piece in its own process group; returns the channel to read."""
        return self.conn().start(wrap(argv, workdir, {**self.host.env, **env},
                                      self.host.guix_profile, pythonpath))

    # -- the layout
    def workdir(self) -> str:
        """The inventory's `workdir`, else ~/.cache/sheepdog on the host."""
        if not self._workdir:
            if self.host.workdir:
                self._workdir = self.host.workdir
            else:
                _, out, _ = self.run('printf %s "$HOME"')
                self._workdir = f"{out.strip()}/.cache/sheepdog"
        return self._workdir

    def piece_dir(self, task: Task) -> str:
        """Where one attempt runs: private scratch for a cacheable piece, the job's own
        directory for a plain command."""
        wd = self.workdir()
        if task.cacheable:
            return f"{wd}/scratch/{task.id}.{uuid.uuid4().hex[:8]}"
        return f"{wd}/jobs/{task.nonce}"

    # -- sending (looked at and moved by SFTP on the shared connection: a command run
    # there costs sshd ~0.1 s a time, an SFTP request a fraction of a millisecond)
    def missing(self, paths: list[str]) -> set[str]:
        """Those of `paths` not on the host (`test -e`: links followed)."""
        if not paths:
            return set()
        sftp = self.sftp()
        absent = set()
        for path in paths:
            try:
                sftp.stat(path)
            except FileNotFoundError:
                absent.add(path)
            except OSError as e:
                raise BackendError(f"cannot look into {self.workdir()}: {path}: {e}",
                                   self.host.name) from e
        return absent

    def makedirs(self, path: str) -> None:
        """`mkdir -p` by SFTP (what is known to exist is not asked again)."""
        sftp = self.sftp()
        todo = []
        while path not in self._made and path not in ("", "/"):
            try:
                sftp.stat(path)
                break
            except FileNotFoundError:
                todo.append(path)
                path = str(Path(path).parent)
        for new in reversed(todo):
            try:
                sftp.mkdir(new)
            except OSError:  # made meanwhile by another piece: fine if it is there now
                sftp.stat(new)
        self._made.update(todo)

    def put(self, data: io.BufferedIOBase | io.BytesIO, remote: str) -> None:
        """Upload to a temporary name, then rename: a half-sent file is never used."""
        sftp = self.sftp()
        tmp = f"{remote}.{uuid.uuid4().hex[:8]}.part"
        try:
            self.makedirs(str(Path(remote).parent))
            attrs = sftp.putfo(data, tmp)
            self.sent_bytes += attrs.st_size or 0
            sftp.posix_rename(tmp, remote)
        except OSError as e:
            raise BackendError(f"cannot send {remote}: {e}", self.host.name) from e

    def write_text(self, remote: str, text: str) -> None:
        self.put(io.BytesIO(text.encode()), remote)

    def stage(self, task: Task) -> dict[str, str]:
        """Send what the task reads that the host lacks; returns remote paths by key:
        an input's sha, `dep:<task id>`, and `lib` (sheepdog's code)."""
        self.sent_bytes = 0
        wd = self.workdir()
        blobs = {sha: f"{wd}/store/blobs/{sha}" for sha in task.inputs.values()}
        deps = {tid: f"{wd}/store/tasks/{tid}" for tid in task.deps
                if any(isinstance(a, dict) and a.get("dep") == tid for a in task.argv)}
        code_sha, code = step_code()
        lib = f"{wd}/lib/sheepdog-{code_sha[:16]}.zip"
        missing = self.missing([*blobs.values(), *[d + "/.complete" for d in deps.values()],
                                lib])
        for sha, remote in blobs.items():
            if remote in missing:
                with open(self.cache.blob(sha), "rb") as f:
                    self.put(f, remote)
        for tid, remote in deps.items():
            if remote + "/.complete" in missing:
                self._send_dir(self.cache.task_dir(tid), remote)
        if lib in missing:
            self.put(io.BytesIO(code), lib)
        return {"lib": lib, **blobs, **{f"dep:{t}": d for t, d in deps.items()}}

    def _send_dir(self, local: Path, remote: str) -> None:
        if not local.is_dir():
            raise BackendError(f"needed outputs {local.name[:12]} are not in the local cache")
        part = f"{remote}.{uuid.uuid4().hex[:8]}.part"
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                self.put(f, f"{part}/{path.relative_to(local)}")
        try:
            self.makedirs(part)  # made by the first file sent, unless there was none
            self._move_in(part, remote)
        except OSError as e:
            raise BackendError(f"cannot send {remote}: {e}", self.host.name) from e

    @staticmethod
    def resolver(task: Task, staged: dict[str, str], scratch: str
                 ) -> Callable[[dict[str, Any]], str]:
        """Placeholders to paths on the host (see stage)."""

        def resolve(item: dict[str, Any]) -> str:
            if "input" in item:
                return staged[task.inputs[item["input"]]]
            if "dep" in item:
                return f"{staged['dep:' + item['dep']]}/{item['file']}"
            if "out" in item:
                return f"{scratch}/{item['out']}"
            if "python" in item:
                return "python3"
            raise BackendError(f"piece '{task.name}' has an unknown placeholder {item!r}")

        return resolve

    # -- reading back
    def read_from(self, path: str, offset: int) -> bytes:
        """The bytes of a remote file from `offset` on (b'' if it does not exist)."""
        code, out, _ = self.run(f"tail -c +{offset + 1} {ssh.quote([path])} 2>/dev/null")
        return out.encode() if code == 0 else b""

    def publish(self, task: Task, piece_dir: str, skip: frozenset[str] = CONTROL_FILES
                ) -> None:
        """Fetch a finished piece's outputs into the local cache (published there whole),
        then publish them on the host too, for later pieces that need them."""
        local = self.cache.scratch(task.id)
        try:
            self._fetch_dir(piece_dir, local, skip)
            self.cache.publish(task.id, local, task.outputs, task.complete_when)
        except (SheepdogError, OSError) as e:
            self.cache.discard(local)
            raise BackendError(str(e), self.host.name) from e
        target = f"{self.workdir()}/store/tasks/{task.id}"
        # the host's copy only saves sending them again: the piece's outputs are safe
        # here already, so a host that cannot keep them (or the link gone) fails nothing
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException, SheepdogError):
            self._move_in(piece_dir, target, skip)

    def _move_in(self, piece_dir: str, target: str, skip: frozenset[str] = frozenset()
                 ) -> None:
        """Mark a directory complete and rename it to `target` in one step, or drop it
        when another piece put the same outputs there first."""
        sftp = self.sftp()
        for name in sorted(skip):
            with contextlib.suppress(FileNotFoundError):
                sftp.remove(f"{piece_dir}/{name}")
        sftp.open(f"{piece_dir}/.complete", "w").close()
        self.makedirs(str(Path(target).parent))
        try:
            sftp.posix_rename(piece_dir, target)  # rename(2), as `mv -T` does
        except OSError:  # there already (not empty): the same outputs, published first
            self.run(f"rm -rf {ssh.quote([piece_dir])}")

    def _fetch_dir(self, remote: str, local: Path, skip: frozenset[str]) -> None:
        sftp = self.sftp()
        for entry in sftp.listdir_attr(remote):
            if entry.filename in skip:
                continue
            name = safe_name(entry.filename, self.host.name)
            src, dst = f"{remote}/{name}", local / name
            if stat.S_ISDIR(entry.st_mode or 0):
                dst.mkdir()
                self._fetch_dir(src, dst, frozenset())
            else:
                sftp.get(src, str(dst))

    def kill_group(self, piece_dir: str) -> None:
        """SIGTERM, then SIGKILL, the process group a piece started in (see wrap)."""
        pgid = f"{piece_dir}/{PGID_FILE}"
        script = (f"p=$(cat {ssh.quote([pgid])} 2>/dev/null) && kill -TERM -- -$p; "
                  f"sleep 2; [ -n \"$p\" ] && kill -KILL -- -$p 2>/dev/null; true")
        try:
            self.run(script, timeout=REMOTE_KILL_TIMEOUT)
        except SheepdogError:
            pass  # the host is gone: nothing left to stop from here
