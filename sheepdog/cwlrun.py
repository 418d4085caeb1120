"""CWL through sheepdog: cwltool, used as a library, loads and validates the process,
evaluates its expressions and builds each tool invocation's command line; every
invocation then runs as a piece of one open sheepdog job, by the workers of its queue
(the local backend: the files are on this machine's disk), as many at once as they
take (cwltool's parallel executor hands them over as their inputs are ready).
`sheepdog-cwl-runner` has cwl-runner's command line (cwltool's own: --outdir, --quiet,
PROCESS [JOB]; the output object on stdout; exit 0, 1, or 33 for an unsupported
requirement), so cwltest runs the conformance suite on it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any

from . import jobs, logs, store
from .config import Settings, load
from .connection import connect
from .defaults import CWL_LISTEN_MS, CWL_LOOK_AGAIN, EXECUTOR_STOP_WAIT
from .errors import ConfigError, SheepdogError
from .models import Job, JobStatus, Task
from .pool import Pool, unserved

# The piece's program, its redirections applied first: a fixed script, everything the
# tool gives as its positional parameters (never part of the script's text).
_REDIRECT = ('in=$1 out=$2 err=$3; shift 3; '
             '[ -z "$in" ] || exec <"$in"; [ -z "$out" ] || exec >"$out"; '
             '[ -z "$err" ] || exec 2>"$err"; exec "$@"')
_NOT_RUN = 127  # what a shell says of a program it could not start


class Pieces:
    """The open job a CWL run's tool invocations join, one piece each."""

    def __init__(self, settings: Settings, process: str, queue: str | None = None) -> None:
        self.settings = settings
        self.conn = connect(settings)
        self.queue = queue or settings.queue
        self.job = Job(id=jobs.new_job_id(), workflow="cwl", queue=self.queue,
                       command=[process], params={"process": process})
        store.submit(self.conn, self.job, [], open_=True)
        self._lock = threading.Lock()
        self._waiting: dict[str, threading.Event] = {}
        self._closed = threading.Event()
        threading.Thread(target=self._listen, name="cwl-listen", daemon=True).start()
        self._pool = Pool(settings)
        if unserved(self.conn, self.queue):  # no worker serves it: this run brings its own
            self._pool.start(1, self.queue, concurrency=os.cpu_count() or 1, quiet="stdout",
                             parent_job=self.job.id)

    def slots(self) -> int:
        """Invocations worth handing over at once: the slots of the workers serving the
        queue now (cwltool's parallel executor would otherwise count this machine's
        cores), at least this machine's cores. More in flight made the run slower here:
        cwltool's threads then contend in this one process, which builds them all."""
        from .registration import live_workers

        found = sum(int(str(w.get("concurrency") or 1))
                    for w in live_workers(self.conn, self.queue))
        return max(found, os.cpu_count() or 1)

    def run(self, name: str, argv: list[str], cwd: str, env: MutableMapping[str, str],
            stdin: str | None, stdout: str | None, stderr: str | None,
            timelimit: int | None) -> int:
        """One tool invocation as a piece of the job; its exit code once it ended."""
        task = Task(name=name, argv=["sh", "-c", _REDIRECT, "sh", stdin or "", stdout or "",
                                     stderr or "", *argv],
                    cacheable=False, cwd=cwd, env=dict(env), clean_env=True,
                    timeout=float(timelimit or 0), max_attempts=1, queue=self.queue,
                    nonce=uuid.uuid4().hex)
        told = threading.Event()
        with self._lock:
            self._waiting[task.id] = told
        try:
            store.add_tasks(self.conn, self.job.id, [task])
            while True:
                found = store.get_task(self.conn, task.id)
                if found is not None and found.status.final:
                    if found.exit_code is not None:
                        return found.exit_code
                    if found.error:
                        print(f"sheepdog: {name}: {found.error}", file=sys.stderr)
                    return _NOT_RUN
                told.wait(CWL_LOOK_AGAIN)  # a line of its piece, or a look anyway
                told.clear()
        finally:
            with self._lock:
                del self._waiting[task.id]

    def _listen(self) -> None:
        """One reader of the job's log for all the invocations waiting: a line of a
        piece (its end writes one) wakes the invocation waiting for it."""
        cursors = {self.job.id: "0-0"}
        while not self._closed.is_set():
            try:
                lines = logs.tail(self.conn, cursors, block_ms=CWL_LISTEN_MS)
            except Exception:  # noqa: BLE001  (Redis away): the waiting look every second
                time.sleep(CWL_LOOK_AGAIN)
                continue
            with self._lock:
                for _, line in lines:
                    told = self._waiting.get(line.task)
                    if told is not None:
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
        return pieces.run(name or commands[0], commands, cwd, env, stdin_path, stdout_path,
                          stderr_path, timelimit)

    return popen


