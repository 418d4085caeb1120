"""Work done once when a job succeeds (exporting results), by whoever sees it first."""

from __future__ import annotations

import time

import redis

from . import keys, logs, store
from .config import Settings
from .errors import SheepdogError
from .models import JobStatus


def finalize(conn: redis.Redis, settings: Settings, job_id: str) -> None:
    """Export a successful workflow job's result once; safe to call from several places."""
    job = store.get_job(conn, job_id)
    if job.status != JobStatus.SUCCESS.value or job.result or not job.workflow.startswith("gemma"):
        return
    # a short lock: a worker and a waiting CLI may both get here; the one that loses
    # waits, so that nobody reports results that are still being written
    if not conn.set(keys.job_finalizing(job_id), "1", nx=True, ex=60):
        deadline = time.monotonic() + 60
        while conn.exists(keys.job_finalizing(job_id)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return
    from .gemma.result import finalize as gemma_finalize

    try:
        gemma_finalize(conn, settings, job)
        if job.out_dir:
            logs.note(conn, job_id, f"results written to {job.out_dir}")
    except (SheepdogError, OSError, KeyError, ValueError) as e:
        logs.note(conn, job_id, f"could not write the results: {e}")
        store.set_job_fields(conn, job_id, error=f"results not written: {e}")
    finally:
        conn.delete(keys.job_finalizing(job_id))
