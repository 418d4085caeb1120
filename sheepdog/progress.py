"""What a job looks like to a reader: status, progress with ETA, and its pieces."""

from __future__ import annotations

import time
from typing import Any

import redis

from . import store
from .models import Job, JobStatus, Task, TaskStatus


def eta_seconds(job: Job, now: float) -> float | None:
    """Linear estimate from the pieces done so far; None until one is done."""
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING) or not job.started:
        return None
    fresh_done = job.done - job.cached
    remaining = job.total - job.done
    if fresh_done <= 0 or remaining <= 0:
        return None
    return (now - job.started) / fresh_done * remaining


def piece(task: Task) -> dict[str, Any]:
    return {"id": task.id, "name": task.name, "status": task.status,
            "attempts": task.attempts, "exit_code": task.exit_code, "error": task.error,
            "worker": task.worker, "backend": task.backend, "host": task.host,
            "started": task.started or None,
            "ended": task.ended or None
            if task.status in (TaskStatus.SUCCESS, TaskStatus.ERROR) else None}


def job_view(conn: redis.Redis, job: Job, with_pieces: bool = True) -> dict[str, Any]:
    """The JSON form of a job shared by the CLI (--json) and the REST API."""
    now = time.time()
    view: dict[str, Any] = {
        "id": job.id, "workflow": job.workflow, "status": job.status,
        "exit_code": job.exit_code, "error": job.error or None, "command": job.command,
        "params": job.params, "backend": job.backend, "host": job.host, "queue": job.queue,
        "submitted": job.submitted, "started": job.started or None, "ended": job.ended or None,
        "out_dir": job.out_dir or None,
        "progress": {"done": job.done, "total": job.total, "cached": job.cached,
                     "percent": round(100.0 * job.done / job.total, 1) if job.total else 0.0,
                     "eta_seconds": eta_seconds(job, now)},
        "result": job.result or None,
    }
    if with_pieces:
        tasks = store.job_tasks(conn, job.id)
        view["pieces"] = [piece(t) for t in tasks]
        running = [t for t in tasks if t.status == TaskStatus.RUNNING]
        view["progress"]["running"] = len(running)
    return view
