"""Jobs and tasks in Redis, and every state change as one transaction.

A task's state change, its jobs' counters and statuses, and the dispatch of tasks it
makes ready are written in the same MULTI, so a crash can never leave a job that
disagrees with its tasks or a ready task that nobody will run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from . import dispatch, keys, liveness, logs
from .errors import JobEnded, UnknownJob
from .lua import run_many, script
from .models import (
    FINAL_STATES,
    Job,
    JobStatus,
    Task,
    TaskStatus,
    from_hash,
    to_hash,
    valid_job_id,
)

if TYPE_CHECKING:
    import redis
    from redis.client import Pipeline

ACTIVE = {TaskStatus.WAITING, TaskStatus.QUEUED, TaskStatus.RUNNING}
PUSH_MOST = 1000  # task ids in one RPUSH: a script's unpack() takes at most ~8,000 values
NEW_MOST = 20_000  # new cacheable pieces stored in one script call (see _new), at most
FIRST_PART = 64  # a big new job's tasks stored with it; the rest follow in parts, each
PART_MOST = 1000  # twice the last, at most this many (see _submit_in_parts)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _texts(values: Iterable[bytes | str]) -> list[str]:
    return sorted(_text(v) for v in values)


# ---------------------------------------------------------------- reading


def get_job(conn: redis.Redis, job_id: str) -> Job:
    if not valid_job_id(job_id):  # never a key of another type (`<id>:tasks`)
        raise UnknownJob(job_id)
    raw = conn.hgetall(keys.job(job_id))
    if not raw:
        raise UnknownJob(job_id)
    return from_hash(Job, raw)


_SUBMITTED: dict[str, Job] = {}  # job id -> the job as first read here (see submitted_job)
_SUBMITTED_KEEP = 256


def submitted_job(conn: redis.Redis, job_id: str) -> Job:
    """A job as it was submitted: read once per process and kept (its workflow, params,
    pieces and owner never change; its status, counters and result here may be old).
    What a worker tells the workflow after each piece, without a read per piece."""
    job = _SUBMITTED.get(job_id)
    if job is None:
        job = get_job(conn, job_id)
        if len(_SUBMITTED) >= _SUBMITTED_KEEP:
            _SUBMITTED.pop(next(iter(_SUBMITTED)))
        _SUBMITTED[job_id] = job
    return job


def job_read_token(conn: redis.Redis, job_id: str) -> str:
    """A job's read token ('' for no such job, or none): one field, so a wrong token
    takes as long on a job that exists as on one that does not."""
    if not valid_job_id(job_id):
        return ""
    return _text(conn.hget(keys.job(job_id), "read_token") or b"")


def get_task(conn: redis.Redis, task_id: str) -> Task | None:
    raw = conn.hgetall(keys.task(task_id))
    return from_hash(Task, raw) if raw else None


def job_task_ids(conn: redis.Redis, job_id: str) -> list[str]:
    return [_text(t) for t in conn.lrange(keys.job_tasks(job_id), 0, -1)]


def job_tasks(conn: redis.Redis, job_id: str, offset: int = 0,
              limit: int | None = None) -> list[Task]:
    """The job's tasks in order; `offset`/`limit` for one page of a large job."""
    if limit is not None and limit <= 0:
        return []
    stop = -1 if limit is None else offset + limit - 1
    ids = [_text(t) for t in conn.lrange(keys.job_tasks(job_id), offset, stop)]
    pipe = conn.pipeline(transaction=False)
    for tid in ids:
        pipe.hgetall(keys.task(tid))
    return [from_hash(Task, raw) for raw in pipe.execute() if raw]


def count_tasks(conn: redis.Redis, job_id: str) -> int:
    return int(conn.llen(keys.job_tasks(job_id)))


def running_tasks(conn: redis.Redis, job_id: str) -> list[Task]:
    """The job's running tasks, read from its small running set (dropping those that
    ended or went back to the queue since)."""
    ids = _texts(conn.smembers(keys.job_running(job_id)))
    pipe = conn.pipeline(transaction=False)
    for tid in ids:
        pipe.hgetall(keys.task(tid))
    tasks = [from_hash(Task, raw) if raw else None for raw in pipe.execute()]
    running = [t for t in tasks if t is not None and t.status == TaskStatus.RUNNING]
    stale = [tid for tid, t in zip(ids, tasks, strict=True)
             if t is None or t.status != TaskStatus.RUNNING]
    if stale:
        conn.srem(keys.job_running(job_id), *stale)
    return running


def list_jobs(conn: redis.Redis, limit: int = 50, offset: int = 0) -> list[Job]:
    ids = conn.zrevrange(keys.jobs_index(), offset, offset + limit - 1)
    pipe = conn.pipeline(transaction=False)
    for jid in ids:
        pipe.hgetall(keys.job(_text(jid)))
    return [from_hash(Job, raw) for raw in pipe.execute() if raw]


def count_jobs(conn: redis.Redis) -> int:
    return int(conn.zcard(keys.jobs_index()))


def job_ids_of_task(conn: redis.Redis, task_id: str) -> list[str]:
    return _texts(conn.smembers(keys.task_jobs(task_id)))


def tasks_and_jobs(conn: redis.Redis, task_ids: list[str]
                   ) -> list[tuple[Task | None, list[str]]]:
    """get_task and job_ids_of_task of each, in one round trip."""
    pipe = conn.pipeline(transaction=False)
    for tid in task_ids:
        pipe.hgetall(keys.task(tid))
        pipe.smembers(keys.task_jobs(tid))
    raw = pipe.execute()
    return [((from_hash(Task, raw[i]) if raw[i] else None), _texts(raw[i + 1]))
            for i in range(0, len(raw), 2)]


def set_job_fields(conn: redis.Redis, job_id: str, **values: Any) -> None:
    """Single-field updates (result, out dir) that no transition depends on."""
    job = Job(id=job_id, workflow="", **{k: v for k, v in values.items()})
    flat = to_hash(job)
    conn.hset(keys.job(job_id), mapping={k: flat[k] for k in values})


# ---------------------------------------------------------------- submitting


def _statuses(conn: redis.Redis, task_ids: list[str]) -> dict[str, str]:
    """The tasks' statuses in one round trip. Called while a transaction watches their
    keys: the reads may take another connection, the EXEC still fails if one changed."""
    pipe = conn.pipeline(transaction=False)
    for tid in task_ids:
        pipe.hget(keys.task(tid), "status")
    return {tid: _text(v) for tid, v in zip(task_ids, pipe.execute(), strict=True)}


def _add(pipe: Pipeline | _Commands, conn: Any, job_id: str, tasks: list[Task],
         states: dict[str, str], published: Callable[[str], bool], now: float,
         listed: bool = False) -> tuple[int, int]:
    """Inside a MULTI: store the tasks for the job, dispatch what can run now; returns
    (done, cached) among them. `listed`: the job's list names them already."""
    done = cached = 0
    for task in tasks:
        state = states[task.id]
        if state == TaskStatus.SUCCESS and published(task.id):
            done, cached = done + 1, cached + 1
            pipe.hset(keys.task(task.id), "used", repr(now))  # retention keeps it for this job
            continue
        if state in ACTIVE:
            pipe.sadd(keys.task_jobs(task.id), job_id)
            continue  # shared with the job that started it
        # starting over: jobs of an earlier run of it have counted it already
        pipe.delete(keys.task_jobs(task.id))
        pipe.sadd(keys.task_jobs(task.id), job_id)
        waiting_on = [d for d in task.deps if states.get(d) != TaskStatus.SUCCESS]
        task.pending = len(waiting_on)
        task.status = TaskStatus.WAITING if waiting_on else TaskStatus.QUEUED
        task.attempts, task.exit_code, task.error = 0, None, ""
        task.queued_at = now
        if state:  # a stored record's fields go; a new one's are all written below
            pipe.delete(keys.task(task.id))
        task.rq_id = "" if waiting_on else dispatch.new_entry_id(task.id)
        pipe.hset(keys.task(task.id), mapping=to_hash(task))  # its entry's id with it
        for dep in waiting_on:
            pipe.sadd(keys.task_dependents(dep), task.id)
        pipe.sadd(keys.active_tasks(), task.id)
        states[task.id] = task.status
        if not waiting_on:
            dispatch.push_entry(pipe, task.id, task.queue, task.rq_id)
    if not listed:
        _list(pipe, job_id, [t.id for t in tasks])
    return done, cached


