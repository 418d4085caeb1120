"""Workers: take task attempts off RQ queues, run them on a backend, keep them alive.

Each running task has a heartbeat key with a TTL that its worker refreshes; every
worker (and every waiting `sheepdog run`) also reaps: a running task whose heartbeat
expired was lost with its worker and is run again, or failed when out of attempts.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import redis

from . import dispatch, keys, liveness, logs, piece, registration, store
from .cache import Cache
from .config import Settings
from .defaults import (
    BURST_OUTAGE_LIMIT,
    CANCEL_CHECK,
    MAINTAIN_FAST,
    REDIS_RETRY,
    SCRATCH_SWEEP_EVERY,
    SLOTS_LOOK_AGAIN,
    TAKE_TO_CLAIM,
    TAKE_WAIT,
    TAKE_WAIT_INLINE,
)
from .errors import SheepdogError
from .finalize import run_timers
from .maintenance import end_orphaned, expire_jobs, reap_lost, sweep_scratch
from .models import Task
from .outcome import conclude
from .piece import RELEASED, Outcome, PieceOutput

log = logging.getLogger(__name__)
T = TypeVar("T")
_UNCLAIMED = object()  # an entry taken by a blocking wait: its task is claimed next


class Heartbeats:
    """Keeps the heartbeats of a worker's running tasks alive from one thread of their
    own (one pipelined round per beat for all of them), so a long blocking backend call
    (staging inputs, fetching outputs) cannot make a task look lost, and a piece that
    ends within a beat costs no thread and no round trip. A task's event is set when it
    was cancelled or taken from this worker."""

    def __init__(self, conn: redis.Redis, worker: str, settings: Settings) -> None:
        self._conn, self._worker, self._settings = conn, worker, settings
        self._tasks: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def keep(self, task_id: str) -> Iterator[threading.Event]:
        revoked = self.adopt(task_id)
        try:
            yield revoked
        finally:
            self.drop(task_id)

    def adopt(self, task_id: str) -> threading.Event:
        """Beat for the task from now on (until drop()), e.g. a piece claimed before its
        thread is free to run it; keep() goes on from there."""
        with self._lock:
            revoked = self._tasks.setdefault(task_id, threading.Event())
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="heartbeats",
                                                daemon=True)
                self._thread.start()
        return revoked

    def drop(self, task_id: str) -> None:
        with self._lock:
            self._tasks.pop(task_id, None)

    def kept(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._tasks

    def _beat(self) -> None:
        # a cancel reaches the running process within CANCEL_CHECK
        every = min(self._settings.heartbeat_interval, CANCEL_CHECK)
        while True:
            time.sleep(every)
            with self._lock:
                tasks = dict(self._tasks)
                if not tasks:  # idle: the next task starts another
                    self._thread = None
                    return
            try:
                alive = store.heartbeats(self._conn, list(tasks), self._worker,
                                         self._settings.heartbeat_timeout)
            except redis.RedisError:
                continue  # Redis is restarting: try again next beat
            for revoked, ok in zip(tasks.values(), alive, strict=True):
                if not ok:
                    revoked.set()


class Slots:
    """A worker's slots (its concurrency): a piece that asks for several cores holds
    that many (at most all) while it runs; pieces get them in the order they asked."""

    def __init__(self, total: int) -> None:
        self.total = self.free = max(1, total)
        self._turns: collections.deque[object] = collections.deque()
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, cores: int, leaving: threading.Event) -> Iterator[None]:
        """`cores` slots (0: one) until the block ends; a worker leaving stops waiting."""
        want = max(1, min(cores, self.total))
        with self._cond:
            if self._turns or self.free < want:  # someone waits before it, or no room
                got = self._wait_turn(want, leaving)
            else:  # the usual case: one slot, free (a thread is one)
                got = want
            self.free -= got
        try:
            yield
        finally:
            with self._cond:
                self.free += got
                if self._turns:
                    self._cond.notify_all()

    def _wait_turn(self, want: int, leaving: threading.Event) -> int:
        """Inside the lock: wait until it is this piece's turn and `want` slots are free;
        what it got (0 if the worker is leaving)."""
        turn = object()
        self._turns.append(turn)
        while not (self._turns[0] is turn and self.free >= want) and not leaving.is_set():
            self._cond.wait(SLOTS_LOOK_AGAIN)
        self._turns.remove(turn)
        self._cond.notify_all()  # the next in line looks again
        return want if self.free >= want else 0


class PieceRunner:
    """Runs one claimed task to its end, streaming its output into the jobs' logs."""

    def __init__(self, conn: redis.Redis, settings: Settings, worker: str,
                 leaving: threading.Event | None = None,
                 stopping: threading.Event | None = None,
                 beats: Heartbeats | None = None, slots: Slots | None = None) -> None:
        self.leaving = leaving or threading.Event()
        self.slots = slots
        self.beats = beats or Heartbeats(conn, worker, settings)
        self.stopping = stopping or threading.Event()
        self.conn = conn
        self.settings = settings
        self.worker = worker
        self.cache = Cache(settings.cache_dir)
        self.hostname = socket.gethostname()
        # the next piece, taken in the same round trip as the last one's success
        self.next: store.Taken = None

    def execute(self, task_id: str) -> str | None:
        """Claim and run one task attempt; returns its recorded status, None if not ours."""
        claimed = self.claim(task_id)
        return None if claimed is None else self.run(*claimed).status

    def claim(self, task_id: str) -> tuple[Task, list[str]] | None:
        """The task, now running for this worker, and its jobs; None if it is not ours."""
        return store.claim_jobs(self.conn, task_id, self.worker,
                                self.settings.heartbeat_timeout, where=self.hostname,
                                process=liveness.this_process())

    def take(self, queues: list[str]) -> store.Taken:
        """The next entry waiting on the queues, its task claimed in the same call."""
        return store.take_and_claim(self.conn, queues, self.worker,
                                    self.settings.heartbeat_timeout, where=self.hostname,
                                    process=liveness.this_process())

    def run(self, task: Task, jobs: list[str], entry: dispatch.Entry | None = None,
            then_take: list[str] | None = None) -> store.Finished:
        """Run a claimed task's attempt to its end; what recording it did. `then_take`:
        queues to take the next piece from with its success (then in self.next, its
        heartbeat kept), unless the worker is stopping."""
        writer = logs.LogWriter(self.conn, task.id, task.name, jobs, self.settings.log_max_lines,
                                buffer_lines=self.settings.log_buffer_lines,
                                max_bytes=self.settings.log_max_bytes)
        raw = None
        if task.capture:
            raw = logs.RawWriter(self.conn, task.id)
            raw.reset()
        output = PieceOutput(writer, raw)
        with self.beats.keep(task.id) as revoked, self._slots(task):
            outcome = piece.run(task, self.settings, self.cache, output, revoked,
                                self.leaving)
        output.flush()
        writer.done()
        if writer.lost and outcome.error != RELEASED:
            # the run may be fine, but its log is not whole: a cacheable piece runs again,
            # a command (side effects) fails saying so
            outcome = Outcome(outcome.exit_code, writer.lost, lost=task.cacheable)
        take = None
        if then_take and not (self.stopping.is_set() or self.leaving.is_set()):
            take = store.Take(then_take, self.worker, self.settings.heartbeat_timeout,
                              self.hostname, liveness.this_process())
        return conclude(self.conn, self.settings, self.worker, task, jobs,
                        piece.explain(outcome, output), self.stopping, entry, take=take,
                        taken=self._hold)

    def _hold(self, taken: store.Taken) -> None:
        if taken is not None and taken[1] is not None:
            self.beats.adopt(taken[1][0].id)
        self.next = taken

    def next_held(self, task_id: str) -> bool:
        """Whether the task was taken with the last piece (its heartbeat kept since)."""
        return self.beats.kept(task_id)


    def _slots(self, task: Task) -> contextlib.AbstractContextManager[None]:
        if self.slots is None or task.backend not in ("", "local"):
            return contextlib.nullcontext()  # its cores are elsewhere (a host, a cluster)
        return self.slots.hold(task.cores, self.leaving)


