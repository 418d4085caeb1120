"""Workers: take task attempts off RQ queues, run them on a backend, keep them alive.

Each running task has a heartbeat key with a TTL that its worker refreshes; every
worker (and every waiting `sheepdog run`) also reaps: a running task whose heartbeat
expired was lost with its worker and is run again, or failed when out of attempts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import redis

from . import dispatch, keys, logs, store
from .backends import registry
from .backends.base import Backend, StatusUpdate, Submission
from .cache import Cache
from .config import Settings
from .defaults import (
    CANCEL_CHECK,
    MAINTAIN_FAST,
    REDIS_RETRY,
    SCRATCH_SWEEP_EVERY,
    TAKE_WAIT,
    TAKE_WAIT_INLINE,
    WATCH_POLL,
)
from .errors import SheepdogError
from .finalize import finalize
from .models import Task, TaskStatus

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    exit_code: int | None
    error: str = ""
    lost: bool = False


RELEASED = "released"


class PieceOutput:
    """Where a running piece's output goes: its jobs' logs, the stderr tail quoted in
    its error, and for a capturing piece the exact bytes (see process.OutputSink)."""

    def __init__(self, writer: logs.LogWriter, raw: logs.RawWriter | None) -> None:
        self.writer = writer
        self.raw_writer = raw
        self.tail: deque[str] = deque(maxlen=6)
        if raw is not None:
            raw.reset()

    def __call__(self, stream: str, lines: list[str]) -> None:
        if stream == "stderr":
            self.tail.extend(lines)
        self.writer.write(stream, lines)

    def raw(self, stream: str, chunk: bytes) -> None:
        if self.raw_writer is not None:
            self.raw_writer.append(stream, chunk)

    def flush(self) -> None:
        self.writer.flush()
        if self.raw_writer is not None:
            self.raw_writer.flush()


class Heartbeat:
    """Keeps a running task's heartbeat alive from its own thread, so a long blocking
    backend call (staging inputs, fetching outputs) cannot make the task look lost.
    `revoked` is set when the task was cancelled or taken from this worker."""

    def __init__(self, conn: redis.Redis, task_id: str, worker: str, settings: Settings) -> None:
        self.revoked = threading.Event()
        self._stop = threading.Event()
        self._args = (conn, task_id, worker, settings)
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{task_id[:8]}",
                                        daemon=True)

    def _beat(self) -> None:
        conn, task_id, worker, settings = self._args
        # a cancel reaches the running process within CANCEL_CHECK
        while not self._stop.wait(min(settings.heartbeat_interval, CANCEL_CHECK)):
            try:
                if not store.heartbeat(conn, task_id, worker, settings.heartbeat_timeout):
                    self.revoked.set()
                    return
            except redis.RedisError:
                continue  # Redis is restarting: try again next beat

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class Executor:
    """Runs one claimed task to its end, streaming its output into the jobs' logs."""

    def __init__(self, conn: redis.Redis, settings: Settings, worker: str,
                 leaving: threading.Event | None = None) -> None:
        self.leaving = leaving or threading.Event()
        self.conn = conn
        self.settings = settings
        self.worker = worker
        self.cache = Cache(settings.cache_dir)
        self.hostname = socket.gethostname()

    def execute(self, task_id: str) -> str | None:
        """Claim and run one task attempt; returns its recorded status, None if not ours."""
        ttl = self.settings.heartbeat_timeout
        task = store.claim(self.conn, task_id, self.worker, ttl, where=self.hostname)
        if task is None:
            return None
        jobs = store.job_ids_of_task(self.conn, task_id)
        writer = logs.LogWriter(self.conn, task.id, task.name, jobs, self.settings.log_max_lines,
                                buffer_lines=self.settings.log_buffer_lines)
        output = PieceOutput(writer, logs.RawWriter(self.conn, task.id) if task.capture else None)
        with Heartbeat(self.conn, task.id, self.worker, self.settings) as beat:
            outcome = self._run(task, output, beat)
        output.flush()
        if writer.lost and outcome.error != RELEASED:
            # the run may be fine, but its log is not whole: a cacheable piece runs again,
            # a command (side effects) fails saying so
            outcome = Outcome(outcome.exit_code, writer.lost, lost=task.cacheable)
        if outcome.error == RELEASED and not task.cacheable and task.max_attempts <= 1:
            # run at most once (GN3's commands): stopped midway is an error, not a retry
            outcome = Outcome(None, f"worker {self.worker} stopped while it ran; not run "
                                    "again (it runs at most once)")
        if outcome.error == RELEASED and store.release(self.conn, task.id, self.worker):
            logs.note(self.conn, jobs[0], f"{task.name}: handed back to the queue "
                      f"(worker {self.worker} is leaving)", task=task.id) if jobs else None
            return TaskStatus.QUEUED
        if outcome.exit_code not in (0, None) and not outcome.error:
            outcome.error = f"exit code {outcome.exit_code}"
        if outcome.error and output.tail and outcome.exit_code not in (None, 0):
            outcome.error += ": " + " | ".join(output.tail)
        status = store.finish(self.conn, task.id, self.worker, outcome.exit_code, outcome.error,
                              retryable=outcome.lost)
        if status == TaskStatus.SUCCESS:
            for jid in jobs:
                finalize(self.conn, self.settings, jid)
        return status

    def _run(self, task: Task, output: PieceOutput, beat: Heartbeat) -> Outcome:
        try:
            backend = registry.open_backend(task, self.settings, self.cache)
        except SheepdogError as e:
            return Outcome(None, str(e))
        try:
            sub = backend.submit(task, output)
            return self._watch(backend, sub, task, output, beat)
        except SheepdogError as e:
            return Outcome(None, str(e))
        except Exception as e:  # a backend's bug fails the piece, loudly, not the worker
            log.exception("task %s failed inside sheepdog", task.id)
            return Outcome(None, f"internal error in the {task.backend} backend: "
                                 f"{type(e).__name__}: {e}")
        finally:
            backend.close()

    def _watch(self, backend: Backend, sub: Submission, task: Task,
               output: PieceOutput, beat: Heartbeat) -> Outcome:
        """Watch a started piece to its end; whatever goes wrong while watching (a
        backend error, a bug) stops the submission, so nothing runs on unwatched."""
        try:
            return self._watch_loop(backend, sub, task, output, beat)
        except BaseException:
            try:
                backend.cancel([sub])
            except Exception as e:  # noqa: BLE001  the original failure is the one to report
                log.warning("task %s: could not cancel after a failure: %s", task.id, e)
            raise

    def _watch_loop(self, backend: Backend, sub: Submission, task: Task,
                    output: PieceOutput, beat: Heartbeat) -> Outcome:
        deadline = time.monotonic() + task.timeout if task.timeout > 0 else None
        while True:
            ended: list[StatusUpdate] = list(backend.poll([sub]))
            if ended:
                return Outcome(ended[0].exit_code, ended[0].error, ended[0].lost)
            stop = self._stop_reason(task, beat, deadline)
            if stop:
                backend.cancel([sub])
                return Outcome(None, stop)
            output.flush()  # quiet output still reaches readers within a fraction of a second
            wait = WATCH_POLL if deadline is None else min(
                WATCH_POLL, max(0.001, deadline - time.monotonic()))
            backend.wait([sub], wait)

    def _stop_reason(self, task: Task, beat: Heartbeat, deadline: float | None) -> str:
        """Why a running piece must stop now ('' if it may go on)."""
        if beat.revoked.is_set():
            return "cancelled"
        if deadline is not None and time.monotonic() > deadline:
            return f"timed out after {task.timeout:g}s"
        if self.leaving.is_set():
            return RELEASED
        return ""


