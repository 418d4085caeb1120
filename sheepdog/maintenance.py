"""Maintenance of abandoned work, done by every worker and waiting client in turn:
pieces lost with their workers run again (or fail), stranded queue entries go round
again, old scratch is swept and finished jobs leave Redis."""

from __future__ import annotations

import logging
import time

import redis

from . import dispatch, keys, liveness, logs, store
from .cache import Cache
from .config import Settings
from .defaults import TAKE_TO_CLAIM
from .models import TaskStatus
from .retention import expire_finished

log = logging.getLogger(__name__)


def reap_lost(conn: redis.Redis, settings: Settings) -> list[str]:
    """Recover tasks lost with their workers; returns what was done, for logging.

    One pipelined look at every active task; transactions only for the suspicious ones.
    """
    ids = store.active_task_ids(conn)
    if not ids:
        return []
    pipe = conn.pipeline(transaction=False)
    for tid in ids:
        pipe.hmget(keys.task(tid), "status", "queued_at", "process", "taken_by", "rq_id",
                   "queue")
        pipe.exists(keys.task_heartbeat(tid))
    replies = pipe.execute()
    # one look at the queues, not one search of a queue per waiting task (which made a
    # round cost the square of the pieces waiting)
    queues = {(r[5] or b"default").decode() for r in replies[::2] if r[0] == b"queued"}
    on_queue = dispatch.waiting_ids(conn, queues) if queues else set()
    now = time.time()
    said = []
    for i, tid in enumerate(ids):
        (status, queued_at, process, taker, rq_id, _), beating = (replies[2 * i],
                                                                  replies[2 * i + 1])
        status = status.decode() if status else ""
        if status == TaskStatus.QUEUED and rq_id and rq_id.decode() in on_queue:
            continue  # its entry waits its turn (a taken_by left from before is stale)
        if status == TaskStatus.RUNNING and beating and liveness.gone(
                process.decode() if process else ""):
            # its worker ran here and is dead: no need to wait out its heartbeat
            conn.delete(keys.task_heartbeat(tid))
            beating = False
        if status == TaskStatus.RUNNING and not beating:
            line = store.recover_lost(conn, tid)
            if line:
                for jid in store.job_ids_of_task(conn, tid):
                    logs.note(conn, jid, line, task=tid)
                said.append(line)
        elif (status == TaskStatus.QUEUED
              and (taker or now - float(queued_at or now) > TAKE_TO_CLAIM)
              and store.redispatch_stranded(conn, tid, older_than=TAKE_TO_CLAIM,
                                            taker_gone=liveness.gone)):
            said.append(f"piece {tid[:12]} re-dispatched: its queue entry was lost")
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
        return expire_finished(conn, settings.retention_days * 86400)
    except redis.RedisError as e:
        log.warning("could not expire finished jobs: %s", e)
        return 0
