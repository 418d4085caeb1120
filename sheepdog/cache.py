"""The content-addressed cache on disk: input files by sha256, task outputs by task id.

Nothing partial is ever visible: a file or a task's output directory appears under its
address only by one rename, after it is complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import DiskFull, InputError, SheepdogError, is_disk_full

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One thing in the store, for `sheepdog cache list`."""

    kind: str  # "input" or "task"
    id: str
    size: int
    modified: float


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def task_file(root: Path | str, task_id: str, name: str) -> str:
    """A file of a published task's outputs under the cache at `root`, as text, with no
    Cache made (a workflow reads one for every piece that succeeds)."""
    return os.path.join(root, "tasks", task_id, name)


@functools.lru_cache(maxsize=16)
def _layout(root: Path) -> tuple[Path, Path, Path, str, str]:
    """A root's blobs/, tasks/ and tmp/, and the last two as text (a piece's scratch and
    publication are made from these every time: joining text costs a tenth of joining
    Paths); joined once per root, not for every Cache (two for every POST /jobs)."""
    tasks, tmp = root / "tasks", root / "tmp"
    return root / "blobs", tasks, tmp, os.fspath(tasks), os.fspath(tmp)


class Cache:
    """Files under one root: blobs/ (inputs), tasks/ (published outputs), tmp/ (scratch)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs, self.tasks, self.tmp, self._tasks, self._tmp = _layout(root)
        if not os.path.isdir(self._tmp):  # one stat, not three mkdirs: opened for every piece
            for d in (self.blobs, self.tasks, self.tmp):
                d.mkdir(parents=True, exist_ok=True)

    # -- inputs
    def blob(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    def put_file(self, path: Path) -> str:
        """Copy a file in under the hash of its contents; returns the hash."""
        tmp = self.tmp / f"in.{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        try:
            src = open(path, "rb")  # noqa: SIM115  closed below; its errors are the input's
        except OSError as e:
            raise InputError(str(path), f"cannot read: {e.strerror or e}") from e
        try:
            with src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if is_disk_full(e):
                raise DiskFull(str(self.root), f"copying {path} in") from e
            raise InputError(str(path), f"cannot read: {e.strerror or e}") from e
        sha = digest.hexdigest()
        self.put_blob_file(tmp, sha)
        return sha

    def put_bytes(self, data: bytes) -> str:
        """Store bytes under the hash of their contents (a spec, an index); the hash."""
        sha = hashlib.sha256(data).hexdigest()
        if self.blob(sha).exists():
            return sha
        tmp = self.tmp / f"in.{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if is_disk_full(e):
                raise DiskFull(str(self.root), "writing a job's description") from e
            raise
        self.put_blob_file(tmp, sha)
        return sha

    def put_blob_file(self, tmp: Path, sha: str) -> Path:
        """Move an already-hashed file to its address (dropped if it is already there)."""
        target = self.blob(sha)
        if target.exists():
            tmp.unlink(missing_ok=True)
            self.touch(target)
        else:
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp, target)
        return target

    # -- task outputs
    def task_dir(self, task_id: str) -> Path:
        return self.tasks / task_id

    def published(self, task_id: str) -> bool:
        return self.task_dir(task_id).is_dir()

    def reused(self, task_id: str) -> bool:
        """published(), and if so marked as just used (`cache gc` trims the least
        recently used first)."""
        found = self.published(task_id)
        if found:
            self.touch(self.task_dir(task_id))
        return found

    def has_blob(self, sha: str) -> bool:
        """Is this input stored (marked as just used if so)?"""
        path = self.blob(sha)
        if path.exists():
            self.touch(path)
            return True
        return False

    @staticmethod
    def touch(path: Path) -> None:
        try:
            os.utime(path)
        except OSError:
            pass  # removed meanwhile, or read-only: its age only guides the trimming

    def scratch(self, task_id: str) -> Path:
        path = os.path.join(self._tmp, f"{task_id}.{os.urandom(4).hex()}")
        os.mkdir(path)
        return Path(path)

    def publish(self, task_id: str, scratch: Path, outputs: list[str],
                complete_when: dict[str, str] | None = None) -> Path:
        """Make a finished task's scratch its published outputs, all at once.

        Raises when an expected output is missing or incomplete; then nothing is published.
        """
        at = os.fspath(scratch)
        for name in outputs:
            if not os.path.isfile(os.path.join(at, name)):
                raise SheepdogError(f"expected output {name!r} was not written")
        for name, text in (complete_when or {}).items():
            if text not in (scratch / name).read_text(errors="replace"):
                raise SheepdogError(f"output {name!r} is incomplete (no {text!r} in it)")
        target = os.path.join(self._tasks, task_id)
        try:
            os.rename(at, target)
        except OSError:
            # a twin run published first; identical by construction, keep theirs
            shutil.rmtree(at, ignore_errors=True)
        return Path(target)

    def adopt(self, task_id: str, source: Path) -> Path:
        """Publish a copy of another task's published outputs as this task's (a twin's
        for its original), whole or not at all; kept as is if already there."""
        target = self.task_dir(task_id)
        if target.exists():
            return target
        tmp = self.tmp / f"{task_id}.adopt.{uuid.uuid4().hex[:8]}"
        shutil.copytree(source, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # published meanwhile
        return target

    # -- files by hash (a pull worker's inputs and outputs travel this way)
    def manifest(self, task_id: str) -> dict[str, str]:
        """A published task's files (relative path -> sha256), each also stored as a blob
        so it can be fetched by its hash. Worked out once per publication and kept."""
        target = self.task_dir(task_id)
        try:
            st = target.stat()
        except FileNotFoundError:
            raise SheepdogError(f"the outputs of piece {task_id[:12]} are not published") from None
        stamp = [st.st_dev, st.st_ino]  # published again (new directory): worked out again
        kept = self.root / "manifests" / f"{task_id}.json"
        try:
            found = json.loads(kept.read_text())
            if found.get("stamp") == stamp:
                return dict(found["files"])
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        files = {}
        for path in sorted(target.rglob("*")):
            if path.is_file() and not path.is_symlink():
                sha = sha256_file(path)
                files[path.relative_to(target).as_posix()] = sha
                self.link_blob(path, sha)
        if not files:  # nothing was hashed: nothing worth keeping (a file less per piece)
            return files
        kept.parent.mkdir(exist_ok=True)
        tmp = self.tmp / f"manifest.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"stamp": stamp, "files": files}))
        os.replace(tmp, kept)
        return files

    def link_blob(self, path: Path, sha: str) -> Path:
        """Make a file of known hash a blob too (a hard link: no copy), if it is not one."""
        target = self.blob(sha)
        if target.exists():
            return target
        tmp = self.tmp / f"in.{uuid.uuid4().hex}"
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)  # another file system, or no hard links there
        return self.put_blob_file(tmp, sha)

    def assemble(self, task_id: str, files: dict[str, str]) -> Path:
        """A scratch directory holding these blobs under their relative paths (hard
        links); SheepdogError names a blob that is not stored."""
        scratch = self.scratch(task_id)
        try:
            for rel, sha in files.items():
                source = self.blob(sha)
                if not source.is_file():
                    raise SheepdogError(f"{rel}: blob {sha[:12]} is not stored")
                dest = scratch / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, dest)
                except OSError:
                    shutil.copyfile(source, dest)
        except BaseException:
            self.discard(scratch)
            raise
        return scratch

    def discard(self, scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)

    # -- listing and clearing
    def entries(self) -> list[Entry]:
        found = []
        for kind, base in (("input", self.blobs), ("task", self.tasks)):
            paths = base.glob("*/*") if kind == "input" else base.glob("*")
            for p in paths:
                found.append(Entry(kind, p.name, _tree_size(p), p.stat().st_mtime))
        return sorted(found, key=lambda e: e.modified)

    def remove(self, entry_id: str) -> bool:
        """Remove one task's outputs or one input, atomically from a reader's view."""
        for path in (self.task_dir(entry_id), self.blob(entry_id)):
            if path.exists():
                doomed = self.tmp / f"rm.{uuid.uuid4().hex}"
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True) if doomed.is_dir() else doomed.unlink()
                return True
        return False

    def sweep_scratch(self, older_than: float, keep: set[str] | frozenset[str] = frozenset()
                      ) -> int:
        """Delete scratch left by killed or failed runs, untouched for `older_than`
        seconds; it was never published, so nothing is lost. Scratch of the task ids in
        `keep` (pieces queued or running now) stays, however old."""
        cutoff = time.time() - older_than
        gone = 0
        for p in list(self.tmp.iterdir()):
            try:
                if p.name.split(".", 1)[0] in keep or p.lstat().st_mtime >= cutoff:
                    continue
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            except FileNotFoundError:
                continue  # another sweeper or the run itself removed it first
            gone += 1
        return gone
