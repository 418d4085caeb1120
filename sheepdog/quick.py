"""The `sheepdog` command's entry. `sheepdog run --detach -- CMD ...`, what people type
in a shell loop to submit many jobs, is submitted here without loading redis-py, click
or RQ (their imports are most of that command's time), and `status JOB`, `list`,
`logs JOB` and `result JOB` (each with or without --json) are read here the same way
(`result` of a job whose workflow's result is its record: a command's); every other
command line, and these whenever anything is out of the ordinary (TLS, a Redis that is
not up yet, an unknown job, a command the checks refuse), goes to sheepdog.cli, which
says what is wrong. What these print is written by sheepdog.readout for both."""

from __future__ import annotations

import dataclasses
import os
import sys

_FORM = ["run", "--detach", "--"]
_READ = ("status", "logs", "result")  # each with a job id (and `list`): see readout


def main() -> None:
    args = sys.argv[1:]
    try:
        code = submit(args)
        if code is None:
            code = read(args)
        if code is None:
            from .cli import main as full

            full()  # exits
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `sheepdog logs JOB | head`: as the full command line does
        code = 0
    os._exit(code or 0)  # as cli.main: nothing is left to tear down


def submit(args: list[str]) -> int | None:
    """Submit `run --detach -- CMD ...` and print the job's id: 0 then, 1 if Redis
    failed under it; None: the full command line is to handle it."""
    if len(args) <= len(_FORM) or args[:len(_FORM)] != _FORM:
        return None
    from . import config, embedded, jobs, pool
    from .errors import SheepdogError
    from .wire import Wire, WireError

    try:
        settings = config.load()
        url = settings.redis_url or f"unix://{embedded.socket_path(settings.home)}"
        wire = Wire.open(url)
        if wire is None:
            return None
        job, tasks = jobs.command_job(args[len(_FORM):], settings)
    except (SheepdogError, OSError):
        return None
    try:
        jobs.submit(wire, settings, job, tasks)
        alone = pool.unserved(wire, job.queue)
    except WireError as e:
        print(f"sheepdog: {e} while submitting job {job.id}: `sheepdog status {job.id}` "
              "says whether it was stored", file=sys.stderr)
        return 1
    finally:
        wire.close()
    if alone:
        pool.spawn_detached_worker(dataclasses.replace(settings, redis_url=url), job.queue)
    print(job.id)
    return 0


# ---------------------------------------------------------------- reading


def _reading(args: list[str]) -> tuple[str, str, bool] | None:
    """(command, job id or '', --json) of a command read here; None for anything else."""
    as_json = "--json" in args
    rest = [a for a in args if a != "--json"]
    if args.count("--json") > 1 or not rest:
        return None
    if rest == ["list"]:
        return "list", "", as_json
    if len(rest) == 2 and rest[0] in _READ and not rest[1].startswith("-"):
        return rest[0], rest[1], as_json
    return None


def read(args: list[str]) -> int | None:
    """Print what `status JOB`, `list`, `logs JOB` or `result JOB` show: 0; None: the full command
    line is to handle it (it reports an unknown job, an outage, an option not read here)."""
    asked = _reading(args)
    if asked is None:
        return None
    command, job_id, as_json = asked
    from . import config, embedded, readout
    from .errors import SheepdogError
    from .wire import Wire

    try:
        settings = config.load()
        wire = Wire.open(settings.redis_url or f"unix://{embedded.socket_path(settings.home)}")
        if wire is None:
            return None
        try:
            shown = readout.READS[command](wire, job_id, as_json)
        finally:
            wire.close()
    except (SheepdogError, OSError):  # readout.Elsewhere too
        return None
    tty = sys.stderr.isatty()
    for stream, text in shown:  # each stream flushed before the other is written
        out = sys.stdout if stream == "stdout" else sys.stderr
        (sys.stderr if out is sys.stdout else sys.stdout).flush()
        out.write((readout.dim(text) if stream == "stderr-dim" and tty else text) + "\n")
    return 0
