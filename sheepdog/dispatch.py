"""The queue library in one place: every use of RQ is here, and nowhere else.

A dispatch is one RQ entry carrying one task id. Entries are pushed inside the
transaction that makes the task ready (so a ready task always has one), taken by a
worker's task thread, and acknowledged (removed) by the taker when it is done with
the attempt. The reaper asks `is_queued` to tell an entry still waiting from one a
taker lost before claiming it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis
from redis.client import Pipeline
from rq import Queue
from rq.exceptions import DequeueTimeout

from . import keys

# What a plain `rq worker` calls for a sheepdog entry (worker.run_task).
RUN_TASK = "sheepdog.worker.run_task"


@dataclass(frozen=True)
class Entry:
    """One taken queue entry: the task it carries and what removing it needs."""

    task_id: str
    rq_id: str
    queue: str


def _queue(conn: redis.Redis, name: str) -> Queue:
    return Queue(name or "default", connection=conn)


def push(pipe: Pipeline, conn: redis.Redis, task_id: str, queue: str,
         at_front: bool = False) -> str:
    """Put a task on its queue inside the caller's MULTI; returns the entry's id.
    `at_front`: a piece that had its turn already (lost, handed back) goes first.

    The task records which entry carries it, so the reaper can tell a lost entry
    from a taken one; ids are unique per dispatch, so removing an old entry never
    removes a newer one for the same task.
    """
    rq_id = keys.rq_job_id(task_id, uuid.uuid4().hex[:12])
    pipe.hset(keys.task(task_id), "rq_id", rq_id)
    _queue(conn, queue).enqueue_call(RUN_TASK, args=(task_id,), job_id=rq_id, timeout=-1,
                                     result_ttl=0, failure_ttl=3600, pipeline=pipe,
                                     at_front=at_front)
    return rq_id


def take(conn: redis.Redis, queues: list[str], timeout: float | None) -> Entry | None:
    """Block up to `timeout` seconds for an entry on any of the queues (in order);
    None: only an entry waiting now."""
    try:
        found = Queue.dequeue_any([_queue(conn, q) for q in queues], timeout=timeout,
                                  connection=conn)
    except DequeueTimeout:
        return None
    if found is None:
        return None
    rq_job, queue = found
    return Entry(str(rq_job.args[0]), rq_job.id, queue.name)


def acknowledge(conn: redis.Redis, entry: Entry) -> None:
    """Forget a taken entry. Idempotent. RQ parks taken entries on an intermediate list
    for its own workers' clean-up, which never comes for entries taken this way."""
    queue = _queue(conn, entry.queue)
    pipe = conn.pipeline(transaction=False)
    pipe.delete(f"{queue.job_class.redis_job_namespace_prefix}{entry.rq_id}")
    pipe.lrem(queue.intermediate_queue_key, 1, entry.rq_id)
    pipe.execute()


def is_queued(conn: redis.Redis, queue: str, rq_id: str) -> bool:
    """Is this entry still waiting on its queue (not taken)?"""
    return conn.lpos(_queue(conn, queue).key, rq_id) is not None


def waiting_ids(conn: redis.Redis, queues: set[str]) -> set[str]:
    """The entry ids waiting on these queues, in one round trip (a reaper's snapshot: an
    entry missing from it may have been taken since, so check again before acting)."""
    pipe = conn.pipeline(transaction=False)
    for name in sorted(queues):
        pipe.lrange(_queue(conn, name).key, 0, -1)
    return {(e.decode() if isinstance(e, bytes) else e) for ids in pipe.execute() for e in ids}


def waiting(conn: redis.Redis, queue: str) -> int:
    """How many entries wait on a queue."""
    return int(_queue(conn, queue).count)


def queue_key(conn: redis.Redis, queue: str) -> str:
    """The Redis key of a queue's waiting list (for tests and diagnostics)."""
    return str(_queue(conn, queue).key)


def parked_key(conn: redis.Redis, queue: str) -> str:
    """The Redis key of the queue's intermediate (taken) list."""
    return str(_queue(conn, queue).intermediate_queue_key)
