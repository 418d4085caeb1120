"""Recording how a piece ended, the same for Redis and pull workers: through a Redis
outage (a finished piece that went unrecorded would run again), handed back, retried,
failed or succeeded (then its twin settled and its jobs told)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import redis

from . import dispatch, logs, store
from .config import Settings
from .defaults import REDIS_RETRY
from .finalize import after_success, piece_counts, settle_twins
from .models import Task, TaskStatus
from .piece import RELEASED, Outcome

log = logging.getLogger(__name__)
T = TypeVar("T")


class Deadline:
    """A stop signal that is given by the clock: a request thread records through a
    short outage, then answers 503 and its client asks again."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def is_set(self) -> bool:
        return time.monotonic() >= self._at

    def wait(self, seconds: float) -> bool:
        time.sleep(max(0.0, min(seconds, self._at - time.monotonic())))
        return self.is_set()


class Stop(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...


def until_recorded(write: Callable[[], T], stopping: Stop, who: str) -> T:
    """Retry a Redis write through an outage (backing off, saying so once); gives up
    only when told to stop."""
    pause, said = REDIS_RETRY / 8, False
    while True:
        try:
            return write()
        except redis.RedisError as e:
            if stopping.is_set():
                raise
            if not said:
                log.warning("worker %s: cannot record a piece's outcome yet (%s); "
                            "retrying until Redis is back", who, e)
                said = True
            stopping.wait(pause)
            pause = min(pause * 2, REDIS_RETRY * 2)


def _finish(conn: redis.Redis, settings: Settings, worker: str, task: Task, jobs: list[str],
            outcome: Outcome, stopping: Stop, entry: dispatch.Entry | None, untrusted: bool,
            take: store.Take | None) -> store.Finished:
    """The piece's end recorded (see conclude), a success with its counts and take."""
    succeeded = outcome.exit_code == 0 and not outcome.error
    # the workflows' counters go with the success, in its one call
    counts = until_recorded(lambda: piece_counts(conn, settings, task, jobs), stopping,
                            worker) if succeeded else {}
    taking = [take if succeeded else None]

    def finish() -> store.Finished:
        once, taking[0] = taking[0], None  # a retry through an outage takes nothing more
        return store.finish_piece(conn, task.id, worker, outcome.exit_code, outcome.error,
                                  retryable=outcome.lost, attempt=task.attempts,
                                  entry=entry, untrusted=untrusted, counts=counts,
                                  take=once)

    return until_recorded(finish, stopping, worker)


def conclude(conn: redis.Redis, settings: Settings, worker: str, task: Task, jobs: list[str],
             outcome: Outcome, stopping: Stop, entry: dispatch.Entry | None = None,
             untrusted: bool = False, take: store.Take | None = None,
             taken: Callable[[store.Taken], None] | None = None) -> store.Finished:
    """Record how a piece this worker ran ended: handed back, retried, failed or
    succeeded (then its twin settled and its jobs told); what recording it did. The
    outcome must be recorded even if Redis is away for a while: a finished piece that
    went unrecorded would be run again. A success also removes the queue `entry` it
    came from, in the same call; from an `untrusted` worker, its outputs are marked so.
    `take`: a success takes the worker's next piece in the same round trip, handed to
    `taken` at once (before the jobs are told, which can take long: it must not wait
    unwatched)."""
    def record(write: Callable[[], T]) -> T:
        return until_recorded(write, stopping, worker)

    if outcome.error == RELEASED and not task.cacheable and task.max_attempts <= 1:
        # run at most once (GN3's commands): stopped midway is an error, not a retry
        outcome = Outcome(None, f"worker {worker} stopped while it ran; not run "
                                "again (it runs at most once)")
    if outcome.error == RELEASED and record(lambda: store.release(conn, task.id, worker)):
        if jobs:
            logs.note(conn, jobs[0], f"{task.name}: handed back to the queue "
                      f"(worker {worker} is leaving)", task=task.id)
        return store.Finished(TaskStatus.QUEUED, {}, None, False)
    done = _finish(conn, settings, worker, task, jobs, outcome, stopping, entry, untrusted,
                   take)
    if done.taken is not None and taken is not None:
        taken(done.taken)
    if done.status == TaskStatus.SUCCESS:
        # a twin of this piece may have been started while it ran
        task.twin = done.twin if done.twin is not None else record(
            lambda: store.twin_of_task(conn, task.id))
        if task.twin or task.twin_of:
            record(functools.partial(settle_twins, conn, settings, task))
        for jid in jobs:
            record(functools.partial(after_success, conn, settings, jid, task,
                                     done.jobs.get(jid), done.counts.get(jid)))
    return done
