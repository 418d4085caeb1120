"""Serving GN3's existing job queue: Redis LISTs of ids of hashes with a `cmd` field.

GN3's `queue_cmd` pushes the id first and writes the hash's fields after it (`cmd`,
`result`, `status`, then `email` and `env`), so an id may arrive before its hash is
complete: it waits (a short back-off) until `status` is `queued`, then a moment more
for `env`. Taken ids are moved to a list of the taking worker's own until handled, so a
worker that dies holding one loses nothing, and only a dead worker's list is taken back
(GN3 starts one one-shot worker per command, many at once: none may take another's).
Each command runs as an ordinary sheepdog job (live log, page), at most once by
default, and its output goes back into the hash as GN3's `run_cmd` leaves it:
`result`, `status`, `stderr`.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import shlex
import threading
import time
from dataclasses import dataclass, field

import redis

from . import jobs, keys, liveness, logs, registration, store
from .config import Settings
from .defaults import GN3_JOB_POLL, GN3_RECOVER_EVERY, GN3_SETTLE, GN3_START_GRACE, GN3_TAKE_WAIT
from .errors import SheepdogError
from .models import Job, JobStatus

log = logging.getLogger(__name__)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def parse_command(raw: str) -> list[str]:
    """GN3's `cmd`: JSON (a list is an argv, a string a shell line, as GN3's run_cmd
    runs it); anything else that is a command line runs through the shell the same."""
    try:
        cmd = json.loads(raw)
    except json.JSONDecodeError:
        cmd = raw  # not JSON: a command line as given
        try:
            words = shlex.split(raw)
        except ValueError as e:
            raise SheepdogError(f"cmd is neither JSON nor a command line: {e}: "
                                f"{raw[:80]!r}") from e
        if not words or "\0" in raw:
            raise SheepdogError(f"cmd is neither JSON nor a command line: {raw[:80]!r}") from None
    if isinstance(cmd, str):
        if not cmd.strip():
            raise SheepdogError("cmd is an empty command line")
        # GN3 itself runs string commands through the shell; this is the same, made explicit
        return ["/bin/sh", "-c", cmd]
    if isinstance(cmd, list) and cmd and all(isinstance(c, str | int | float) for c in cmd):
        return [str(c) for c in cmd]
    raise SheepdogError(f"cmd must be a JSON string or a non-empty list, got {raw[:80]!r}")


def gn3_text(raw: bytes) -> str:
    """A command's output as GN3's fields hold it: text that GN3's own readers
    (`decode_responses=True` clients) can read, invalid UTF-8 replaced. The exact bytes
    stay in sheepdog's own record of the piece (`sheepdog result`)."""
    return raw.decode("utf-8", errors="replace")


def mirror(conn: redis.Redis, cmd_id: str, job: Job) -> None:
    """Write a finished sheepdog job back into GN3's hash as GN3's `run_cmd` does:
    `result` is stdout on success; a command that exited non-zero gets its stderr in
    `result` and `stderr`, exactly (empty stays empty: GN2 parses a non-empty result as
    JSON). sheepdog's own account of it is in the job's log. A command that never gave
    an exit status (lost, cancelled) has sheepdog's reason there instead."""
    out = logs.raw_output(conn, job.final_task, "stdout")
    err = logs.raw_output(conn, job.final_task, "stderr")
    if job.status == JobStatus.SUCCESS and job.exit_code == 0:
        conn.hset(cmd_id, mapping={"result": gn3_text(out), "status": "success"})
        return
    if job.exit_code is not None and job.exit_code > 0:
        text = gn3_text(err)
    else:
        text = gn3_text(err) or (job.error or f"job {job.status}")
    conn.hset(cmd_id, mapping={"result": text, "stderr": text, "status": "error"})


@dataclass(order=True)
class _Waiting:
    """An id whose hash was not complete (or not settled) yet."""

    due: float
    cmd_id: str = field(compare=False)
    queue: str = field(compare=False)
    first_seen: float = field(compare=False)
    pause: float = field(compare=False, default=0.005)
    queued_seen: bool = field(compare=False, default=False)


