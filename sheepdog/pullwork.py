"""The service's side of pull workers: leases, files by hash, and recorded outcomes.

A pull worker reaches nothing but the web service. The service does for it what a
Redis worker does for itself: takes an entry off the queue and claims the piece (the
claim's heartbeat is the worker's lease, renewed over HTTP), writes its log lines,
and records its end, publishing its outputs from blobs the worker uploaded and
the service checked by hash. web/workers.py only turns HTTP into these calls.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

import redis

from . import dispatch, keys, liveness, logs, registration, store
from .cache import Cache, sha256_file
from .config import Settings
from .defaults import (
    PULL_ANNOUNCE_EVERY,
    PULL_CHUNK,
    PULL_CLAIM_WAIT,
    PULL_INLINE,
    PULL_PUT_BACK_PAUSE,
    PULL_REPORT_DEADLINE,
    PULL_TAKE_SLICE,
)
from .errors import FieldError, SheepdogError
from .finalize import run_timers
from .maintenance import end_orphaned, reap_lost
from .models import Task, TaskStatus
from .outcome import Deadline, conclude
from .piece import RELEASED, Outcome

SHA256 = re.compile(r"[0-9a-f]{64}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Refused(SheepdogError):
    """The worker does not hold this piece (any more): cancelled, or run elsewhere."""

    http_status = 410


def worker_name(token_name: str, given: object) -> str:
    """The name a pull worker's claims are made under: its token's and its own."""
    if not isinstance(given, str) or not NAME.fullmatch(given):
        raise FieldError("worker", "a worker name of letters, digits, '.', '_', '-' "
                         "(at most 100) is needed")
    return f"pull:{token_name}:{given}"


def check_sha(sha: str) -> str:
    if not SHA256.fullmatch(sha):
        raise FieldError("sha256", f"{sha[:80]!r} is not a sha256 (64 lowercase hex digits)")
    return sha


_announced: dict[tuple[str, tuple[str, ...], int, str], float] = {}


def announce(conn: redis.Redis, settings: Settings, name: str, queues: list[str],
             concurrency: int, host: str) -> None:
    """Register the pull worker as a live worker of its queues, for a lease's time; not
    again from this process within PULL_ANNOUNCE_EVERY (a busy worker claims with every
    report), unless what it says changed."""
    said = (name, tuple(queues), concurrency, host)
    now = time.monotonic()
    if now - _announced.get(said, -PULL_ANNOUNCE_EVERY) < PULL_ANNOUNCE_EVERY:
        return
    registration.announce(conn, name, queues, settings.lease_timeout, host=host, pid=0,
                          process="", concurrency=concurrency, pull=True)
    if len(_announced) > 10_000:  # workers come and go: forget the old ones
        _announced.clear()
    _announced[said] = now


_upkeep_asked = -float("inf")  # when this process last asked for its turn


def upkeep(conn: redis.Redis, settings: Settings) -> None:
    """Reap pieces lost with their workers (a killed pull worker's, after its lease), by
    one web process at a time, once per heartbeat interval: pull workers may be the
    only workers there are. A process asks for its turn at most four times an interval,
    not with every claim (a busy worker's each report claims: a Redis write apiece)."""
    global _upkeep_asked
    every = max(0.1, settings.heartbeat_interval)
    now = time.monotonic()
    if now - _upkeep_asked < every / 4:
        return
    _upkeep_asked = now
    if conn.set(keys.pull_upkeep(), "1", nx=True, px=int(every * 1000)):
        reap_lost(conn, settings)
        end_orphaned(conn)
        run_timers(conn, settings)


def _dep_ids(task: Task) -> list[str]:
    found = list(task.deps)
    for item in task.argv:
        if isinstance(item, dict) and "dep" in item and item["dep"] not in found:
            found.append(str(item["dep"]))
    return found


def describe(task: Task, cache: Cache) -> dict[str, Any]:
    """What a worker needs to run a piece it was given: the task, and the hashes of
    the files its inputs and dependencies' outputs are."""
    return {"lease": task.id, "task": dataclasses.asdict(task),
            "deps": {dep: cache.manifest(dep) for dep in _dep_ids(task)}}


def leave(conn: redis.Redis, name: str, instance: str) -> None:
    """The worker's process is going: its claims still waiting here end empty."""
    conn.set(keys.pull_leaving(name), instance, ex=int(PULL_CLAIM_WAIT) + 10)


def claim(conn: redis.Redis, settings: Settings, cache: Cache, name: str, host: str,
          queues: list[str], slots: int, wait: float, going: threading.Event,
          instance: str = "", client_gone: Callable[[], bool] = lambda: False
          ) -> list[dict[str, Any]]:
    """Up to `slots` pieces for this worker, waiting up to `wait` seconds for the first
    (a long poll); [] if none came. Pieces for other backends (ssh, Slurm) go back to
    their queue for a Redis worker. A worker that went meanwhile (it said goodbye, or
    closed the connection) gets nothing: a piece taken for it goes back at once."""
    deadline = time.monotonic() + wait
    found: list[dict[str, Any]] = []

    def gone() -> bool:
        said = instance and conn.get(keys.pull_leaving(name)) == instance.encode()
        return bool(said) or client_gone()

    upkeep(conn, settings)
    looked = False  # wait 0 (a claim riding on a report): one look at what waits now
    while len(found) < slots:
        left = deadline - time.monotonic()
        # (a claim riding on a report comes from a worker that is there)
        if not found and ((left <= 0 and looked) or going.is_set() or (wait > 0 and gone())):
            break
        looked = True
        tasks, drained = _claim_waiting(conn, settings, name, host, queues,
                                        slots - len(found))  # one call for all that wait
        if not tasks and drained:
            if found or left <= 0:  # more pieces only if they wait right now
                break
            tasks, drained = _wait_slice(conn, settings, name, host, queues, left, gone)
        for task in tasks:
            _describe_into(found, conn, settings, cache, name, task)
        if drained and found:
            break
    return found


def _wait_slice(conn: redis.Redis, settings: Settings, name: str, host: str,
                queues: list[str], left: float, gone: Callable[[], bool]
                ) -> tuple[list[Task], bool]:
    """One slice of a long poll: the task of an entry that came, and False (more may
    wait now); nothing and True if none came (the reaper's turn asked again)."""
    task = _claim_next(conn, settings, name, host, queues, left, gone)
    if task is _NONE_WAITING:
        upkeep(conn, settings)
        return [], True
    return ([task] if isinstance(task, Task) else []), False


def _describe_into(found: list[dict[str, Any]], conn: redis.Redis, settings: Settings,
                   cache: Cache, name: str, task: Task) -> None:
    if task.capture:
        logs.RawWriter(conn, task.id).reset()
    try:
        found.append(describe(task, cache))
    except SheepdogError as e:  # a dependency's outputs went missing meanwhile
        conclude(conn, settings, name, task, store.job_ids_of_task(conn, task.id),
                 Outcome(None, str(e), lost=True), Deadline(PULL_REPORT_DEADLINE))


_NONE_WAITING = object()


def _claim_waiting(conn: redis.Redis, settings: Settings, name: str, host: str,
                   queues: list[str], count: int) -> tuple[list[Task], bool]:
    """Up to `count` entries waiting now, each taken, its task claimed and its entry
    dropped, all in one round trip: (the tasks ours to run, whether the queues ran out).
    Not ours: an entry whose task is no longer queued, or one for ssh or Slurm (back
    to its queue, for a Redis worker)."""
    tasks: list[Task] = []
    handed_back = False
    got = store.take_and_claim_many(conn, queues, name, settings.lease_timeout, count,
                                    where=f"{host}, pull worker", drop_entry=True)
    for one in got:
        if one is None:
            continue
        entry, claimed = one
        if claimed is None:
            dispatch.acknowledge(conn, entry)
        elif claimed[0].backend not in ("", "local"):
            store.release(conn, claimed[0].id, name)
            handed_back = True
        else:
            tasks.append(claimed[0])
    if handed_back:
        time.sleep(PULL_PUT_BACK_PAUSE)  # a Redis worker takes them meanwhile
    return tasks, None in got


def _claim_next(conn: redis.Redis, settings: Settings, name: str, host: str,
                queues: list[str], left: float, gone: Callable[[], bool]
                ) -> Task | None | object:
    """Wait a slice of the long poll for an entry and claim its task."""
    entry = dispatch.take(conn, queues, min(PULL_TAKE_SLICE, max(0.01, left)))
    if entry is None:
        return _NONE_WAITING
    try:
        if gone():
            store.put_back(conn, entry.task_id)
            return None
        return _claim_entry(conn, settings, entry, name, host)
    finally:
        dispatch.acknowledge(conn, entry)  # claimed or not, the lease covers it now


def _claim_entry(conn: redis.Redis, settings: Settings, entry: dispatch.Entry, name: str,
                 host: str) -> Task | None:
    store.mark_taken(conn, entry.task_id, liveness.this_process())
    backend = conn.hget(keys.task(entry.task_id), "backend")
    if backend and backend.decode() not in ("", "local"):
        store.put_back(conn, entry.task_id)
        time.sleep(PULL_PUT_BACK_PAUSE)  # a Redis worker takes it meanwhile
        return None
    return store.claim(conn, entry.task_id, name, settings.lease_timeout,
                       where=f"{host}, pull worker")


def held(conn: redis.Redis, name: str, lease: str) -> Task:
    """The running task this worker holds under `lease`; Refused if it holds none."""
    task = store.get_task(conn, lease) if SHA256.fullmatch(lease) else None
    if task is None or task.status != TaskStatus.RUNNING or task.worker != name:
        raise Refused(f"piece {lease[:12]} is not running for worker {name} (cancelled, "
                      "or its lease expired and it runs elsewhere)")
    return task


def renew(conn: redis.Redis, settings: Settings, name: str, leases: list[str]) -> list[str]:
    """Renew the worker's leases; returns those it no longer holds (cancelled, taken)."""
    revoked = []
    for lease in leases:
        if not (SHA256.fullmatch(lease)
                and store.heartbeat(conn, lease, name, settings.lease_timeout)):
            revoked.append(lease)
    return revoked


def write_log(conn: redis.Redis, settings: Settings, name: str, lease: str,
              lines: list[tuple[str, str]], raw: dict[str, bytes],
              task: Task | None = None, jobs: list[str] | None = None) -> None:
    """A batch of the piece's output lines (and, for a capturing piece, its bytes);
    `task` and `jobs`: already read by the caller, who checked the lease."""
    task = task or held(conn, name, lease)
    jobs = jobs if jobs is not None else store.job_ids_of_task(conn, task.id)
    writer = logs.LogWriter(conn, task.id, task.name, jobs, settings.log_max_lines,
                            max_bytes=settings.log_max_bytes)
    for stream, text in lines:
        writer.add(stream if stream in ("stdout", "stderr") else "stderr", [text])
    writer.flush(strict=True)
    if raw:
        sink = logs.RawWriter(conn, task.id)
        for stream, data in raw.items():
            sink.append(stream, data)
        sink.flush(strict=True)


def blob_for(conn: redis.Redis, cache: Cache, name: str, lease: str, sha: str) -> Path:
    """An input or dependency output of a piece this worker holds, by hash."""
    task = held(conn, name, lease)
    allowed = set(task.inputs.values())
    for dep in _dep_ids(task):
        allowed.update(cache.manifest(dep).values())
    if check_sha(sha) not in allowed:
        raise Refused(f"blob {sha[:12]} is not an input of piece {lease[:12]}")
    path = cache.blob(sha)
    if not path.is_file():
        raise SheepdogError(f"blob {sha[:12]} is missing from the service's store")
    return path


def small_blobs(conn: redis.Redis, cache: Cache, name: str, lease: str, shas: list[str]
                ) -> dict[str, str]:
    """Inputs of a held piece in one answer (base64), as many small ones as fit in
    PULL_INLINE bytes; the worker streams the rest one by one."""
    found: dict[str, str] = {}
    room = PULL_INLINE
    for sha in shas:
        path = blob_for(conn, cache, name, lease, sha)
        size = path.stat().st_size
        if size <= room:
            found[sha] = base64.b64encode(path.read_bytes()).decode()
            room -= size
    return found


def _partial(cache: Cache, sha: str, name: str, lease: str) -> Path:
    """Where one worker's upload of one blob for one piece grows (two never mix; the
    piece's end removes what is left: see drop_partials)."""
    return cache.tmp / f"up.{lease[:16]}.{sha}.{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def drop_partials(cache: Cache, lease: str) -> None:
    """Uploads a piece's worker began and did not finish: gone with the piece."""
    if not SHA256.fullmatch(lease):
        return
    begun = f"up.{lease[:16]}."  # a scan, not a glob: this runs for every piece's end
    with os.scandir(cache.tmp) as found:
        for part in [e.path for e in found if e.name.startswith(begun)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)


def upload_state(cache: Cache, name: str, sha: str, lease: str) -> dict[str, Any]:
    if cache.blob(check_sha(sha)).is_file():
        return {"complete": True, "offset": None}
    part = _partial(cache, sha, name, lease)
    return {"complete": False, "offset": part.stat().st_size if part.exists() else 0}


class OffsetMismatch(SheepdogError):
    http_status = 409


class HashMismatch(SheepdogError):
    http_status = 422


def receive(cache: Cache, name: str, sha: str, offset: int, total: int,
            body: IO[bytes], lease: str) -> dict[str, Any]:
    """Append one segment of an upload at `offset`, streamed to disk as it comes; when
    the file is whole, check its hash and store it. A segment cut short leaves what
    came, and the next one resumes there."""
    check_sha(sha)
    if cache.blob(sha).is_file():
        return {"complete": True, "offset": None}
    part = _partial(cache, sha, name, lease)
    have = part.stat().st_size if part.exists() else 0
    if offset != have:
        raise OffsetMismatch(f"upload of {sha[:12]} continues at byte {have}, not {offset}")
    with open(part, "ab") as f:
        for chunk in iter(lambda: body.read(PULL_CHUNK), b""):
            f.write(chunk)
            if f.tell() > total:
                break
        size = f.tell()
    if size > total:
        part.unlink(missing_ok=True)
        raise FieldError("Upload-Length", f"more than the {total} bytes announced came")
    if size < total:
        return {"complete": False, "offset": size}
    got = sha256_file(part)
    if got != sha:
        part.unlink(missing_ok=True)
        raise HashMismatch(f"the upload's sha256 is {got}, not {sha}: refused (send it again)")
    cache.put_blob_file(part, sha)
    return {"complete": True, "offset": None}


def _clean_files(files: object) -> dict[str, str]:
    if not isinstance(files, dict):
        raise FieldError("files", "an object of relative path -> sha256")
    clean = {}
    for rel, sha in files.items():
        path = PurePosixPath(str(rel))
        if (path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts)
                or "\0" in str(rel)):
            raise FieldError("files", f"{str(rel)[:80]!r} is not a plain relative path")
        clean[path.as_posix()] = check_sha(str(sha))
    folders = {p.as_posix() for rel in clean for p in PurePosixPath(rel).parents}
    both = sorted(folders & set(clean))
    if both:
        raise FieldError("files", f"{both[0][:80]!r} is named both as a file and as a "
                         "folder of another")
    return clean


def _store_inline(cache: Cache, blobs: object) -> None:
    """Small outputs sent inside a report (base64), each checked against its hash."""
    if not isinstance(blobs, dict):
        raise FieldError("blobs", "an object of sha256 -> base64 bytes")
    for sha, data in blobs.items():
        check_sha(str(sha))
        try:
            raw = base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError) as e:
            raise FieldError("blobs", f"{str(sha)[:12]}: not base64: {e}") from e
        got = hashlib.sha256(raw).hexdigest()
        if got != sha:
            raise HashMismatch(f"an output's sha256 is {got}, not {sha}: refused "
                               "(send it again)")
        cache.put_bytes(raw)


