"""A `map` request becomes a job: one task per chunk of items, then one gather task.

Chunk tasks are always published through the cache (their records and files come
back whole or not at all); without `--cache` each carries the job id, so nothing is
shared with another run. With it, a chunk's id is the hash of its command, items and
staged files' contents, so a rerun computes only new or changed items.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, jobs
from ..cache import Cache
from ..config import Settings
from ..errors import FieldError, InputError
from ..models import ArgvItem, Job, Task
from .items import Item, check_template, placeholders, render, staged_paths

STEP = "sheepdog.mapping.step"
INLINE_SPEC = 64 * 1024  # bytes: a longer chunk spec travels as a staged file
MAX_CHUNK = 100_000
MANY = 16  # items in a chunk from which it runs as a process of its own (step.py)
# Without --chunk, a job's items are packed into about this many pieces (never more than
# AUTO_CHUNK_MAX items each): a piece's bookkeeping (queue entry, claim, heartbeat,
# publish, record) costs ~15 ms of CPU, so 10,000 tiny items as 10,000 pieces spend 20x
# more on sheepdog than on the items. 200 pieces still keep far more slots busy than
# this project's clusters have, and up to 200 items nothing changes.
AUTO_PIECES = 200
AUTO_CHUNK_MAX = 1000


@dataclass
class MapRequest:
    """What `sheepdog map` (or POST /jobs with workflow map) asked for."""

    template: list[str]
    items: list[Item]
    files: bool = False  # --files: each item is a file, staged by content
    columns: list[str] | None = None
    chunk: int | None = None  # items per piece; None: chunk_size() decides
    cache: bool = False
    timeout: float = 0.0
    checks: list[str] = field(default_factory=list)
    max_failures: str = ""  # "N" or "P%"
    straggler_after: float = 0.0  # s; 0: never start a slow piece twice
    cwd: str = ""  # where items run on this machine (local backend); "" = their own dir
    env: dict[str, str] = field(default_factory=dict)
    # False (-N0): a command without placeholders runs as it is, not with the item last
    append: bool = True
    source: str = ""  # where the items came from, for the job's record
    backend: str = "local"
    host: str = ""
    queue: str = ""


def failure_limit(spec: str, total: int) -> int | None:
    """`--max-failures N|P%` as a count of items (None: no limit)."""
    if not spec:
        return None
    text = spec.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return int(total * share / 100)
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise InputError("--max-failures", f"{spec!r} is not a count (N) or a share "
                         "(P%)") from None


def _program_hash(template: list[str], cwd: str) -> str:
    """A local program named by path is part of what an item computes: its content
    goes into the cache key, so editing ./score.sh recomputes."""
    program = template[0]
    if "/" not in program or "{" in program:
        return ""
    path = Path(cwd or ".") / program
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _stages(request: MapRequest) -> bool:
    """Whether items stage files (--files, {file:COL}): most do not, and 100,000 items
    need not be asked one by one."""
    return request.files or any(p.startswith("file:") for p in placeholders(request.template))


def _item_specs(request: MapRequest, chunk: list[Item], cache: Cache,
                inputs: dict[str, str]) -> list[dict[str, Any]]:
    """Each item's key and argv; the files it stages go into `inputs` as N/NAME."""
    specs = []
    stages = _stages(request)
    for n, item in enumerate(chunk):
        paths = staged_paths(request.template, item, request.files) if stages else {}
        names = {name: f"{n}/{name}" for name in paths}
        for name, path in paths.items():
            inputs[names[name]] = cache.put_file(Path(path))
        parts = [[{"input": names[p["input"]]} if isinstance(p, dict) else p for p in arg]
                 for arg in render(request.template, item, set(names))]
        specs.append({"key": item.key, "argv": parts})
    return specs


