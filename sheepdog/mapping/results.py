"""A map job's items, read back by key from its chunks' published records.

Nothing is copied into Redis per item: a chunk's records live with its outputs in the
cache, and the job's index (keys in input order, chunk by chunk) is a content-addressed
file. A missing answer is always explicit: no such item, not finished, failed, skipped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis

from .. import keys, store
from ..cache import Cache
from ..config import Settings
from ..errors import FieldError, SheepdogError
from ..models import Job, Task, TaskStatus
from . import step

# what an item is while its chunk is not published, by the chunk task's state
WAITING = {TaskStatus.WAITING: "queued", TaskStatus.QUEUED: "queued",
           TaskStatus.RUNNING: "running", TaskStatus.ERROR: "error",
           TaskStatus.CANCELLED: "skipped", TaskStatus.SUCCESS: "missing"}
FINISHED_OK = "success"


@dataclass(frozen=True)
class Index:
    """The job's items: keys in input order, their 1-based indices, and which chunk
    (the n-th task of the job) holds each."""

    raw: dict[str, Any]
    position: dict[str, int]
    owner: list[int]

    @property
    def keys(self) -> list[str]:
        keys: list[str] = self.raw["keys"]
        return keys


@lru_cache(maxsize=16)
def _load(path: str) -> Index:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    owner = [0] * len(raw["keys"])
    for chunk, positions in enumerate(raw["chunks"]):
        for p in positions:
            owner[p] = chunk
    return Index(raw, {k: i for i, k in enumerate(raw["keys"])}, owner)


def load_index(settings: Settings, job: Job) -> Index:
    path = Cache(settings.cache_dir).blob(job.params["index"])
    if not path.is_file():
        raise FieldError("items", f"job {job.id}'s item index is no longer in the cache", 410)
    return _load(str(path))


def chunk_tasks(conn: redis.Redis, job: Job) -> list[str]:
    """The job's chunk task ids, in index order (the gather comes last)."""
    return store.job_task_ids(conn, job.id)[:int(job.params["chunks"])]


def states(conn: redis.Redis, task_ids: list[str]) -> list[str]:
    pipe = conn.pipeline(transaction=False)
    for tid in task_ids:
        pipe.hget(keys.task(tid), "status")
    return [(v.decode() if v else "") for v in pipe.execute()]


def sources(conn: redis.Redis, settings: Settings, job: Job
            ) -> tuple[list[Path | None], list[str]]:
    """Each chunk's published directory (None if not there) and the state its
    unpublished items are in."""
    cache = Cache(settings.cache_dir)
    ids = chunk_tasks(conn, job)
    dirs: list[Path | None] = []
    waiting = []
    for tid, state in zip(ids, states(conn, ids), strict=True):
        ok = state == TaskStatus.SUCCESS and cache.published(tid)
        dirs.append(cache.task_dir(tid) if ok else None)
        waiting.append(WAITING.get(TaskStatus(state), "missing") if state else "missing")
    return dirs, waiting


def all_records(conn: redis.Redis, settings: Settings, job: Job) -> Iterator[dict[str, Any]]:
    index = load_index(settings, job)
    dirs, states = sources(conn, settings, job)
    yield from step.records(index.raw, dirs, states)


def public(record: dict[str, Any]) -> dict[str, Any]:
    """An item's record as users see it (no server paths)."""
    return {k: v for k, v in record.items() if k != "files_dir"}