class Worker:
    """A pool of task threads on one or more queues, plus heartbeats and reaping."""

    def __init__(self, conn: redis.Redis, settings: Settings, queues: list[str],
                 concurrency: int = 1, name: str | None = None, burst: bool = False,
                 until: Callable[[], bool] | None = None,
                 services: Sequence[Callable[[threading.Event], None]] = (),
                 register: bool = True, piece_ended: Callable[[], None] | None = None,
                 linger: float = 0.0) -> None:
        self.conn = conn
        self.settings = settings
        self.queue_names = queues
        self.concurrency = max(1, concurrency)
        self.name = name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.burst = burst
        self.linger = linger  # s: a burst worker stays this long with nothing to do
        self._idle_since: float | None = None
        self.until = until
        # more loops run beside the task threads until the worker stops (GN3's queue)
        self.services = list(services)
        self.register = register
        self.piece_ended = piece_ended  # told after each piece this worker recorded
        self.stopping = threading.Event()
        self._told_to_stop = threading.Event()  # stop() was called (not burst idleness)
        self.leaving = threading.Event()  # set: running tasks go back to the queue
        self._busy = 0
        self._running = 0  # pieces being run now (not entries being taken)
        self._lock = threading.Lock()
        self.beats = Heartbeats(conn, self.name, settings)
        self.slots = Slots(self.concurrency)

    # -- lifecycle
    def run(self) -> None:
        """Work until stopped, until `until()` is true, or (burst) until idle."""
        if self.until is not None and self.until():
            return  # nothing to wait for: take no piece at all
        try:  # pieces lost before it came go first (they had their turn), not after
            reap_lost(self.conn, self.settings)
        except redis.RedisError:
            pass  # its upkeep reaps when Redis is back
        try:
            while True:
                self._serve()
                # a burst worker decides it is idle between one of its threads taking an
                # entry and counting itself busy, at worst: that thread still runs its
                # piece, and what the piece made ready must not be left behind
                if not self.burst or self._told_to_stop.is_set():
                    break
                # unregistered before its last look: a submitter that still found it
                # registered (and so started no worker) enqueued before that look
                if self.register:
                    registration.unregister(self.conn, self.name)
                if not self._work_left():
                    break
                self.stopping.clear()
        finally:
            if self.register:
                registration.unregister(self.conn, self.name)

    def _serve(self) -> None:
        """Task threads and services until the worker stops (or, burst, finds itself idle)."""
        self._idle_since = None
        threads = [threading.Thread(target=self._task_loop, name=f"task-{i}", daemon=True)
                   for i in range(self.concurrency)]
        for i, service in enumerate(self.services):
            threads.append(threading.Thread(target=service, args=(self.stopping,),
                                            name=f"service-{i}", daemon=True))
        for t in threads:
            t.start()
        try:
            self._maintain(threads)
        finally:
            self.stopping.set()
            for t in threads:
                t.join()

    def _work_left(self) -> bool:
        try:
            return any(dispatch.waiting(self.conn, q) for q in self.queue_names)
        except redis.RedisError:
            return False  # a burst worker that gave up on Redis goes

    def stop(self, release: bool = False) -> None:
        """Take no more pieces; `release`: also stop the running ones and hand them back
        to the queue (a SIGTERM: the worker is going, its pieces run elsewhere)."""
        self._told_to_stop.set()
        if release:
            self.leaving.set()
        self.stopping.set()

    def _maintain(self, threads: list[threading.Thread]) -> None:
        interval = self.settings.heartbeat_interval
        if self.until is not None:
            # a client waiting for its job: lost entries must not keep it waiting long
            interval = min(interval, TAKE_TO_CLAIM)
        next_round = next_sweep = reap_from = outage_since = 0.0
        outage = False
        while not self.stopping.is_set():
            try:
                if time.monotonic() >= next_round:
                    next_round = time.monotonic() + interval
                    self._upkeep(reap=time.monotonic() >= reap_from)
                if self.register and time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SCRATCH_SWEEP_EVERY
                    sweep_scratch(self.conn, self.settings)
                    expire_jobs(self.conn, self.settings)
                finished = self._finished()
            except redis.RedisError as e:
                if not outage:  # once per outage, not once a second
                    log.warning("worker %s: Redis is unreachable (%s); waiting for it",
                                self.name, e)
                    outage_since = time.monotonic()
                outage = True
                if self._gives_up(outage_since):
                    return
                next_round = 0.0
                self.stopping.wait(REDIS_RETRY)
                continue
            if outage:
                log.warning("worker %s: Redis is reachable again", self.name)
                outage = False
                # heartbeats lapsed in the outage, though their workers live: give them
                # one timeout to beat again before taking anything for lost
                reap_from = time.monotonic() + self.settings.heartbeat_timeout
            if finished:
                if self.until is not None:
                    self.leaving.set()  # its job is done: don't hold others' tasks hostage
                return
            self.stopping.wait(min(interval, MAINTAIN_FAST) if self.until or self.burst
                               else interval)

    def _gives_up(self, outage_since: float) -> bool:
        """A burst worker, a one-off, stops waiting for Redis after BURST_OUTAGE_LIMIT;
        one that lingers, idle, no longer than it would have waited for work (a Redis
        restarting is ridden out, `sheepdog redis stop` does not keep it a minute). A
        daemon worker waits for as long as it takes."""
        if not self.burst:
            return False
        # pieces being run, not takes being tried: a thread tries one a second in an
        # outage, in step with this loop's round, and `_busy` counts those tries
        idle = self._running == 0
        limit = min(self.linger, BURST_OUTAGE_LIMIT) if idle and self.linger \
            else BURST_OUTAGE_LIMIT
        if time.monotonic() - outage_since <= limit:
            return False
        log.warning("worker %s: a burst worker gives up on Redis after %gs", self.name, limit)
        return True

    def _upkeep(self, reap: bool = True) -> None:
        if self.register:
            self._announce()
        if reap:
            reap_lost(self.conn, self.settings)
            end_orphaned(self.conn)
        run_timers(self.conn, self.settings)

    def _finished(self) -> bool:
        if self.until is not None and self.until():
            return True
        if self.burst:
            with self._lock:
                idle = self._busy == 0
            if not idle or any(dispatch.waiting(self.conn, q) for q in self.queue_names):
                self._idle_since = None
                return False
            if self._idle_since is None:
                self._idle_since = time.monotonic()
            return time.monotonic() - self._idle_since >= self.linger
        return False

    def _announce(self) -> None:
        registration.announce(self.conn, self.name, self.queue_names,
                              self.settings.heartbeat_timeout, host=socket.gethostname(),
                              pid=os.getpid(), process=liveness.this_process(),
                              concurrency=self.concurrency, cores=os.cpu_count() or 1)

    # -- one task thread
    def _task_loop(self) -> None:
        runner = PieceRunner(self.conn, self.settings, self.name, self.leaving, self.stopping,
                             self.beats, self.slots)
        # a worker that leaves with its job must notice quickly (Redis takes floats)
        wait = TAKE_WAIT_INLINE if self.until is not None else TAKE_WAIT
        # a piece's success takes the next one in the same round trip; not for a worker
        # that works for one job or one command (it would hold another's piece)
        then_take = self.queue_names if self.until is None and self.piece_ended is None \
            else None
        while True:
            taken: tuple[dispatch.Entry, object] | None = runner.next
            runner.next = None
            if taken is None:  # (a piece taken with the last one's success is run)
                if self.stopping.is_set():
                    return
                taken = self._take(runner, wait)
                if taken is None:
                    continue
            with self._lock:
                self._running += 1
            try:
                self._run_taken(runner, taken[0], taken[1], then_take)
            finally:
                with self._lock:
                    self._running -= 1
                if runner.next is None:
                    self._count_busy(-1)

    def _take(self, runner: PieceRunner, wait: float) -> tuple[dispatch.Entry, object] | None:
        """An entry taken off the queues (and its task claimed, or _UNCLAIMED), counted
        busy; None: nothing came, or Redis failed."""
        self._count_busy(1)
        try:  # what waits now is taken and claimed in one call; else wait for one
            taken: tuple[dispatch.Entry, object] | None = runner.take(self.queue_names)
            if taken is None:
                self._count_busy(-1)
                entry = dispatch.take(self.conn, self.queue_names, wait)
                if entry is None:
                    return None
                self._count_busy(1)
                taken = (entry, _UNCLAIMED)
            return taken
        except Exception as e:  # Redis restarting, a mangled entry: keep this thread
            self._count_busy(-1)
            log.warning("worker %s: cannot take work: %s", self.name, e)
            self.stopping.wait(TAKE_WAIT)
            return None

    def _count_busy(self, change: int) -> None:
        with self._lock:
            self._busy += change

    def _run_taken(self, runner: PieceRunner, entry: dispatch.Entry, got: object,
                   then_take: list[str] | None = None) -> None:
        """Run a taken entry's task (claiming it first if the take did not), then drop
        the entry; an entry that may not have been claimed goes back to its queue."""
        claimed: bool | None = None  # None: unknown (Redis failed before it answered)
        removed = False
        try:
            if got is _UNCLAIMED:
                store.mark_taken(self.conn, entry.task_id, liveness.this_process())
                got = runner.claim(entry.task_id)
            claimed = got is not None
            if isinstance(got, tuple):
                task, jobs = got
                if self.leaving.is_set() and runner.next_held(task.id):
                    # taken with the last piece, the worker leaving before it began: it
                    # goes back unstarted (not "stopped midway": it never ran)
                    self._retry(functools.partial(store.release, self.conn, task.id,
                                                  self.name), f"hand back {task.id[:12]}")
                    return
                removed = runner.run(task, jobs, entry, then_take).entry_removed
                if self.piece_ended is not None:
                    self.piece_ended()
        except redis.RedisError as e:  # an outage: a claimed task's heartbeat lapses
            log.warning("worker %s: Redis went away around piece %s (%s); it runs "
                        "again", self.name, entry.task_id[:12], e)
        except Exception:  # keep serving; a claimed task's heartbeat lapses and it reruns
            log.exception("worker %s: task thread error", self.name)
        finally:
            if isinstance(got, tuple):  # its heartbeat was kept since it was taken
                self.beats.drop(got[0].id)
            if claimed is None:  # taken, maybe never claimed: it must not be dropped
                self._retry(functools.partial(store.put_back, self.conn, entry.task_id,
                                              at_front=True),
                            f"hand back {entry.task_id[:12]}")
            if not removed:
                self._drop(entry)

    def _drop(self, entry: dispatch.Entry) -> None:
        """Forget the queue entry this thread took (idempotent); through an outage too,
        or it would stay on RQ's taken list for good."""
        self._retry(functools.partial(dispatch.acknowledge, self.conn, entry),
                    f"remove queue entry {entry.rq_id}")

    def _retry(self, step: Callable[[], object], what: str) -> None:
        """Do a Redis step, through an outage (until the worker stops)."""
        pause = REDIS_RETRY / 8
        while True:
            try:
                step()
                return
            except redis.RedisError as e:
                if self.stopping.is_set():
                    log.warning("worker %s: could not %s: %s", self.name, what, e)
                    return
                self.stopping.wait(pause)
                pause = min(pause * 2, REDIS_RETRY * 2)


