"""What every `sheepdog run WORKFLOW` shares: settings and connection, the backend
options, waiting for the job with its output live, racing lanes, and the exit code.

Helpers here return exit codes; only the click commands exit.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import config, progress, readout, store
from .backends import registry
from .connection import connect, ride_out
from .defaults import TERMINAL_REDRAW
from .finalize import finalize as finalize  # a workflow's command line gets it from here
from .logs import LogLine
from .models import Job, JobStatus, Task
from .pool import spawn_detached_worker, unserved
from .runner import Helpers, follow_job

F = TypeVar("F", bound=Callable[..., Any])


def settings() -> config.Settings:
    return config.load()


def conn(given: config.Settings | None = None) -> Any:
    """The command's connection: it rides out an outage of Redis, saying so once."""
    return ride_out(connect(given or settings()),
                    lambda said: click.echo(f"sheepdog: {said}", err=True))


def print_json(value: Any) -> None:
    click.echo(readout.json_text(value))


def backend_options(fn: F) -> F:
    """The options every `run` workflow shares."""
    for opt in reversed([
        click.option("--backend", default="local", show_default=True,
                     help="Where the pieces run: " + ", ".join(registry.names()) + "."),
        click.option("--host", default=None, help="Host (ssh config name) for shell/slurm."),
        click.option("--queue", default=None, help="Queue name (default: from settings)."),
        click.option("--detach", is_flag=True, help="Print the job id and return at once."),
        click.option("--json", "as_json", is_flag=True, help="Print the final job as JSON."),
        click.option("--race", default=None, metavar="H1,H2,local",
                     help="Start the job on several hosts/backends; the first success wins."),
        click.option("--complete-all", is_flag=True,
                     help="With --race: let the losers finish too, to fill their caches."),
    ]):
        fn = opt(fn)
    return fn


def finish(db: Any, given: config.Settings, job_id: str, queue: str, detach: bool,
           as_json: bool, after_wait: Callable[[Any, config.Settings, str], None] | None = None,
           concurrency: int | None = None, show_notes: bool = True,
           show_output: bool = True) -> int:
    """Shared end of every `run`: detach, or stream until the end; returns the exit code.
    `concurrency`: pieces at once when this process runs the job itself; `show_notes`
    False prints sheepdog's per-piece lines only when something went wrong; `show_output`
    False, the pieces' own lines only when they say error or warning."""
    if detach:
        if unserved(db, queue):
            spawn_detached_worker(given, queue)
        click.echo(job_id)
        return 0
    stream_until_done(db, given, job_id, queue, quiet=as_json, concurrency=concurrency,
                      show_notes=show_notes, show_output=show_output)
    if after_wait:
        after_wait(db, given, job_id)
    job = store.get_job(db, job_id)
    if as_json:
        print_json(progress.job_view(db, job))
    if job.exit_code is not None:
        return job.exit_code
    return 0 if job.status == JobStatus.SUCCESS else 1


def run_race(given: config.Settings, spec: str, complete_all: bool, queue: str,
             build: Callable[[], tuple[Job, list[Task]]],
             after: Callable[[Any, config.Settings, Any, str], None] | None = None) -> int:
    """Run a job on several lanes, stream them all; returns the winner's exit code."""
    from . import race

    lanes = race.parse_lanes(spec, given.inventory)
    db = conn(given)
    jobs = race.start(db, given, lanes, build)
    for job_id, lane in jobs.items():
        click.echo(f"[sheepdog] race lane {lane.label}: job {job_id}", err=True)
    for lane, item in race.follow(db, given, jobs, queue, complete_all):
        if isinstance(item, str):
            click.echo(f"[sheepdog] {item}", err=True)
        elif item.stream in ("stdout", "stderr"):
            click.echo(f"[{lane.label}] {item.text}", err=item.stream == "stderr")
    winner = race.winner_of(db, jobs)
    if winner is None:
        return 1
    if after is not None:
        after(db, given, winner, jobs[winner.id].label)
    return winner.exit_code or 0


class ProgressLine:
    """A one-line status on a terminal's stderr, redrawn in place; nothing otherwise."""

    def __init__(self, db: Any, job_id: str) -> None:
        self.db, self.job_id = db, job_id
        # on a terminal only: piped output stays plain lines
        self.enabled = sys.stdout.isatty() and sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def tick(self) -> None:
        if not self.enabled or time.monotonic() - self.last < TERMINAL_REDRAW:
            return
        self.last = time.monotonic()
        job = store.get_job(self.db, self.job_id)
        eta = progress.eta_seconds(job, time.time())
        text = f"[{job.status}] {job.done}/{job.total} pieces"
        items = progress.items_progress(job, store.counts(self.db, self.job_id), time.time())
        if items is not None:
            eta = items["eta_seconds"]
            text = (f"[{job.status}] {items['done']:,d}/{items['total']:,d} items, "
                    f"{items['failed']:,d} failed, {items['rate_per_second'] or 0:.0f}/s")
        if eta is not None:
            text += f", about {eta:.0f}s left"
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def print_line(line: LogLine) -> None:
    stream, text = readout.log_line(line)  # as sheepdog.quick prints it
    click.echo(click.style(text, dim=True) if stream == "stderr-dim" else text,
               err=stream != "stdout")


class Interrupted(click.exceptions.Exit):
    """Ctrl-C while waiting: the job was cancelled; exit 130 like a shell."""

    def __init__(self) -> None:
        super().__init__(130)


class Terminated(BaseException):
    """SIGTERM while a command waits (a supervisor, `kill`): raised in the main thread,
    so every `finally` runs — worker threads started here hand their running pieces
    back to the queue — and the command exits 143 like a shell. A BaseException, so
    that no handler of ordinary errors swallows it."""

    exit_code = 143


def on_sigterm() -> None:
    """Make SIGTERM raise Terminated in the main thread (commands that stop otherwise,
    `worker` and `serve`, install their own handlers)."""

    def raise_terminated(_signum: int, _frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)


def _worth_showing(line: LogLine) -> bool:
    """Without per-piece notes: output, and sheepdog lines that say something failed."""
    return line.stream != "sheepdog" or line.end or any(
        word in line.text for word in ("error", "failed", "lost", "stopped", "truncated",
                                       "once more"))


def _says_trouble(text: str) -> bool:
    lowered = text.lower()
    return "error" in lowered or "warning" in lowered


def stream_until_done(db: Any, given: config.Settings, job_id: str, queue: str,
                      quiet: bool = False, concurrency: int | None = None,
                      show_notes: bool = True, show_output: bool = True) -> None:
    bar = ProgressLine(db, job_id)
    helpers = Helpers(db, given, job_id, queue, concurrency)
    try:
        for line in follow_job(db, given, job_id, queue, helpers=helpers):
            bar.clear()
            if not quiet and (show_notes or _worth_showing(line)) and (
                    show_output or line.stream == "sheepdog" or _says_trouble(line.text)):
                print_line(line)
            bar.tick()
    except KeyboardInterrupt:
        bar.clear()
        store.cancel_job(db, job_id)
        click.echo(f"sheepdog: cancelled job {job_id}", err=True)
        raise Interrupted() from None
    except Terminated:
        bar.clear()
        click.echo(f"sheepdog: terminated; job {job_id} was left to other workers, its "
                   f"running pieces handed back (sheepdog status {job_id})", err=True)
        raise
    bar.clear()
