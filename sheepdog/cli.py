"""The `sheepdog` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import config, embedded, logs, progress, store, workflow
from .cache import Store
from .connection import connect, url_for
from .errors import SheepdogError
from .logs import LogLine
from .models import JobStatus
from .runner import follow_job, spawn_detached_worker
from .worker import Worker, live_workers

F = TypeVar("F", bound=Callable[..., Any])


def _settings() -> config.Settings:
    return config.load()


def _conn(settings: config.Settings | None = None) -> Any:
    return connect(settings or _settings())


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


class RunGroup(click.Group):
    """`sheepdog run WORKFLOW ...`, or `sheepdog run [OPTIONS] -- CMD ...` for a command."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] in self.commands:
            return super().resolve_command(ctx, args)
        return "command", self.commands["command"], args

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["command", *args]
        return super().parse_args(ctx, args)


def backend_options(fn: F) -> F:
    """The options every `run` workflow shares."""
    for opt in reversed([
        click.option("--backend", default="local", show_default=True,
                     type=click.Choice(workflow.BACKENDS), help="Where the pieces run."),
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sheepdog")
def cli() -> None:
    """Run jobs (commands, GEMMA LOCO scans, permutations) through Redis, with live logs."""


@cli.group(cls=RunGroup)
def run() -> None:
    """Run a job and stream its output: `sheepdog run -- CMD ARGS` or `sheepdog run WORKFLOW`."""


@run.command("command", context_settings={"ignore_unknown_options": True,
                                           "allow_interspersed_args": False})
@backend_options
@click.option("--timeout", type=float, default=0.0, help="Kill the command after SECONDS.")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def run_command(argv: tuple[str, ...], backend: str, host: str | None, queue: str | None,
                detach: bool, as_json: bool, timeout: float, race: str | None,
                complete_all: bool) -> None:
    """Run one command as a job; exit with its exit code."""
    settings = _settings()
    job, tasks = workflow.command_job(list(argv), settings, backend=backend, host=host,
                                      queue=queue, timeout=timeout)
    if race:
        run_race(settings, race, complete_all, queue or settings.queue,
                 lambda: workflow.command_job(list(argv), settings, queue=queue,
                                              timeout=timeout))
    conn = _conn(settings)
    workflow.submit(conn, settings, job, tasks)
    finish(conn, settings, job.id, job.queue, detach, as_json)


def finish(conn: Any, settings: config.Settings, job_id: str, queue: str, detach: bool,
           as_json: bool, after_wait: Callable[[Any, config.Settings, str], None] | None = None
           ) -> None:
    """Shared end of every `run`: detach, or stream until the end and exit with its code."""
    if detach:
        if not live_workers(conn, queue):
            spawn_detached_worker(settings, queue)
        click.echo(job_id)
        return
    stream_until_done(conn, settings, job_id, queue, quiet=as_json)
    if after_wait:
        after_wait(conn, settings, job_id)
    job = store.get_job(conn, job_id)
    if as_json:
        _print_json(progress.job_view(conn, job))
    elif job.status == JobStatus.ERROR.value and job.error and (
            job.workflow != "command" or job.exit_code is None):
        click.echo(f"sheepdog: job {job.id} failed: {job.error}", err=True)
    code = job.exit_code if job.exit_code is not None else (0 if job.status == "success" else 1)
    sys.exit(code)


def run_race(settings: config.Settings, spec: str, complete_all: bool, queue: str,
             build: Callable[[], Any],
             after: Callable[[Any, config.Settings, Any, str], None] | None = None) -> None:
    """Run a job on several lanes, stream them all, exit with the winner's exit code."""
    from . import race

    lanes = race.parse_lanes(spec, settings.inventory)
    conn = _conn(settings)
    jobs = race.start(conn, settings, lanes, build)
    for job_id, lane in jobs.items():
        click.echo(f"[sheepdog] race lane {lane.label}: job {job_id}", err=True)
    for lane, item in race.follow(conn, settings, jobs, queue, complete_all):
        if isinstance(item, str):
            click.echo(f"[sheepdog] {item}", err=True)
        elif item.stream in ("stdout", "stderr"):
            click.echo(f"[{lane.label}] {item.text}", err=item.stream == "stderr")
    winner = race.winner_of(conn, jobs)
    if winner is None:
        sys.exit(1)
    if after is not None:
        after(conn, settings, winner, jobs[winner.id].label)
    sys.exit(winner.exit_code or 0)


class ProgressLine:
    """A one-line status on a terminal's stderr, redrawn in place; nothing otherwise."""

    def __init__(self, conn: Any, job_id: str) -> None:
        self.conn, self.job_id = conn, job_id
        # on a terminal only: piped output stays plain lines
        self.enabled = sys.stdout.isatty() and sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def tick(self) -> None:
        if not self.enabled or time.monotonic() - self.last < 0.5:
            return
        self.last = time.monotonic()
        job = store.get_job(self.conn, self.job_id)
        eta = progress.eta_seconds(job, time.time())
        text = f"[{job.status}] {job.done}/{job.total} pieces"
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
    if line.stream == "stdout":
        click.echo(line.text)
    elif line.stream == "stderr":
        click.echo(line.text, err=True)
    else:
        click.echo(click.style(f"[sheepdog] {line.text}", dim=True), err=True)


def stream_until_done(conn: Any, settings: config.Settings, job_id: str, queue: str,
                      quiet: bool = False) -> None:
    bar = ProgressLine(conn, job_id)
    try:
        for line in follow_job(conn, settings, job_id, queue):
            bar.clear()
            if not quiet or line.stream != "sheepdog":
                print_line(line) if not quiet else None
            bar.tick()
    except KeyboardInterrupt:
        bar.clear()
        store.cancel_job(conn, job_id)
        click.echo(f"sheepdog: cancelled job {job_id}", err=True)
        sys.exit(130)
    bar.clear()


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(job_id: str, as_json: bool) -> None:
    """Show a job's status, progress and pieces."""
    conn = _conn()
    view = progress.job_view(conn, store.get_job(conn, job_id))
    if as_json:
        _print_json(view)
        return
    p = view["progress"]
    click.echo(f"{view['id']}  {view['status']}  exit={view['exit_code']}  "
               f"{p['done']}/{p['total']} pieces ({p['cached']} cached)  {view['workflow']}")
    if view["error"]:
        click.echo(f"error: {view['error']}")
    for piece in view["pieces"]:
        click.echo(f"  {piece['status']:<9} {piece['name']:<28} attempts={piece['attempts']}"
                   + (f"  {piece['error']}" if piece["error"] else ""))


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", default=50, show_default=True, help="How many recent jobs.")
def list_jobs(as_json: bool, limit: int) -> None:
    """List recent jobs, newest first."""
    conn = _conn()
    jobs = store.list_jobs(conn, limit=limit)
    if as_json:
        _print_json([progress.job_view(conn, j, with_pieces=False) for j in jobs])
        return
    for j in jobs:
        what = " ".join(j.command) if j.command else j.workflow
        code = "" if j.exit_code is None else j.exit_code
        click.echo(f"{j.id}  {j.status:<9} {code!s:>4}  {j.done}/{j.total}  {what[:60]}")


@cli.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep following until the job ends.")
@click.option("--after", default="0-0", help="Only lines after this log id.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def logs_cmd(job_id: str, follow: bool, after: str, as_json: bool) -> None:
    """Print a job's log from the start (or --after ID); --follow waits for new lines."""
    settings = _settings()
    conn = _conn(settings)
    job = store.get_job(conn, job_id)
    if follow:
        lines = follow_job(conn, settings, job_id, job.queue, after=after, inline=False)
    else:
        lines = iter(_all_lines(conn, job_id, after))
    for line in lines:
        click.echo(json.dumps(line.as_dict())) if as_json else print_line(line)


def _all_lines(conn: Any, job_id: str, after: str) -> list[LogLine]:
    out: list[LogLine] = []
    while batch := logs.read(conn, job_id, after=after):
        out.extend(batch)
        after = batch[-1].id
    return out


@cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: queued pieces never run, running ones are killed."""
    conn = _conn()
    if store.cancel_job(conn, job_id):
        click.echo(f"cancelled {job_id}")
    else:
        click.echo(f"{job_id} had already ended ({store.get_job(conn, job_id).status})")


@cli.command()
@click.option("--queue", "queues", multiple=True, help="Queue(s) to serve (repeatable).")
@click.option("--burst", is_flag=True, help="Exit once the queues are empty and idle.")
@click.option("--concurrency", "-j", default=1, show_default=True, help="Tasks at once.")
@click.option("--gn3-queue", is_flag=False, flag_value="GN3::job-queue", default=None,
              help="Also serve GN3's Redis LIST queue (default name GN3::job-queue).")
@click.option("--name", default=None, help="Worker name (default host.pid.random).")
def worker(queues: tuple[str, ...], burst: bool, concurrency: int, gn3_queue: str | None,
           name: str | None) -> None:
    """Run tasks from the queues until stopped (SIGTERM/SIGINT finish current tasks)."""
    settings = _settings()
    conn = _conn(settings)
    w = Worker(conn, settings, list(queues) or [settings.queue], concurrency=concurrency,
               name=name, burst=burst, gn3_queue=gn3_queue)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: w.stop())
    click.echo(f"sheepdog worker {w.name} on {', '.join(w.queue_names)} "
               f"({url_for(settings)})", err=True)
    w.run()


@cli.command()
@click.option("--bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve on.")
@click.option("--local-workers", "local_workers", default=os.cpu_count() or 1, show_default=True,
              help="Tasks at once in a worker started alongside (0: rely on other workers).")
@click.option("--threads", default=32, show_default=True,
              help="Web threads (each open websocket holds one).")
def serve(bind: str, local_workers: int, threads: int) -> None:
    """Serve the REST API, websockets and pages (gunicorn, threaded) on the same Redis."""
    settings = _settings()
    _conn(settings)  # a down Redis is reported now, not on the first request
    env = dict(os.environ, SHEEPDOG_REDIS_URL=url_for(settings))
    helpers = []
    if local_workers > 0:
        helpers = [subprocess.Popen([sys.executable, "-m", "sheepdog", "worker", "--queue",
                                     settings.queue, "-j", str(local_workers)], env=env)]
    # `web` is a short name: put the directory this install's `web` package sits in first,
    # so a stray web/ folder where the server is started cannot shadow it
    home = str(Path(__file__).resolve().parent.parent)
    argv = [sys.executable, "-m", "gunicorn", "--bind", bind, "--worker-class", "gthread",
            "--workers", "1", "--threads", str(threads), "--access-logfile", "-",
            "--pythonpath", home, "web:create_app()"]
    click.echo(f"sheepdog serving on http://{bind} ({url_for(settings)})", err=True)
    try:
        code = subprocess.run(argv, env=env).returncode
    except KeyboardInterrupt:
        code = 0
    finally:
        for h in helpers:
            h.terminate()
            h.wait(30)
    sys.exit(code)


@cli.group()
def hosts() -> None:
    """Remote hosts (names from ~/.ssh/config and the sheepdog inventory)."""


@hosts.command("list")
def hosts_list() -> None:
    """The host names sheepdog knows."""
    from .hosts import known_host_names

    for name in known_host_names(_settings().inventory):
        click.echo(name)


@hosts.command("check")
@click.argument("host")
@click.option("--json", "as_json", is_flag=True)
def hosts_check(host: str, as_json: bool) -> None:
    """Can sheepdog run pieces on HOST: ssh, Guix alignment, tools, GEMMA, disk, Slurm."""
    from .checks import check_host
    from .gemma.commands import version
    from .hosts import resolve

    target = resolve(host, _settings().inventory)
    try:
        local = version()
    except SheepdogError:
        local = None
    checks = check_host(target, local)
    if as_json:
        _print_json({"host": host, "ok": all(c.status != "fail" for c in checks),
                     "checks": [c.as_dict() for c in checks]})
    else:
        for c in checks:
            line = f"{c.status.upper():<5} {c.name}: {c.found}"
            click.echo(line + (f"\n      -> {c.remedy}" if c.remedy else ""))
    sys.exit(0 if all(c.status != "fail" for c in checks) else 1)


@cli.group()
def cache() -> None:
    """The content-addressed cache of inputs and computed pieces."""


@cache.command("list")
@click.option("--json", "as_json", is_flag=True)
def cache_list(as_json: bool) -> None:
    """List cached inputs and pieces with their sizes."""
    entries = Store(_settings().store_dir).entries()
    if as_json:
        _print_json([e.__dict__ for e in entries])
        return
    for e in entries:
        click.echo(f"{e.kind:<6} {e.id[:16]}  {e.size:>12,d} bytes")
    click.echo(f"{len(entries)} entries, {sum(e.size for e in entries):,d} bytes")


@cache.command("clear")
def cache_clear() -> None:
    """Remove every cached input and piece (the next run recomputes them)."""
    settings = _settings()
    local = Store(settings.store_dir)
    entries = local.entries()
    for e in entries:
        local.remove(e.id)
    click.echo(f"removed {len(entries)} entries, {sum(e.size for e in entries):,d} bytes")


@cli.group("redis")
def redis_group() -> None:
    """The embedded Redis server used when SHEEPDOG_REDIS_URL is not set."""


@redis_group.command("status")
def redis_status() -> None:
    """Say which Redis is in use (starting the embedded one if needed)."""
    settings = _settings()
    conn = _conn(settings)
    info = conn.info("server")
    click.echo(f"{url_for(settings)}  redis {info.get('redis_version')}  "
               f"pid {info.get('process_id')}")


@redis_group.command("stop")
def redis_stop() -> None:
    """Stop the embedded Redis server (its data stays on disk)."""
    home = _settings().home
    click.echo("stopped" if embedded.stop(home) else "not running")


def _main() -> int:
    from .gemma import cli as _gemma_cli  # noqa: F401  registers `run gemma-*`

    try:
        code = cli.main(standalone_mode=False)  # click's own Exit comes back as its code
        return code if isinstance(code, int) else 0
    except SystemExit as e:
        if isinstance(e.code, str):
            click.echo(e.code, err=True)
            return 1
        return e.code or 0
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except SheepdogError as e:
        click.echo(f"sheepdog: {e}", err=True)
        return e.exit_code


def main() -> None:
    # Task threads, heartbeats and log readers share one GIL with the steps run
    # in-process: a short switch interval lets a thread whose Redis reply has arrived
    # run again at once instead of waiting out another thread's 5 ms slice.
    sys.setswitchinterval(0.0005)
    try:
        code = _main()
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = 0
    # Everything is written and every job's state is in Redis: skip the interpreter's
    # teardown of numpy/redis/rq modules (measured ≈0.3 s, a tenth of a cold BXD scan).
    os._exit(code)