def read_held(conn: redis.Redis, leases: list[str]) -> list[tuple[Task | None, list[str]]]:
    """The piece under each lease and its jobs, in one round trip (None: no such piece)."""
    valid = [lease for lease in leases if SHA256.fullmatch(lease)]
    found = dict(zip(valid, store.tasks_and_jobs(conn, valid), strict=True)) if valid else {}
    return [found.get(lease, (None, [])) for lease in leases]


def _outcome(report: dict[str, Any]) -> Outcome:
    """How the piece ended, as its worker reports it."""
    if report.get("released"):
        return Outcome(None, RELEASED)
    code = report.get("exit_code")
    if code is not None and not isinstance(code, int):
        raise FieldError("exit_code", "a whole number or null")
    return Outcome(code, str(report.get("error") or ""), bool(report.get("lost")))


def _publish(cache: Cache, task: Task, report: dict[str, Any],
             outcome: Outcome) -> tuple[list[str], Outcome]:
    """A success's outputs into the cache: (the blobs still to upload, the outcome, a
    failure if they cannot be published)."""
    files = _clean_files(report.get("files"))
    _store_inline(cache, report.get("blobs") or {})
    missing = sorted({sha for sha in files.values() if not cache.has_blob(sha)})
    if missing:
        return missing, outcome
    scratch = cache.assemble(task.id, files)
    try:
        cache.publish(task.id, scratch, task.outputs, task.complete_when)
    except SheepdogError as e:
        cache.discard(scratch)
        return [], Outcome(0, str(e))
    return [], outcome


