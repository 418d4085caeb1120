"""The queue library in one place: every use of RQ is here, and nowhere else.

A dispatch is one RQ entry carrying one task id. Entries are pushed inside the
transaction that makes the task ready (so a ready task always has one), taken by a
worker's task thread, and acknowledged (removed) by the taker when it is done with
the attempt. The reaper asks `is_queued` to tell an entry still waiting from one a
taker lost before claiming it.
"""

from __future__ import annotations

import datetime
import functools
import pickle
import uuid
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import keys

if TYPE_CHECKING:
    import redis
    from rq import Queue

# What a plain `rq worker` calls for a sheepdog entry (worker.run_task).
RUN_TASK = "sheepdog.worker.run_task"


@dataclass(frozen=True)
class Entry:
    """One taken queue entry: the task it carries and what removing it needs."""

    task_id: str
    rq_id: str
    queue: str


def _queue(conn: redis.Redis, name: str) -> Queue:
    from rq import Queue  # only to read an entry of an older form back (entry_of)

    return Queue(name or "default", connection=conn)


def _keys(name: str) -> tuple[str, str, str]:
    """(waiting list, taken list, RQ job key prefix) of a queue."""
    return keys.rq_queue(name), keys.rq_taken(name), keys.RQ_JOB_PREFIX


def _utc() -> str:
    """Now, as RQ writes its timestamps."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.lru_cache(maxsize=4096)
def _body(task_id: str) -> bytes:
    """What RQ stores as an entry's call: its pickled (function, instance, args, kwargs)."""
    return zlib.compress(pickle.dumps((RUN_TASK, None, (task_id,), {}),
                                     protocol=pickle.HIGHEST_PROTOCOL))


def _shown(arg: str) -> str:
    """An argument as RQ's description of a call shows it (cut at 75 characters)."""
    text = repr(arg)
    return text[:75] + "..." if len(text) > 75 else text


def entry_commands(task_id: str, queue: str, rq_id: str,
                   at_front: bool = False) -> list[tuple[Any, ...]]:
    """The commands RQ's `enqueue_call(RUN_TASK, args=(task_id,), job_id=rq_id,
    timeout=-1, result_ttl=0, failure_ttl=3600)` sends, written here rather than by an RQ
    Job and Queue for each entry (a piece's dearest part of being queued); a plain `rq
    worker` runs them as it runs its own (a test holds them to RQ's)."""
    now, name = _utc(), queue or "default"
    job_key = keys.rq_job(rq_id)
    return [
        ("SADD", keys.RQ_QUEUES, keys.rq_queue(name)),
        ("HSET", job_key, "status", "queued"),
        ("HSET", job_key, "created_at", now, "data", _body(task_id),
         "success_callback_name", "", "failure_callback_name", "",
         "stopped_callback_name", "", "started_at", "", "ended_at", "", "last_heartbeat", "",
         "worker_name", "", "group_id", "", "origin", name,
         "description", f"{RUN_TASK}({_shown(task_id)})", "enqueued_at", now, "timeout", -1,
         "result_ttl", 0, "failure_ttl", 3600, "status", "queued"),
        ("LPUSH" if at_front else "RPUSH", keys.rq_queue(name), rq_id),
    ]


def push(pipe: Any, conn: redis.Redis | None, task_id: str, queue: str,
         at_front: bool = False) -> str:
    """Put a task on its queue inside the caller's MULTI; returns the entry's id.
    `at_front`: a piece that had its turn already (lost, handed back) goes first.

    The task records which entry carries it, so the reaper can tell a lost entry
    from a taken one; ids are unique per dispatch, so removing an old entry never
    removes a newer one for the same task.
    """
    rq_id = new_entry_id(task_id)
    pipe.hset(keys.task(task_id), "rq_id", rq_id)
    push_entry(pipe, task_id, queue, rq_id, at_front)
    return rq_id


def new_entry_id(task_id: str) -> str:
    return keys.rq_job_id(task_id, uuid.uuid4().hex[:12])


def push_entry(pipe: Any, task_id: str, queue: str, rq_id: str, at_front: bool = False) -> None:
    """push() for a task whose record already names `rq_id` (a new one, written whole)."""
    for command in entry_commands(task_id, queue, rq_id, at_front):
        pipe.execute_command(*command)


