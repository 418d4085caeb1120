"""Turning a POST /jobs body into a job and its tasks, outside the request's process.

A workflow that reads input files (`Workflow.reads_inputs`) is validated and split in a
child process with its own memory and CPU limits: a hostile or merely huge input costs
that child, never the web process, its other requests or its open websockets. At most
`prepare_workers` children run at once; the rest of the requests wait their turn.
Workflows that read nothing are prepared in the request, as that is cheaper than a
process.
"""

from __future__ import annotations

import multiprocessing
import resource
import threading
import traceback
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sheepdog import workflows
from sheepdog.cache import Cache
from sheepdog.config import Settings
from sheepdog.errors import FieldError, InputError, SheepdogError
from sheepdog.models import Job, Task

from . import inputs

# forkserver: a child forks from a clean process that has already imported sheepdog,
# never from the threaded web process
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["web.prepare", *(
    f"{workflows.__name__}.{n.replace('-', '_')}" for n in workflows.names())])
_slots_lock = threading.Lock()
_slots: dict[int, threading.BoundedSemaphore] = {}
RESULT_GRACE = 5.0  # s past the CPU limit before a child that sleeps is killed


def _slot(settings: Settings) -> threading.BoundedSemaphore:
    with _slots_lock:
        return _slots.setdefault(settings.prepare_workers,
                                 threading.BoundedSemaphore(settings.prepare_workers))


def _resolver(files: dict[str, Path], where: Path | None, roots: tuple[str, ...],
              limits: inputs.BundleLimits, raw: Any, roles: tuple[str, ...],
              required: tuple[str, ...]) -> dict[str, Path]:
    try:
        return inputs.resolve(raw, files, where, roots, roles, required, limits)
    except InputError as e:
        raise FieldError(e.where, e.problem) from e


def build(name: str, body: dict[str, Any], files: dict[str, Path], where: Path | None,
          settings: Settings, owner: str = "") -> tuple[Job, list[Task]]:
    """The job and tasks of a request whose uploads are saved (in this process)."""
    workflow = workflows.get(name)
    resolver = partial(_resolver, files, where, settings.input_roots,
                       inputs.BundleLimits.of(settings))
    job, tasks = workflow.from_request(body, resolver, settings, Cache(settings.cache_dir),
                                       owner)
    job.owner = owner
    return job, tasks


def _limit(settings: Settings) -> None:
    memory = settings.prepare_memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = max(1, int(settings.prepare_seconds))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _child(send: Connection, name: str, body: dict[str, Any], files: dict[str, Path],
           where: Path | None, settings: Settings, owner: str) -> None:
    _limit(settings)
    try:
        answer: tuple[Any, ...] = ("ok", *build(name, body, files, where, settings, owner))
    except MemoryError:
        answer = ("error", 413, "inputs", _too_big(settings))
    except SheepdogError as e:  # sent as plain values: not every error pickles back
        message = getattr(e, "problem", None) if isinstance(e, FieldError) else str(e)
        if where is not None and message:  # an upload by its name, not where it was kept
            message = message.replace(f"{where}/", "").replace(str(where), "the upload")
        answer = ("error", e.http_status, getattr(e, "field", None), message)
    except Exception as e:  # a bug, not the input: say so, and keep the traceback
        traceback.print_exc()
        answer = ("error", 500, None, f"preparing the job failed: {type(e).__name__}")
    send.send(answer)
    send.close()


def _too_big(settings: Settings) -> str:
    return (f"validating and splitting these inputs needs more than "
            f"{settings.prepare_memory_mb:,d} MB or {settings.prepare_seconds:g} s of CPU "
            "(prepare_memory_mb, prepare_seconds); send smaller inputs or raise the limits")


def prepare(name: str, body: dict[str, Any], files: dict[str, Path], where: Path | None,
            settings: Settings, owner: str = "") -> tuple[Job, list[Task]]:
    """The request's job and tasks, built in a bounded child process when the
    workflow reads inputs; its errors come back as the same 4xx/5xx. `owner`: the
    sending token's name."""
    if not workflows.get(name).reads_inputs:
        return build(name, body, files, where, settings, owner)
    with _slot(settings):
        recv, send = _CONTEXT.Pipe(duplex=False)
        child = _CONTEXT.Process(target=_child, args=(send, name, body, files, where,
                                                      settings, owner), daemon=True)
        child.start()
        send.close()
        try:
            if not recv.poll(settings.prepare_seconds + RESULT_GRACE):
                raise FieldError("inputs", _too_big(settings), 413)
            try:
                answer = recv.recv()
            except EOFError:  # killed by its limits before it could answer
                raise FieldError("inputs", _too_big(settings), 413) from None
        finally:
            recv.close()
            if child.is_alive():
                child.kill()
            child.join()
    if answer[0] == "ok":
        return answer[1], answer[2]
    _, status, field, message = answer
    if field:
        raise FieldError(field, message, status)
    error = SheepdogError(message)
    error.http_status = status
    raise error
