"""Jobs and tasks as plain dataclasses, and their flat Redis-hash form."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

FINAL_STATES = frozenset({"success", "error", "cancelled"})
# jobs.new_job_id makes UTC time then 10 hex digits; any id is a short plain word
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_job_id(job_id: str) -> bool:
    """Shaped like a job id? Checked before any Redis call, so an id never names a key
    of another type (`<id>:tasks`)."""
    return bool(JOB_ID.fullmatch(job_id))


class JobStatus(StrEnum):
    """A job's state, in GN3's words plus `cancelled`."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self.value in FINAL_STATES


class TaskStatus(StrEnum):
    """A task's state; `waiting` means some task it needs has not finished yet."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self.value in FINAL_STATES


# An argv item is a literal string, or a placeholder a backend resolves to a path:
#   {"input": NAME}            the staged input file NAME (see Task.inputs)
#   {"dep": TASK_ID, "file": F} file F of a finished task's published outputs
#   {"out": F}                 file F in this task's scratch (published on success)
#   {"python": true}           the Python interpreter that has sheepdog installed
ArgvItem = str | dict[str, Any]


@dataclass
class Task:
    """One process to run. Its id is the sha256 of what it computes, when cacheable."""

    name: str
    argv: list[ArgvItem]
    inputs: dict[str, str] = field(default_factory=dict)  # name -> sha256 of content
    deps: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    cacheable: bool = True
    cwd: str = ""  # only for uncacheable commands: where the user asked to run it
    env: dict[str, str] = field(default_factory=dict)
    clean_env: bool = False  # env replaces the worker's environment (GN3 semantics)
    capture: bool = False  # keep the exact stdout/stderr bytes too (GN3's result field)
    complete_when: dict[str, str] = field(default_factory=dict)  # output -> text it must hold
    environment: str = ""  # what the result depends on beyond inputs (GEMMA version...)
    timeout: float = 0.0  # seconds; 0 means none
    max_attempts: int = 3
    retry_on_failure: bool = False
    # its failure is the job's own words (map's gather: "3 of 3 items failed"), not
    # "piece 'gather' failed"; not part of the content id
    speaks_for_job: bool = False
    # what it asks for (CWL's ResourceRequirement): that many of a worker's slots, Slurm's
    # --cpus-per-task and --mem; 0 is one slot and the cluster's default. Not part of the
    # content id: the result does not depend on it
    cores: int = 0
    ram_mb: int = 0
    backend: str = "local"
    host: str = ""
    queue: str = "default"
    nonce: str = ""  # makes an uncacheable task unique (its job id)
    twin_of: str = ""  # a second run of this straggling task; the first to succeed wins
    id: str = ""
    # state, owned by store.py
    status: TaskStatus = TaskStatus.WAITING
    pending: int = 0
    attempts: int = 0
    worker: str = ""
    process: str = ""  # "host pid start-time" of the attempt's worker process
    requeued_from: str = ""  # the worker whose attempt was handed back to the queue
    exit_code: int | None = None
    error: str = ""
    queued_at: float = 0.0
    rq_id: str = ""  # the RQ job of the current dispatch (unique per dispatch)
    unqueued_seen: float = 0.0  # when the reaper first found it queued but on no queue
    started: float = 0.0
    ended: float = 0.0
    cache_hit: bool = False
    twin: str = ""  # the id of this task's twin, once one was started
    used: float = 0.0  # when a job last took it from the cache (retention keeps it since)
    # the untrusted pull worker whose outputs these are: they serve the job they ran for,
    # and any other job computes them again (jobs.submit)
    untrusted: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = self.content_id()

    def content_id(self) -> str:
        """sha256 over the canonical description: same inputs and argv, same id."""
        what = {
            "argv": self.argv,
            "inputs": self.inputs,
            "deps": self.deps,
            "outputs": self.outputs,
            "environment": self.environment,
            "nonce": "" if self.cacheable else self.nonce,
            "cwd": "" if self.cacheable else self.cwd,
            "env": self.env,
            "clean_env": self.clean_env,
        }
        if self.capture:  # only then: ids of every other task stay as they were
            what["capture"] = True
        if self.twin_of:
            what["twin_of"] = self.twin_of
        blob = json.dumps(what, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass
class Job:
    """What a user asked for; expands into tasks. All state lives in Redis."""

    id: str
    workflow: str
    status: JobStatus = JobStatus.QUEUED
    command: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    backend: str = "local"
    host: str = ""
    queue: str = "default"
    out_dir: str = ""
    final_task: str = ""  # the task whose exit code becomes the job's
    owner: str = ""  # the name of the token that sent it over HTTP ('' from the CLI)
    total: int = 0
    done: int = 0
    cached: int = 0
    submitted: float = field(default_factory=time.time)
    started: float = 0.0
    ended: float = 0.0
    exit_code: int | None = None
    error: str = ""
    gn3_id: str = ""
    read_token: str = ""  # lets a shared page link read this one job, and nothing else
    result: dict[str, Any] = field(default_factory=dict)


_JSON_TYPES = (list, dict)


_NAMES: dict[type[Any], tuple[str, ...]] = {}


def _names(cls: type[Any]) -> tuple[str, ...]:
    found = _NAMES.get(cls)
    if found is None:
        found = _NAMES[cls] = tuple(f.name for f in fields(cls))
    return found


def to_hash(obj: Task | Job) -> dict[str, str]:
    """Flatten a dataclass to string fields; containers become JSON."""
    out: dict[str, str] = {}
    for key in _names(type(obj)):
        value = getattr(obj, key)  # not asdict(): it deep-copies every list and dict
        if isinstance(value, _JSON_TYPES):
            # most are empty: their text without json's encoder set up (a job's pieces)
            out[key] = json.dumps(value) if value else "[]" if isinstance(value, list) else "{}"
        elif value is None:
            out[key] = ""
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        else:
            out[key] = str(value)
    return out


_ENUMS = {"TaskStatus": TaskStatus, "JobStatus": JobStatus}


def _decoder(kind: str) -> Callable[[str], Any]:
    """How a field of this declared type is read back from its string."""
    if kind in _ENUMS:
        return _ENUMS[kind]
    if "list" in kind or "dict" in kind:
        empty: Callable[[], Any] = list if "list" in kind else dict
        return lambda raw: json.loads(raw) if raw else empty()
    if kind == "bool":
        return lambda raw: raw == "1"
    if "int" in kind:
        return lambda raw: int(raw) if raw != "" else None
    if "float" in kind:
        return lambda raw: float(raw) if raw else 0.0
    return str


_DECODERS: dict[type[Any], dict[str, Callable[[str], Any]]] = {}


def _decoders(cls: type[Any]) -> dict[str, Callable[[str], Any]]:
    found = _DECODERS.get(cls)
    if found is None:
        found = _DECODERS[cls] = {f.name: _decoder(str(f.type)) for f in fields(cls)}
    return found


def from_hash(cls: type[Any], raw: dict[bytes, bytes] | dict[str, str]) -> Any:
    """Rebuild a Task or Job from its Redis hash (unknown fields are ignored)."""
    decoders = _decoders(cls)
    kwargs = {}
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else k
        decode = decoders.get(name)
        if decode is not None:
            kwargs[name] = decode(v.decode() if isinstance(v, bytes) else v)
    return cls(**kwargs)