def finish(conn: redis.Redis, settings: Settings, cache: Cache, name: str, lease: str,
           report: dict[str, Any], lines: list[tuple[str, str]] | None = None,
           raw: dict[str, bytes] | None = None, trusted: bool = True,
           held: tuple[Task | None, list[str]] | None = None) -> dict[str, Any]:
    """Record a piece's end. A success's output files must all be stored first:
    {"missing": [...]} names those to upload. Asking again after it was recorded
    answers its status, so a worker may always repeat a report it is unsure of.
    `held`: the piece and its jobs as read_held gave them (a batch of reports)."""
    task, jobs = held or read_held(conn, [lease])[0]
    if task is None:
        raise Refused(f"no piece {lease[:12]}")
    if task.status != TaskStatus.RUNNING or task.worker != name:
        return {"status": str(task.status), "recorded": False}
    if lines or raw:  # the piece's last lines, before its end is told
        write_log(conn, settings, name, lease, lines or [], raw or {}, task, jobs)
    outcome = _outcome(report)
    untrusted = False
    if outcome.exit_code == 0 and not outcome.error and task.cacheable:
        missing, outcome = _publish(cache, task, report, outcome)
        if missing:
            return {"missing": missing}
        untrusted = not trusted  # marked as it counts as done: no other job reuses it
    status = conclude(conn, settings, name, task, jobs, outcome,
                      Deadline(PULL_REPORT_DEADLINE), untrusted=untrusted).status
    drop_partials(cache, lease)  # (one the worker gave up on, or a stale one)
    return {"status": str(status), "recorded": True}
