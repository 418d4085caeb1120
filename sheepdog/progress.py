"""What a job looks like to a reader: status, progress with ETA, and its pieces."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from . import store
from .defaults import PIECES_PAGE
from .models import Job, JobStatus, Task, TaskStatus

if TYPE_CHECKING:
    import redis


def eta_seconds(job: Job, now: float) -> float | None:
    """Linear estimate from the pieces done so far; None until one is done."""
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING) or not job.started:
        return None
    fresh_done = job.done - job.cached
    remaining = job.total - job.done
    if fresh_done <= 0 or remaining <= 0:
        return None
    return (now - job.started) / fresh_done * remaining


def items_progress(job: Job, counts: dict[str, int], now: float) -> dict[str, Any] | None:
    """Items done and failed, their rate and ETA, for a job whose workflow counts items
    (see store.count); None for the others."""
    if "items_total" not in counts:
        return None
    total, done = counts["items_total"], counts.get("items_done", 0)
    elapsed = (job.ended or now) - job.started if job.started else 0.0
    rate = done / elapsed if elapsed > 0 else None
    eta = ((total - done) / rate if rate and not job.status.final and total > done
           else None)
    return {"total": total, "done": done, "failed": counts.get("items_failed", 0),
            "rate_per_second": round(rate, 2) if rate else None,
            "eta_seconds": round(eta, 1) if eta is not None else None}


def piece(task: Task) -> dict[str, Any]:
    return {"id": task.id, "name": task.name, "status": task.status,
            "attempts": task.attempts, "exit_code": task.exit_code, "error": task.error,
            "worker": task.worker, "backend": task.backend, "host": task.host,
            "started": task.started or None,
            "ended": task.ended or None
            if task.status in (TaskStatus.SUCCESS, TaskStatus.ERROR) else None}


_SCATTER_INDEX = re.compile(r"_[0-9]+$")


def steps(pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pieces counted by step, in the order the steps first appear: a piece's step is its
    name without a scatter index (cwltool names a scatter's invocations `count`,
    `count_2`, `count_3`...)."""
    found: dict[str, dict[str, Any]] = {}
    for p in pieces:
        name = _SCATTER_INDEX.sub("", p["name"])
        step = found.setdefault(name, {"step": name, "total": 0, "done": 0, "running": 0,
                                       "failed": 0})
        step["total"] += 1
        status = p["status"]
        step["done"] += status == TaskStatus.SUCCESS
        step["running"] += status == TaskStatus.RUNNING
        step["failed"] += status in (TaskStatus.ERROR, TaskStatus.CANCELLED)
    return list(found.values())


def job_view(conn: redis.Redis, job: Job, with_pieces: bool = True, offset: int = 0,
             limit: int = PIECES_PAGE) -> dict[str, Any]:
    """The JSON form of a job shared by the CLI (--json) and the REST API: its counts,
    and one page of its pieces (`offset`, `limit`), so a view of a job of 100,000
    pieces costs what a view of one of 40 does."""
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
    items = items_progress(job, store.counts(conn, job.id), now)
    if items is not None:
        view["progress"]["items"] = items
    if with_pieces:
        view["progress"]["running"] = len(store.running_tasks(conn, job.id))
        total = store.count_tasks(conn, job.id)
        view["pieces"] = [piece(t) for t in store.job_tasks(conn, job.id, offset, limit)]
        view["pieces_total"] = total
        view["pieces_next"] = offset + limit if offset + limit < total else None
        if offset == 0 and total <= limit:  # every piece is in the view: counts by step
            view["steps"] = steps(view["pieces"])
    return view
