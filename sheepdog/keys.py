"""Every Redis key sheepdog uses, built here and nowhere else."""

from __future__ import annotations

PREFIX = "sheepdog"

# GN3's own queue: a LIST of hash names, optionally prefixed "<env>::" by GN3.
GN3_DEFAULT_QUEUE = "GN3::job-queue"


def job(job_id: str) -> str:
    """HASH: one job's fields (see models.Job)."""
    return f"{PREFIX}:job:{job_id}"


def job_tasks(job_id: str) -> str:
    """LIST: the job's task ids in the order the workflow lists them."""
    return f"{PREFIX}:job:{job_id}:tasks"


def job_running(job_id: str) -> str:
    """SET: the job's tasks claimed since they last ended (a superset of its running
    ones, so a view counts them without reading every task)."""
    return f"{PREFIX}:job:{job_id}:running"


def job_counts(job_id: str) -> str:
    """HASH: a workflow's own counters for the job (items succeeded, failed...)."""
    return f"{PREFIX}:job:{job_id}:counts"


def job_counted(job_id: str) -> str:
    """SET: the job's pieces already added to its counters (each counted once)."""
    return f"{PREFIX}:job:{job_id}:counted"


def timers() -> str:
    """ZSET: job ids whose workflow asked to be called back, scored by when (Unix time)."""
    return f"{PREFIX}:timers"


def job_log(job_id: str) -> str:
    """STREAM: the job's log lines (task, stream, text, time)."""
    return f"{PREFIX}:job:{job_id}:log"


def job_log_count(job_id: str) -> str:
    """STRING counter: lines offered to the job's log, kept or not (for the cap)."""
    return f"{PREFIX}:job:{job_id}:log:count"


def job_log_bytes(job_id: str) -> str:
    """STRING counter: bytes of text offered to the job's log (for the byte cap)."""
    return f"{PREFIX}:job:{job_id}:log:bytes"


def jobs_index() -> str:
    """ZSET: every job id scored by its submit time."""
    return f"{PREFIX}:jobs"


def task(task_id: str) -> str:
    """HASH: one task's description and state (see models.Task)."""
    return f"{PREFIX}:task:{task_id}"


def task_jobs(task_id: str) -> str:
    """SET: the jobs waiting on this task (a cached or shared task has several)."""
    return f"{PREFIX}:task:{task_id}:jobs"


def task_dependents(task_id: str) -> str:
    """SET: tasks that need this task's outputs."""
    return f"{PREFIX}:task:{task_id}:dependents"


def task_heartbeat(task_id: str) -> str:
    """STRING with a TTL: present while a live worker runs the task."""
    return f"{PREFIX}:task:{task_id}:heartbeat"


def task_raw(task_id: str, stream: str) -> str:
    """STRING: the exact bytes a capturing task wrote to stdout or stderr."""
    return f"{PREFIX}:task:{task_id}:raw:{stream}"


def gn3_taken(queue: str, worker: str | None = None) -> str:
    """LIST: ids one worker took off one of GN3's queues and has not yet handled
    (survives a crash; taken back only once that worker is dead). Without a worker: the
    one list all workers shared before 0.2, still emptied by recovery."""
    base = f"{PREFIX}:gn3:taken:{queue}"
    return base if worker is None else f"{base}@{worker}"


def gn3_takers(queue: str) -> str:
    """HASH: worker name -> JSON {process, at} of every worker that may hold ids of
    `queue` in its own taken list."""
    return f"{PREFIX}:gn3:takers:{queue}"


def gn3_jobs() -> str:
    """HASH: GN3 command id -> the sheepdog job running it, until it is mirrored back."""
    return f"{PREFIX}:gn3:jobs"


def untrusted_tasks() -> str:
    """SET: finished tasks whose outputs an untrusted pull worker made (no other job
    reuses them)."""
    return f"{PREFIX}:tasks:untrusted"


def open_jobs() -> str:
    """HASH: job id -> the process adding its pieces ("host pid start-time"), while the
    job is open (a CWL runner's, an Executor's): maintenance ends one whose process died."""
    return f"{PREFIX}:jobs:open"


def active_tasks() -> str:
    """SET: tasks that are queued or running, for the reaper to inspect."""
    return f"{PREFIX}:tasks:active"


def worker(name: str) -> str:
    """STRING with a TTL: a live worker's JSON description (queues, host, pid)."""
    return f"{PREFIX}:worker:{name}"