def _chunk_task(request: MapRequest, chunk: list[Item], settings: Settings, cache: Cache,
                nonce: str, environment: str, queue: str) -> Task:
    inputs: dict[str, str] = {}
    specs = _item_specs(request, chunk, cache, inputs)
    spec = json.dumps({"items": specs, "timeout": request.timeout, "env": request.env,
                       "nonce": nonce}, separators=(",", ":"), sort_keys=True)
    argv: list[ArgvItem] = [{"python": True}, "-m", STEP,
                            "run-many" if len(chunk) >= MANY else "run"]
    if len(spec) <= INLINE_SPEC:
        argv.append(spec)
    else:
        inputs["spec"] = cache.put_bytes(spec.encode())
        argv.append({"input": "spec"})
    if request.cwd and request.backend == "local":
        argv += ["--cwd", request.cwd]
    for name in sorted(n for n in inputs if n != "spec"):
        argv += ["--input", name, {"input": name}]
    first, last = chunk[0], chunk[-1]
    name = f"item {first.key}" if len(chunk) == 1 else f"items {first.index}-{last.index}"
    return Task(name=name[:120], argv=argv, inputs=inputs, outputs=["results.jsonl"],
                environment=environment, max_attempts=settings.max_attempts,
                backend=request.backend, host=request.host, queue=queue)


def _gather_argv(checks: list[str], tasks: list[Task]) -> list[ArgvItem]:
    argv: list[ArgvItem] = [{"python": True}, "-m", STEP, "gather"]
    for name in checks:
        argv += ["--check", name]
    argv.append({"input": "index"})
    return argv + [{"dep": t.id, "file": ""} for t in tasks]


def chunk_size(request: MapRequest) -> int:
    """Items per piece: as asked, else one per piece up to AUTO_PIECES items and packed
    beyond. With --cache each item stays a piece of its own, so a rerun computes only
    the items that changed (a chunk is cached as a whole)."""
    if request.chunk is not None:
        return request.chunk
    if request.cache:
        return 1
    return min(AUTO_CHUNK_MAX, math.ceil(len(request.items) / AUTO_PIECES))


def check(request: MapRequest) -> None:
    """Everything that can be refused before anything runs."""
    if not request.items:
        raise InputError("items", "no items to run")
    if request.chunk is not None and not 1 <= request.chunk <= MAX_CHUNK:
        raise InputError("--chunk", f"must be between 1 and {MAX_CHUNK:,d}")
    if request.timeout < 0:
        raise InputError("--timeout", "must be 0 (none) or more seconds")
    if request.straggler_after < 0:
        raise InputError("--straggler-after", "must be 0 (never) or more seconds")
    check_template(request.template, request.columns, request.files, request.append)
    failure_limit(request.max_failures, len(request.items))
    if not _stages(request):
        return
    for item in request.items:
        for name, path in staged_paths(request.template, item, request.files).items():
            if not Path(path).is_file():
                raise item.error(f"{{{name}}}: no such file {path!r}")


def build_job(request: MapRequest, settings: Settings, cache: Cache,
              reuse: dict[int, str] | None = None) -> tuple[Job, list[Task]]:
    """The job and its tasks. `reuse` maps chunk numbers to finished tasks of an earlier
    job (`--retry-failed`): their records stand, only the other chunks run."""
    check(request)
    jobs.check_backend(request.backend, request.host)
    job_id = jobs.new_job_id()
    queue = request.queue or settings.queue
    environment = json.dumps({"sheepdog": __version__, "map": 1,
                              "program": _program_hash(request.template, request.cwd),
                              "cwd": request.cwd if request.cwd else ""}, sort_keys=True)
    nonce = "" if request.cache else job_id
    tasks: list[Task] = []
    chunks: list[list[int]] = []
    size = chunk_size(request)
    for start in range(0, len(request.items), size):
        chunk = request.items[start:start + size]
        chunks.append(list(range(start, start + len(chunk))))
        tasks.append(_chunk_task(request, chunk, settings, cache, nonce, environment, queue))
    index = {"keys": [i.key for i in request.items],
             "indices": [i.index for i in request.items], "chunks": chunks}
    index_sha = cache.put_bytes(json.dumps(index, separators=(",", ":")).encode())
    gather_argv = _gather_argv(request.checks, tasks)
    gather = Task(name="gather", speaks_for_job=True, argv=gather_argv, inputs={"index": index_sha},
                  deps=[t.id for t in tasks], outputs=["summary.json"],
                  environment=environment + nonce, max_attempts=settings.max_attempts,
                  queue=queue)
    params: dict[str, Any] = {
        "index": index_sha, "items": len(request.items), "chunk": size,
        "chunk_auto": request.chunk is None,
        "chunks": len(tasks), "checks": request.checks, "cache": request.cache,
        "max_failures": request.max_failures, "source": request.source,
        "template": request.template, "timeout": request.timeout,
        "straggler_after": request.straggler_after, "append": request.append}
    job = Job(id=job_id, workflow="map", command=list(request.template), params=params,
              backend=request.backend, host=request.host, queue=queue, final_task=gather.id)
    return job, [*tasks, gather]