def _tool_maker(refuse_containers: bool) -> Any:
    """cwltool's tool factory; with `refuse_containers`, a CommandLineTool that asks for a
    container at all (DockerRequirement, as a hint too) is refused when it would run
    (UnsupportedRequirement: cwltool exits 33) instead of running from the host."""
    from cwltool.command_line_tool import CommandLineTool
    from cwltool.errors import UnsupportedRequirement
    from cwltool.workflow import default_make_tool

    class NoContainers(CommandLineTool):
        def make_job_runner(self, runtimeContext: Any) -> Any:
            docker, _ = self.get_requirement("DockerRequirement")
            if docker is not None:
                raise UnsupportedRequirement(
                    f"{self.tool.get('id', 'a tool')} asks for a container (DockerRequirement"
                    f" {docker.get('dockerPull') or ''}) and SHEEPDOG_CWL_CONTAINERS=refuse: "
                    "sheepdog runs no containers and is told not to run such a tool from "
                    "the host")
            return super().make_job_runner(runtimeContext)

    def make(toolpath_object: Any, loadingContext: Any) -> Any:
        if refuse_containers and toolpath_object.get("class") == "CommandLineTool":
            return NoContainers(toolpath_object, loadingContext)
        return default_make_tool(toolpath_object, loadingContext)

    return make


_patched = threading.Lock()


def _through_sheepdog() -> None:
    import cwltool.job

    with _patched:
        if not getattr(cwltool.job._job_popen, "sheepdog", False):
            popen = _job_popen(cwltool.job._job_popen)
            popen.sheepdog = True  # type: ignore[attr-defined]
            cwltool.job._job_popen = popen


def run(argv: list[str], settings: Settings | None = None, queue: str | None = None) -> int:
    """cwltool's command line (`argv`), each tool invocation a sheepdog piece on the
    local backend (its files are on this machine's disk); cwltool's exit code. No
    containers, as cwltool's --no-container: a DockerRequirement hint's tool runs from
    the host, a required one is refused; settings.cwl_containers "refuse" refuses both."""
    global _current
    try:
        import cwltool.argparser
        import cwltool.main
        from cwltool.context import LoadingContext
        from cwltool.executors import MultithreadedJobExecutor
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
    pieces = Pieces(settings, str(args.workflow or ""), queue)
    loading = LoadingContext(vars(args))  # as cwltool makes it, with sheepdog's tool factory
    loading.construct_tool_object = _tool_maker(settings.cwl_containers == "refuse")
    _current = pieces
    code = 1
    try:
        code = int(cwltool.main.main([*extra, *argv], loadingContext=loading,
                                     executor=MultithreadedJobExecutor(
                                         max_parallel=pieces.slots())))
        return code
    finally:
        _current = None
        pieces.close(code)


def main(argv: list[str] | None = None) -> int:
    """`sheepdog-cwl-runner`: cwl-runner's command line."""
    try:
        return run(list(sys.argv[1:] if argv is None else argv),
                   queue=os.environ.get("SHEEPDOG_CWL_QUEUE") or None)
    except SheepdogError as e:
        print(f"sheepdog-cwl-runner: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
