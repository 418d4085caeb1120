"""The `sheepdog` command's entry. `sheepdog run --detach -- CMD ...`, what people type
in a shell loop to submit many jobs, is submitted here without loading redis-py, click
or RQ (their imports are most of that command's time); every other command line, and
this one whenever anything is out of the ordinary (TLS, a Redis that is not up yet, a
command the checks refuse), goes to sheepdog.cli, which says what is wrong."""

from __future__ import annotations

import dataclasses
import os
import sys

_FORM = ["run", "--detach", "--"]


def main() -> None:
    code = submit(sys.argv[1:])
    if code is None:
        from .cli import main as full

        full()  # exits
    sys.stdout.flush()
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
