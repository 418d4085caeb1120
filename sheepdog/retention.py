"""Bounded storage: finished jobs leave Redis after the retention setting, and the disk
cache is trimmed least recently used first, never taking what a live piece needs.

A job's exported results stay in their files; its pieces' outputs stay in the cache
(where `sheepdog cache gc` trims them) and are found again by content if asked for.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from . import keys, store
from .cache import Cache, Entry
from .lua import script
from .models import JobStatus, TaskStatus, valid_job_id


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


SWEEP_BATCH = 500  # jobs looked at per sweep round: one round holds Redis briefly

# drop one job from a task's jobs; the task itself goes once no job waits on it, it has
# ended, and no job took it from the cache since the cutoff (such a job still shows it)
_RELEASE_TASK = """
redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) > 0 then return 0 end
local state = redis.call('HMGET', KEYS[2], 'status', 'ended', 'used')
local status = state[1]
if status == 'queued' or status == 'running' or status == 'waiting' then return 0 end
local cutoff = tonumber(ARGV[2])
if (tonumber(state[2]) or 0) > cutoff or (tonumber(state[3]) or 0) > cutoff then return 0 end
redis.call('DEL', KEYS[1], unpack(KEYS, 2))
return 1
"""


def expire_finished(conn: redis.Redis, older_than: float, now: float | None = None,
                    jobs_dir: Path | None = None) -> int:
    """Remove jobs that ended more than `older_than` seconds ago, with their logs, the
    state of tasks no other job needs and their own directories in `jobs_dir`; how many
    jobs went. A batch at a time, so Redis is never held long."""
    cutoff = (now or time.time()) - older_than
    start = gone = 0
    while True:
        ids = [_text(j) for j in conn.zrangebyscore(keys.jobs_index(), "-inf", cutoff,
                                                    start=start, num=SWEEP_BATCH)]
        went = _expire(conn, ids, cutoff, jobs_dir)
        gone += went
        start += len(ids) - went  # the ones kept (still running) stay in the index
        if len(ids) < SWEEP_BATCH:
            return gone


def _expire(conn: redis.Redis, ids: list[str], cutoff: float, jobs_dir: Path | None) -> int:
    if not ids:
        return 0
    pipe = conn.pipeline(transaction=False)
    for jid in ids:
        pipe.hmget(keys.job(jid), "status", "ended")
    release = script(conn, _RELEASE_TASK)
    gone = 0
    for jid, (status, ended) in zip(ids, pipe.execute(), strict=True):
        if status is not None:  # (None: already gone, only its index entry was left)
            if not JobStatus(_text(status)).final or float(ended or 0) > cutoff:
                continue
            for tid in store.job_task_ids(conn, jid):
                release(keys=[keys.task_jobs(tid), *keys.task_keys(tid)],
                        args=[jid, repr(cutoff)])
            conn.delete(*keys.job_keys(jid))
        conn.zrem(keys.jobs_index(), jid)
        if jobs_dir is not None and valid_job_id(jid):  # (an id is never a path)
            shutil.rmtree(jobs_dir / jid, ignore_errors=True)
        gone += 1
    return gone


def needed(conn: redis.Redis) -> set[str]:
    """Cache entries a job that has not ended still needs: its pieces' outputs and the
    inputs they read (a piece's id names its outputs, a sha256 its input)."""
    keep: set[str] = set()
    ids = [_text(j) for j in conn.zrange(keys.jobs_index(), 0, -1)]
    pipe = conn.pipeline(transaction=False)
    for job_id in ids:  # one round trip for every job's status, not one each
        pipe.hget(keys.job(job_id), "status")
    for job_id, raw in zip(ids, pipe.execute(), strict=True):
        status = _text(raw)
        if not status or JobStatus(status).final:
            continue
        for task in store.job_tasks(conn, job_id):
            keep.add(task.id)
            keep.update(task.deps)
            keep.update(task.inputs.values())
    for tid in store.active_task_ids(conn):  # a piece running for a job just ended too
        live = store.get_task(conn, tid)
        if live is not None and live.status in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            keep.update([live.id, *live.deps, *live.inputs.values()])
    return keep


@dataclass
class Trimmed:
    removed: list[Entry]
    kept_needed: int
    size_before: int
    size_after: int


def gc(cache: Cache, keep: set[str], max_size: int | None = None,
       older_than: float | None = None, now: float | None = None) -> Trimmed:
    """Remove entries unused for `older_than` seconds, then the least recently used
    until the cache is at most `max_size` bytes; never an entry in `keep`."""
    entries = cache.entries()  # least recently used first
    size = total = sum(e.size for e in entries)
    removed: list[Entry] = []
    skipped = 0
    cutoff = (now or time.time()) - older_than if older_than is not None else None
    for entry in entries:
        stale = cutoff is not None and entry.modified < cutoff
        over = max_size is not None and size > max_size
        if not (stale or over):
            continue
        if entry.id in keep:
            skipped += 1
            continue
        if cache.remove(entry.id):
            removed.append(entry)
            size -= entry.size
    return Trimmed(removed, skipped, total, size)