def run_task(task_id: str) -> str | None:
    """RQ job function: lets a plain `rq worker` run sheepdog tasks too."""
    from . import config
    from .connection import connect

    settings = config.load()
    conn = connect(settings)
    name = f"rq.{socket.gethostname()}.{os.getpid()}"
    return PieceRunner(conn, settings, name).execute(task_id)



GN3_REDIS_DEFAULT = "redis://localhost:6379/0"  # what GN3's worker connects to: redis.Redis()


def gn3_main(argv: list[str] | None = None) -> int:
    """`python -m sheepdog.worker [--daemon] [--queue-name Q] [--log-level L]`: GN3's own
    worker command line, served by sheepdog. Without --daemon it runs one command to
    its end (GN3's one-shot mode, started after each queue_cmd); with it, serves until
    stopped. Redis: SHEEPDOG_REDIS_URL, else GN3's default (localhost:6379)."""
    import argparse
    import signal

    from .process import own_signals

    own_signals()

    from . import config
    from .connection import connect
    from .gn3 import Gn3Server

    parser = argparse.ArgumentParser(prog="python -m sheepdog.worker",
                                     description="Run GN3's queued commands with sheepdog.")
    parser.add_argument("--daemon", action="store_true", help="serve until stopped")
    parser.add_argument("--queue-name", action="append", default=None,
                        help=f"GN3's Redis list (default {keys.GN3_DEFAULT_QUEUE}; repeatable)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error", "critical"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s sheepdog GN3 worker: %(levelname)s: %(message)s")
    settings = config.load()
    if not settings.redis_url:
        settings = config.load(redis_url=GN3_REDIS_DEFAULT)
    try:
        conn = connect(settings)
    except SheepdogError as e:
        log.error("%s", e)
        return e.exit_code
    name = f"{socket.gethostname()}.{os.getpid()}.gn3"
    server = Gn3Server(conn, settings, args.queue_name or [keys.GN3_DEFAULT_QUEUE], name,
                       one_shot=not args.daemon)
    worker = Worker(conn, settings, [settings.queue], concurrency=os.cpu_count() or 1,
                    name=name, services=[server.loop], piece_ended=server.piece_ended)
    for sig in (signal.SIGTERM, signal.SIGINT):  # going: running pieces go back to the queue
        signal.signal(sig, lambda *_: worker.stop(release=True))
    worker.run()
    return 0


if __name__ == "__main__":  # GN3 starts its queue worker as `python -m sheepdog.worker`
    import sys

    sys.exit(gn3_main())
