"""Turning what a user asked for into a job and its tasks, and submitting them."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import store
from .backends import registry
from .cache import Cache
from .config import Settings
from .errors import ConfigError
from .models import Job, Task, valid_job_id

if TYPE_CHECKING:
    import redis

__all__ = ["command_job", "new_job_id", "submit", "valid_job_id"]

def new_job_id() -> str:
    """Sortable, URL-safe and unique: time first, then randomness."""
    # ten random hex digits, as uuid4().hex[:10] gave, without building a UUID
    return time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + os.urandom(5).hex()


def check_backend(backend: str, host: str | None) -> None:
    """Refuse an unknown backend, or one that needs a host without one."""
    registry.check(backend, host)


# one argument longer than this is refused by exec itself (Linux MAX_ARG_STRLEN)
MAX_ARG_BYTES = 128 * 1024


def check_command_size(argv: Sequence[str], settings: Settings) -> None:
    """Refuse now what exec would refuse later: too many words, too many bytes."""
    if len(argv) > settings.max_command_args:
        raise ConfigError(f"command has {len(argv):,d} arguments; at most "
                          f"{settings.max_command_args:,d} (max_command_args)")
    sizes = [len(str(a).encode(errors="replace")) for a in argv]
    if max(sizes) > MAX_ARG_BYTES:
        raise ConfigError(f"command argument {sizes.index(max(sizes))} is {max(sizes):,d} "
                          f"bytes; at most {MAX_ARG_BYTES:,d}")
    if sum(sizes) > settings.max_command_bytes:
        raise ConfigError(f"command is {sum(sizes):,d} bytes; at most "
                          f"{settings.max_command_bytes:,d} (max_command_bytes)")
    if any("\0" in str(a) for a in argv):
        raise ConfigError("command arguments cannot hold NUL characters")


def command_job(argv: Sequence[str], settings: Settings, backend: str = "local",
                host: str | None = None, queue: str | None = None, cwd: str | None = None,
                env: dict[str, str] | None = None, clean_env: bool = False,
                timeout: float = 0.0, workflow: str = "command", capture: bool = False,
                max_attempts: int | None = None) -> tuple[Job, list[Task]]:
    """A job that runs one command once (never cached: commands have side effects);
    `capture` keeps its exact output bytes, `max_attempts` 1 runs it at most once."""
    if not argv or not str(argv[0]).strip():
        raise ConfigError("empty command: give the program to run after '--'")
    check_command_size(argv, settings)
    check_backend(backend, host)
    job_id = new_job_id()
    q = queue or settings.queue
    task = Task(name="command", argv=[str(a) for a in argv], cacheable=False,
                cwd=cwd if cwd is not None else os.getcwd(), env=env or {}, clean_env=clean_env,
                timeout=timeout, capture=capture,
                max_attempts=settings.max_attempts if max_attempts is None else max_attempts,
                backend=backend, host=host or "", queue=q, nonce=job_id)
    job = Job(id=job_id, workflow=workflow, command=[str(a) for a in argv], backend=backend,
              host=host or "", queue=q, final_task=task.id)
    return job, [task]


def submit(conn: redis.Redis, settings: Settings, job: Job, tasks: list[Task]) -> Job:
    """Store and dispatch; cached pieces are reported in the job's log. The pieces a
    workflow names in `params["forced"]` (--force, REST "force": true) are computed
    again, whatever the cache holds. A job whose params say `open` takes more pieces
    as it runs (a CWL run's invocations) and ends when its runner closes it."""
    local = Cache(settings.cache_dir)
    if job.params.get("forced"):
        store.forget(conn, list(job.params["forced"]), local.remove)
    # outputs an untrusted pull worker made served its own job only: computed again
    store.forget(conn, store.untrusted(conn, [t.id for t in tasks if t.cacheable]),
                 local.remove)
    by_id = {t.id: t for t in tasks}
    return store.submit(conn, job, tasks,
                        published=lambda tid: not by_id[tid].cacheable or local.reused(tid),
                        open_=bool(job.params.get("open")))
