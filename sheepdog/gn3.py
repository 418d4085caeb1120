"""Serving GN3's existing job queue: a Redis LIST of ids of hashes with a `cmd` field.

The hash moves through queued -> running -> success|error and gets `result` (stdout,
or stderr on failure) and `stderr`, exactly as GN3's own worker leaves it; meanwhile the
command runs as an ordinary sheepdog job, so its output streams live like any other.
"""

from __future__ import annotations

import json
import os
import threading

import redis

from . import jobs, logs, store
from .config import Settings
from .defaults import GN3_JOB_POLL, GN3_TAKE_WAIT
from .errors import SheepdogError
from .models import Job, JobStatus


def _text(value: bytes | None) -> str:
    return value.decode(errors="replace") if value is not None else ""


def parse_command(raw: str) -> list[str]:
    """GN3's `cmd` is JSON: a list is an argv; a string is a shell command line."""
    cmd = json.loads(raw)
    if isinstance(cmd, str):
        # GN3 itself runs string commands through the shell; this is the same, made explicit
        return ["/bin/sh", "-c", cmd]
    if isinstance(cmd, list) and cmd and all(isinstance(c, str | int | float) for c in cmd):
        return [str(c) for c in cmd]
    raise SheepdogError(f"cmd must be a JSON string or a non-empty list, got {raw[:80]!r}")


def output_text(conn: redis.Redis, job_id: str, stream: str) -> str:
    lines: list[str] = []
    after = "0-0"
    while batch := logs.read(conn, job_id, after=after):
        lines += [ln.text for ln in batch if ln.stream == stream]
        after = batch[-1].id
    return "\n".join(lines) + ("\n" if lines else "")


def mirror(conn: redis.Redis, cmd_id: str, job: Job) -> None:
    """Write a finished sheepdog job back into GN3's hash, as GN3's worker would."""
    out = output_text(conn, job.id, "stdout")
    err = output_text(conn, job.id, "stderr")
    if job.status == JobStatus.SUCCESS and job.exit_code == 0:
        conn.hset(cmd_id, mapping={"result": out, "status": "success"})
    else:
        err = err or job.error
        conn.hset(cmd_id, mapping={"result": err, "stderr": err, "status": "error"})


class Gn3Server:
    """Takes ids off GN3's LIST and runs each as a sheepdog job."""

    def __init__(self, conn: redis.Redis, settings: Settings, queue_name: str,
                 worker: str) -> None:
        self.conn = conn
        self.settings = settings
        self.queue_name = queue_name
        self.worker = worker

    def loop(self, stop: threading.Event) -> None:
        self.resync()
        while not stop.is_set():
            item = self.conn.blpop([self.queue_name], timeout=GN3_TAKE_WAIT)
            if item:
                self.handle(_text(item[1]), stop)

    def resync(self) -> None:
        """Finish the GN3 side of jobs whose waiting worker died before mirroring them."""
        for job in store.list_jobs(self.conn, limit=500):
            if job.gn3_id and JobStatus(job.status).final:
                if _text(self.conn.hget(job.gn3_id, "status")) == "running":
                    mirror(self.conn, job.gn3_id, job)

    def handle(self, cmd_id: str, stop: threading.Event) -> None:
        raw = self.conn.hget(cmd_id, "cmd")
        if not raw or _text(self.conn.hget(cmd_id, "status")) != "queued":
            return  # GN3 skips these too
        self.conn.hset(cmd_id, "status", "running")
        try:
            argv = parse_command(_text(raw))
            env_raw = _text(self.conn.hget(cmd_id, "env"))
            env = json.loads(env_raw) if env_raw else None
            job, tasks = jobs.command_job(
                argv, self.settings, env={k: str(v) for k, v in (env or {}).items()},
                clean_env=env is not None, cwd=os.getcwd(), workflow="gn3")
        except (SheepdogError, ValueError) as e:
            self.conn.hset(cmd_id, mapping={"status": "error", "stderr": str(e),
                                            "result": str(e)})
            return
        job.gn3_id = cmd_id
        jobs.submit(self.conn, self.settings, job, tasks)
        while not stop.wait(GN3_JOB_POLL):
            current = store.get_job(self.conn, job.id)
            if JobStatus(current.status).final:
                mirror(self.conn, cmd_id, current)
                return