def reap(conn: redis.Redis, settings: Settings) -> list[str]:
    """Recover tasks lost with their workers; returns what was done, for logging.

    One pipelined look at every active task; transactions only for the suspicious ones.
    """
    ids = store.active_task_ids(conn)
    if not ids:
        return []
    pipe = conn.pipeline(transaction=False)
    for tid in ids:
        pipe.hmget(keys.task(tid), "status", "queued_at")
        pipe.exists(keys.task_heartbeat(tid))
    replies = pipe.execute()
    now = time.time()
    said = []
    for i, tid in enumerate(ids):
        (status, queued_at), beating = replies[2 * i], replies[2 * i + 1]
        status = status.decode() if status else ""
        if status == TaskStatus.RUNNING and not beating:
            line = store.recover_lost(conn, tid)
            if line:
                for jid in store.job_ids_of_task(conn, tid):
                    logs.note(conn, jid, line, task=tid)
                said.append(line)
        elif (status == TaskStatus.QUEUED
              and now - float(queued_at or now) > settings.heartbeat_timeout
              and store.redispatch_stranded(conn, tid, older_than=settings.heartbeat_timeout)):
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


def live_workers(conn: redis.Redis, queue: str | None = None) -> list[dict[str, object]]:
    """Workers whose registration has not expired, optionally only those serving queue."""
    names = [n.decode() for n in conn.smembers(keys.workers())]
    if not names:
        return []
    found = []
    for name, raw in zip(names, conn.mget([keys.worker(n) for n in names]), strict=True):
        if raw is None:
            conn.srem(keys.workers(), name)
            continue
        info = json.loads(raw)
        if queue is None or queue in info.get("queues", []):
            found.append(info)
    return found


