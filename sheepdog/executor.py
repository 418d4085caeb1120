"""`sheepdog.Executor`: a `concurrent.futures.Executor` whose calls are sheepdog pieces.

    with Executor(setup="mypkg.model:load") as ex:
        for fut in as_completed([ex.submit(score, x) for x in xs]):
            print(fut.result())

An Executor is one open job whose pieces workers run through sheepdog.calls like any
other piece — with heartbeats, re-runs of a lost worker's pieces, live logs and the web
page. Tiny calls are packed into pieces as joblib's batch_size="auto" does: the first
pieces carry one call each, later ones as many as fill about a tenth of a second at the
measured call time, and only a few pieces per worker thread are sent ahead, so a piece
never holds calls another worker could be running. map(chunksize=n) makes pieces of
exactly n calls; batch_size=n packs every piece to n. Functions
travel by import path, arguments and results by pickle: whoever can write the queue can
run code as the workers, exactly as with RQ. With no worker serving its queue, the
Executor starts worker processes of its own and stops them at shutdown.
"""

from __future__ import annotations

import atexit
import base64
import collections
import itertools
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from concurrent.futures._base import PENDING
from dataclasses import dataclass
from typing import Any

import redis

from . import jobs, keys, liveness, logs, store
from .cache import Cache
from .calls import RESULT, encode, function_path
from .config import Settings, load
from .connection import connect, ride_out
from .defaults import (
    EXECUTOR_AHEAD,
    EXECUTOR_DEATH_CHECK,
    EXECUTOR_FLUSH,
    EXECUTOR_MAX_PACK,
    EXECUTOR_MIN_PIECE_SECONDS,
    EXECUTOR_PIECE_SECONDS,
    EXECUTOR_STOP_WAIT,
    EXECUTOR_THREADS,
    EXECUTOR_WORKERS_CHECK,
)
from .errors import SheepdogError
from .maintenance import reap_lost
from .models import ArgvItem, Job, JobStatus, Task, TaskStatus
from .pool import Pool, unserved
from .registration import live_workers

INLINE_PAYLOAD = 16 * 1024  # bytes of pickled calls carried in the argv; more are staged
Call = tuple[str, tuple[Any, ...], dict[str, Any]]


@dataclass
class Unit:
    """Calls waiting to be sent: one submit, or a map chunk that stays one piece (fixed)."""

    calls: list[Call]
    futures: list[Future]
    name: str
    fixed: bool = False


class TaskFailed(SheepdogError):
    """The piece that carried a call failed (its worker was lost too often, it was
    cancelled...): the call's future gets this."""


class Future(futures.Future):
    """A call's future; cancel() takes a call that has not started out of the queue."""

    def __init__(self, executor: Executor) -> None:
        super().__init__()
        self._executor = executor
        self.task_id = ""

    def cancel(self) -> bool:
        with self._condition:
            if self._state != PENDING:
                return super().cancel()
        if not self._executor._withdraw(self):
            return False
        cancelled = super().cancel()
        # as a pool does when it dequeues a cancelled call: wait() counts it done now
        self.set_running_or_notify_cancel()
        return cancelled


def _warn(said: str) -> None:
    print(f"sheepdog.Executor: {said}", file=sys.stderr, flush=True)


def _checked(batch_size: int | str, setup: str | Callable[[], Any] | None) -> str | None:
    """The Executor's arguments checked; `setup` as MODULE:FUNCTION."""
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError("batch_size must be 'auto' or a whole number >= 1")
    if setup is not None and not isinstance(setup, str):
        return function_path(setup)
    return setup


