"""Work a workflow does as its job goes: after each piece (piece_done, by the worker
that ran it), and once when the job succeeds (its gather and export, by whoever sees
it first)."""

from __future__ import annotations

import time

import redis

from . import keys, logs, store, workflows
from .cache import Cache
from .config import Settings
from .defaults import FINALIZE_LOCK, FINALIZE_WAIT
from .errors import SheepdogError
from .models import Job, JobStatus, Task


def finalize(conn: redis.Redis, settings: Settings, job_id: str, job: Job | None = None
             ) -> None:
    """Run a successful job's workflow finalize once; safe to call from several places
    (`job`: already read)."""
    job = job or store.get_job(conn, job_id)
    workflow = workflows.find(job.workflow)
    if job.status != JobStatus.SUCCESS or job.result or workflow is None:
        return
    if type(workflow).finalize is workflows.Workflow.finalize:
        return  # nothing to gather: no lock, no round trips
    # a short lock: a worker and a waiting CLI may both get here; the one that loses
    # waits, so that nobody reports results that are still being written
    if not conn.set(keys.job_finalizing(job_id), "1", nx=True, ex=FINALIZE_LOCK):
        deadline = time.monotonic() + FINALIZE_LOCK
        while conn.exists(keys.job_finalizing(job_id)) and time.monotonic() < deadline:
            time.sleep(FINALIZE_WAIT)
        return
    try:
        workflow.finalize(conn, settings, job)
        if job.out_dir:
            logs.note(conn, job_id, f"results written to {job.out_dir}")
    except (SheepdogError, OSError, KeyError, ValueError) as e:
        logs.note(conn, job_id, f"could not write the results: {e}")
        store.set_job_fields(conn, job_id, error=f"results not written: {e}")
    finally:
        conn.delete(keys.job_finalizing(job_id))


def piece_counts(conn: redis.Redis, settings: Settings, task: Task,
                 job_ids: list[str]) -> dict[str, store.Count]:
    """What a piece that succeeded adds to each of its jobs' counters (see
    Workflow.piece_counts), to be recorded with its success. A job whose workflow cannot
    say (its outputs unreadable) is left out: its piece_done counts it, or says why not."""
    counts: dict[str, store.Count] = {}
    for job_id in job_ids:
        try:  # (a job removed meanwhile has nothing to count: its piece is still recorded)
            job = store.submitted_job(conn, job_id)  # read once per job and process
            workflow = workflows.find(job.workflow)
            if workflow is None or \
                    type(workflow).piece_counts is workflows.Workflow.piece_counts:
                continue
            count = workflow.piece_counts(settings, job, task)
        except (SheepdogError, OSError, KeyError, ValueError):
            continue
        if count is not None:
            counts[job_id] = count
    return counts


def after_success(conn: redis.Redis, settings: Settings, job_id: str, task: Task,
                  after: tuple[str, str] | None = None,
                  totals: dict[str, int] | None = None) -> None:
    """After a piece succeeded, for each of its jobs: tell the workflow (if it wants to
    know), then finalize the job if that was its last piece. `after`: the job's status
    and workflow as recording the piece left them, when known (no read then, unless
    the workflow wants to hear of each piece or the job just succeeded); `totals`: the
    job's counters, when the piece's Count was recorded with its success."""
    if after is not None:
        status, name = after
        workflow = workflows.find(name)
        if workflow is None:
            return
        wants = type(workflow).piece_done is not workflows.Workflow.piece_done
        if wants and not JobStatus(status or JobStatus.ERROR).final:
            _piece_done(conn, settings, store.submitted_job(conn, job_id), task, totals)
        if status == JobStatus.SUCCESS:
            finalize(conn, settings, job_id)
        return
    job = store.get_job(conn, job_id)
    workflow = workflows.find(job.workflow)
    if (workflow is not None and not job.status.final
            and type(workflow).piece_done is not workflows.Workflow.piece_done):
        _piece_done(conn, settings, job, task)
        job = store.get_job(conn, job_id)
    finalize(conn, settings, job_id, job)


def _piece_done(conn: redis.Redis, settings: Settings, job: Job, task: Task,
                totals: dict[str, int] | None = None) -> None:
    workflow = workflows.find(job.workflow)
    if workflow is None:
        return
    try:
        workflow.piece_done(conn, settings, job, task, totals)
    except (SheepdogError, OSError, KeyError, ValueError) as e:
        logs.note(conn, job.id, f"could not count {task.name}: {e}", task=task.id)


def settle_twins(conn: redis.Redis, settings: Settings, task: Task) -> None:
    """A task with a twin succeeded: the other one is done too — the original gets the
    twin's outputs (identical by construction), the twin the original's verdict."""
    if task.twin_of:
        cache = Cache(settings.cache_dir)
        cache.adopt(task.twin_of, cache.task_dir(task.id))
        store.complete_twin(conn, task.twin_of, "its second run finished first")
    elif task.twin:
        store.complete_twin(conn, task.twin, "the first run finished first")


def run_timers(conn: redis.Redis, settings: Settings) -> None:
    """Call the workflows whose timers are due (each once, by one worker)."""
    for job_id in store.due_timers(conn, time.time()):
        try:
            job = store.get_job(conn, job_id)
        except SheepdogError:
            continue
        workflow = workflows.find(job.workflow)
        if workflow is None or job.status.final:
            continue
        try:
            workflow.on_timer(conn, settings, job)
        except (SheepdogError, OSError, KeyError, ValueError) as e:
            logs.note(conn, job_id, f"could not check the job's pieces: {e}")
