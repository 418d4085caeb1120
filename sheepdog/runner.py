"""Waiting for a job as a client: make sure someone runs it, then follow its log."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import redis

from . import logs, store
from .config import Settings
from .logs import LogLine
from .models import JobStatus
from .pool import unserved
from .worker import Worker


def job_ended(conn: redis.Redis, job_id: str) -> Callable[[], bool]:
    def ended() -> bool:
        return JobStatus(store.get_job(conn, job_id).status).final

    return ended


def run_inline(conn: redis.Redis, settings: Settings, job_id: str, queue: str,
               concurrency: int | None = None) -> tuple[Worker, threading.Thread]:
    """Work the job's queue in this process until the job ends (no worker was running)."""
    # unregistered: other clients must not wait on a worker that leaves with its job
    worker = Worker(conn, settings, [queue], concurrency=concurrency or os.cpu_count() or 1,
                    until=job_ended(conn, job_id), name=f"inline.{job_id}", register=False)
    thread = threading.Thread(target=worker.run, name="inline-worker", daemon=True)
    thread.start()
    return worker, thread


class Helpers:
    """Whoever runs a job for a waiting client when no worker serves its queue: worker
    threads in the client itself (measured faster here than helper processes, whose
    interpreter start-up lands on the job's critical path)."""

    def __init__(self, conn: redis.Redis, settings: Settings, job_id: str, queue: str,
                 concurrency: int | None = None) -> None:
        self.conn, self.settings, self.job_id, self.queue = conn, settings, job_id, queue
        self.concurrency = concurrency
        self.thread: tuple[Worker, threading.Thread] | None = None

    def alive(self) -> bool:
        return self.thread is not None and self.thread[1].is_alive()

    def ensure(self) -> None:
        """Start worker threads here if the job still needs someone to run it."""
        if self.alive() or not unserved(self.conn, self.queue):
            return
        if JobStatus(store.get_job(self.conn, self.job_id).status).final:
            return  # a helper for an ended job would only take (and hand back) others' pieces
        self.thread = run_inline(self.conn, self.settings, self.job_id, self.queue,
                                 self.concurrency)

    def stop(self) -> None:
        """After the job ended: hand back whatever the threads still run, then go."""
        if self.thread is not None:
            self.thread[0].stop()
            self.thread[0].leaving.set()
            self.thread[1].join()


def follow_job(conn: redis.Redis, settings: Settings, job_id: str, queue: str,
               after: str = "0-0", inline: bool = True,
               helpers: Helpers | None = None) -> Iterator[LogLine]:
    """Every log line of the job until it ends; runs it here if no worker serves its queue.

    A worker that vanishes while we wait is replaced by one started here, so waiting
    never hangs on a dead queue.
    """
    ended = job_ended(conn, job_id)
    if inline and helpers is None:
        helpers = Helpers(conn, settings, job_id, queue)

    def check() -> bool:
        done = ended()
        if not done and inline and helpers is not None:
            helpers.ensure()
        return done

    try:
        yield from logs.follow(conn, job_id, check, after=after)
    finally:
        if helpers is not None:
            helpers.stop()