class Executor(futures.Executor):
    """Runs calls on sheepdog workers (see the module docstring)."""

    def __init__(self, max_workers: int | None = None, *,
                 setup: str | Callable[[], Any] | None = None,
                 queue: str | None = None, backend: str = "local", host: str | None = None,
                 settings: Settings | None = None, start_workers: bool | None = None,
                 batch_size: int | str = "auto") -> None:
        """`max_workers`: worker processes to start when none serves the queue (default:
        the number of cores); `start_workers` False never starts any, True always does;
        `batch_size`: calls per piece, "auto" to size pieces from measured call times;
        `setup`: MODULE:FUNCTION (or the function) run once per worker process, whose
        value reaches every call as `context=`."""
        setup = _checked(batch_size, setup)
        self._settings = settings or load()
        # rides out an outage of Redis: the futures resolve when it is back
        self._conn: redis.Redis = ride_out(connect(self._settings), _warn)
        self._cache = Cache(self._settings.cache_dir)
        self._queue = queue or self._settings.queue
        self._backend, self._host, self._setup = backend, host or "", setup
        jobs.check_backend(backend, host)
        self.job = Job(id=jobs.new_job_id(), workflow="python", queue=self._queue,
                       backend=backend, host=self._host,
                       params={"setup": setup or "", "calls": 0})
        store.submit(self._conn, self.job, [], open_=True, holder=liveness.this_process())
        self._batch = batch_size
        self._call_seconds: float | None = None  # measured, for batch_size="auto"
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._units: collections.deque[Unit] = collections.deque()
        self._pending: dict[str, list[Future]] = {}
        self._unsent: list[tuple[Task, list[Future]]] = []  # pending, not known sent
        self._slots, self._slots_seen, self._processes = 1, 0.0, 1
        self._all: list[Future] = []
        self._shutdown = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = Pool(self._settings, {
            "SHEEPDOG_HOME": str(self._settings.home),
            "SHEEPDOG_HEARTBEAT_TIMEOUT": str(self._settings.heartbeat_timeout),
            "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)})
        self._mourned: set[int] = set()  # pids of its workers known dead
        self._replacements = 0  # workers that may still be started in a dead one's place
        if unserved(self._conn, self._queue) if start_workers is None else start_workers:
            self._replacements = max_workers or os.cpu_count() or 1
            self._start_workers(self._replacements)
        self._threads = [threading.Thread(target=self._flusher, name="executor-flush",
                                          daemon=True),
                         threading.Thread(target=self._collector, name="executor-collect",
                                          daemon=True)]
        for t in self._threads:
            t.start()
        # like the standard executors at interpreter exit: what was never started is
        # cancelled, the job closed, the workers it started stopped
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        with self._lock:
            if self._shutdown:
                return
        try:
            self.shutdown(wait=True, cancel_futures=True)
        except (redis.RedisError, SheepdogError):
            self._stop.set()  # Redis is gone: the job stays open; stop what we started
            self._stop_workers()

    # -- submitting
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._submit_calls([(function_path(fn), args, kwargs)], fn)[0]

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Results in input order; `chunksize` calls share one piece."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        path = function_path(fn)
        calls: list[Call] = [(path, args, {}) for args in zip(*iterables, strict=False)]
        fs = []
        for start in range(0, len(calls), chunksize):
            fs += self._submit_calls(calls[start:start + chunksize], fn, fixed=chunksize > 1)
        return _in_order(fs, timeout)

    def _submit_calls(self, calls: list[Call], fn: Callable[..., Any],
                      fixed: bool = False) -> list[Future]:
        fs = [Future(self) for _ in calls]
        unit = Unit(calls, fs, getattr(fn, "__qualname__", "call"), fixed)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._units.append(unit)
            self._all.extend(fs)
        self._wake.set()
        return fs

    def _pack_size(self, waiting_calls: int) -> int:
        """Calls per piece: the set size, or (auto) enough to fill EXECUTOR_PIECE_SECONDS
        at the measured call time — but never so many that workers would sit idle."""
        if self._batch != "auto":
            return int(self._batch)
        if self._call_seconds is None:
            return 1  # nothing measured yet
        per_call = max(self._call_seconds, 1e-6)
        size = int(EXECUTOR_PIECE_SECONDS / per_call)
        # each worker process gets a share (its threads share one interpreter: a Python
        # call holds it; calls that wait let them overlap, and `size` keeps those short)
        spread = -(-waiting_calls // self._processes)
        # but not below the calls that outlast a piece's own cost: more worker threads
        # would only mean more pieces, each dearer than its calls
        spread = max(spread, int(EXECUTOR_MIN_PIECE_SECONDS / per_call))
        return max(1, min(EXECUTOR_MAX_PACK, size, spread))

    def _refresh_slots(self) -> None:
        """Worker threads serving the queue (the pieces worth sending ahead scale with it)."""
        if time.monotonic() - self._slots_seen < EXECUTOR_WORKERS_CHECK:
            return
        self._slots_seen = time.monotonic()
        workers = live_workers(self._conn, self._queue)
        threads = sum(int(str(w.get("concurrency", 1))) for w in workers)
        self._slots = max(1, threads, len(self._pool.processes) * EXECUTOR_THREADS)
        self._processes = max(1, len(workers), len(self._pool.processes))

    def _short(self, units: collections.deque[Unit]) -> bool:
        """Would the waiting calls make a piece smaller than the packing wants? (Sent
        ahead anyway, such pieces would only be more pieces, each dearer than its calls,
        while the caller is still submitting.)"""
        if units[0].fixed or self._batch != "auto" or self._call_seconds is None:
            return False
        waiting = sum(len(u.calls) for u in itertools.islice(units, EXECUTOR_MAX_PACK))
        return waiting < self._pack_size(len(units))

    def _take_pieces(self) -> list[tuple[Task, list[Future]]]:
        """Units packed into pieces, as many as may go ahead of the workers now."""
        pieces = []
        with self._lock:
            # until a call was timed, one piece of one call per worker thread: more
            # slots must not mean more unpacked pieces
            ahead = EXECUTOR_AHEAD if self._call_seconds is not None else 1
            room = ahead * self._slots - len(self._pending)
            while self._units and room > 0:
                if self._short(self._units) and len(self._pending) >= self._processes:
                    # every worker process has a piece (its threads share one
                    # interpreter): wait for calls to fill one
                    break
                unit = self._units.popleft()
                calls, fs, name = list(unit.calls), list(unit.futures), unit.name
                if not unit.fixed:
                    size = self._pack_size(len(self._units) + 1)
                    while (len(calls) < size and self._units and not self._units[0].fixed):
                        more = self._units.popleft()
                        calls += more.calls
                        fs += more.futures
                seq = next(self._seq)
                label = f"{name} #{seq}" + (f" ({len(calls)} calls)" if len(calls) > 1 else "")
                task = self._task(label[:120], encode(calls), seq)
                for f in fs:
                    f.task_id = task.id
                self._pending[task.id] = fs
                pieces.append((task, fs))
                room -= 1
        return pieces

    def _task(self, name: str, payload: bytes, seq: int) -> Task:
        argv: list[ArgvItem] = [{"python": True}, "-m", "sheepdog.calls", "call"]
        inputs = {}
        if len(payload) <= INLINE_PAYLOAD:
            argv.append("b64:" + base64.b64encode(payload).decode())
        else:
            inputs["calls"] = self._cache.put_bytes(payload)
            argv.append({"input": "calls"})
        if self._setup:
            argv += ["--setup", self._setup]
        # the job id and a sequence number: every piece is its own, never cached
        argv += ["--", f"{self.job.id}/{seq}"]
        return Task(name=name, argv=argv, inputs=inputs, outputs=[RESULT],
                    max_attempts=self._settings.max_attempts, backend=self._backend,
                    host=self._host, queue=self._queue, environment="python calls")

    def _flush(self) -> None:
        if self._unsent:
            self._resend()
        self._refresh_slots()
        pieces = self._take_pieces()
        if pieces:
            self._send(pieces)

    def _send(self, pieces: list[tuple[Task, list[Future]]]) -> None:
        try:
            store.add_tasks(self._conn, self.job.id, [t for t, _ in pieces])
        except SheepdogError as e:
            for task, fs in pieces:
                self._take(task.id)
                self._settle(fs, error=TaskFailed(str(e)))
        except redis.RedisError:
            # the connection went with or without the pieces (a script call is not
            # retried through an outage): asked again once Redis is back (_resend)
            self._unsent = pieces
            raise

    def _resend(self) -> None:
        """Pieces whose sending met an outage: sent again unless they got in. New pieces
        go in by one script call, so one of them there means all of them are."""
        pieces = self._unsent
        there = store.get_task(self._conn, pieces[0][0].id) is not None
        self._unsent = []
        if not there:
            self._send(pieces)

    def _flusher(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(EXECUTOR_WORKERS_CHECK)
            self._wake.clear()
            if self._stop.wait(EXECUTOR_FLUSH):  # a burst of submits goes in one batch
                return
            try:
                self._flush()
            except redis.RedisError:
                self._stop.wait(0.5)  # Redis is restarting: the calls wait here meanwhile

    def _withdraw(self, future: Future) -> bool:
        """Take a future's call out before it starts (only a call alone in its piece)."""
        with self._lock:
            for unit in self._units:
                if unit.futures == [future]:
                    self._units.remove(unit)
                    return True
            if self._pending.get(future.task_id) != [future]:
                return False
        if store.drop_task(self._conn, self.job.id, future.task_id):
            with self._lock:
                self._pending.pop(future.task_id, None)
            return True
        return False

    # -- collecting
    def _collector(self) -> None:
        cursors = {self.job.id: "0-0"}
        looked = time.monotonic()
        touched: set[str] = set()  # pieces whose lines came and whose state is unread
        ended = False
        while True:
            with self._lock:
                if self._shutdown and not self._pending and not self._units:
                    return
            if time.monotonic() - looked > EXECUTOR_DEATH_CHECK:
                looked = time.monotonic()
                self._check_workers()
            try:
                lines = logs.tail(self._conn, cursors, block_ms=200)
            except redis.RedisError:
                self._stop.wait(0.5)  # Redis is restarting: the pieces go on meanwhile
                continue
            touched |= {line.task for _, line in lines if line.task}
            ended = ended or any(line.end for _, line in lines)
            try:
                if touched:
                    self._check(touched)
                touched = set()
                if ended:
                    self._job_ended()
                    ended = False
            except redis.RedisError:  # their lines are read: looked at again when it is back
                self._stop.wait(0.5)

    def _check_workers(self) -> None:
        """A worker this Executor started that died: its pieces go back to the queue at
        once (it ran here, so it is known dead: no heartbeat to wait out) and, while
        others of them live, another takes its place (as many times in all as workers
        were started). Calls waiting while they have all died, and no other worker serves
        the queue: a clear error, never a hang."""
        processes = self._pool.processes
        if not processes:
            return
        dead = [p for p in processes if p.poll() is not None and p.pid not in self._mourned]
        alive = any(p.poll() is None for p in processes)
        if dead:
            self._mourned.update(p.pid for p in dead)
            self._replace(len(dead) if alive and not self._shutdown else 0)
        if alive:
            return
        with self._lock:
            waiting = bool(self._pending)
        if not waiting or not unserved(self._conn, self._queue):
            return
        codes = sorted({p.returncode for p in self._pool.processes})
        store.stop_job(self._conn, self.job.id, JobStatus.ERROR,
                       f"no workers left: the {len(self._pool.processes)} worker processes this "
                       f"Executor started exited (codes {codes})")

    def _replace(self, count: int) -> None:
        """Workers died: their pieces back to the queue now, `count` started anew."""
        try:
            reap_lost(self._conn, self._settings)
        except redis.RedisError:
            pass  # the other workers' upkeep reaps when Redis is back
        count = min(count, self._replacements)
        if count:
            self._replacements -= count
            self._start_workers(count)

    def _check(self, task_ids: set[str]) -> None:
        with self._lock:
            ids = [t for t in task_ids if t in self._pending]
        if not ids:
            return
        pipe = self._conn.pipeline(transaction=False)
        for tid in ids:
            pipe.hmget(keys.task(tid), "status", "error")
        for tid, (status, error) in zip(ids, pipe.execute(), strict=True):
            state = status.decode() if status else ""
            if state == TaskStatus.RUNNING:
                self._started(tid)
            elif state == TaskStatus.SUCCESS:
                self._deliver(tid)
            elif state in (TaskStatus.ERROR, TaskStatus.CANCELLED):
                self._failed(tid, state, error.decode() if error else state)

    def _started(self, task_id: str) -> None:
        for f in self._pending.get(task_id, []):
            if not f.running() and not f.done():
                f.set_running_or_notify_cancel()

    def _failed(self, task_id: str, state: str, why: str) -> None:
        if state == TaskStatus.CANCELLED:  # with its job: say why the job ended
            why = store.get_job(self._conn, self.job.id).error or why
        self._settle(self._take(task_id), error=TaskFailed(f"the piece failed: {why}"))

    def _take(self, task_id: str) -> list[Future]:
        with self._lock:
            fs = self._pending.pop(task_id, [])
        self._wake.set()
        return fs

    def _deliver(self, task_id: str) -> None:
        fs = self._take(task_id)
        try:
            results = pickle.loads((self._cache.task_dir(task_id) / RESULT).read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            self._settle(fs, error=TaskFailed(f"cannot read the result: {e}"))
            return
        seconds = [outcome[-1] for outcome in results]
        if seconds:
            mean = sum(seconds) / len(seconds)
            self._call_seconds = (mean if self._call_seconds is None
                                  else (self._call_seconds + mean) / 2)
        self._wake.set()  # room for another piece
        for f, outcome in zip(fs, results, strict=True):
            if outcome[0] == "ok":
                self._settle([f], value=outcome[1])
            else:
                error: BaseException = outcome[1]
                error.add_note("traceback on the worker:\n" + outcome[2].rstrip())
                self._settle([f], error=error)

    @staticmethod
    def _settle(fs: list[Future], value: Any = None, error: BaseException | None = None) -> None:
        for f in fs:
            if f.done():
                continue
            if error is not None:
                f.set_exception(error)
            else:
                f.set_result(value)

    def _job_ended(self) -> None:
        job = store.get_job(self._conn, self.job.id)
        with self._lock:
            left = list(self._pending)
        self._check(set(left))  # pieces that ended with the job
        with self._lock:
            rest = [f for tid in list(self._pending) for f in self._pending.pop(tid)]
            if job.status != JobStatus.SUCCESS:
                rest += [f for unit in self._units for f in unit.futures]
                self._units.clear()
                self._shutdown = True
        self._settle(rest, error=TaskFailed(f"job {job.id} ended ({job.status}): "
                                            f"{job.error or 'no reason given'}"))

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes this Executor started (none if others serve its queue)."""
        return [p.pid for p in self._pool.processes if p.poll() is None]

    # -- workers and shutdown
    def _start_workers(self, count: int) -> None:
        # the same store (results land in its cache) and the caller's import path
        self._pool.start(count, self._queue, concurrency=EXECUTOR_THREADS, quiet="stdout",
                         parent_job=self.job.id)

    def _stop_workers(self) -> None:
        self._pool.stop(EXECUTOR_STOP_WAIT)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            already = self._shutdown
            self._shutdown = True
        if not already and cancel_futures:
            for f in list(self._all):
                f.cancel()
        self._wake.set()
        if wait:
            self._close_when_sent()
        else:
            threading.Thread(target=self._close_when_sent, daemon=True).start()

    def _close_when_sent(self) -> None:
        """Close the job once every call went out (pieces are sent a few at a time), then
        wait for the answers and stop what this Executor started."""
        while True:
            with self._lock:
                if not self._units:
                    break
            self._wake.set()
            self._stop.wait(EXECUTOR_FLUSH * 10)
        if not self._all:  # nothing was ever sent: no job to list
            store.drop_empty_job(self._conn, self.job.id)
        else:
            store.close_job(self._conn, self.job.id)
        futures.wait(self._all)
        raised = [f for f in self._all if not f.cancelled() and f.exception() is not None]
        if raised:  # the pieces ran; calls that raised make the job an error all the same
            first = raised[0].exception()
            store.calls_failed(self._conn, self.job.id, len(raised), len(self._all),
                               f"{type(first).__name__}: {first}")
        self._finish()

    def _finish(self) -> None:
        atexit.unregister(self._at_exit)
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        self._stop_workers()


def _in_order(fs: list[Future], timeout: float | None) -> Iterator[Any]:
    """Results in submission order, as Executor.map promises (first exception raised)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for f in fs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            yield f.result(left)
    finally:
        for f in fs:
            f.cancel()