def push_commands(conn: redis.Redis, task_id: str, queue: str) -> list[list[bytes]]:
    """The commands push() would send, encoded, for a Lua script to run when it is the
    one that makes the task ready (store.finish: a piece's last dependency ending)."""
    rq_id = keys.rq_job_id(task_id, uuid.uuid4().hex[:12])
    encode = conn.get_encoder().encode
    return [[encode(arg) for arg in command]
            for command in [("HSET", keys.task(task_id), "rq_id", rq_id),
                            *entry_commands(task_id, queue, rq_id)]]


def sources(conn: redis.Redis, queues: list[str]) -> list[tuple[str, str, str]]:
    """(name, waiting list, taken list) of each queue, in the order they are served."""
    return [(name or "default", *_keys(name)[:2]) for name in queues]


def entry_of(conn: redis.Redis, rq_id: str, queue: str) -> Entry | None:
    """The entry with this id, taken from `queue`: its task read from the id (RQ's job
    only for an id of an older form); None for an entry whose RQ job is gone."""
    task_id = keys.task_of_rq_job(rq_id)
    if not task_id:
        found = _queue(conn, queue).fetch_job(rq_id)
        if found is None or not found.args:
            return None
        task_id = str(found.args[0])
    return Entry(task_id, rq_id, queue)


def take(conn: redis.Redis, queues: list[str], timeout: float | None) -> Entry | None:
    """Block up to `timeout` seconds for an entry on any of the queues (in order);
    None: only an entry waiting now. One blocking move onto the queue's taken list, as
    RQ's own workers do it, without reading RQ's job back (the id names the task)."""
    served = sources(conn, queues)
    while True:
        found: tuple[str, str] | None = None
        if timeout is None:
            for name, waiting_key, taken_key in served:
                rq_id = conn.lmove(waiting_key, taken_key, "LEFT", "RIGHT")
                if rq_id is not None:
                    found = (name, _text(rq_id))
                    break
        elif len(served) == 1:
            name, waiting_key, taken_key = served[0]
            rq_id = conn.blmove(waiting_key, taken_key, timeout, "LEFT", "RIGHT")
            found = None if rq_id is None else (name, _text(rq_id))
        else:
            popped = conn.blpop([w for _, w, _ in served], timeout)
            if popped is not None:
                by_key = {w: n for n, w, _ in served}
                found = (by_key[_text(popped[0])], _text(popped[1]))
        if found is None:
            return None
        entry = entry_of(conn, found[1], found[0])
        if entry is not None:
            return entry
        acknowledge(conn, Entry("", found[1], found[0]))  # its RQ job is gone: skip it


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def job_key_prefix() -> str:
    """What RQ puts before an entry's id to name its job's key."""
    return _keys("default")[2]


def entry_keys(conn: redis.Redis, entry: Entry) -> tuple[str, str]:
    """The keys removing a taken entry touches: RQ's job and the queue's taken list."""
    _, taken, job_prefix = _keys(entry.queue)
    return f"{job_prefix}{entry.rq_id}", taken


def acknowledge(conn: redis.Redis, entry: Entry) -> None:
    """Forget a taken entry. Idempotent. RQ parks taken entries on an intermediate list
    for its own workers' clean-up, which never comes for entries taken this way."""
    job_key, taken_key = entry_keys(conn, entry)
    pipe = conn.pipeline(transaction=False)
    pipe.delete(job_key)
    pipe.lrem(taken_key, 1, entry.rq_id)
    pipe.execute()


def is_queued(conn: redis.Redis, queue: str, rq_id: str) -> bool:
    """Is this entry still waiting on its queue (not taken)?"""
    return conn.lpos(keys.rq_queue(queue), rq_id) is not None


def waiting_ids(conn: redis.Redis, queues: set[str]) -> set[str]:
    """The entry ids waiting on these queues, in one round trip (a reaper's snapshot: an
    entry missing from it may have been taken since, so check again before acting)."""
    pipe = conn.pipeline(transaction=False)
    for name in sorted(queues):
        pipe.lrange(keys.rq_queue(name), 0, -1)
    return {(e.decode() if isinstance(e, bytes) else e) for ids in pipe.execute() for e in ids}


def waiting(conn: redis.Redis, queue: str) -> int:
    """How many entries wait on a queue."""
    return int(conn.llen(keys.rq_queue(queue)))


def queue_key(conn: redis.Redis, queue: str) -> str:
    """The Redis key of a queue's waiting list (for tests and diagnostics)."""
    return keys.rq_queue(queue)


def parked_key(conn: redis.Redis, queue: str) -> str:
    """The Redis key of the queue's intermediate (taken) list."""
    return keys.rq_taken(queue)