def _list(pipe: Pipeline | _Commands, job_id: str, task_ids: list[str]) -> None:
    for start in range(0, len(task_ids), PUSH_MOST):
        pipe.rpush(keys.job_tasks(job_id), *task_ids[start:start + PUSH_MOST])


def submit(
    conn: redis.Redis,
    job: Job,
    tasks: list[Task],
    published: Callable[[str], bool] = lambda _tid: True,
    open_: bool = False,
    holder: str = "",
) -> Job:
    """Store a job and its tasks (in dependency order); dispatch what can run now.

    A task that already succeeded (and whose outputs are still published) counts as
    done at once: that is the cache. A task still queued or running for another job
    is shared, not started twice. A task that failed or was cancelled before starts over.
    An `open_` job takes more tasks later (add_tasks) and cannot end before close_job;
    `holder`, the process that will add them (liveness.this_process()), is kept while it
    is open, so that the job ends if that process dies first (maintenance.end_orphaned).
    A first run of more than FIRST_PART tasks is stored in parts (_submit_in_parts).
    """
    task_keys = [keys.task(t.id) for t in tasks]
    if len(tasks) > FIRST_PART and _none_stored(conn, tasks, task_keys):
        if _submit_in_parts(conn, job, tasks, task_keys, open_, holder):
            return job
    elif tasks and _new(conn, tasks, task_keys) and _submit_new(conn, job, tasks, open_,
                                                                 holder):
        return job

    def txn(pipe: Pipeline) -> None:
        states = _statuses(conn, [t.id for t in tasks])
        pipe.multi()
        _write_job(pipe, conn, job, tasks, states, published, open_, holder)

    conn.transaction(txn, *task_keys)
    return job


def _write_job(pipe: Pipeline | _Commands, conn: Any, job: Job, tasks: list[Task],
               states: dict[str, str], published: Callable[[str], bool], open_: bool,
               holder: str = "", all_ids: list[str] | None = None) -> None:
    """Inside a MULTI: a submitted job, its tasks as `states` found them. `all_ids`:
    the job's whole list, when `tasks` are only its first part (_submit_in_parts)."""
    now = time.time()
    pipe.delete(keys.job_tasks(job.id))
    if all_ids is not None:
        _list(pipe, job.id, all_ids)
    done, cached = _add(pipe, conn, job.id, tasks, states, published, now,
                        listed=all_ids is not None)
    # an open job counts one piece more than it has: the one close_job removes
    job.total = len(all_ids if all_ids is not None else tasks) + open_
    job.done, job.cached = done, cached
    pipe.hset(keys.job(job.id), mapping=to_hash(job))
    if holder and (open_ or all_ids is not None):
        pipe.hset(keys.open_jobs(), job.id, holder)
    if cached:
        pipe.xadd(keys.job_log(job.id), logs.note_fields(
            f"cache hit: {cached}/{len(tasks)} pieces already computed"))
    if done == job.total:
        job.status, job.ended, job.exit_code = JobStatus.SUCCESS, now, 0
        pipe.hset(keys.job(job.id), mapping={"status": job.status, "ended": str(now),
                                            "exit_code": "0"})
        _close_log(pipe, job.id, job.status, 0)
    pipe.zadd(keys.jobs_index(), {job.id: job.submitted})


# Runs the commands recorded for tasks that did not exist (ARGV: _argv's encoding), unless
# one of them (KEYS) exists now: 0 then.
_RUN = """
local function run(argv)
  local unpack = unpack or table.unpack
  local blobs = #argv > 1  -- a number stands for one only when some were sent
  for _, cmd in ipairs(cjson.decode(argv[1])) do
    if blobs then
      for k, x in ipairs(cmd) do
        if type(x) == 'number' then cmd[k] = argv[x] end
      end
    end
    redis.call(unpack(cmd))
  end
end
"""
_IF_NEW = _RUN + """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then return 0 end
end
run(ARGV)
return 1
"""


