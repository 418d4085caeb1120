"""Turning a POST /jobs request's inputs into local files, safely.

An input is an uploaded file (multipart field named after the input), a member of an
uploaded tar.gz bundle (field `bundle`, like GN3's metadata uploads; the input's value
names the member), or a path under one of the configured server-side roots. Uploaded
names never leave their directory; paths outside the roots are refused.

The request saves what was uploaded (`save_uploads`, streamed to disk); resolving the
inputs, bundle unpacking included, needs no request and runs where the workflow is
prepared (`web/prepare.py`: a bounded child process for workflows that read files).
"""

from __future__ import annotations

import shutil
import tarfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import g
from werkzeug.datastructures import FileStorage
from werkzeug.utils import secure_filename

from sheepdog.errors import DiskFull, FieldError, InputError, is_disk_full


def upload_dir(home: Path) -> Path:
    """A new directory for one request's uploads; the request removes it when done
    (its inputs are in the content-addressed cache by then, or it failed)."""
    path = home / "uploads" / uuid.uuid4().hex
    try:
        path.mkdir(parents=True)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(str(home / "uploads"), "saving an upload") from e
        raise
    made = g.setdefault("upload_dirs", [])
    made.append(path)
    return path


def discard_uploads() -> None:
    """teardown: nothing a request uploaded outlives it."""
    for path in g.pop("upload_dirs", []):
        shutil.rmtree(path, ignore_errors=True)


def _save_upload(storage: FileStorage, where: Path, role: str) -> Path:
    name = secure_filename(storage.filename or "") or role
    target = where / f"{role}-{name}"
    try:
        storage.save(target)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(str(where.parent), f"saving the upload {role}") from e
        raise
    return target


def save_uploads(files: dict[str, FileStorage], home: Path) -> tuple[Path | None,
                                                                    dict[str, Path]]:
    """Every uploaded field saved in this request's upload directory (None: nothing
    uploaded); field name -> saved file."""
    if not files:
        return None, {}
    where = upload_dir(home)
    return where, {field: _save_upload(storage, where, field) for field, storage in
                   files.items()}


@dataclass(frozen=True)
class BundleLimits:
    """What one bundle may unpack to (settings bundle_max_mb, bundle_member_max_mb,
    bundle_max_members): a small tar.gz must not expand into gigabytes."""

    total: int = 4096 << 20
    member: int = 2048 << 20
    members: int = 1000

    @classmethod
    def of(cls, settings: Any) -> BundleLimits:
        return cls(settings.bundle_max_mb << 20, settings.bundle_member_max_mb << 20,
                   settings.bundle_max_members)


def _too_big(what: str) -> FieldError:
    return FieldError("bundle", what, 413)


def _unpack_bundle(bundle: Path, where: Path, limits: BundleLimits) -> Path:
    """Extract a tar.gz of regular files only, each kept inside `where`, streamed member
    by member and stopped at the first limit passed (the headers' sizes are checked
    before any byte is written, and the bytes themselves as they are written)."""
    bundle_dir = where / "bundle"
    bundle_dir.mkdir()
    total = members = 0
    try:
        with tarfile.open(bundle, mode="r|*") as tar:  # a stream: no index of every member
            for member in tar:
                members += 1
                if members > limits.members:
                    raise _too_big(f"more than {limits.members:,d} members "
                                   "(bundle_max_members)")
                if not member.isfile():
                    continue
                if member.size > limits.member:
                    raise _too_big(f"member {member.name[:100]!r} unpacks to "
                                   f"{member.size:,d} bytes; at most {limits.member:,d} "
                                   "(bundle_member_max_mb)")
                if total + member.size > limits.total:
                    raise _too_big(f"the members unpack to more than {limits.total:,d} bytes "
                                   "(bundle_max_mb)")
                target = (bundle_dir / member.name).resolve()
                if not target.is_relative_to(bundle_dir.resolve()) or target == \
                        bundle_dir.resolve():
                    raise InputError("bundle", f"member {member.name[:100]!r} escapes the "
                                     "bundle")
                total += _extract(tar, member, target, limits.member)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise InputError("bundle", f"not a readable tar.gz: {str(e)[:200]}") from e
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(str(where.parent), "unpacking the bundle") from e
        raise
    except FieldError:
        shutil.rmtree(bundle_dir, ignore_errors=True)  # nothing of a refused bundle stays
        raise
    return bundle_dir


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, most: int) -> int:
    """One member, streamed to disk (never held whole in memory); its size."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        if source is None:
            return 0
        written = 0
        with source, open(target, "xb") as out:
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > most:  # a header that lied about the size
                    raise _too_big(f"member {member.name[:100]!r} unpacks to more than "
                                   f"{most:,d} bytes (bundle_member_max_mb)")
                out.write(chunk)
        return written
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        raise InputError("bundle", f"member {member.name[:100]!r} clashes with another "
                         "member of the same name") from e


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _named(role: str, value: Any, files: dict[str, Path], where: Path | None,
           roots: tuple[str, ...], limits: BundleLimits | None, bundle: list[Path]) -> Path:
    """The file an input names: a member of the uploaded bundle, or a path under an
    input root."""
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise InputError(f"inputs.{role}", "must be a file name or path")
    if "bundle" in files and where is not None:
        if not bundle:
            bundle.append(_unpack_bundle(files["bundle"], where, limits or BundleLimits()))
        member = (bundle[0] / value).resolve()
        if not _inside(member, bundle[0]) or not member.is_file():
            raise InputError(f"inputs.{role}", f"{value!r} is not a file in the bundle")
        return member
    path = Path(value)
    if not roots or not any(_inside(path, Path(r)) for r in roots):
        raise InputError(f"inputs.{role}", f"{value!r} is not under an allowed input root "
                         "(SHEEPDOG_INPUT_ROOTS); upload the file instead")
    return path.resolve()


def resolve(inputs: dict[str, Any], files: dict[str, Path], where: Path | None,
            roots: tuple[str, ...], roles: tuple[str, ...],
            required: tuple[str, ...], limits: BundleLimits | None = None) -> dict[str, Path]:
    """role -> local path for every input given (the workflow says which roles exist
    and which are required), from the saved uploads `files` (in `where`), bundle members
    or paths under `roots`; InputError names the field otherwise."""
    if not isinstance(inputs, dict):
        raise InputError("inputs", "must be an object mapping input names to files")
    unknown = set(inputs) - set(roles)
    if unknown:
        raise InputError(f"inputs.{sorted(unknown)[0]}", f"unknown input; use {roles}")
    found: dict[str, Path] = {}
    bundle: list[Path] = []  # unpacked once, when a role first names a member
    for role in roles:
        if role in files:
            found[role] = files[role]
        elif inputs.get(role) is not None:
            found[role] = _named(role, inputs[role], files, where, roots, limits, bundle)
    for role in required:
        if role not in found:
            raise InputError(f"inputs.{role}", "missing: upload it or give a path")
    return found