def item(conn: redis.Redis, settings: Settings, job: Job, key: str) -> dict[str, Any]:
    """One item's record; FieldError 404 no such item, 409 not finished or failed.
    Reads its own chunk only, whatever the job's size."""
    index = load_index(settings, job)
    if key not in index.position:
        raise FieldError("item", f"no such item {key[:200]!r} in job {job.id}", 404)
    position = index.position[key]
    chunk = index.owner[position]
    number = index.raw["indices"][position]
    task_id = conn.lindex(keys.job_tasks(job.id), chunk)
    tid = task_id.decode() if isinstance(task_id, bytes) else str(task_id or "")
    state = states(conn, [tid])[0] if tid else ""
    cache = Cache(settings.cache_dir)
    if state == TaskStatus.SUCCESS and cache.published(tid):
        lines = (cache.task_dir(tid) / step.RESULTS).read_text(encoding="utf-8").splitlines()
        positions = index.raw["chunks"][chunk]
        record = {"key": key, "index": number, **json.loads(lines[positions.index(position)])}
    else:
        waiting = WAITING.get(TaskStatus(state), "missing") if state else "missing"
        record = {"key": key, "index": number, "status": waiting}
    status = record["status"]
    if status == FINISHED_OK:
        return public(record)
    if status in ("queued", "running"):
        raise FieldError("item", f"item {key!r} is not finished: it is {status}", 409)
    reason = record.get("stderr", "") or f"exit code {record.get('exit_code')}"
    raise FieldError("item", f"item {key!r} {status}: {reason[-2000:]}", 409)


def page(conn: redis.Redis, settings: Settings, job: Job, state: str | None,
         after: str | None, limit: int) -> dict[str, Any]:
    """Items in input order after the key `after`, optionally only those in `state`."""
    index = load_index(settings, job)
    if after is not None and after not in index.position:
        raise FieldError("after", f"no such item {after[:200]!r} in job {job.id}", 404)
    start = index.position[after] + 1 if after is not None else 0
    found: list[dict[str, Any]] = []
    next_key = None
    for n, record in enumerate(all_records(conn, settings, job)):
        if n < start or (state and record["status"] != state):
            continue
        if len(found) == limit:
            next_key = found[-1]["key"]
            break
        found.append(public(record))
    return {"items": found, "next_after": next_key, "total": len(index.keys)}


def summary(conn: redis.Redis, settings: Settings, job: Job) -> dict[str, Any]:
    """Counts by state, the failed keys (first thousand) and --check disagreements."""
    index = load_index(settings, job)
    dirs, states = sources(conn, settings, job)
    found, _ = step.summarize(index.raw, dirs, list(job.params.get("checks", [])), states)
    return found


def export(conn: redis.Redis, settings: Settings, job: Job, out_dir: Path) -> dict[str, Any]:
    """DIR/items.jsonl (one object per item, input order) and DIR/files/<index>/..."""
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / "items.jsonl.part"
    counts: dict[str, int] = {}
    with open(partial, "w", encoding="utf-8") as out:
        for record in all_records(conn, settings, job):
            counts[record["status"]] = counts.get(record["status"], 0) + 1
            files = record.get("files") or []
            if files and record.get("files_dir"):
                target = out_dir / "files" / str(record["index"])
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(record["files_dir"], target)
                record["files"] = [f"files/{record['index']}/{f}" for f in files]
            out.write(json.dumps(public(record)) + "\n")
    partial.rename(out_dir / "items.jsonl")
    return {"id": job.id, "status": job.status, "items": sum(counts.values()),
            "counts": counts, "out": str(out_dir / "items.jsonl")}


# ---------------------------------------------------------------- --retry-failed


def retry_plan(conn: redis.Redis, settings: Settings, job: Job
               ) -> tuple[list[Task], list[list[int]], list[tuple[int, Task]]]:
    """What a retry of a map job reuses and runs again: its published chunk tasks
    (kept whole), their positions, and (position, old chunk task) for each item that
    did not succeed."""
    index = load_index(settings, job)
    dirs, _ = sources(conn, settings, job)
    ids = chunk_tasks(conn, job)
    kept: list[Task] = []
    kept_chunks: list[list[int]] = []
    again: list[tuple[int, Task]] = []
    records = list(step.records(index.raw, dirs, None))
    for chunk, (tid, directory) in enumerate(zip(ids, dirs, strict=True)):
        task = store.get_task(conn, tid)
        if task is None:
            raise SheepdogError(f"job {job.id}: piece {tid[:12]} is no longer in Redis")
        positions = index.raw["chunks"][chunk]
        if directory is not None:
            kept.append(task)
            kept_chunks.append(positions)
        again += [(p, task) for p in positions if records[p]["status"] != FINISHED_OK
                  and index.owner[p] == chunk]
    return kept, kept_chunks, again