# More new tasks for an open job (KEYS[1] the job, the rest the tasks): as _IF_NEW, after
# the job is found open: -1 no such job, its status if it has ended, 0 a task exists.
_ADD_NEW = _RUN + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if FINAL[status] then return status end
for k = 2, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then return 0 end
end
run(ARGV)
return 1
""".replace("FINAL[status]", "(" + " or ".join(f"status == '{s}'" for s in sorted(FINAL_STATES))
            + ")")


def _argv(stack: list[tuple[Any, ...]]) -> list[Any]:
    """Recorded commands as a script's ARGV: the commands as one JSON text, in which a
    number n stands for ARGV[n], a bytes value sent as itself (a piece's pickled call).
    A job's ~200 arguments packed one by one by redis-py cost the web process more than
    the rest of its POST /jobs. Numbers are sent as redis-py sends them (repr)."""
    text: list[Any] = []
    blobs: list[bytes] = []
    for args in stack:
        if set(map(type, args)) == _TEXT:  # nearly all: checked in C, not one by one
            text.append(args)
            continue
        command: list[str | int] = list(args)
        for i, a in enumerate(args):
            if isinstance(a, str):  # nearly all; JSON writes an enum's text as it is
                continue
            if isinstance(a, bytes):
                blobs.append(a)
                command[i] = len(blobs) + 1
            elif isinstance(a, int | float) and not isinstance(a, bool):
                command[i] = repr(a)
            else:
                raise TypeError(f"{args[0]}: a {type(a).__name__} is not a Redis argument")
        text.append(command)
    return [_encode(text), *blobs]


_encode = json.JSONEncoder(ensure_ascii=False).encode  # made once, not for every job


_TEXT = {str}


class _Commands:
    """What a pipeline's write methods would send, recorded: storing a job of new
    pieces is one script call (_IF_NEW), built without a redis-py pipeline, so a
    client that has none can make it (sheepdog.wire)."""

    def __init__(self) -> None:
        self.stack: list[tuple[Any, ...]] = []
        self._queues: set[Any] = set()

    def execute_command(self, *args: Any) -> None:
        if args[:2] == ("SADD", keys.RQ_QUEUES):  # every entry says its queue exists: once
            if args[2] in self._queues:
                return
            self._queues.add(args[2])
        self.stack.append(args)

    def hset(self, name: str, key: str | None = None, value: Any = None,
             mapping: dict[str, Any] | None = None) -> None:
        pairs = [] if key is None else [key, value]
        for k, v in (mapping or {}).items():
            pairs += [k, v]
        self.stack.append(("HSET", name, *pairs))

    def delete(self, *names: str) -> None:
        self.stack.append(("DEL", *names))

    def sadd(self, name: str, *values: Any) -> None:
        self.stack.append(("SADD", name, *values))

    def rpush(self, name: str, *values: Any) -> None:
        self.stack.append(("RPUSH", name, *values))

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        self.stack.append(("HINCRBY", name, key, amount))

    def xadd(self, name: str, fields: dict[str, Any]) -> None:
        self.stack.append(("XADD", name, "*", *[x for pair in fields.items() for x in pair]))

    def zadd(self, name: str, mapping: dict[str, float]) -> None:
        self.stack.append(("ZADD", name, *[x for m, score in mapping.items()
                                           for x in (score, m)]))


def _new(conn: Any, tasks: list[Task], task_keys: list[str]) -> bool:
    """Worth storing as new tasks in one script call (_submit_new, _add_new): uncacheable
    ones are each their job's own; cacheable ones when none is stored yet (one EXISTS),
    as on a first run: a redis-py transaction packs each of their ~30 arguments one by
    one, which held back the first piece of a 4,000-item map by over a second. Up to
    NEW_MOST of them: the script's decoded text is held in Redis while it runs (20,000
    pieces: a 412 MB peak against the transaction's 321 MB)."""
    if not any(t.cacheable for t in tasks):
        return True
    return len(tasks) <= NEW_MOST and not conn.exists(*task_keys)


def _submit_new(conn: Any, job: Job, tasks: list[Task], open_: bool, holder: str = "") -> bool:
    """A job of new tasks in one call, not a watched read and a transaction; False
    (nothing written) if a task exists already. `conn`: a redis-py client, or a
    sheepdog.wire one."""
    pipe = _Commands()
    _write_job(pipe, conn, job, tasks, {t.id: "" for t in tasks}, lambda _tid: False, open_,
               holder)
    run = script(conn, _IF_NEW)
    return bool(run(keys=[keys.task(t.id) for t in tasks], args=_argv(pipe.stack)))


def _none_stored(conn: Any, tasks: list[Task], task_keys: list[str]) -> bool:
    """No task of a job is stored yet (uncacheable ones are their job's own)."""
    return not any(t.cacheable for t in tasks) or not conn.exists(*task_keys)


def _submit_in_parts(conn: Any, job: Job, tasks: list[Task], task_keys: list[str],
                     open_: bool, holder: str) -> bool:
    """A big job of new tasks stored in parts, so that its first pieces run while the
    rest are stored (4,000 of map's pieces took Redis 0.45 s and their sender as long;
    workers idle meanwhile) and Redis serves its workers between parts. The first part
    is the job, its whole task list and total, every task that waits for others (all of
    theirs unfinished: none is stored) and the first FIRST_PART of the rest: the job
    cannot end before the last part is in, and until then this process holds it
    (open_jobs: if it dies midway, maintenance.end_orphaned ends the job in error). A
    part that meets a task stored meanwhile (the same piece, by another job) is stored
    as a transaction reads them: one still queued or running is shared, one done already
    runs again (a rare race; what waits for it was told of it with the first part and
    counted its end once). False (nothing written) if a task was stored before the
    first part."""
    waiting = [t for t in tasks if t.deps]
    free = [t for t in tasks if not t.deps]
    first, rest = waiting + free[:FIRST_PART], free[FIRST_PART:]
    pipe = _Commands()
    _write_job(pipe, conn, job, first, {t.id: "" for t in first}, lambda _tid: False, open_,
               holder or liveness.this_process(), all_ids=[t.id for t in tasks])
    if not script(conn, _IF_NEW)(keys=task_keys, args=_argv(pipe.stack)):
        return False
    size = FIRST_PART
    while rest:
        size = min(size * 2, PART_MOST)  # larger parts once the workers are busy
        part, rest = rest[:size], rest[size:]
        if not _add_part(conn, job.id, part):
            break  # the job ended meanwhile (cancelled, a piece failed): it says so
    if not open_:
        conn.hdel(keys.open_jobs(), job.id)  # nobody holds it now
    return True


def _add_part(conn: Any, job_id: str, part: list[Task]) -> bool:
    """A later part of _submit_in_parts; False if the job has ended."""
    pipe = _Commands()
    _add(pipe, conn, job_id, part, {t.id: "" for t in part}, lambda _tid: False, time.time(),
         listed=True)
    said = script(conn, _ADD_NEW)(keys=[keys.job(job_id), *[keys.task(t.id) for t in part]],
                                  args=_argv(pipe.stack))
    if said == 1:
        return True
    if said != 0:
        return False  # unknown (removed) or ended

    def txn(watched: Pipeline) -> None:
        states = _statuses(conn, [t.id for t in part])
        watched.multi()
        # one done meanwhile runs again: counted done here, it could be the job's last
        # piece with nobody left to end the job
        _add(watched, conn, job_id, part, states, lambda _tid: False, time.time(),
             listed=True)

    conn.transaction(txn, *[keys.task(t.id) for t in part])
    return True


def add_tasks(conn: redis.Redis, job_id: str, tasks: list[Task],
              published: Callable[[str], bool] = lambda _tid: True) -> None:
    """More tasks for an open job (see submit); UnknownJob, or SheepdogError if the job
    has ended (failed or cancelled) meanwhile."""
    task_keys = [keys.task(t.id) for t in tasks]
    if tasks and _new(conn, tasks, task_keys) and _add_new(conn, job_id, tasks):
        return

    def txn(pipe: Pipeline) -> None:
        status = _text(pipe.hget(keys.job(job_id), "status"))
        if not status:
            raise UnknownJob(job_id)
        if JobStatus(status).final:
            raise JobEnded(job_id, status)
        states = _statuses(conn, [t.id for t in tasks])
        pipe.multi()
        done, _ = _add(pipe, conn, job_id, tasks, states, published, time.time())
        pipe.hincrby(keys.job(job_id), "total", len(tasks))
        if done:
            pipe.hincrby(keys.job(job_id), "done", done)
            pipe.hincrby(keys.job(job_id), "cached", done)

    conn.transaction(txn, keys.job(job_id), *task_keys)


def _add_new(conn: Any, job_id: str, tasks: list[Task]) -> bool:
    """New tasks (a CWL run's invocations) for an open job in one script call, not a
    watched transaction that the job's finishing pieces would keep retrying; False
    (nothing written) if a task exists already."""
    pipe = _Commands()
    _add(pipe, conn, job_id, tasks, {t.id: "" for t in tasks}, lambda _tid: False,
         time.time())
    pipe.hincrby(keys.job(job_id), "total", len(tasks))
    said = script(conn, _ADD_NEW)(keys=[keys.job(job_id), *[keys.task(t.id) for t in tasks]],
                                  args=_argv(pipe.stack))
    if said == -1:
        raise UnknownJob(job_id)
    if isinstance(said, bytes | str):
        raise JobEnded(job_id, said.decode() if isinstance(said, bytes) else said)
    return bool(said)


def close_job(conn: redis.Redis, job_id: str) -> None:
    """An open job takes no more tasks: it ends when the ones it has are done."""
    def txn(pipe: Pipeline) -> None:
        fields = [_text(v) for v in pipe.hmget(keys.job(job_id), "status", "done", "total")]
        if not fields[0] or JobStatus(fields[0]).final:
            return
        done, total = int(fields[1] or 0), int(fields[2] or 0) - 1
        now = time.time()
        pipe.multi()
        pipe.hset(keys.job(job_id), "total", str(total))
        if done >= total:
            pipe.hset(keys.job(job_id), mapping={"status": JobStatus.SUCCESS,
                                                "ended": str(now), "exit_code": "0"})
            _close_log(pipe, job_id, JobStatus.SUCCESS, 0)

    conn.transaction(txn, keys.job(job_id))
    conn.hdel(keys.open_jobs(), job_id)  # its holder is done with it


def drop_empty_job(conn: redis.Redis, job_id: str) -> bool:
    """An open job that never got a task (an Executor nothing reached): gone, rather
    than listed as the success of nothing."""
    if conn.llen(keys.job_tasks(job_id)):
        return False
    conn.delete(*keys.job_keys(job_id))
    conn.zrem(keys.jobs_index(), job_id)
    conn.hdel(keys.open_jobs(), job_id)
    return True


def calls_failed(conn: redis.Redis, job_id: str, failed: int, total: int, first: str) -> None:
    """An Executor's job whose pieces all ran but some of whose calls raised: an error,
    as `list`, `status` and the page show it, naming the first exception."""
    error = f"{failed:,d} of {total:,d} calls raised; the first: {first[:500]}"
    pipe = conn.pipeline(transaction=True)
    pipe.hset(keys.job(job_id), mapping={"status": JobStatus.ERROR, "error": error,
                                        "exit_code": "1"})
    pipe.xadd(keys.job_log(job_id), logs.note_fields(error))
    pipe.execute()


def drop_task(conn: redis.Redis, job_id: str, task_id: str) -> bool:
    """Take a task that has not started out of an open job (a cancelled future); False
    if it is running or done, or another job waits on it too."""
    def txn(pipe: Pipeline) -> bool:
        status = _text(pipe.hget(keys.task(task_id), "status"))
        jobs = _texts(pipe.smembers(keys.task_jobs(task_id)))
        if status not in (TaskStatus.QUEUED, TaskStatus.WAITING) or jobs != [job_id]:
            return False
        pipe.multi()
        pipe.hset(keys.task(task_id), mapping={"status": TaskStatus.CANCELLED,
                                               "error": "cancelled", "ended": str(time.time())})
        pipe.srem(keys.active_tasks(), task_id)
        pipe.srem(keys.task_jobs(task_id), job_id)
        pipe.lrem(keys.job_tasks(job_id), 1, task_id)
        pipe.hincrby(keys.job(job_id), "total", -1)
        return True

    return conn.transaction(txn, keys.task(task_id), keys.task_jobs(task_id),
                            keys.job(job_id), value_from_callable=True)


# ---------------------------------------------------------------- running


# Lua shared by the scripts below: the keys of tasks and jobs a script learns of while
# it runs, built from keys.script_parts(), written into the script's text and put before
# the arguments it was given (ARGV[1..9]: its own arguments are ARGV[10] on), rather
# than sent with every call (redis-py packs each one in Python).
_PARTS = """
local unpack = unpack or table.unpack
local ARGV = {PARTS, unpack(ARGV)}
local TASK, JOBS, DEPS, BEAT = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local JOB, RUNNING, LOG, RQ_HEAD, RQ_TAIL = ARGV[5], ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local function task_of(rq_id)  -- keys.task_of_rq_job
  if string.sub(rq_id, 1, #RQ_HEAD) ~= RQ_HEAD or #rq_id <= #RQ_HEAD + RQ_TAIL then return '' end
  local tid = string.sub(rq_id, #RQ_HEAD + 1, #rq_id - RQ_TAIL)
  if #tid == 40 then return '' end
  return tid
end
""".replace("PARTS", ", ".join(json.dumps(part) for part in keys.script_parts()))

# Claims a queued task for worker ARGV[10] in one call: running, its heartbeat set, its
# jobs running and told where it started. Returns {task hash, job ids} or false.
_CLAIM_FN = _PARTS + """
local worker, ttl, now, process, where, now3 = ARGV[10], ARGV[11], ARGV[12], ARGV[13],
  ARGV[14], ARGV[15]
local function claim(tid)
  local t = TASK .. tid
  local state = redis.call('HMGET', t, 'status', 'attempts', 'name', 'backend')
  if state[1] ~= 'queued' then return false end
  local attempts = tostring(tonumber(state[2] or '0') + 1)
  local name = state[3] or ''
  redis.call('HSET', t, 'status', 'running', 'worker', worker, 'started', now,
             'attempts', attempts, 'process', process, 'requeued_from', '', 'taken_by', process)
  redis.call('HDEL', t, 'silent_since')  -- a new attempt: silent from now on, if ever
  redis.call('SET', t .. BEAT, worker, 'PX', ttl)
  local backend = state[4]
  if not backend or backend == '' then backend = 'local' end
  local said = name .. ': started on ' .. backend .. ' (' .. where .. ', worker ' .. worker
    .. ', attempt ' .. attempts .. ')'
  local jobs = redis.call('SMEMBERS', t .. JOBS)
  for _, jid in ipairs(jobs) do
    local j = JOB .. jid
    if redis.call('HGET', j, 'status') == 'queued' then
      redis.call('HSET', j, 'status', 'running', 'started', now)
    end
    redis.call('SADD', j .. RUNNING, tid)
    redis.call('XADD', j .. LOG, '*', 'task', tid, 'piece', name, 'stream', 'sheepdog',
               'text', said, 'time', now3)
  end
  return {redis.call('HGETALL', t), jobs}
end
"""

_CLAIM = _CLAIM_FN + """
return claim(ARGV[16])
"""

# Takes the first entry waiting on the queues (KEYS: waiting and taken list of each, in
# order) and claims its task, in one call: nothing between the two for a death to fall
# into. Returns false (all empty), {entry id, queue number} (a task that is not ours to
# run, or an id of an older form), or {entry id, queue number, task hash, job ids}.
_TAKE = _CLAIM_FN + """
for i = 1, #KEYS, 2 do
  local rq_id = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT')
  if rq_id then
    local tid = task_of(rq_id)
    local n = (i + 1) / 2
    if tid == '' then return {rq_id, n} end
    local got = claim(tid)
    if not got then return {rq_id, n} end
    if ARGV[16] ~= '' then  -- the claim is the lease: the entry goes (a pull worker's)
      redis.call('DEL', ARGV[16] .. rq_id)
      redis.call('LREM', KEYS[i + 1], 1, rq_id)
    end
    return {rq_id, n, got[1], got[2]}
  end
end
return false
"""


def _claim_args(conn: redis.Redis, worker: str, ttl: float, where: str,
                process: str) -> list[str | int]:
    now = time.time()
    return [worker, int(ttl * 1000), str(now), process, where, f"{now:.3f}"]


def _claimed(raw: list[Any]) -> tuple[Task, list[str]]:
    flat, jobs = raw
    fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
    return from_hash(Task, fields), _texts(jobs)


def claim_jobs(conn: redis.Redis, task_id: str, worker: str, ttl: float,
               where: str = "", process: str = "") -> tuple[Task, list[str]] | None:
    """Move a queued task to running for this worker, in one call: the task and the
    ids of its jobs, or None if it is not ours to run.

    `process` ("host pid start-time") lets a reaper on the same host know at once that
    the attempt's process is gone. The jobs' logs say where it started.
    """
    raw = script(conn, _CLAIM)(
        args=[*_claim_args(conn, worker, ttl, where, process), task_id])
    return _claimed(raw) if raw else None


def claim(conn: redis.Redis, task_id: str, worker: str, ttl: float,
          where: str = "", process: str = "") -> Task | None:
    """claim_jobs, the task alone."""
    got = claim_jobs(conn, task_id, worker, ttl, where, process)
    return None if got is None else got[0]


class Take(NamedTuple):
    """A take_and_claim to make in the same round trip as recording a piece's success:
    the worker's next piece (see finish_piece)."""

    queues: list[str]
    worker: str
    ttl: float
    where: str = ""
    process: str = ""


# What a take gives: the entry and its task claimed, (entry, None) for an entry that is
# not ours to run, or None when nothing waits
Taken = tuple[dispatch.Entry, tuple[Task, list[str]] | None] | None


def take_and_claim(conn: redis.Redis, queues: list[str], worker: str, ttl: float,
                   where: str = "", process: str = "", drop_entry: bool = False) -> Taken:
    """The first entry waiting on the queues, taken and its task claimed in one call
    (None: nothing waits); the claim is None when the task is not ours to run.
    `drop_entry`: a claimed task's entry is removed in the same call (a lease, not the
    entry, keeps it from then on)."""
    return take_and_claim_many(conn, queues, worker, ttl, 1, where, process, drop_entry)[0]


def take_and_claim_many(conn: redis.Redis, queues: list[str], worker: str, ttl: float,
                        count: int, where: str = "", process: str = "",
                        drop_entry: bool = False) -> list[Taken]:
    """take_and_claim `count` times in one round trip (a pull worker's claim of several
    pieces): what each call gave, None for each that found nothing waiting."""
    take = Take(queues, worker, ttl, where, process)
    served, call = _take_call(conn, take, drop_entry)
    return [_taken(conn, served, raw, take) for raw in run_many(conn, [call] * count)]


def _take_call(conn: redis.Redis, take: Take, drop_entry: bool = False
               ) -> tuple[list[tuple[str, str, str]], tuple[str, list[str], list[Any]]]:
    """The queues served and the _TAKE call (text, keys, args) for `take`."""
    served = dispatch.sources(conn, take.queues)
    return served, (_TAKE, [k for _, waiting, taken in served for k in (waiting, taken)],
                    [*_claim_args(conn, take.worker, take.ttl, take.where, take.process),
                     dispatch.job_key_prefix() if drop_entry else ""])


def _taken(conn: redis.Redis, served: list[tuple[str, str, str]], raw: Any,
           take: Take) -> Taken:
    if not raw:
        return None
    rq_id, queue = _text(raw[0]), served[int(raw[1]) - 1][0]
    if len(raw) > 2:
        task, jobs = _claimed(raw[2:])
        return dispatch.Entry(task.id, rq_id, queue), (task, jobs)
    entry = dispatch.entry_of(conn, rq_id, queue)
    if entry is None or keys.task_of_rq_job(rq_id):
        return entry or dispatch.Entry("", rq_id, queue), None
    # an entry of an older form: its task is claimed by id
    return entry, claim_jobs(conn, entry.task_id, take.worker, take.ttl, take.where,
                             take.process)


# Renews (or, after Redis lost it in an outage, re-creates) a task's heartbeat, but only
# while the task is running for this worker: a late beat never revives a finished task.
_HEARTBEAT = """
local state = redis.call('HMGET', KEYS[1], 'status', 'worker')
if state[1] == 'running' and state[2] == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


def heartbeat(conn: redis.Redis, task_id: str, worker: str, ttl: float) -> bool:
    """Prove the task is alive; False when it was cancelled or taken from this worker."""
    beat = script(conn, _HEARTBEAT)
    return bool(beat(keys=[keys.task(task_id), keys.task_heartbeat(task_id)],
                     args=[worker, int(ttl * 1000)]))


def heartbeats(conn: redis.Redis, task_ids: list[str], worker: str, ttl: float) -> list[bool]:
    """heartbeat() for several tasks in one round trip."""
    beat = script(conn, _HEARTBEAT)
    pipe = conn.pipeline(transaction=False)
    for task_id in task_ids:
        beat(keys=[keys.task(task_id), keys.task_heartbeat(task_id)],
             args=[worker, int(ttl * 1000)], client=pipe)
    return [bool(v) for v in pipe.execute()]


def _descendants(pipe: Pipeline, task_id: str) -> list[str]:
    """Waiting tasks downstream of a task (they can no longer run once it failed)."""
    seen: list[str] = []
    frontier = [task_id]
    while frontier:
        nxt = []
        for tid in frontier:
            for dep in _texts(pipe.smembers(keys.task_dependents(tid))):
                status = _text(pipe.hget(keys.task(dep), "status"))
                if dep not in seen and status == TaskStatus.WAITING:
                    seen.append(dep)
                    nxt.append(dep)
        frontier = nxt
    return seen


def _say(pipe: Pipeline, jobs: dict[str, dict[str, str]], task: Task, text: str) -> None:
    """A note about a task into its jobs' logs, inside the transaction that changed it."""
    for jid in jobs:
        pipe.xadd(keys.job_log(jid), logs.note_fields(text, task.id, task.name))


def _ended(pipe: Pipeline, jobs: dict[str, dict[str, str]], task_id: str) -> None:
    for jid in jobs:
        pipe.srem(keys.job_running(jid), task_id)


def _close_log(pipe: Pipeline | _Commands, job_id: str, status: str, exit_code: int | None,
               error: str = "") -> None:
    pipe.xadd(keys.job_log(job_id), logs.end_fields(status, exit_code, error, job_id))


def _fail_jobs(pipe: Pipeline, jobs: dict[str, dict[str, str]], task: Task,
               message: str, now: float) -> None:
    for jid, state in jobs.items():
        if state["status"] in (JobStatus.QUEUED, JobStatus.RUNNING):
            pipe.hset(keys.job(jid), mapping={
                "status": JobStatus.ERROR, "ended": str(now), "error": message,
                "exit_code": "" if task.exit_code is None else str(task.exit_code)})
            _close_log(pipe, jid, JobStatus.ERROR, task.exit_code, message)


def _succeed_jobs(pipe: Pipeline, jobs: dict[str, dict[str, str]], task: Task,
                  now: float) -> None:
    for jid, state in jobs.items():
        if state["status"] not in (JobStatus.QUEUED, JobStatus.RUNNING):
            continue
        done = int(state["done"] or 0) + 1
        fields = {"done": str(done)}
        if state["final_task"] == task.id:
            fields["exit_code"] = str(task.exit_code)
        if done >= int(state["total"] or 0):
            fields.update(status=JobStatus.SUCCESS, ended=str(now))
            fields.setdefault("exit_code", "0")
            _close_log(pipe, jid, JobStatus.SUCCESS, int(fields["exit_code"]))
        pipe.hset(keys.job(jid), mapping=fields)


_JOB_FIELDS = ("status", "done", "total", "final_task")


def _read_jobs(pipe: Pipeline, task_id: str) -> dict[str, dict[str, str]]:
    jobs = _texts(pipe.smembers(keys.task_jobs(task_id)))
    if jobs:
        pipe.watch(*[keys.job(j) for j in jobs])
    return {j: dict(zip(_JOB_FIELDS, map(_text, pipe.hmget(keys.job(j), *_JOB_FIELDS)),
                        strict=True))
            for j in jobs}


class Finished(NamedTuple):
    """What recording a piece's end did: its status now, the status and workflow of each
    of its jobs afterwards ({} when not known), the id of its twin ('' if none or not
    known: None), whether its queue entry was removed with it, and the counters of each
    job whose Count was recorded with it."""

    status: TaskStatus
    jobs: dict[str, tuple[str, str]]
    twin: str | None
    entry_removed: bool
    counts: dict[str, dict[str, int]] = {}  # noqa: RUF012  (never changed in place)
    taken: Taken = None  # what the Take made with it gave


class Count(NamedTuple):
    """What a succeeded piece adds to one job's counters (as count() adds them), recorded
    in the same call as its success: once per `piece` (a twin's is its original's id),
    and the counter `total` names set to its value if it has none."""

    piece: str
    amounts: dict[str, int]
    total: tuple[str, int] | None = None


# A running piece's success, recorded in one call (see _record_success, which does the
# same for the rarer cases): its jobs counted and told, its dependents released, its
# queue entry removed (KEYS[7], KEYS[8], if given), an untrusted worker's outputs marked
# (ARGV[15] not empty; KEYS[6]), a workflow's Counts added (after the prepared commands:
# how many, then each job's id, counted and counts keys, piece, total name and value,
# and its amounts). A dependent it makes ready is put
# on its queue by commands prepared in Python (dispatch.push_commands); when one was not
# prepared the call changes nothing and names them: {'need', ids...}. A task not
# running for this worker: {'other'}. Else {'ok', twin, job, status, workflow, counters
# (JSON of HGETALL, or ''), ...}.
_SUCCEED = _PARTS + """
local tid, worker, now, now3, rq_id = ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local t = KEYS[1]
local st = redis.call('HMGET', t, 'status', 'worker', 'name', 'started', 'twin')
if st[1] ~= 'running' or st[2] ~= worker then return {'other'} end
local prepared, i = {}, 17
for _ = 1, tonumber(ARGV[16]) do
  local cmds = {}
  local dep, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  for _ = 1, n do
    local len, cmd = tonumber(ARGV[i]), {}
    for k = 1, len do cmd[k] = ARGV[i + k] end
    i = i + len + 1
    table.insert(cmds, cmd)
  end
  prepared[dep] = cmds
end
local counts, jobs_counted = {}, tonumber(ARGV[i])
i = i + 1
for _ = 1, jobs_counted do
  local c = {counted = ARGV[i + 1], counts = ARGV[i + 2], piece = ARGV[i + 3],
             total = ARGV[i + 4], total_value = ARGV[i + 5], amounts = {}}
  local n = tonumber(ARGV[i + 6])
  for k = 1, n do c.amounts[k] = {ARGV[i + 5 + 2 * k], ARGV[i + 6 + 2 * k]} end
  counts[ARGV[i]] = c
  i = i + 7 + 2 * n
end
local deps, ready, need = redis.call('SMEMBERS', KEYS[3]), {}, {}
for _, d in ipairs(deps) do
  local ds = redis.call('HMGET', TASK .. d, 'status', 'pending')
  if ds[1] == 'waiting' then
    local left = tonumber(ds[2] or '1') - 1
    table.insert(ready, {d, left})
    if left <= 0 and not prepared[d] then table.insert(need, d) end
  end
end
if #need > 0 then return {'need', unpack(need)} end
local name = st[3] or ''
if ARGV[15] ~= '' then  -- mark_untrusted: before the outputs count as done
  redis.call('HSET', t, 'untrusted', worker)
  redis.call('SADD', KEYS[6], tid)
end
redis.call('HSET', t, 'status', 'success', 'exit_code', '0', 'ended', now, 'error', '')
redis.call('SREM', KEYS[5], tid)
redis.call('DEL', KEYS[4], KEYS[3])
for _, r in ipairs(ready) do
  local d, left = r[1], r[2]
  if left > 0 then redis.call('HSET', TASK .. d, 'pending', tostring(left)) else
    redis.call('HSET', TASK .. d, 'pending', '0', 'status', 'queued', 'queued_at', now)
    for _, cmd in ipairs(prepared[d]) do redis.call(unpack(cmd)) end
  end
end
local said = name .. ': success in ' .. string.format('%.2f', tonumber(now) -
  tonumber(st[4] or now)) .. 's'
local out = {'ok', st[5] or ''}
for _, jid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local j = JOB .. jid
  redis.call('SREM', j .. RUNNING, tid)
  redis.call('XADD', j .. LOG, '*', 'task', tid, 'piece', name, 'stream', 'sheepdog',
             'text', said, 'time', now3)
  local js = redis.call('HMGET', j, 'status', 'done', 'total', 'final_task', 'workflow')
  local status = js[1]
  if status == 'queued' or status == 'running' then
    local done = tonumber(js[2] or '0') + 1
    redis.call('HSET', j, 'done', tostring(done))
    if js[4] == tid then redis.call('HSET', j, 'exit_code', '0') end
    if done >= tonumber(js[3] or '0') then
      status = 'success'
      redis.call('HSET', j, 'status', status, 'ended', now, 'exit_code', '0')
      -- logs.end_fields: the closing line names the job
      redis.call('XADD', j .. LOG, '*', 'task', '', 'piece', '', 'stream', 'sheepdog',
                 'text', 'job ' .. jid .. ' success (exit code 0)', 'time', now3, 'end', '1')
    end
  end
  local totals = ''
  local c = counts[jid]
  if c then  -- count(): once per piece
    if c.total ~= '' then redis.call('HSETNX', c.counts, c.total, c.total_value) end
    if redis.call('SADD', c.counted, c.piece) == 1 then
      for _, a in ipairs(c.amounts) do redis.call('HINCRBY', c.counts, a[1], a[2]) end
    end
    totals = cjson.encode(redis.call('HGETALL', c.counts))
  end
  table.insert(out, jid)
  table.insert(out, status or '')
  table.insert(out, js[5] or '')
  table.insert(out, totals)
end
if #KEYS > 6 then
  redis.call('DEL', KEYS[7])
  redis.call('LREM', KEYS[8], 1, rq_id)
end
return out
"""


def finish(conn: redis.Redis, task_id: str, worker: str, exit_code: int | None,
           error: str = "", retryable: bool = False, attempt: int = 0) -> TaskStatus:
    """Record the end of a running attempt; returns the task's new status.

    Success releases the tasks that were waiting on it. A failure is retried when the
    task's policy allows (or the backend lost it: `retryable`) and attempts remain;
    otherwise the task, everything downstream of it and every job waiting on it fail,
    with the message naming the piece.

    An attempt that ended while Redis was unreachable may find its task handed back to
    the queue meanwhile (its heartbeat expired); if nobody has claimed it since
    (`attempt` still the last one), its outcome is recorded all the same, so a finished
    piece is never run again.
    """
    return finish_piece(conn, task_id, worker, exit_code, error, retryable, attempt).status


def finish_piece(conn: redis.Redis, task_id: str, worker: str, exit_code: int | None,
                 error: str = "", retryable: bool = False, attempt: int = 0,
                 entry: dispatch.Entry | None = None, untrusted: bool = False,
                 counts: dict[str, Count] | None = None, take: Take | None = None
                 ) -> Finished:
    """finish(), saying what it did (see Finished); a success of a piece running for this
    worker is one call, which also removes the queue `entry` it was taken from, for
    an `untrusted` worker marks the outputs as its (mark_untrusted) before they count,
    and adds each job's Count in `counts` to its counters (then in Finished.counts).
    `take`: with a success, the worker's next piece is taken in the same round trip
    (Finished.taken), after the success, so a dependent it made ready can be the one."""
    taken: Taken = None
    if exit_code == 0 and not error:
        done, taken = _succeed(conn, task_id, worker, entry, untrusted, counts or {}, take)
        if done is not None:
            return done
        if untrusted:
            mark_untrusted(conn, task_id, worker)
    status = _finish_txn(conn, task_id, worker, exit_code, error, retryable, attempt)
    return Finished(status, {}, None, False, taken=taken)


def _succeed(conn: redis.Redis, task_id: str, worker: str, entry: dispatch.Entry | None,
             untrusted: bool = False, counts: dict[str, Count] | None = None,
             take: Take | None = None) -> tuple[Finished | None, Taken]:
    counting = _flat_counts(counts or {})
    task_keys = [keys.task(task_id), keys.task_jobs(task_id), keys.task_dependents(task_id),
                 keys.task_heartbeat(task_id), keys.active_tasks(), keys.untrusted_tasks()]
    if entry is not None:
        task_keys += dispatch.entry_keys(conn, entry)
    prepared: list[Any] = []
    taken: Taken = None
    for _ in range(3):  # a dependent added meanwhile (an open job) asks once more
        now = time.time()
        calls = [(_SUCCEED, task_keys, [
            task_id, worker, str(now), f"{now:.3f}",
            entry.rq_id if entry else "", "1" if untrusted else "",
            len(prepared) // 2, *_flat(prepared), *counting])]
        if take is not None:
            served, call = _take_call(conn, take)
            calls.append(call)
        replies = run_many(conn, calls, raise_on_error=False)
        if take is not None:  # whatever became of the success (an error: as if nothing
            # waited; the worker's own take meets it again and says so)
            if not isinstance(replies[1], Exception):
                taken = _taken(conn, served, replies[1], take)
            take = None
        raw = replies[0]
        if isinstance(raw, Exception):
            raise raw
        head = _text(raw[0])
        if head in ("ok", "other"):
            return (_succeeded(raw, entry, taken) if head == "ok" else None), taken
        for dep in map(_text, raw[1:]):
            queue = _text(conn.hget(keys.task(dep), "queue")) or "default"
            prepared += [dep, dispatch.push_commands(conn, dep, queue)]
    return None, taken


def _succeeded(raw: list[Any], entry: dispatch.Entry | None, taken: Taken) -> Finished:
    """Finished, from _SUCCEED's 'ok' reply."""
    out = [_text(v) for v in raw[1:]]
    quads = range(1, len(out), 4)
    return Finished(TaskStatus.SUCCESS, {out[i]: (out[i + 1], out[i + 2]) for i in quads},
                    out[0], entry is not None,
                    {out[i]: _pairs(json.loads(out[i + 3])) for i in quads if out[i + 3]},
                    taken)


def _flat_counts(counts: dict[str, Count]) -> list[Any]:
    """The Counts as _SUCCEED reads them (see there)."""
    out: list[Any] = [len(counts)]
    for job_id, c in counts.items():
        name, value = c.total or ("", 0)
        out += [job_id, keys.job_counted(job_id), keys.job_counts(job_id), c.piece, name,
                value, len(c.amounts)]
        for amount in c.amounts.items():
            out += amount
    return out


def _pairs(flat: list[Any]) -> dict[str, int]:
    return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _flat(prepared: list[Any]) -> list[Any]:
    """[dep, commands, ...] as the script reads it: dep, count, then each command as its
    length and arguments."""
    out: list[Any] = []
    for i in range(0, len(prepared), 2):
        dep, commands = prepared[i], prepared[i + 1]
        out += [dep, len(commands)]
        for cmd in commands:
            out += [len(cmd), *cmd]
    return out


def _finish_txn(conn: redis.Redis, task_id: str, worker: str, exit_code: int | None,
                error: str = "", retryable: bool = False, attempt: int = 0) -> TaskStatus:
    """finish() for every case but a success recorded by the worker it ran for."""
    key = keys.task(task_id)

    def txn(pipe: Pipeline) -> TaskStatus:
        # watched: the task and its job set; read in one round trip with its dependents
        read = conn.pipeline(transaction=False)
        read.hgetall(key)
        read.smembers(keys.task_jobs(task_id))
        read.smembers(keys.task_dependents(task_id))
        raw, job_set, dependent_set = read.execute()
        task: Task = from_hash(Task, raw)
        reclaimed = (task.status == TaskStatus.QUEUED and task.requeued_from == worker
                     and attempt and task.attempts == attempt)
        if not reclaimed and (task.status != TaskStatus.RUNNING or task.worker != worker):
            return task.status  # cancelled or reaped meanwhile: not ours to record
        success = exit_code == 0 and not error
        jobs, dep_state = _read_around(pipe, conn, _texts(job_set),
                                       _texts(dependent_set) if success else [])
        now = time.time()
        task.exit_code = exit_code
        took = f"in {now - task.started:.2f}s"
        if success:
            return _record_success(pipe, conn, task, jobs, dep_state, now,
                                   note=f"{task.name}: success {took}")
        again = retryable or (task.retry_on_failure and not _its_own_failure(exit_code))
        if task.twin_of and not (again and task.attempts < task.max_attempts):
            return _drop_twin(pipe, task, jobs, now, f"{task.name}: its second run failed "
                              f"({error}); the first goes on")
        if again and task.attempts < task.max_attempts:
            pipe.multi()
            _requeue(pipe, conn, task, now, f"attempt {task.attempts} failed: {error}")
            _say(pipe, jobs, task, f"{task.name}: attempt {task.attempts} failed {took} "
                                   f"({error}); trying again")
            return TaskStatus.QUEUED
        return _record_failure(pipe, task, jobs, now, error,
                               note=f"{task.name}: error {took} ({error})")

    return conn.transaction(txn, key, keys.task_jobs(task_id), value_from_callable=True)


def _its_own_failure(exit_code: int | None) -> bool:
    """The program ended by itself with a failure (an exit code, or abort()): it would
    fail the same way again, so a piece that retries failures does not retry it. A kill
    (the OOM killer's SIGKILL, a SIGTERM), a crash with no code, or an exit 0 whose
    outputs were not whole may be the machine's fault: those are tried again."""
    # 128 + 6: abort(); 128 + 2: a program that stops itself with SIGINT (GEMMA does, on
    # a singular matrix: pieces never get a SIGINT from anyone else, in a session of their own)
    return exit_code is not None and (0 < exit_code < 128 or exit_code in (128 + 6, 128 + 2))


def _read_around(pipe: Pipeline, conn: redis.Redis, job_ids: list[str],
                 dependents: list[str]) -> tuple[dict[str, dict[str, str]],
                                                 dict[str, list[str]]]:
    """Watch a task's jobs and dependents, then read what finishing it needs of them in
    one round trip: (job -> status/done/total/final_task, dependent -> status/pending/queue)."""
    watched = [keys.job(j) for j in job_ids] + [keys.task(d) for d in dependents]
    if not watched:
        return {}, {}
    pipe.watch(*watched)
    read = conn.pipeline(transaction=False)
    for j in job_ids:
        read.hmget(keys.job(j), *_JOB_FIELDS)
    for d in dependents:
        read.hmget(keys.task(d), "status", "pending", "queue")
    values = read.execute()
    jobs = {j: dict(zip(_JOB_FIELDS, map(_text, v), strict=True))
            for j, v in zip(job_ids, values, strict=False)}
    deps = {d: [_text(x) for x in v] for d, v in zip(dependents, values[len(job_ids):],
                                                     strict=True)}
    return jobs, deps


def _record_success(pipe: Pipeline, conn: redis.Redis, task: Task,
                    jobs: dict[str, dict[str, str]], dep_state: dict[str, list[str]],
                    now: float, note: str) -> TaskStatus:
    pipe.multi()
    pipe.hset(keys.task(task.id), mapping={"status": TaskStatus.SUCCESS,
                                           "exit_code": str(task.exit_code),
                                           "ended": str(now), "error": ""})
    pipe.srem(keys.active_tasks(), task.id)
    pipe.delete(keys.task_heartbeat(task.id), keys.task_dependents(task.id))
    _ended(pipe, jobs, task.id)
    for dep, (status, pending, queue) in dep_state.items():
        if status != TaskStatus.WAITING:
            continue
        left = int(pending or 1) - 1
        if left > 0:
            pipe.hset(keys.task(dep), "pending", str(left))
            continue
        pipe.hset(keys.task(dep), mapping={"pending": "0", "status": TaskStatus.QUEUED,
                                           "queued_at": str(now)})
        dispatch.push(pipe, conn, dep, queue or "default")
    _say(pipe, jobs, task, note)  # before any job's closing line
    _succeed_jobs(pipe, jobs, task, now)
    return TaskStatus.SUCCESS


def _record_failure(pipe: Pipeline, task: Task, jobs: dict[str, dict[str, str]],
                    now: float, error: str, note: str = "") -> TaskStatus:
    downstream = _descendants(pipe, task.id)
    message = f"piece '{task.name}' failed: {error}" if error else f"piece '{task.name}' failed"
    if task.speaks_for_job and error:
        message = error.rsplit("ERROR: ", 1)[-1]  # the program's own sentence
    pipe.multi()
    if note:
        _say(pipe, jobs, task, note)
    pipe.hset(keys.task(task.id), mapping={
        "status": TaskStatus.ERROR, "ended": str(now), "error": error,
        "exit_code": "" if task.exit_code is None else str(task.exit_code)})
    pipe.srem(keys.active_tasks(), task.id)
    pipe.delete(keys.task_heartbeat(task.id))
    _ended(pipe, jobs, task.id)
    for dep in downstream:
        pipe.hset(keys.task(dep), mapping={"status": TaskStatus.CANCELLED,
                                           "error": f"needs '{task.name}', which failed"})
        pipe.srem(keys.active_tasks(), dep)
    _fail_jobs(pipe, jobs, task, message, now)
    return TaskStatus.ERROR


def _drop_twin(pipe: Pipeline, task: Task, jobs: dict[str, dict[str, str]], now: float,
               note: str) -> TaskStatus:
    """A twin failed: it no longer counts in its jobs; the original decides."""
    pipe.multi()
    _say(pipe, jobs, task, note)
    pipe.hset(keys.task(task.id), mapping={"status": TaskStatus.ERROR, "ended": str(now),
                                           "exit_code": "" if task.exit_code is None
                                           else str(task.exit_code)})
    pipe.srem(keys.active_tasks(), task.id)
    pipe.delete(keys.task_heartbeat(task.id))
    _ended(pipe, jobs, task.id)
    for jid in jobs:
        pipe.hincrby(keys.job(jid), "total", -1)
    return TaskStatus.ERROR


def _requeue(pipe: Pipeline, conn: redis.Redis, task: Task, now: float, why: str) -> None:
    pipe.hset(keys.task(task.id), mapping={"status": TaskStatus.QUEUED, "worker": "",
                                           "queued_at": str(now), "error": why,
                                           "requeued_from": task.worker})
    pipe.delete(keys.task_heartbeat(task.id))
    dispatch.push(pipe, conn, task.id, task.queue, at_front=True)  # it had its turn


def recover_lost(conn: redis.Redis, task_id: str) -> str | None:
    """A running task whose heartbeat expired: run it again, or fail it when out of tries.

    Returns a line for the job log saying what was done, or None if nothing was lost.
    """
    key = keys.task(task_id)

    def txn(pipe: Pipeline) -> str | None:
        raw = pipe.hgetall(key)
        if not raw or pipe.exists(keys.task_heartbeat(task_id)):
            return None
        task: Task = from_hash(Task, raw)
        if task.status != TaskStatus.RUNNING:
            return None
        jobs = _read_jobs(pipe, task_id)
        now = time.time()
        lost = f"worker {task.worker} stopped sending heartbeats (attempt {task.attempts})"
        if task.attempts < task.max_attempts:
            pipe.multi()
            _requeue(pipe, conn, task, now, lost)
            return f"{lost}; running '{task.name}' again"
        _record_failure(pipe, task, jobs, now,
                        f"{lost}; gave up after {task.attempts} attempts",
                        note=f"{task.name}: {lost}; gave up after {task.attempts} attempts")
        return f"{lost}; gave up after {task.attempts} attempts"

    return conn.transaction(txn, key, keys.task_heartbeat(task_id), keys.task_jobs(task_id),
                            value_from_callable=True)


def release(conn: redis.Redis, task_id: str, worker: str) -> bool:
    """A worker leaving hands a running task back to the queue; the try does not count."""
    key = keys.task(task_id)

    def txn(pipe: Pipeline) -> bool:
        raw = pipe.hgetall(key)
        task: Task = from_hash(Task, raw)
        if task.status != TaskStatus.RUNNING or task.worker != worker:
            return False
        task.attempts -= 1
        pipe.multi()
        pipe.hset(key, "attempts", str(task.attempts))
        _requeue(pipe, conn, task, time.time(), f"released by worker {worker}")
        return True

    return conn.transaction(txn, key, value_from_callable=True)


def silent_since(conn: redis.Redis, task_id: str, now: float) -> float:
    """When a reaper first found this running task's heartbeat gone while its process
    lives (set now if no one had)."""
    key = keys.task(task_id)
    pipe = conn.pipeline(transaction=False)
    pipe.hsetnx(key, "silent_since", repr(now))
    pipe.hget(key, "silent_since")
    return float(_text(pipe.execute()[1]) or repr(now))


def mark_taken(conn: redis.Redis, task_id: str, process: str) -> None:
    """Say which process took the task's queue entry (before it claims the task), so a
    reaper on its host knows at once if that process died in between."""
    conn.hset(keys.task(task_id), "taken_by", process)


def redispatch_stranded(conn: redis.Redis, task_id: str, older_than: float,
                        taker_gone: Callable[[str], bool] = lambda _p: False) -> bool:
    """A queued task whose RQ job is on no queue: its taker died before claiming it.

    A taker holds the entry only for the moment between taking and claiming, so the
    task must be seen missing from its queue twice, older_than apart, before it is
    dispatched again (once could be that moment) — unless its taker is known dead.
    """
    key = keys.task(task_id)

    def txn(pipe: Pipeline) -> bool:
        status, queued_at, queue, rq_id, seen, taker = map(_text, pipe.hmget(
            key, "status", "queued_at", "queue", "rq_id", "unqueued_seen", "taken_by"))
        now = time.time()
        if status != TaskStatus.QUEUED:
            return False
        gone = bool(taker) and taker_gone(taker)
        if not gone and now - float(queued_at or 0) < older_than:
            return False
        if dispatch.is_queued(conn, queue, rq_id):
            return False
        if gone:
            pipe.multi()
            pipe.hset(key, mapping={"queued_at": str(now), "taken_by": ""})
            dispatch.push(pipe, conn, task_id, queue or "default", at_front=True)
            return True
        if float(seen or 0) <= float(queued_at or 0):  # first sighting since it was queued
            pipe.multi()
            pipe.hset(key, "unqueued_seen", str(now))
            return False
        if now - float(seen) < older_than:
            return False
        pipe.multi()
        pipe.hset(key, "queued_at", str(now))
        dispatch.push(pipe, conn, task_id, queue or "default", at_front=True)
        return True

    return conn.transaction(txn, key, value_from_callable=True)


def put_back(conn: redis.Redis, task_id: str, at_front: bool = False) -> bool:
    """A queued task taken by someone who cannot run it (a pull worker, a piece for
    ssh or Slurm): onto its queue again, with a new entry. False if it is not queued."""
    key = keys.task(task_id)

    def txn(pipe: Pipeline) -> bool:
        status, queue = map(_text, pipe.hmget(key, "status", "queue"))
        if status != TaskStatus.QUEUED:
            return False
        pipe.multi()
        pipe.hset(key, mapping={"queued_at": str(time.time()), "taken_by": ""})
        dispatch.push(pipe, conn, task_id, queue or "default", at_front=at_front)
        return True

    return conn.transaction(txn, key, value_from_callable=True)


def active_task_ids(conn: redis.Redis) -> list[str]:
    return _texts(conn.smembers(keys.active_tasks()))


# ---------------------------------------------------------------- cancelling


def cancel_job(conn: redis.Redis, job_id: str) -> bool:
    """Cancel a job; its tasks stop unless another job still waits on them.

    False if the job had already ended.
    """
    return stop_job(conn, job_id, JobStatus.CANCELLED, "cancelled by user")


def stop_job(conn: redis.Redis, job_id: str, status: JobStatus, why: str) -> bool:
    """End a job early with this status and reason (a cancel; too many failed items);
    its tasks stop unless another job still waits on them. False if it had ended."""
    get_job(conn, job_id)
    task_ids = job_task_ids(conn, job_id)
    watch = [keys.job(job_id)] + [keys.task_jobs(t) for t in task_ids]

    def txn(pipe: Pipeline) -> bool:
        if JobStatus(_text(pipe.hget(keys.job(job_id), "status"))).final:
            return False
        others = {t: set(_texts(pipe.smembers(keys.task_jobs(t)))) - {job_id} for t in task_ids}
        states = {t: _text(pipe.hget(keys.task(t), "status")) for t in task_ids}
        now = time.time()
        pipe.multi()
        pipe.hset(keys.job(job_id), mapping={"status": status, "ended": str(now),
                                            "error": why})
        _close_log(pipe, job_id, status, None, "" if status == JobStatus.CANCELLED else why)
        pipe.delete(keys.job_running(job_id))
        pipe.hdel(keys.open_jobs(), job_id)
        for tid in task_ids:
            pipe.srem(keys.task_jobs(tid), job_id)
            if states[tid] in ACTIVE and not others[tid]:
                pipe.hset(keys.task(tid), mapping={"status": TaskStatus.CANCELLED,
                                                   "ended": str(now), "error": "cancelled"})
                pipe.srem(keys.active_tasks(), tid)
        return True

    return conn.transaction(txn, *watch, value_from_callable=True)


# Adds a piece's amounts to its job's counters once (the piece's id joins a set), and
# sets the counter ARGV[2] to ARGV[3] if it has none; one call, so the pieces of a job
# finishing at once never retry each other's transactions.
_COUNT = """
if ARGV[2] ~= '' then redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) end
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
return redis.call('HGETALL', KEYS[2])
"""


def count(conn: redis.Redis, job_id: str, task_id: str, total: tuple[str, int] | None = None,
          **amounts: int) -> dict[str, int]:
    """Add a piece's amounts to the job's counters, once per piece (and set the counter
    `total` names, if not set yet); the totals."""
    run = script(conn, _COUNT)
    args: list[str | int] = [task_id, *(total or ("", 0))]
    for name, amount in amounts.items():
        args += [name, amount]
    flat = run(keys=[keys.job_counted(job_id), keys.job_counts(job_id)], args=args)
    return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def counts(conn: redis.Redis, job_id: str) -> dict[str, int]:
    """The job's workflow counters (see count)."""
    return {_text(k): int(v) for k, v in conn.hgetall(keys.job_counts(job_id)).items()}


# ---------------------------------------------------------------- timers and twins


def set_timer(conn: redis.Redis, job_id: str, due: float) -> None:
    """Ask for the job's workflow to be called back (on_timer) at `due`, or earlier."""
    conn.zadd(keys.timers(), {job_id: due}, lt=True)
    conn.zadd(keys.timers(), {job_id: due}, nx=True)


def due_timers(conn: redis.Redis, now: float) -> list[str]:
    """Jobs whose timer is due, each handed to exactly one caller (ZREM decides)."""
    due = _texts(conn.zrangebyscore(keys.timers(), 0, now))
    return [j for j in due if conn.zrem(keys.timers(), j)]


def twin_of_task(conn: redis.Redis, task_id: str) -> str:
    """The id of the task's twin, if one was started ('' if none)."""
    return _text(conn.hget(keys.task(task_id), "twin"))


def add_twin(conn: redis.Redis, job_id: str, twin: Task) -> bool:
    """Start `twin` (its twin_of a running task of the job) as a piece of that job; False
    if the original is no longer running or already has a twin."""
    original = keys.task(twin.twin_of)

    def txn(pipe: Pipeline) -> bool:
        state, has = map(_text, pipe.hmget(original, "status", "twin"))
        if state != TaskStatus.RUNNING or has:
            return False
        states = _statuses(conn, [twin.id])
        pipe.multi()
        pipe.hset(original, "twin", twin.id)
        _add(pipe, conn, job_id, [twin], states, lambda _tid: False, time.time())
        pipe.hincrby(keys.job(job_id), "total", 1)
        return True

    return conn.transaction(txn, original, keys.job(job_id), value_from_callable=True)


def complete_twin(conn: redis.Redis, task_id: str, why: str) -> bool:
    """Record a task as succeeded because its twin did (its outputs are published
    already); the attempt still running, if any, sees it is no longer its own and stops.
    False if it had ended."""
    key = keys.task(task_id)

    def txn(pipe: Pipeline) -> bool:
        read = conn.pipeline(transaction=False)
        read.hgetall(key)
        read.smembers(keys.task_jobs(task_id))
        read.smembers(keys.task_dependents(task_id))
        raw, job_set, dependent_set = read.execute()
        if not raw:
            return False
        task: Task = from_hash(Task, raw)
        if task.status not in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            return False
        jobs, dep_state = _read_around(pipe, conn, _texts(job_set), _texts(dependent_set))
        task.exit_code = 0
        _record_success(pipe, conn, task, jobs, dep_state, time.time(),
                        note=f"{task.name}: success ({why})")
        return True

    return conn.transaction(txn, key, keys.task_jobs(task_id), value_from_callable=True)


def iter_final(conn: redis.Redis, job_ids: Iterable[str]) -> Iterator[str]:
    """The given jobs that have ended."""
    for jid in job_ids:
        status = _text(conn.hget(keys.job(jid), "status"))
        if status and JobStatus(status).final:
            yield jid


def mark_untrusted(conn: redis.Redis, task_id: str, worker: str) -> None:
    pipe = conn.pipeline(transaction=True)
    pipe.hset(keys.task(task_id), "untrusted", worker)
    pipe.sadd(keys.untrusted_tasks(), task_id)
    pipe.execute()


def untrusted(conn: redis.Redis, task_ids: list[str]) -> list[str]:
    """The finished tasks among these whose outputs came from an untrusted worker (one
    command when there are none, the usual case)."""
    if not task_ids or not conn.scard(keys.untrusted_tasks()):
        return []
    flags = conn.smismember(keys.untrusted_tasks(), task_ids)
    marked = [tid for tid, flag in zip(task_ids, flags, strict=True) if flag]
    if not marked:
        return []
    pipe = conn.pipeline(transaction=False)
    for tid in marked:  # the set may name a task run again since: its hash says
        pipe.hmget(keys.task(tid), "status", "untrusted")
    return [tid for tid, (status, who) in zip(marked, pipe.execute(), strict=True)
            if who and _text(status) == TaskStatus.SUCCESS]


def forget(conn: redis.Redis, task_ids: list[str],
           remove_outputs: Callable[[str], object]) -> int:
    """For --force: drop finished tasks (state and outputs) so they are computed again.

    Tasks still queued or running are left alone: they are computing right now.
    """
    forgotten = 0
    for tid in task_ids:
        status = _text(conn.hget(keys.task(tid), "status"))
        if status in ACTIVE:
            continue
        conn.delete(keys.task(tid))
        conn.srem(keys.untrusted_tasks(), tid)
        remove_outputs(tid)
        forgotten += 1
    return forgotten
