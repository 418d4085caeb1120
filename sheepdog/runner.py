"""Waiting for a job as a client: make sure someone runs it, then follow its log."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import redis

from . import logs, store
from .config import Settings
from .logs import LogLine
from .models import JobStatus
from .worker import Worker, live_workers


def job_ended(conn: redis.Redis, job_id: str) -> Callable[[], bool]:
    def ended() -> bool:
        return JobStatus(store.get_job(conn, job_id).status).final

    return ended


def run_inline(conn: redis.Redis, settings: Settings, job_id: str, queue: str,
               concurrency: int | None = None) -> threading.Thread:
    """Work the job's queue in this process until the job ends (no worker was running)."""
    worker = Worker(conn, settings, [queue], concurrency=concurrency or os.cpu_count() or 1,
                    until=job_ended(conn, job_id), name=f"inline.{job_id}")
    thread = threading.Thread(target=worker.run, name="inline-worker", daemon=True)
    thread.start()
    return thread


def spawn_detached_worker(settings: Settings, queue: str) -> int:
    """A background `sheepdog worker --burst` for --detach when no worker is running."""
    env = dict(os.environ)
    if settings.redis_url:
        env["SHEEPDOG_REDIS_URL"] = settings.redis_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "sheepdog", "worker", "--burst", "--queue", queue,
         "--concurrency", str(os.cpu_count() or 1)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=env,
    )
    return proc.pid


def follow_job(conn: redis.Redis, settings: Settings, job_id: str, queue: str,
               after: str = "0-0", inline: bool = True) -> Iterator[LogLine]:
    """Every log line of the job until it ends; runs it here if no worker serves its queue.

    A worker that vanishes while we wait is replaced by one in this process, so waiting
    never hangs on a dead queue.
    """
    ended = job_ended(conn, job_id)
    helper: threading.Thread | None = None

    def ensure_worker() -> bool:
        nonlocal helper
        if helper is not None and helper.is_alive():
            return ended()
        if inline and not ended() and not live_workers(conn, queue):
            helper = run_inline(conn, settings, job_id, queue)
        return ended()

    yield from logs.follow(conn, job_id, ensure_worker, after=after)
