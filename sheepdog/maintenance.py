"""Maintenance of abandoned work, done by every worker and waiting client in turn:
pieces lost with their workers run again (or fail), stranded queue entries go round
again, old scratch is swept and finished jobs leave Redis."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import redis

from . import dispatch, keys, liveness, logs, store
from .cache import Cache
from .config import Settings
from .defaults import SILENT_GRACE, TAKE_TO_CLAIM
from .errors import UnknownJob
from .models import JobStatus, TaskStatus
from .retention import expire_finished

log = logging.getLogger(__name__)


class _Look(NamedTuple):
    """One active task as one pipelined round saw it."""

    tid: str
    status: str
    queued_at: float | None
    process: str
    taker: bool
    rq_id: str
    queue: str
    beating: bool
    silent_since: float | None  # when a reaper first found its live process's heartbeat gone


def _look(conn: redis.Redis, ids: list[str]) -> list[_Look]:
    pipe = conn.pipeline(transaction=False)
    for tid in ids:
        pipe.hmget(keys.task(tid), "status", "queued_at", "process", "taken_by", "rq_id",
                   "queue", "silent_since")
        pipe.exists(keys.task_heartbeat(tid))
    replies = pipe.execute()
    out = []
    for i, tid in enumerate(ids):
        (status, queued_at, process, taker, rq_id, queue, silent), beating = \
            replies[2 * i:2 * i + 2]
        out.append(_Look(tid, status.decode() if status else "",
                         float(queued_at) if queued_at else None,
                         process.decode() if process else "", bool(taker),
                         rq_id.decode() if rq_id else "",
                         (queue or b"default").decode(), bool(beating),
                         float(silent) if silent else None))
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _recover(conn: redis.Redis, tid: str) -> str:
    """A running task whose heartbeat is gone goes back to its queue; what was said."""
    line = store.recover_lost(conn, tid)
    if line:
        for jid in store.job_ids_of_task(conn, tid):
            logs.note(conn, jid, line, task=tid)
    return line or ""


def reap_lost(conn: redis.Redis, settings: Settings) -> list[str]:
    """Recover tasks lost with their workers; returns what was done, for logging.

    One pipelined look at every active task whose entry is not waiting on a queue (an
    entry's id names its task: a task waiting its turn costs nothing to pass over, so a
    round over 10,000 queued pieces reads the few running ones); transactions only for
    the suspicious ones.
    """
    ids = store.active_task_ids(conn)
    if not ids:
        return []
    served = {_text(q) for q in conn.smembers(keys.queues_served())} | {settings.queue}
    waiting = {keys.task_of_rq_job(e) for e in dispatch.waiting_ids(conn, served)}
    looks = _look(conn, [tid for tid in ids if tid not in waiting])
    # one look at the queues, not one search of a queue per waiting task (which made a
    # round cost the square of the pieces waiting)
    queues = {t.queue for t in looks if t.status == TaskStatus.QUEUED}
    on_queue = dispatch.waiting_ids(conn, queues) if queues else set()
    now = time.time()
    grace = SILENT_GRACE * settings.heartbeat_timeout
    return [line for t in looks if (line := _tend(conn, t, on_queue, now, grace))]


def _tend(conn: redis.Redis, t: _Look, on_queue: set[str], now: float, grace: float) -> str:
    """Recover one task if it is lost; what was done ('' if nothing)."""
    if t.status == TaskStatus.QUEUED:
        if t.rq_id and t.rq_id in on_queue:
            return ""  # its entry waits its turn (a taken_by left from before is stale)
        if (t.taker or now - (t.queued_at or now) > TAKE_TO_CLAIM) and \
                store.redispatch_stranded(conn, t.tid, older_than=TAKE_TO_CLAIM,
                                          taker_gone=liveness.gone):
            return f"piece {t.tid[:12]} re-dispatched: its queue entry was lost"
        return ""
    if t.status != TaskStatus.RUNNING:
        return ""
    if t.beating and liveness.gone(t.process):
        # its worker ran here and is dead: no need to wait out its heartbeat
        conn.delete(keys.task_heartbeat(t.tid))
    elif t.beating:
        if t.silent_since is not None:  # it beats again: a later silence starts anew
            conn.hdel(keys.task(t.tid), "silent_since")
        return ""
    elif liveness.alive_here(t.process):
        # its process is here and alive: an outage of Redis outlived its heartbeat's
        # key, and it beats again once it notices; running it twice would do its side
        # effects twice. A process that stays silent that long is stuck: run again.
        if now - store.silent_since(conn, t.tid, now) < grace:
            return ""
    return _recover(conn, t.tid)


def end_orphaned(conn: redis.Redis) -> list[str]:
    """Open jobs whose holder (the process adding their pieces: a CWL runner, an
    Executor) died on this host before closing them: ended in error, naming it, instead
    of `running` for ever; what was done. (A holder on another host is never known dead
    here; the maintenance there ends its jobs.)"""
    said = []
    for raw_id, raw_holder in conn.hgetall(keys.open_jobs()).items():
        job_id, holder = _text(raw_id), _text(raw_holder)
        if not liveness.gone(holder):
            continue
        host, pid = holder.split()[:2]
        why = (f"the process adding its pieces (pid {pid} on {host}) went away before it "
               "had added them all")
        try:
            if store.stop_job(conn, job_id, JobStatus.ERROR, why):
                said.append(f"job {job_id} ended: {why}")
        except UnknownJob:
            pass
        conn.hdel(keys.open_jobs(), job_id)
    return said


def sweep_scratch(conn: redis.Redis, settings: Settings) -> int:
    """Delete scratch that killed or failed runs left, older than the setting; never
    the scratch of a piece that is queued or running now."""
    try:
        active = set(store.active_task_ids(conn))
        return Cache(settings.cache_dir).sweep_scratch(settings.scratch_max_age, keep=active)
    except (OSError, redis.RedisError) as e:
        log.warning("could not sweep scratch: %s", e)
        return 0


def expire_jobs(conn: redis.Redis, settings: Settings) -> int:
    """Finished jobs past the retention setting leave Redis."""
    try:
        return expire_finished(conn, settings.retention_days * 86400,
                               jobs_dir=settings.jobs_dir)
    except redis.RedisError as e:
        log.warning("could not expire finished jobs: %s", e)
        return 0
