"""CWL through sheepdog: cwltool, used as a library, loads and validates the process,
evaluates its expressions and builds each tool invocation's command line; every
invocation then runs as a piece of one open sheepdog job, by the workers of its queue
(the local backend: the files are on this machine's disk), as many at once as they
take (cwltool's parallel executor hands them over as their inputs are ready); many of
one tool ready at once (a scatter) go in chunks built on the workers (sheepdog.cwlbatch).
`sheepdog-cwl-runner` has cwl-runner's command line (cwltool's own: --outdir, --quiet,
PROCESS [JOB]; the output object on stdout; exit 0, 1, or 33 for an unsupported
requirement), so cwltest runs the conformance suite on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from . import cwlbatch, jobs, liveness, logs, store
from .cache import Cache
from .config import Settings, load
from .connection import connect
from .cwlstep import ROOT
from .defaults import (
    CWL_LISTEN_MS,
    CWL_LOOK_AGAIN,
    CWL_REMOTE_CORES,
    CWL_REMOTE_RAM_MB,
    EXECUTOR_STOP_WAIT,
)
from .errors import ConfigError, SheepdogError
from .models import Job, JobStatus, Task, TaskStatus
from .pool import Pool, unserved
from .registration import live_workers

# The piece's program, its redirections applied first: a fixed script, everything the
# tool gives as its positional parameters (never part of the script's text).
_REDIRECT = ('in=$1 out=$2 err=$3; shift 3; '
             '[ -z "$in" ] || exec <"$in"; [ -z "$out" ] || exec >"$out"; '
             '[ -z "$err" ] || exec 2>"$err"; exec "$@"')
_NOT_RUN = 127  # what a shell says of a program it could not start


class Staging:
    """One invocation written for a host without the runner's disk (sheepdog.cwlstep):
    every local path it names under ROOT, every file it reads by content. The names
    under ROOT come from contents only, so the same invocation has the same piece id
    in every run (cwltool's own directories are new temporary ones each time)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.roots: dict[str, str] = {}  # local directory -> its place under ROOT
        self.files: dict[str, tuple[str, bool]] = {}  # path under ROOT -> (sha, writable)
        self.dirs: set[str] = set()

    def path(self, text: str) -> str:
        """`text` with every local root it names moved under ROOT (a shell command line
        names them among other words: a root is a root wherever a file name's own
        characters do not go on after it)."""
        for local in sorted(self.roots, key=len, reverse=True):
            if local in text:
                text = re.sub(re.escape(local) + r"(?![\w.-])", self.roots[local], text)
        return text

    def tree(self, local: str, rel: str, writable: bool) -> None:
        """A file, or a directory's files (links followed) and empty directories, as rel."""
        if not os.path.isdir(local):
            self.files[rel] = (self.cache.put_file(Path(local)), writable)
            return
        self.dirs.add(rel)
        for here, dirs, names in os.walk(local, followlinks=True):
            sub = os.path.normpath(os.path.join(rel, os.path.relpath(here, local)))
            self.dirs.update(f"{sub}/{d}" for d in dirs)
            for name in names:
                self.files[f"{sub}/{name}"] = (
                    self.cache.put_file(Path(here, name)), writable)

    def inputs(self, pathmapper: Any, outdir: str) -> None:
        """The files cwltool mapped for the tool: each directory they sit in becomes one
        directory under ROOT/in, named by what it holds (a file's secondary files stay
        beside it); those in the output directory go with it."""
        groups: dict[str, list[tuple[str, str, bool]]] = {}
        done: list[str] = [outdir]
        for _, ent in sorted(pathmapper.items(), key=lambda kv: kv[1].target):
            target = ent.target
            if ent.type.startswith("Create") or target in done or any(
                    target.startswith(d + "/") for d in done):
                continue  # literal contents are staged in the outdir; a listed child is in
            source = ent.resolved[7:] if ent.resolved.startswith("file://") else ent.resolved
            source = source if os.path.exists(source) else target
            if os.path.exists(source):
                groups.setdefault(os.path.dirname(target), []).append(
                    (os.path.basename(target), source, ent.type.startswith("Writable")))
                done.append(target)
        for parent, members in groups.items():
            group = Staging(self.cache)
            for name, source, writable in members:
                group.tree(source, name, writable)
            named = json.dumps([sorted(group.files.items()), sorted(group.dirs)])
            root = f"in/{hashlib.sha256(named.encode()).hexdigest()[:16]}"
            self.roots[parent] = f"{ROOT}/{root}"
            self.files.update({f"{root}/{k}": v for k, v in group.files.items()})
            self.dirs.update(f"{root}/{d}" for d in group.dirs)

    def place(self, outdir: str, tmpdir: str, job: Any) -> None:
        """An invocation's directories under ROOT, and the files it reads: its inputs
        and what cwltool put in its output directory (InitialWorkDir)."""
        self.roots[outdir] = f"{ROOT}/out"
        if tmpdir:
            self.roots[tmpdir] = f"{ROOT}/tmp"
        pathmapper = getattr(job, "pathmapper", None)
        if pathmapper is not None:
            self.inputs(pathmapper, outdir)
        self.tree(outdir, "out", True)

    def spec(self) -> tuple[list[list[Any]], list[str], list[str]]:
        """(files as [path, blob index, writable], directories, blob shas), in order."""
        shas = sorted({sha for sha, _ in self.files.values()})
        index = {sha: i for i, sha in enumerate(shas)}
        files = [[rel, index[sha], writable] for rel, (sha, writable)
                 in sorted(self.files.items())]
        return files, sorted(self.dirs - {"out"}), shas


# what a staged piece's result depends on beyond its inputs: the step that runs it
_STEP_VERSION = "cwlstep " + hashlib.sha256(
    Path(__file__).with_name("cwlstep.py").read_bytes()).hexdigest()[:16]


def staged_task(cache: Cache, name: str, argv: list[str], cwd: str,
                env: MutableMapping[str, str], redirect: list[str | None], job: Any,
                timelimit: int | None) -> tuple[Task, dict[str, str]]:
    """The invocation as a content-addressed piece running sheepdog.cwlstep (the same
    tool on the same inputs has the same id wherever the run is: its cache is shared),
    and where its paths under ROOT are here."""
    staging = Staging(cache)
    staging.place(cwd, env.get("TMPDIR") or str(getattr(job, "tmpdir", "") or ""), job)
    files, dirs, shas = staging.spec()
    stdin, stdout, stderr = (staging.path(r) if r else None for r in redirect)
    spec: dict[str, Any] = {
        "argv": [staging.path(a) for a in argv],
        "stdin": stdin, "stdout": stdout, "stderr": stderr,
        "env": {k: staging.path(v) for k, v in sorted(env.items()) if k != "PATH"},
        "files": files, "dirs": dirs, **_codes(job),
        # a piece another run shares ends as that run's did: with the same time limit
        "timelimit": timelimit or 0}
    if not reused(job):  # CWL's WorkReuse: computed again, never shared or from the cache
        spec["again"] = uuid.uuid4().hex
    blobs: list[Any] = [{"input": str(i)} for i in range(len(shas))]
    task = Task(name=name, argv=[{"python": True}, "-m", "sheepdog.cwlstep", {"out": "code"},
                                 json.dumps(spec, sort_keys=True), *blobs],
                inputs={str(i): sha for i, sha in enumerate(shas)},
                outputs=["code"], environment=_STEP_VERSION, timeout=float(timelimit or 0))
    return task, {root: local for local, root in staging.roots.items()}


def _codes(job: Any) -> dict[str, list[int]]:
    """The tool's exit codes as cwltool reads them: which are a success, which a failure."""
    fail = [*getattr(job, "temporaryFailCodes", []), *getattr(job, "permanentFailCodes", [])]
    return {"success": sorted(getattr(job, "successCodes", None) or []), "fail": sorted(fail)}


def reused(job: Any) -> bool:
    """False when the tool says WorkReuse enableReuse: false (maybe an expression)."""
    builder: Any = getattr(job, "builder", None)
    for req in [*getattr(builder, "requirements", []), *getattr(builder, "hints", [])]:
        if req.get("class") == "WorkReuse":
            enable = req.get("enableReuse", True)
            return bool(builder.do_eval(enable) if isinstance(enable, str) else enable)
    return True


def asked(job: Any) -> tuple[int, int]:
    """(cores, MiB of memory) a tool's ResourceRequirement asks for, as cwltool worked
    them out; (0, 0) without one (a worker's one slot, the cluster's defaults)."""
    builder = getattr(job, "builder", None)
    if builder is None or not any(r.get("class") == "ResourceRequirement"
                                  for r in [*builder.requirements, *builder.hints]):
        return 0, 0
    resources = builder.resources
    return math.ceil(float(resources.get("cores") or 0)), math.ceil(
        float(resources.get("ram") or 0))


def bring_back(cache: Cache, task_id: str, cwd: str, roots: dict[str, str]) -> int:
    """A staged invocation's output directory into cwltool's `cwd` (an output object the
    tool wrote names the files here); the tool's exit code."""
    done = cache.task_dir(task_id)
    out = done / "out"
    for here, _, names in os.walk(out):
        dest = Path(cwd) / os.path.relpath(here, out)
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = dest / name
            if target.is_symlink() or target.exists():
                target.unlink()  # a staged link: never write through it into an input
            shutil.copyfile(Path(here) / name, target)
    written = Path(cwd) / "cwl.output.json"
    if (out / "cwl.output.json").is_file():
        text = written.read_text()
        for root in sorted(roots, key=len, reverse=True):
            text = re.sub(re.escape(root) + r"(?![\w.-])", roots[root], text)
        written.write_text(text)
    return int((done / "code").read_text().strip() or 0)


class Pieces:
    """The open job a CWL run's tool invocations join, one piece each."""

    def __init__(self, settings: Settings, process: str, queue: str | None = None,
                 backend: str = "local", host: str = "", stage: bool = False,
                 job_id: str = "") -> None:
        jobs.check_backend(backend, host)
        self.settings = settings
        self.conn = connect(settings)
        self.cache = Cache(settings.cache_dir)
        self.backend, self.host = backend, host
        self.queue = queue or settings.queue
        if job_id:  # a run a POST /jobs started: its job exists, this runner is its piece
            self.job = store.get_job(self.conn, job_id)
            self.queue = self.job.queue
        else:
            self.job = Job(id=jobs.new_job_id(), workflow="cwl", queue=self.queue,
                           command=[process], params={"process": process}, backend=backend,
                           host=host)
            store.submit(self.conn, self.job, [], open_=True, holder=liveness.this_process())
        # in place only where the worker shares this disk: a local worker (a pull worker
        # serving the queue has a disk of its own)
        self.staged = stage or backend != "local" or bool(host) or any(
            w.get("pull") for w in live_workers(self.conn, self.queue))
        self._lock = threading.Lock()
        self._waiting: dict[str, list[threading.Event]] = {}
        self._added: set[str] = set()
        self._closed = threading.Event()
        threading.Thread(target=self._listen, name="cwl-listen", daemon=True).start()
        self._pool = Pool(settings)
        # no worker serves the queue, or only the one slot this runner (a piece) holds:
        # the run brings its own
        if unserved(self.conn, self.queue) or (job_id and self._served_slots() <= 1):
            self._pool.start(1, self.queue, concurrency=os.cpu_count() or 1, quiet="stdout",
                             parent_job=self.job.id)

    def slots(self) -> int:
        """Invocations worth handing over at once: the slots of the workers serving the
        queue now (cwltool's parallel executor would otherwise count this machine's
        cores), at least this machine's cores. More in flight made the run slower here:
        cwltool's threads then contend in this one process, which builds them all."""
        return max(self._served_slots(), os.cpu_count() or 1)

    def cores(self) -> int:
        """The cores serving the queue: on each host, its cores or its workers' slots,
        whichever is fewer."""
        hosts: dict[str, list[int]] = {}
        for w in live_workers(self.conn, self.queue):
            slots = int(str(w.get("concurrency") or 1))
            has = hosts.setdefault(str(w.get("host", "")), [0, 0])
            has[0] = max(has[0], int(str(w.get("cores") or slots)))
            has[1] += slots
        if not hosts:  # the workers this run started have not registered yet
            return os.cpu_count() or 1
        return max(1, sum(min(cores, slots) for cores, slots in hosts.values()))

    def piece(self, task: Task) -> Task:
        """`task` as a piece of the job, on its queue and backend; as it ended."""
        task.queue, task.backend, task.host = self.queue, self.backend, self.host
        return self._wait(task)

    def _served_slots(self) -> int:
        return sum(int(str(w.get("concurrency") or 1))
                   for w in live_workers(self.conn, self.queue))

    def run(self, name: str, argv: list[str], cwd: str, env: MutableMapping[str, str],
            redirect: list[str | None], timelimit: int | None, job: Any = None) -> int:
        """One tool invocation (`redirect`: its stdin, stdout, stderr files) as a piece of
        the job; its exit code once it ended. On this machine's local backend it runs in
        place; elsewhere it is staged by content (sheepdog.cwlstep) and its outputs come
        back into `cwd`."""
        roots: dict[str, str] = {}
        cores, ram_mb = asked(job)
        env = {**cwlbatch.threads(cores), **env}
        if not self.staged:
            task = Task(name=name, argv=["sh", "-c", _REDIRECT, "sh",
                                         *[r or "" for r in redirect], *argv],
                        cacheable=False, cwd=cwd, env=dict(env), clean_env=True,
                        timeout=float(timelimit or 0), max_attempts=1, nonce=uuid.uuid4().hex)
        else:
            task, roots = staged_task(self.cache, name, argv, cwd, env, redirect, job,
                                      timelimit)
        task.cores, task.ram_mb = cores, ram_mb
        found = self.piece(task)
        if found.status == TaskStatus.SUCCESS and task.cacheable:
            return bring_back(self.cache, task.id, cwd, roots)
        if found.exit_code is not None:
            return found.exit_code
        if found.error:
            print(f"sheepdog: {name}: {found.error}", file=sys.stderr)
        return _NOT_RUN

    def _wait(self, task: Task) -> Task:
        """Add the piece (a cached one is done at once) and wait for its end."""
        told = threading.Event()
        with self._lock:
            self._waiting.setdefault(task.id, []).append(told)
            twice = task.id in self._added  # the same invocation again: one piece, one count
            self._added.add(task.id)
        try:
            if not twice:
                store.add_tasks(self.conn, self.job.id, [task], published=self.cache.reused)
            while True:
                found = store.get_task(self.conn, task.id)
                if found is not None and found.status.final:
                    return found
                told.wait(CWL_LOOK_AGAIN)  # a line of its piece, or a look anyway
                told.clear()
        finally:
            with self._lock:
                self._waiting[task.id].remove(told)
                if not self._waiting[task.id]:
                    del self._waiting[task.id]

    def _listen(self) -> None:
        """One reader of the job's log for all the invocations waiting: sheepdog's line
        about a piece (its end writes one; not the tool's own output) wakes the
        invocation waiting for it."""
        cursors = {self.job.id: "0-0"}
        while not self._closed.is_set():
            try:
                lines = logs.tail(self.conn, cursors, block_ms=CWL_LISTEN_MS)
            except Exception:  # noqa: BLE001  (Redis away): the waiting look every second
                time.sleep(CWL_LOOK_AGAIN)
                continue
            with self._lock:
                for _, line in lines:  # sheepdog's own line about a piece: maybe its end
                    if line.stream == "sheepdog":
                        for told in self._waiting.get(line.task, ()):
                            told.set()

    def close(self, code: int) -> None:
        """The run ended with cwltool's exit `code`: the job takes no more pieces, and
        ends in error if the run failed (also before any piece: a process that did not
        validate, an input missing)."""
        self._closed.set()
        try:
            if code != 0:  # before closing: an open job without pieces would succeed
                store.stop_job(self.conn, self.job.id, JobStatus.ERROR,
                               f"the CWL run failed (exit code {code}; its messages are on "
                               "the runner's stderr)")
            store.close_job(self.conn, self.job.id)
        finally:
            self._pool.stop(EXECUTOR_STOP_WAIT)


_current: Pieces | None = None


def _job_popen(original: Callable[..., int]) -> Callable[..., int]:
    """cwltool starts every tool invocation through cwltool.job._job_popen (its one
    place below the command line it built and above the process): under a sheepdog run,
    the invocation goes to `_current` instead."""

    def popen(commands: list[str], stdin_path: str | None, stdout_path: str | None,
              stderr_path: str | None, env: MutableMapping[str, str], cwd: str,
              make_job_dir: Callable[[], str], job_script_contents: str | None = None,
              timelimit: int | None = None, name: str | None = None,
              monitor_function: Any = None, default_stdout: Any = None,
              default_stderr: Any = None) -> int:
        pieces = _current
        if pieces is None:
            return original(commands, stdin_path, stdout_path, stderr_path, env, cwd,
                            make_job_dir, job_script_contents, timelimit, name,
                            monitor_function, default_stdout, default_stderr)
        # cwltool's monitor is a partial of the job's own method: the job (its inputs'
        # paths, its exit codes) for an invocation staged elsewhere
        job = getattr(getattr(monitor_function, "func", None), "__self__", None)
        return pieces.run(name or commands[0], commands, cwd, env,
                          [stdin_path, stdout_path, stderr_path], timelimit, job)

    return popen


def _tool_maker(refuse_containers: bool, staged: bool, batch: bool) -> Any:
    """cwltool's tool factory, refusing when a CommandLineTool would run (an
    UnsupportedRequirement: cwltool exits 33) what sheepdog is told not to run or cannot
    run as asked: with `refuse_containers`, a tool that asks for a container at all
    (DockerRequirement, as a hint too) instead of running it from the host; `staged`, a
    tool that updates its inputs in place (InplaceUpdateRequirement: its copy on the host
    would change, not the runner's file)."""
    from cwltool.command_line_tool import CommandLineTool
    from cwltool.errors import UnsupportedRequirement
    from cwltool.workflow import default_make_tool

    refused: list[str] = []

    class Refusing(CommandLineTool):
        def make_job_runner(self, runtimeContext: Any) -> Any:
            try:
                return self._runner(runtimeContext)
            except UnsupportedRequirement as e:
                refused.append(str(e))
                raise

        def _runner(self, runtimeContext: Any) -> Any:
            name = self.tool.get("id", "a tool")
            docker, _ = self.get_requirement("DockerRequirement")
            if refuse_containers and docker is not None:
                raise UnsupportedRequirement(
                    f"{name} asks for a container (DockerRequirement"
                    f" {docker.get('dockerPull') or ''}) and SHEEPDOG_CWL_CONTAINERS=refuse: "
                    "sheepdog runs no containers and is told not to run such a tool from "
                    "the host")
            inplace, _ = self.get_requirement("InplaceUpdateRequirement")
            if staged and inplace is not None and inplace.get("inplaceUpdate"):
                raise UnsupportedRequirement(
                    f"{name} updates its inputs in place (InplaceUpdateRequirement), which "
                    "a tool staged to another host cannot do: run it on local workers")
            return super().make_job_runner(runtimeContext)

        def job(self, job_order: Any, output_callbacks: Any, runtimeContext: Any) -> Any:
            if batch and cwlbatch.batchable(self, runtimeContext):
                yield cwlbatch.Deferred(self, job_order, output_callbacks, runtimeContext)
            else:
                yield from super().job(job_order, output_callbacks, runtimeContext)

        def built(self, job_order: Any, output_callbacks: Any, runtimeContext: Any) -> Any:
            return super().job(job_order, output_callbacks, runtimeContext)

    def make(toolpath_object: Any, loadingContext: Any) -> Any:
        if toolpath_object.get("class") == "CommandLineTool":
            return Refusing(toolpath_object, loadingContext)
        return default_make_tool(toolpath_object, loadingContext)

    make.refused = refused  # type: ignore[attr-defined]  # a step's refusal: exit 33 too
    return make


_patched = threading.Lock()


def _through_sheepdog() -> None:
    import cwltool.job

    with _patched:
        if not getattr(cwltool.job._job_popen, "sheepdog", False):
            popen = _job_popen(cwltool.job._job_popen)
            popen.sheepdog = True  # type: ignore[attr-defined]
            cwltool.job._job_popen = popen


def run(argv: list[str], settings: Settings | None = None, queue: str | None = None,
        backend: str = "local", host: str = "", stage: bool = False, job_id: str = "",
        output: str = "") -> int:
    """cwltool's command line (`argv`), each tool invocation a sheepdog piece on
    `backend` (local: in place on this machine's disk; shell, slurm, a pull worker's
    queue: staged by content); cwltool's exit code. No
    containers, as cwltool's --no-container: a DockerRequirement hint's tool runs from
    the host, a required one is refused; settings.cwl_containers "refuse" refuses both.
    `job_id`: the job a POST /jobs made (this run is its piece); `output`: a file that
    gets the output object too."""
    global _current
    try:
        import cwltool.argparser
        import cwltool.main
        from cwltool.context import LoadingContext
    except ImportError as e:
        raise ConfigError(f"CWL runs need cwltool ({e}): pip install 'sheepdog[cwl]', or "
                          "Guix's cwltool") from e

    _through_sheepdog()
    given = set(argv)
    extra = [flag for flag in ("--no-container",) if flag not in given]
    try:
        args = cwltool.argparser.arg_parser().parse_args([*extra, *argv])
    except SystemExit:  # cwltool says what is wrong with the command line itself
        return int(cwltool.main.main(argv))
    settings = settings or load()
    pieces = Pieces(settings, str(args.workflow or ""), queue, backend, host, stage, job_id)
    loading = LoadingContext(vars(args))  # as cwltool makes it, with sheepdog's tool factory
    batch = settings.cwl_batch > 0 and not pieces.staged  # built on a worker sharing this disk
    maker = _tool_maker(settings.cwl_containers == "refuse", pieces.staged, batch)
    loading.construct_tool_object = maker
    _current = pieces
    code = 1
    try:
        executor = cwlbatch.executor(pieces.slots(), pieces, settings.cwl_batch)
        if backend != "local" or host:  # this machine's cores and memory are not the hosts'
            executor.max_cores = float(max(executor.max_cores, CWL_REMOTE_CORES))
            executor.max_ram = CWL_REMOTE_RAM_MB
        said = io.StringIO()
        code = int(cwltool.main.main([*extra, *argv], loadingContext=loading,
                                     executor=executor, stdout=said))
        if code == 1 and maker.refused:
            code = 33  # a workflow step refused (cwltool says 1 for a step's error)
        sys.stdout.write(said.getvalue())
        if output and code == 0:  # whole or not at all
            Path(output + ".part").write_text(said.getvalue())
            os.replace(output + ".part", output)
        return code
    finally:
        _current = None
        pieces.close(code)


def main(argv: list[str] | None = None) -> int:
    """`sheepdog-cwl-runner`: cwl-runner's command line."""
    try:
        return run(list(sys.argv[1:] if argv is None else argv),
                   queue=os.environ.get("SHEEPDOG_CWL_QUEUE") or None,
                   backend=os.environ.get("SHEEPDOG_CWL_BACKEND") or "local",
                   host=os.environ.get("SHEEPDOG_CWL_HOST") or "",
                   stage=bool(os.environ.get("SHEEPDOG_CWL_STAGE")),
                   job_id=os.environ.get("SHEEPDOG_CWL_JOB") or "",
                   output=os.environ.get("SHEEPDOG_CWL_OUTPUT") or "")
    except SheepdogError as e:
        print(f"sheepdog-cwl-runner: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