class Gn3Server:
    """Takes ids off GN3's LISTs and runs each as a sheepdog job."""

    def __init__(self, conn: redis.Redis, settings: Settings, queue_names: list[str],
                 worker: str, one_shot: bool = False) -> None:
        self.conn = conn
        self.settings = settings
        self.queue_names = queue_names
        self.worker = worker
        self.one_shot = one_shot
        self.waiting: list[_Waiting] = []
        self.handled = 0
        self.started: set[str] = set()
        self.taken = {name: keys.gn3_taken(name, worker) for name in queue_names}
        self.next_recovery = 0.0
        self.took_turn = False  # one-shot: it looked at GN3's queue once (took one or none)
        self.wake = threading.Event()  # set: a piece ended here, a job may have: mirror now

    # -- the loops
    def loop(self, stop: threading.Event) -> None:
        """Take, settle and start commands until stopped, mirroring finished ones."""
        self._register()
        self._recover()
        mirroring = threading.Thread(target=self._mirror_loop, args=(stop,), name="gn3-mirror",
                                     daemon=True)
        mirroring.start()
        while not stop.is_set():
            try:
                self._take_round(stop)
            except redis.RedisError as e:
                log.warning("GN3 queue: Redis is unreachable (%s); waiting for it", e)
                stop.wait(GN3_TAKE_WAIT)
            if self.one_shot and not self.waiting and not self._own_running():
                stop.set()  # one command run (or none was queued), as GN3's one-shot does
        mirroring.join()
        self._unregister()

    def _own_running(self) -> bool:
        """Is a command this server started still running (one-shot waits for it)?"""
        return any(self.conn.hexists(keys.gn3_jobs(), c) for c in self.started)

    def _take_round(self, stop: threading.Event) -> None:
        took = False
        if self.one_shot and self.took_turn:
            self._settle_due()  # one command only: take no other
            stop.wait(GN3_JOB_POLL if not self.waiting else 0.005)
            return
        if not self.one_shot and time.monotonic() >= self.next_recovery:
            self._recover()
        for name in self.queue_names:
            cmd_id = self.conn.lmove(name, self.taken[name], "LEFT", "RIGHT")
            self.took_turn = True
            if cmd_id is not None:
                took = True
                self._consider(_text(cmd_id), name, time.monotonic())
                if self.one_shot:
                    break
        self._settle_due()
        if took:
            return
        if self.waiting:
            stop.wait(max(0.0, min(self.waiting[0].due - time.monotonic(), GN3_JOB_POLL)))
            return
        if self.one_shot:
            return
        # nothing anywhere: block on the first queue (the others are looked at each round)
        first = self.queue_names[0]
        cmd_id = self.conn.blmove(first, self.taken[first], GN3_TAKE_WAIT, "LEFT", "RIGHT")
        if cmd_id is not None:
            self._consider(_text(cmd_id), first, time.monotonic())

    def piece_ended(self) -> None:
        """A piece this process ran ended: its GN3 command's status is written back at
        once, not at the next look (other workers' pieces are seen by looking)."""
        self.wake.set()

    def _mirror_loop(self, stop: threading.Event) -> None:
        # a one-shot looks at its own command each round and at everyone's as it ends:
        # GN3 starts one per command, and each looking at all of them every round made
        # many at once cost the square of their number
        own = self.started if self.one_shot else None
        while not stop.is_set():
            self.wake.wait(GN3_JOB_POLL)
            self.wake.clear()
            try:
                self.mirror_finished(own)
            except redis.RedisError:
                continue  # Redis is restarting: the next round catches up
        self.mirror_finished()

    def mirror_finished(self, only: set[str] | None = None) -> int:
        """Mirror every GN3 command whose job has ended (any worker may do it), or only
        those of `only`."""
        if only is None:
            running = {_text(k): json.loads(v)
                       for k, v in self.conn.hgetall(keys.gn3_jobs()).items()}
        elif not only:
            return 0
        else:
            ids = sorted(only)
            running = {c: json.loads(v) for c, v in zip(
                ids, self.conn.hmget(keys.gn3_jobs(), ids), strict=True) if v is not None}
        if not running:
            return 0
        pipe = self.conn.pipeline(transaction=False)
        for claim in running.values():
            pipe.hget(keys.job(claim["job"]), "status")
        done = 0
        now = time.time()
        for (cmd_id, claim), status in zip(running.items(), pipe.execute(), strict=True):
            job_id = claim["job"]
            if not status and now - claim["at"] < GN3_START_GRACE:
                continue  # claimed a moment ago: its job is being submitted
            if not status:  # the worker died between claiming and submitting
                self._fail(cmd_id, "", "sheepdog: the worker that took this command stopped "
                                       "before starting it")
            elif JobStatus(_text(status)).final:
                mirror(self.conn, cmd_id, store.get_job(self.conn, job_id))
                self.conn.hdel(keys.gn3_jobs(), cmd_id)
            else:
                continue
            done += 1
        return done

    # -- one id
    def _register(self) -> None:
        """Say which process holds this worker's taken lists, before taking anything."""
        me = json.dumps({"process": liveness.this_process(), "at": time.time()})
        pipe = self.conn.pipeline(transaction=False)
        for name in self.queue_names:
            pipe.hset(keys.gn3_takers(name), self.worker, me)
        pipe.execute()

    def _unregister(self) -> None:
        try:
            for name in self.queue_names:
                if not self.conn.llen(self.taken[name]):
                    self.conn.hdel(keys.gn3_takers(name), self.worker)
        except redis.RedisError:
            pass  # a later worker's recovery finds the list empty and forgets it

    def _dead(self, worker: str, info: dict[str, object]) -> bool:
        """Is the worker that holds a taken list gone? On this host, known at once by its
        process; elsewhere, once its registration expired and it said nothing for two
        heartbeat timeouts."""
        process = str(info.get("process", ""))
        if liveness.gone(process):
            return True
        if process.split(" ")[0] == liveness.this_process().split(" ")[0]:
            return False  # on this host and alive
        quiet = time.time() - float(str(info.get("at", 0))) > 2 * self.settings.heartbeat_timeout
        return quiet and not registration.registered(self.conn, worker)

    def _recover(self) -> None:
        """Ids that a dead worker took and never handled (and those of the shared list of
        earlier versions) become this worker's; then every id it holds goes round again."""
        self.next_recovery = time.monotonic() + GN3_RECOVER_EVERY
        for name in self.queue_names:
            held = [keys.gn3_taken(name)]
            for raw_worker, raw in self.conn.hgetall(keys.gn3_takers(name)).items():
                worker = _text(raw_worker)
                if worker != self.worker and self._dead(worker, json.loads(raw)):
                    held.append(keys.gn3_taken(name, worker))
                    self.conn.hdel(keys.gn3_takers(name), worker)
            for source in held:
                while self.conn.lmove(source, self.taken[name], "LEFT", "RIGHT") is not None:
                    pass
            queued = {w.cmd_id for w in self.waiting}
            for cmd_id in self.conn.lrange(self.taken[name], 0, -1):
                if _text(cmd_id) not in queued:
                    self._consider(_text(cmd_id), name, time.monotonic())

    def _consider(self, cmd_id: str, queue: str, first_seen: float,
                  earlier: _Waiting | None = None) -> None:
        cmd, status = map(_text, self.conn.hmget(cmd_id, "cmd", "status"))
        now = time.monotonic()
        if status == "queued" and cmd:
            if earlier is not None and earlier.queued_seen:
                self._start(cmd_id, queue)
                return
            # `env` (and `email`) come after `status`: give them a moment
            heapq.heappush(self.waiting, _Waiting(now + GN3_SETTLE, cmd_id, queue,
                                                  first_seen, queued_seen=True))
            return
        if status and status != "queued":
            self._done_with(cmd_id, queue)  # not waiting to run: someone else's (GN3 skips too)
            return
        if now - first_seen > self.settings.gn3_incomplete_wait:
            self._fail(cmd_id, queue, f"sheepdog: the hash {cmd_id} was not complete "
                       f"({'no cmd' if not cmd else 'no status'}) "
                       f"{self.settings.gn3_incomplete_wait:g}s after its id was queued")
            return
        pause = min((earlier.pause * 2) if earlier else 0.005, 1.0)
        heapq.heappush(self.waiting, _Waiting(now + pause, cmd_id, queue, first_seen, pause))

    def _settle_due(self) -> None:
        now = time.monotonic()
        while self.waiting and self.waiting[0].due <= now:
            item = heapq.heappop(self.waiting)
            self._consider(item.cmd_id, item.queue, item.first_seen, item)

    def _claim(self, cmd_id: str, job_id: str) -> bool:
        """queued -> running, and the command -> job mapping, in one transaction."""

        def txn(pipe: redis.client.Pipeline) -> bool:
            if _text(pipe.hget(cmd_id, "status")) != "queued":
                return False
            pipe.multi()
            pipe.hset(cmd_id, "status", "running")
            pipe.hset(keys.gn3_jobs(), cmd_id, json.dumps({"job": job_id, "at": time.time()}))
            return True

        return bool(self.conn.transaction(txn, cmd_id, value_from_callable=True))

    def _start(self, cmd_id: str, queue: str) -> None:
        cmd, env_raw = map(_text, self.conn.hmget(cmd_id, "cmd", "env"))
        try:
            argv = parse_command(cmd)
            env = json.loads(env_raw) if env_raw else None
            if env is not None and not isinstance(env, dict):
                raise SheepdogError(f"env must be a JSON object, got {env_raw[:80]!r}")
            job, tasks = jobs.command_job(
                argv, self.settings, env={k: str(v) for k, v in (env or {}).items()},
                clean_env=env is not None, cwd=os.getcwd(), workflow="gn3", capture=True,
                max_attempts=self.settings.gn3_max_attempts)
        except (SheepdogError, ValueError) as e:
            self._fail(cmd_id, queue, str(e))
            return
        job.gn3_id = cmd_id
        if self._claim(cmd_id, job.id):
            jobs.submit(self.conn, self.settings, job, tasks)
            self.started.add(cmd_id)
        self._done_with(cmd_id, queue)

    def _fail(self, cmd_id: str, queue: str, why: str) -> None:
        self.conn.hset(cmd_id, mapping={"status": "error", "stderr": why, "result": why})
        self.conn.hdel(keys.gn3_jobs(), cmd_id)
        if queue:
            self._done_with(cmd_id, queue)

    def _done_with(self, cmd_id: str, queue: str) -> None:
        self.conn.lrem(self.taken[queue], 1, cmd_id)
        self.handled += 1