class Worker:
    """A pool of task threads on one or more queues, plus heartbeats and reaping."""

    def __init__(self, conn: redis.Redis, settings: Settings, queues: list[str],
                 concurrency: int = 1, name: str | None = None, burst: bool = False,
                 until: Callable[[], bool] | None = None, gn3_queues: list[str] | None = None,
                 register: bool = True) -> None:
        self.conn = conn
        self.settings = settings
        self.queue_names = queues
        self.concurrency = max(1, concurrency)
        self.name = name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.burst = burst
        self.until = until
        self.gn3_queues = list(gn3_queues or [])
        self.gn3_one_shot = False  # `python -m sheepdog.worker` without --daemon
        self.register = register
        self.stopping = threading.Event()
        self.leaving = threading.Event()  # set: running tasks go back to the queue
        self._busy = 0
        self._lock = threading.Lock()

    # -- lifecycle
    def run(self) -> None:
        """Work until stopped, until `until()` is true, or (burst) until idle."""
        if self.until is not None and self.until():
            return  # nothing to wait for: take no piece at all
        threads = [threading.Thread(target=self._task_loop, name=f"task-{i}", daemon=True)
                   for i in range(self.concurrency)]
        if self.gn3_queues:
            from .gn3 import Gn3Server

            gn3 = Gn3Server(self.conn, self.settings, self.gn3_queues, self.name,
                            one_shot=self.gn3_one_shot)
            threads.append(threading.Thread(target=gn3.loop, args=(self.stopping,),
                                            name="gn3", daemon=True))
        for t in threads:
            t.start()
        try:
            self._maintain(threads)
        finally:
            self.stopping.set()
            for t in threads:
                t.join()
            if self.register:
                self.conn.delete(keys.worker(self.name))
                self.conn.srem(keys.workers(), self.name)

    def stop(self) -> None:
        self.stopping.set()

    def _maintain(self, threads: list[threading.Thread]) -> None:
        interval = self.settings.heartbeat_interval
        next_round = next_sweep = 0.0
        outage = False
        while not self.stopping.is_set():
            try:
                if time.monotonic() >= next_round:
                    next_round = time.monotonic() + interval
                    self._upkeep()
                if self.register and time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SCRATCH_SWEEP_EVERY
                    sweep_scratch(self.conn, self.settings)
                finished = self._finished()
            except redis.RedisError as e:
                if not outage:  # once per outage, not once a second
                    log.warning("worker %s: Redis is unreachable (%s); waiting for it",
                                self.name, e)
                outage = True
                next_round = 0.0
                self.stopping.wait(REDIS_RETRY)
                continue
            if outage:
                log.warning("worker %s: Redis is reachable again", self.name)
                outage = False
            if finished:
                if self.until is not None:
                    self.leaving.set()  # its job is done: don't hold others' tasks hostage
                return
            self.stopping.wait(min(interval, MAINTAIN_FAST) if self.until or self.burst
                               else interval)

    def _upkeep(self) -> None:
        if self.register:
            self._announce()
        reap(self.conn, self.settings)

    def _finished(self) -> bool:
        if self.until is not None and self.until():
            return True
        if self.burst:
            with self._lock:
                idle = self._busy == 0
            return idle and all(dispatch.waiting(self.conn, q) == 0 for q in self.queue_names)
        return False

    def _announce(self) -> None:
        info = {"name": self.name, "queues": self.queue_names, "host": socket.gethostname(),
                "pid": os.getpid(), "concurrency": self.concurrency, "seen": time.time()}
        ttl = max(1, int(self.settings.heartbeat_timeout))
        pipe = self.conn.pipeline()
        pipe.set(keys.worker(self.name), json.dumps(info), ex=ttl)
        pipe.sadd(keys.workers(), self.name)
        pipe.execute()

    # -- one task thread
    def _task_loop(self) -> None:
        executor = Executor(self.conn, self.settings, self.name, self.leaving)
        # a worker that leaves with its job must notice quickly (Redis takes floats)
        wait = TAKE_WAIT_INLINE if self.until is not None else TAKE_WAIT
        while not self.stopping.is_set():
            try:
                entry = dispatch.take(self.conn, self.queue_names, wait)
            except Exception as e:  # Redis restarting, a mangled entry: keep this thread
                log.warning("worker %s: cannot take work: %s", self.name, e)
                self.stopping.wait(TAKE_WAIT)
                continue
            if entry is None:
                continue
            with self._lock:
                self._busy += 1
            try:
                executor.execute(entry.task_id)
            except Exception:  # keep serving; the heartbeat reaper recovers the task
                log.exception("worker %s: task thread error", self.name)
            finally:
                with self._lock:
                    self._busy -= 1
                self._drop(entry)

    def _drop(self, entry: dispatch.Entry) -> None:
        """Forget the queue entry this thread took (idempotent)."""
        try:
            dispatch.acknowledge(self.conn, entry)
        except redis.RedisError as e:
            log.warning("worker %s: could not remove queue entry %s: %s", self.name,
                        entry.rq_id, e)


def run_task(task_id: str) -> str | None:
    """RQ job function: lets a plain `rq worker` run sheepdog tasks too."""
    from . import config
    from .connection import connect

    settings = config.load()
    conn = connect(settings)
    name = f"rq.{socket.gethostname()}.{os.getpid()}"
    return Executor(conn, settings, name).execute(task_id)


if __name__ == "__main__":  # GN3 starts its queue worker as `python -m sheepdog.worker`
    import sys

    from sheepdog.gn3 import worker_main

    sys.exit(worker_main())