def pull_upkeep() -> str:
    """STRING with a TTL: a web process is reaping lost pieces for pull workers (one at
    a time, one round per heartbeat interval)."""
    return f"{PREFIX}:pull-upkeep"


def pull_leaving(worker: str) -> str:
    """STRING with a TTL: the instance of a pull worker that said it is going; its
    claims still waiting on the service take nothing more."""
    return f"{PREFIX}:pull-leaving:{worker}"


def queues_served() -> str:
    """SET: every queue some registered worker has served (POST /jobs accepts these)."""
    return f"{PREFIX}:queues"


def workers() -> str:
    """SET: names of workers that registered (live ones also have worker(name))."""
    return f"{PREFIX}:workers"


def rq_job_id(task_id: str, dispatch: str) -> str:
    """Id of the RQ job that carries one dispatch of a task: unique per dispatch, so a
    taker cleaning up its own entry never removes a newer one for the same task."""
    return f"{RQ_ID_HEAD}{task_id}-{dispatch}"


RQ_ID_HEAD = "sd-"
RQ_ID_TAIL = 13  # "-" and the 12 hex digits of the dispatch


def task_of_rq_job(rq_id: str) -> str:
    """The task an entry carries, read from its id ('' for an id not of this form: an
    entry made before 0.3 cut the task id to 40 characters; RQ's job then says)."""
    if not rq_id.startswith(RQ_ID_HEAD) or len(rq_id) <= len(RQ_ID_HEAD) + RQ_ID_TAIL:
        return ""
    task_id = rq_id[len(RQ_ID_HEAD):-RQ_ID_TAIL]
    return "" if len(task_id) == 40 else task_id


# RQ's own names for its keys (rq.Queue, rq.Job): sheepdog writes entries in RQ's form
# without building RQ objects for each (dispatch.py); a test holds these to RQ's.
RQ_QUEUES = "rq:queues"


def rq_queue(name: str) -> str:
    """A queue's waiting list."""
    return f"rq:queue:{name or 'default'}"


def rq_taken(name: str) -> str:
    """A queue's intermediate list: entries taken off it and not yet acknowledged."""
    return f"{rq_queue(name)}:intermediate"


RQ_JOB_PREFIX = "rq:job:"


def rq_job(rq_id: str) -> str:
    """The hash of one RQ job (an entry's body)."""
    return f"{RQ_JOB_PREFIX}{rq_id}"


def script_parts() -> list[str]:
    """What a Lua script needs to build the keys of tasks and jobs it only learns of
    while it runs (a task's jobs, an entry's task): the same strings as task(),
    task_jobs(), task_dependents(), task_heartbeat(), job(), job_running() and job_log()
    put together (a test holds them to it)."""
    return [f"{PREFIX}:task:", ":jobs", ":dependents", ":heartbeat", f"{PREFIX}:job:",
            ":running", ":log", RQ_ID_HEAD, str(RQ_ID_TAIL)]


def stream_places(kind: str, name: str) -> str:
    """ZSET: the open streams of one job or token (kind "job" or "token"), each scored
    by when its lease on the place runs out."""
    return f"{PREFIX}:streams:{kind}:{name}"


def job_finalizing(job_id: str) -> str:
    """STRING with a TTL: held while one process exports a finished job's results."""
    return f"{PREFIX}:job:{job_id}:finalizing"


def precompute_datasets() -> str:
    """HASH: precomputed dataset name -> JSON {out, job}: what `serve` serves."""
    return f"{PREFIX}:precompute"


def log_writer(writer: str) -> str:
    """STRING "SEQ:ROOM": the last batch one log writer had applied (a batch resent after
    a lost reply is not applied twice), kept a day."""
    return f"{PREFIX}:logwriter:{writer}"


def job_keys(job_id: str) -> list[str]:
    """Every key of one job (for retention: a finished job goes with all of them)."""
    return [job(job_id), job_tasks(job_id), job_running(job_id), job_counts(job_id),
            job_counted(job_id), job_log(job_id), job_log_count(job_id),
            job_log_bytes(job_id), job_finalizing(job_id)]


def task_keys(task_id: str) -> list[str]:
    """Every key of one task but its jobs set (see retention)."""
    return [task(task_id), task_dependents(task_id), task_heartbeat(task_id),
            task_raw(task_id, "stdout"), task_raw(task_id, "stderr")]