def _one_item_task(old: Task, n: int, nonce: str, cache: Cache) -> Task:
    """A piece that runs item n of an old chunk again (a fresh id: it must run)."""
    spec_arg = old.argv[4]
    text = (cache.blob(old.inputs["spec"]).read_text(encoding="utf-8")
            if isinstance(spec_arg, dict) else spec_arg)
    spec = json.loads(text)
    entry = spec["items"][n]
    prefix = f"{n}/"
    inputs = {f"0/{name[len(prefix):]}": sha for name, sha in old.inputs.items()
              if name.startswith(prefix)}
    argv_parts = [[{"input": "0/" + p["input"][len(prefix):]} if isinstance(p, dict) else p
                   for p in arg] for arg in entry["argv"]]
    new_spec = json.dumps({**spec, "items": [{**entry, "argv": argv_parts}], "nonce": nonce},
                          separators=(",", ":"), sort_keys=True)
    argv: list[ArgvItem] = [{"python": True}, "-m", STEP, "run"]
    if len(new_spec) <= INLINE_SPEC:
        argv.append(new_spec)
    else:
        inputs["spec"] = cache.put_bytes(new_spec.encode())
        argv.append({"input": "spec"})
    rest = old.argv[5:]
    while rest[:1] == ["--cwd"]:
        argv += rest[:2]
        rest = rest[2:]
    for name in sorted(n for n in inputs if n != "spec"):
        argv += ["--input", name, {"input": name}]
    return Task(name=f"item {entry['key']}"[:120], argv=argv, inputs=inputs,
                outputs=list(old.outputs), environment=old.environment,
                max_attempts=old.max_attempts, backend=old.backend, host=old.host,
                queue=old.queue)


def retry_job(conn: Any, settings: Settings, cache: Cache, old: Job, backend: str = "",
              host: str = "", queue: str = "") -> tuple[Job, list[Task]]:
    """A job over the same items as `old` that runs again only those that did not
    succeed; the others' records are reused as they are."""
    from .results import load_index, retry_plan

    index = load_index(settings, old)
    kept, kept_chunks, again = retry_plan(conn, settings, old)
    if not again:
        raise InputError("--retry-failed", f"every item of job {old.id} succeeded; "
                         "nothing to run again")
    job_id = jobs.new_job_id()
    fresh: list[Task] = []
    chunks = list(kept_chunks)
    for position, old_task in again:
        positions = index.raw["chunks"][index.owner[position]]
        n = positions.index(position)
        task = _one_item_task(old_task, n, job_id, cache)
        if backend:
            task.backend, task.host = backend, host
        if queue:
            task.queue = queue
        task.id = task.content_id()
        fresh.append(task)
        chunks.append([position])
    tasks = kept + fresh
    new_index = {**index.raw, "chunks": chunks}
    index_sha = cache.put_bytes(json.dumps(new_index, separators=(",", ":")).encode())
    gather_argv = _gather_argv(list(old.params.get("checks", [])), tasks)
    q = queue or old.queue
    gather = Task(name="gather", speaks_for_job=True, argv=gather_argv, inputs={"index": index_sha},
                  deps=[t.id for t in tasks], outputs=["summary.json"],
                  environment=f"map retry {job_id}", max_attempts=settings.max_attempts,
                  queue=q)
    params = {**old.params, "index": index_sha, "chunks": len(tasks), "retry_of": old.id}
    job = Job(id=job_id, workflow="map", command=list(old.command), params=params,
              backend=backend or old.backend, host=host or old.host, queue=q,
              final_task=gather.id)
    return job, [*tasks, gather]


def spec_cwd(given: str | None) -> str:
    """Where items run locally: the directory the user ran `sheepdog map` in."""
    return os.path.abspath(given) if given else os.getcwd()


def field_error(e: InputError, prefix: str = "") -> FieldError:
    """An input problem as the REST field it came from."""
    return FieldError(prefix + e.where if not e.where.startswith("/") else "items", e.problem)
