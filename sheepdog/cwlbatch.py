"""Many invocations of one CWL tool as one piece, built where they run: a scatter's
elements, ready at once, go to the workers in a few chunks (one per core serving the
queue) instead of one piece each. The runner hands each chunk the tool as cwltool
resolved it and the elements' input objects; the chunk (`python -m sheepdog.cwlbatch
SPEC`) builds each invocation with cwltool, runs it, collects its outputs, and writes the
output objects back; the runner gives them to cwltool's workflow as if it had run them.
Only where the chunk shares the runner's disk (local workers, in place), only for tools
whose every requirement means the same on the worker (no containers, no resources to
reserve, no in-place updates, no secrets, no formats to check against ontologies)."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from .models import Task, TaskStatus


class Pieces(Protocol):
    """Where chunks go (sheepdog.cwlrun.Pieces: the run's open job)."""

    def cores(self) -> int: ...

    def piece(self, task: Task) -> Task: ...


# requirements a chunk honours exactly as the runner's own cwltool would
_SAME_ON_WORKER = {
    "InlineJavascriptRequirement", "SchemaDefRequirement", "ShellCommandRequirement",
    "EnvVarRequirement", "InitialWorkDirRequirement", "LoadListingRequirement",
    "NetworkAccess", "WorkReuse", "ToolTimeLimit", "StepInputExpressionRequirement",
    "ScatterFeatureRequirement", "MultipleInputFeatureRequirement",
    "SubworkflowFeatureRequirement", "InplaceUpdateRequirement"}
_RESULT = "result.json"


def batchable(tool: Any, context: Any) -> bool:
    """Whether `tool`'s invocations may be built on a worker: every requirement in
    _SAME_ON_WORKER (an in-place update only when off), no input format to check, and
    nothing of the run that lives only in the runner (cwltool's cache, provenance)."""
    for req in [*tool.requirements, *tool.hints]:
        if req.get("class") not in _SAME_ON_WORKER:
            return False
        if req.get("class") == "InplaceUpdateRequirement" and req.get("inplaceUpdate"):
            return False
    if any("format" in port for port in tool.tool.get("inputs", [])):
        return False
    return not (getattr(context, "cachedir", None) or getattr(context, "research_obj", None)
                or "$schemas" in tool.metadata)


class Deferred:
    """An invocation cwltool asked for, not built yet."""

    def __init__(self, tool: Any, order: Any, callback: Callable[..., None],
                 context: Any) -> None:
        self.tool, self.order, self.callback, self.context = tool, order, callback, context
        self.name = ""  # cwltool's name for it, given when it is sent in a chunk

    def built(self) -> Iterator[Any]:
        """cwltool's own job for it, built here (the invocation runs as its own piece)."""
        return self.tool.built(self.order, self.callback, self.context)


def threads(cores: int) -> dict[str, str]:
    """What tells a tool's threading libraries how many cores its piece was given (at
    least the one every invocation holds), as batch schedulers advise: an OpenBLAS left
    to itself starts a thread per core of the host and spins them, which cost GEMMA's
    small kinship runs twice the CPU here. A tool's own EnvVarRequirement wins."""
    count = str(max(1, cores))
    return {name: count for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS")}


def chunks(group: list[Deferred], cores: int, fewest: int) -> list[list[Deferred]]:
    """`group`, in order, in at most `cores` chunks of about equal size, and no more
    chunks than it has `fewest`s (10 in at most 4 from 3: three, of 4, 4 and 2)."""
    count = max(1, min(cores, len(group) // max(1, fewest)))
    size = math.ceil(len(group) / count)
    return [group[i:i + size] for i in range(0, len(group), size)]


def _context(context: Any) -> dict[str, Any]:
    """What of the runner's RuntimeContext a chunk takes: its plain settings."""
    def plain(v: Any) -> bool:
        return v is None or isinstance(v, (str, int, float, bool)) or (
            isinstance(v, list) and all(isinstance(i, str) for i in v))
    return {k: v for k, v in vars(context).items() if plain(v)}


class Batches:
    """The invocations a run's executor deferred, sent as chunks when cwltool has nothing
    more to hand over; a thread per chunk waits for its piece and answers cwltool."""

    def __init__(self, pieces: Pieces, fewest: int, executor: Any) -> None:
        self.pieces, self.fewest, self.executor = pieces, fewest, executor
        self.pending: dict[int, list[Deferred]] = {}
        self.outstanding = 0  # chunks sent, not answered (changed under cwltool's lock)

    def add(self, deferred: Deferred) -> None:
        self.pending.setdefault(id(deferred.tool), []).append(deferred)

    def flush(self, one: Callable[[Deferred], None], lock: Any) -> None:
        """Send what is pending: a tool's invocations as chunks when there are at least
        `fewest` (and batching is on), else each through `one`."""
        groups, self.pending = list(self.pending.values()), {}
        for group in groups:
            if self.fewest <= 0 or len(group) < self.fewest:
                for deferred in group:
                    one(deferred)
                continue
            from cwltool.process import uniquename
            for deferred in group:  # named here, in order, as the runner's cwltool would
                deferred.name = uniquename(deferred.context.name or "job")
            for number, chunk in enumerate(chunks(group, self.pieces.cores(), self.fewest)):
                self.outstanding += 1
                threading.Thread(target=self._run, args=(chunk, number + 1, lock),
                                 name="cwl-chunk", daemon=True).start()

    def _run(self, chunk: list[Deferred], number: int, lock: Any) -> None:
        answers: list[tuple[Any, str]] = [({}, "permanentFail")] * len(chunk)
        try:
            answers = self._chunk(chunk, number)
        except Exception as e:  # noqa: BLE001  (a chunk that could not be sent or read)
            print(f"sheepdog: a chunk of {len(chunk)} invocations failed: {e}",
                  file=sys.stderr)
        with lock:
            try:
                for deferred, (out, status) in zip(chunk, answers, strict=True):
                    deferred.callback(out, status)
            except Exception as e:  # noqa: BLE001  (cwltool's own: it ends the run)
                from cwltool.errors import WorkflowException
                self.executor.exceptions.append(
                    e if isinstance(e, WorkflowException) else WorkflowException(str(e)))
            finally:
                self.outstanding -= 1
                lock.notify_all()

    def _chunk(self, chunk: list[Deferred], number: int) -> list[tuple[Any, str]]:
        import cwltool.process
        from cwltool.utils import create_tmp_dir

        first = chunk[0]
        here = create_tmp_dir(first.context.tmp_outdir_prefix)
        self.executor.output_dirs.add(here)  # cwltool moves the outputs out, then removes it
        spec = {
            "tool": {**first.tool.tool, "requirements": first.tool.requirements,
                     "hints": first.tool.hints},
            "metadata": first.tool.metadata,
            "schemas": [cwltool.process.SCHEMA_FILE, cwltool.process.SCHEMA_DIR,
                        cwltool.process.SCHEMA_ANY],
            "context": _context(first.context),
            "resources": [self.executor.max_cores, self.executor.max_ram],
            "log_level": _level(),
            "orders": [[d.name, d.order] for d in chunk]}
        # pickled: cwltool reads the line and column of a tool's parts (ruamel's), which
        # JSON loses; the file is the runner's, in its own 0700 directory, read by this
        # user's workers on this machine (the only ones that share its disk)
        spec_path = Path(here, "spec.pickle")
        spec_path.write_bytes(pickle.dumps(spec))
        name = str(first.context.name or "tool")
        task = Task(name=f"{name}_{number}", argv=[sys.executable, "-m", "sheepdog.cwlbatch",
                                                  str(spec_path)],
                    cacheable=False, cwd=here, env=_environment(first.context), clean_env=True,
                    max_attempts=1, nonce=uuid.uuid4().hex)
        found = self.pieces.piece(task)
        if found.status != TaskStatus.SUCCESS:
            raise RuntimeError(found.error or f"its piece ended {found.status.value}")
        result = json.loads(Path(here, _RESULT).read_text())
        log = logging.getLogger("cwltool")
        for level, line in result["said"]:  # what cwltool said there, said here too
            log.log(level, "%s", line)
        return [(out, status) for out, status in result["answers"]]


def _environment(context: Any) -> dict[str, str]:
    """What of the runner's environment a chunk gets: what cwltool passes a tool from
    it (PATH, the variables it is told to keep, or all of them) and what Python needs to
    start; not the rest (the piece's record keeps its environment)."""
    if getattr(context, "preserve_entire_environment", False):
        return dict(os.environ)
    names = {"PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TZ",
             *(getattr(context, "preserve_environment", None) or [])}
    return {k: v for k, v in os.environ.items() if k in names}


def _level() -> int:
    """The level of what cwltool's log says here (--quiet sets its handler's, not its
    logger's)."""
    log = logging.getLogger("cwltool")
    return max([log.getEffectiveLevel(), *(h.level for h in log.handlers)])


class _Batching:
    """What sheepdog changes in cwltool's parallel executor (a mixin: cwltool is
    imported only when a CWL run starts)."""

    batches: Batches
    exceptions: list[Any]
    output_dirs: set[str]
    taskqueue: Any
    max_cores: float
    run_job: Callable[[Any, Any], None]
    wait_for_next_completion: Callable[[Any], None]
    output_callback: Callable[[Any, str], None]

    def execute(self, process: Any, job_order_object: Any, runtime_context: Any,
                logger: Any = None) -> Any:
        return super().execute(  # type: ignore[misc]
            process, plain(job_order_object), runtime_context, *([logger] if logger else []))

    def _one(self, deferred: Deferred, context: Any) -> None:
        from cwltool.errors import WorkflowException

        try:
            for job in deferred.built():
                self._started(job, context)
        except WorkflowException as e:
            logging.getLogger("cwltool").error("Cannot make job: %s", e)
            deferred.callback({}, "permanentFail")

    def _started(self, job: Any, context: Any) -> None:
        from cwltool.job import JobBase

        if isinstance(job, JobBase):
            job.builder = context.builder or job.builder
            if job.outdir is not None:
                self.output_dirs.add(job.outdir)
        self.run_job(job, context)

    def _busy(self) -> bool:
        return self.taskqueue.in_flight > 0 or self.batches.outstanding > 0

    def run_jobs(self, process: Any, job_order_object: Any, logger: Any,
                 runtime_context: Any) -> None:
        # cwltool's own loop (MultithreadedJobExecutor.run_jobs), deferred invocations
        # kept until it has nothing more to hand over
        from cwltool.errors import WorkflowException
        from cwltool.task_queue import TaskQueue

        self.taskqueue = TaskQueue(threading.Lock(), int(math.ceil(self.max_cores)))
        lock = runtime_context.workflow_eval_lock
        if lock is None:
            raise WorkflowException("runtimeContext.workflow_eval_lock must not be None")
        try:
            jobs = process.job(job_order_object, self.output_callback,
                               runtime_context)
            lock.acquire()
            self._hand_over(jobs, runtime_context, lock, logger)
            self.run_job(None, runtime_context)
            while self._busy():
                self.wait_for_next_completion(runtime_context)
                self.run_job(None, runtime_context)
            lock.release()
        finally:
            self.taskqueue.drain()
            self.taskqueue.join()

    def _hand_over(self, jobs: Any, context: Any, lock: Any, logger: Any) -> None:
        for job in jobs:
            if isinstance(job, Deferred):
                self.batches.add(job)
                continue
            self._started(job, context)
            if job is None:
                self.batches.flush(lambda d: self._one(d, context), lock)
                if not self._busy():
                    logger.error("Workflow cannot make any more progress.")
                    break
                self.wait_for_next_completion(context)
        self.batches.flush(lambda d: self._one(d, context), lock)


def executor(max_parallel: int, pieces: Pieces, fewest: int) -> Any:
    """cwltool's parallel executor, with the invocations a tool deferred batched."""
    from cwltool.executors import MultithreadedJobExecutor

    made: Any = type("Batching", (_Batching, MultithreadedJobExecutor), {})(
        max_parallel=max_parallel)
    made.batches = Batches(pieces, fewest, made)
    return made


def plain(value: Any) -> Any:
    """A job order with its long arrays as plain lists: cwltool deep-copies the order
    several times, and a long array of ruamel's (with every element's line and column)
    took most of a 1,000-element scatter's time here. Short ones keep their positions
    for error messages."""
    if isinstance(value, list) and len(value) > 64:
        return json.loads(json.dumps(value))
    if isinstance(value, list):
        for index, item in enumerate(value):
            value[index] = plain(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            value[key] = plain(item)
    return value


def _answer(got: list[tuple[Any, str]], out: Any, status: str) -> None:
    got.append((out, status))


class _Said(logging.Handler):
    """What cwltool warns of in a chunk, for the runner to say where the user reads."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def run_chunk(spec: dict[str, Any], here: Path) -> dict[str, Any]:
    """On the worker: each element built by cwltool, run, and its outputs collected;
    (output object, status) for each, in order, and what cwltool warned of."""
    import cwltool.job
    import cwltool.process
    from cwltool.command_line_tool import CommandLineTool
    from cwltool.context import LoadingContext, RuntimeContext
    from cwltool.errors import WorkflowException
    from cwltool.executors import MultithreadedJobExecutor
    from cwltool.mutation import MutationManager

    log = logging.getLogger("cwltool")
    log.setLevel(int(spec["log_level"]))
    said = _Said(int(spec["log_level"]))
    log.addHandler(said)
    started = cwltool.job._job_popen

    def popen(commands: Any, **named: Any) -> int:
        named["env"] = {**threads(1), **named["env"]}  # a piece's tool, told its one core
        # and not watched for its memory each 0.1 s (a thread per invocation, 0.8 ms of
        # CPU each here): as on the in-place path, the worker holds the process
        named["monitor_function"] = None
        return int(started(commands, **named))

    cwltool.job._job_popen = popen  # type: ignore[assignment]
    # the schema a tool is checked with, as the runner loaded it (no second loading)
    (cwltool.process.SCHEMA_FILE, cwltool.process.SCHEMA_DIR,
     cwltool.process.SCHEMA_ANY) = spec["schemas"]
    loading = LoadingContext()
    loading.metadata = spec["metadata"]
    tool = CommandLineTool(spec["tool"], loading)  # checked by the runner already
    context = RuntimeContext(spec["context"])
    context.tmp_outdir_prefix = f"{here}/out"
    context.tmpdir_prefix = f"{here}/tmp"
    context.mutation_manager = MutationManager()
    context.workflow_eval_lock = threading.Condition(threading.RLock())
    limits = MultithreadedJobExecutor()
    limits.max_cores, limits.max_ram = spec["resources"]
    context.select_resources = limits.select_resources
    answers: list[tuple[Any, str]] = []
    for name, order in spec["orders"]:
        got: list[tuple[Any, str]] = []
        context.name = name
        try:
            for job in tool.job(order, functools.partial(_answer, got), context):
                if job is not None:
                    job.run(context)
        except WorkflowException as e:
            log.error("Cannot make job: %s", e)
        answers.append(got[0] if got else ({}, "permanentFail"))
    return {"answers": answers, "said": said.lines}


def main(argv: list[str] | None = None) -> int:
    """`python -m sheepdog.cwlbatch SPEC`: a chunk's answers beside its spec."""
    spec_path = Path((argv if argv is not None else sys.argv[1:])[0])
    here = spec_path.parent
    answers = run_chunk(pickle.loads(spec_path.read_bytes()), here)  # noqa: S301 (see _chunk)
    with tempfile.NamedTemporaryFile("w", dir=here, delete=False) as part:
        json.dump(answers, part)
    os.replace(part.name, here / _RESULT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
