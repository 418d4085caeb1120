"""The `sheepdog` command."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import redis

from . import (
    clirun,
    embedded,
    keys,
    logs,
    progress,
    readout,
    registration,
    store,
    tokens,
    workflows,
)
from .cache import Cache
from .clirun import Terminated, on_sigterm, print_line
from .clirun import conn as _conn
from .clirun import print_json as _print_json
from .clirun import settings as _settings
from .connection import connect, connect_waiting, shown, url_for
from .defaults import (
    KILL_GRACE,
    PARENT_WATCH,
    PIECES_PAGE,
    SERVE_CONNECTIONS,
    SERVE_GRACE,
    SERVE_HEAD_TIMEOUT,
    SERVE_NICE,
    SERVE_READY_ENV,
    WORKER_STOP_WAIT,
)
from .errors import ConfigError, SheepdogError
from .logs import LogLine
from .models import JobStatus
from .pool import Pool, stop_all
from .process import own_signals
from .runner import follow_job
from .worker import Worker


class RunGroup(click.Group):
    """`sheepdog run WORKFLOW ...`, or `sheepdog run [OPTIONS] -- CMD ...` for a command.

    Each workflow brings its own command (sheepdog.workflows); only the one asked for
    is imported.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(workflows.names())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = workflows.find(cmd_name)
        return found.command(clirun) if found is not None else None

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] in workflows.names():
            return super().resolve_command(ctx, args)
        return "command", self.get_command(ctx, "command"), args

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in workflows.names() and args[0] not in ("--help", "-h"):
            args = ["command", *args]
        return super().parse_args(ctx, args)


class TopGroup(click.Group):
    """The commands, plus each workflow that is a command of its own (`sheepdog map`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        # --help only: finding which workflows are commands imports them
        own = super().list_commands(ctx)
        extra = [n for n in workflows.names()
                 if n not in own and (w := workflows.find(n)) is not None and w.top_level]
        more = [c.name for c in _workflow_commands() if c.name and c.name not in own]
        return sorted(own + extra + more)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name in workflows.names():
            workflow = workflows.find(cmd_name)
            if workflow is not None and workflow.top_level:
                return workflow.command(clirun)
        if found is None:  # a command a workflow brings (`sheepdog precompute`)
            found = next((c for c in _workflow_commands() if c.name == cmd_name), None)
        return found


def _workflow_commands() -> list[click.Command]:
    """The extra commands of every workflow (imports them: only for a name not known)."""
    found: list[click.Command] = []
    for name in workflows.names():
        workflow = workflows.find(name)
        if workflow is not None:
            found += workflow.commands(clirun)
    return found


@click.group(cls=TopGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sheepdog")
def cli() -> None:
    """Run jobs (commands, GEMMA LOCO scans, permutations) through Redis, with live logs."""


@cli.group(cls=RunGroup)
def run() -> None:
    """Run a job and stream its output: `sheepdog run -- CMD ARGS` or `sheepdog run WORKFLOW`."""


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--offset", default=0, type=click.IntRange(0), help="First piece to show.")
@click.option("--limit", default=PIECES_PAGE, type=click.IntRange(1), show_default=True,
              help="How many pieces to show.")
def status(job_id: str, as_json: bool, offset: int, limit: int) -> None:
    """Show a job's status, progress and pieces."""
    conn = _conn()
    view = progress.job_view(conn, store.get_job(conn, job_id), offset=offset, limit=limit)
    if as_json:
        _print_json(view)
        return
    for line in readout.status_lines(view, job_id):  # as sheepdog.quick prints them
        click.echo(line)


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
    for line in readout.list_lines(jobs):
        click.echo(line)


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


def _worker_options(burst: bool, linger: float, server: str | None,
                    gn3_queues: tuple[str, ...]) -> None:
    if linger and not burst:
        raise click.UsageError("--linger goes with --burst (a worker without it stays anyway)")
    if server is not None and (burst or gn3_queues):
        raise click.UsageError("--server does not go with --burst or --gn3-queue")


@cli.command()
@click.option("--queue", "queues", multiple=True, help="Queue(s) to serve (repeatable).")
@click.option("--burst", is_flag=True, help="Exit once the queues are empty and idle.")
@click.option("--linger", default=0.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0),
              help="With --burst: exit only after this long with nothing to do (jobs "
                   "submitted one after another find it still there).")
@click.option("--concurrency", "-j", default=1, show_default=True, help="Tasks at once.")
@click.option("--gn3-queue", "gn3_queues", multiple=True, is_flag=False,
              flag_value=keys.GN3_DEFAULT_QUEUE, default=(),
              help="Also serve GN3's Redis LIST queue NAME (default GN3::job-queue); "
                   "repeat it for several, e.g. GN3's 'production::GN3::job-queue'.")
@click.option("--name", default=None, help="Worker name (default host.pid.random).")
@click.option("--server", default=None, metavar="URL",
              help="Pull work from this sheepdog service over HTTPS (no Redis, no ssh: "
                   "outbound web access is all it needs).")
@click.option("--token", envvar="SHEEPDOG_WORKER_TOKEN", default=None,
              help="With --server: a token with the worker role [env SHEEPDOG_WORKER_TOKEN] "
                   "(on the command line, any user's `ps` shows it: prefer the variable or "
                   "--token-file).")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False),
              help="With --server: read the token from this file (mode 0600).")
@click.option("--ca-file", envvar="SHEEPDOG_CA_FILE", default=None, type=click.Path(),
              help="With --server: the CA that signs the service's certificate, if it is "
                   "not a public one [env SHEEPDOG_CA_FILE].")
@click.option("--with-parent", "parent", default=None, hidden=True, metavar="PID:JOB",
              help="An Executor's worker: when process PID (which started it) is gone, "
                   "however it ended, cancel its job JOB and exit.")
def worker(queues: tuple[str, ...], burst: bool, linger: float, concurrency: int,
           gn3_queues: tuple[str, ...], name: str | None, server: str | None,
           token: str | None, token_file: str | None, ca_file: str | None,
           parent: str | None) -> None:
    """Run tasks from the queues until stopped (SIGTERM/SIGINT hand running ones back)."""
    settings = _settings()
    _worker_options(burst, linger, server, gn3_queues)
    if server is not None:
        token = _worker_token(token, token_file, server)
        _pull_worker(settings, server, token or "", ca_file, list(queues) or [settings.queue],
                     concurrency, name)
        return
    # a worker that serves until stopped waits for a Redis that is down (it may be
    # restarting); a burst worker, a one-off, says so and exits
    conn = connect(settings) if burst else connect_waiting(
        settings, lambda text: click.echo(f"sheepdog worker: {text}", err=True))
    services: list[Callable[[threading.Event], None]] = []
    worker_name = name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    running = registration.holder(conn, worker_name) if name else None
    if running is not None:
        raise ConfigError(f"a worker named {name} is running already (host "
                          f"{running.get('host', '?')}, pid {running.get('pid', '?')}): give "
                          "this one another --name")
    piece_ended: Callable[[], None] | None = None
    if gn3_queues:
        from .gn3 import Gn3Server

        gn3 = Gn3Server(conn, settings, list(gn3_queues), worker_name)
        services.append(gn3.loop)
        piece_ended = gn3.piece_ended
    if parent:
        pid, _, job_id = parent.partition(":")
        services.append(_parent_watch(int(pid), lambda: _orphaned(conn, w, job_id)))
    w = Worker(conn, settings, list(queues) or [settings.queue], concurrency=concurrency,
               name=worker_name, burst=burst, services=services, piece_ended=piece_ended,
               linger=linger)
    for sig in (signal.SIGTERM, signal.SIGINT):  # going: running pieces go back to the queue
        signal.signal(sig, lambda *_: w.stop(release=True))
    if not parent:  # an Executor's workers are its own business: its user's stderr is theirs
        click.echo(f"sheepdog worker {w.name} on {', '.join(w.queue_names)} "
                   f"({shown(url_for(settings))})", err=True)
    w.run()


def _worker_token(token: str | None, token_file: str | None, server: str) -> str:
    """The pull worker's token, from --token-file, the variable or --token (said to be
    visible in `ps`); plain http:// only to this machine, where no one listens between."""
    if token_file:
        token = Path(token_file).read_text().strip()
    elif click.get_current_context().get_parameter_source("token") == \
            click.core.ParameterSource.COMMANDLINE:
        click.echo("sheepdog worker: the token given with --token shows in `ps` to every "
                   "user of this machine; use SHEEPDOG_WORKER_TOKEN or --token-file", err=True)
    host = urlsplit(server).hostname or ""
    if server.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
        raise click.UsageError(f"{server}: plain http:// would send the worker token and "
                               "every input and output in clear; use https://")
    return token or ""


def _pull_worker(settings: Any, server: str, token: str, ca_file: str | None,
                 queues: list[str], concurrency: int, name: str | None) -> None:
    import logging

    from .pull import PullWorker
    from .pullclient import Client

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s sheepdog pull worker: %(levelname)s: %(message)s")
    client = Client(server, token, ca_file,
                    say=lambda text: click.echo(f"sheepdog worker: {text}", err=True))
    w = PullWorker(client, settings, queues, concurrency, name)
    for sig in (signal.SIGTERM, signal.SIGINT):  # going: running pieces go back to the queue
        signal.signal(sig, lambda *_: w.stop(release=True))
    click.echo(f"sheepdog worker {w.name} pulling from {server} ({', '.join(queues)})",
               err=True)
    w.run()


@cli.command()
@click.option("--bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve on.")
@click.option("--local-workers", "local_workers", default=os.cpu_count() or 1, show_default=True,
              help="Tasks at once in a worker started alongside (0: rely on other workers).")
@click.option("--connections", default=SERVE_CONNECTIONS, show_default=True,
              type=click.IntRange(16),
              help="Open connections at once (websockets, long polls and requests; each "
                   "is a greenlet of the event loop, not a thread).")
@click.option("--processes", default=os.cpu_count() or 1, show_default=True,
              type=click.IntRange(1),
              help="Web processes (each an event loop; one per core uses them all).")
@click.option("--threads", default=None, type=int, hidden=True,
              help="No longer used: connections are not threads (see --connections).")
@click.option("--certfile", envvar="SHEEPDOG_TLS_CERT", default=None, type=click.Path(),
              help="Serve HTTPS with this certificate (PEM, with its chain) "
                   "[env SHEEPDOG_TLS_CERT].")
@click.option("--keyfile", envvar="SHEEPDOG_TLS_KEY", default=None, type=click.Path(),
              help="... and this private key [env SHEEPDOG_TLS_KEY].")
def serve(bind: str, local_workers: int, connections: int, processes: int,
          threads: int | None, certfile: str | None, keyfile: str | None) -> None:
    """Serve the REST API, websockets and pages (gunicorn, event-driven) on the same Redis."""
    settings = _settings()
    tls: list[str] = []
    if certfile or keyfile:
        for option, path in (("--certfile", certfile), ("--keyfile", keyfile)):
            if not path or not Path(path).is_file():
                raise click.UsageError(f"HTTPS needs both --certfile and --keyfile; "
                                       f"{option} {path or ''} is not a file")
        tls = ["--certfile", str(certfile), "--keyfile", str(keyfile)]
    _conn(settings)  # a down Redis is reported now, not on the first request
    # SHEEPDOG_SERVE: the app tells its open websockets when gunicorn is told to go
    env = dict(os.environ, SHEEPDOG_REDIS_URL=url_for(settings), SHEEPDOG_SERVE="1")
    # `web` is a short name: put the directory this install's `web` package sits in first,
    # so a stray web/ folder where the server is started cannot shadow it
    home = str(Path(__file__).resolve().parent.parent)
    _room_for(connections)
    # gevent: an open websocket, a long-polling worker or a slow client costs a greenlet,
    # not one of a few threads; a request's head must arrive within --keep-alive seconds
    # (gevent's worker times out reading it), so a half-sent request holds nothing long
    # sheepdog.serve_worker: gevent's worker, taking waiting connections in batches
    argv = [sys.executable, "-m", "gunicorn", "--bind", bind,
            "--worker-class", "sheepdog.serve_worker.Worker",
            "--workers", str(processes), "--reuse-port",
            "--worker-connections", str(connections),
            "--keep-alive", str(int(SERVE_HEAD_TIMEOUT)), "--access-logfile", "-",
            "--graceful-timeout", str(int(SERVE_GRACE)), *_no_control_socket(),
            # the path without its query string (?token=...) and no referer: no token in logs
            "--access-logformat", '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s',
            *tls, "--pythonpath", home, "web:create_app()"]
    children: list[subprocess.Popen[bytes]] = []

    def going(signum: int, _frame: Any) -> None:
        raise _Stopping(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):  # a supervisor's stop, or Ctrl-C
        signal.signal(sig, going)
    code = 0
    try:
        if local_workers > 0:
            # its pieces yield the CPU to the service: requests are answered first
            children += Pool(settings, {"SHEEPDOG_SERVE": "1"}).start(
                1, settings.queue, concurrency=local_workers, session=False, nice=SERVE_NICE)
        scheme = "https" if tls else "http"
        click.echo(f"sheepdog serving on {scheme}://{bind} ({shown(url_for(settings))})", err=True)
        # each web process writes a byte here once its app is loaded
        ready, env[SERVE_READY_ENV] = _ready_pipe(processes, f"{scheme}://{bind}")
        children.insert(0, subprocess.Popen(argv, env=env, pass_fds=(ready,)))
        os.close(ready)
        code = children[0].wait()
    except _Stopping as e:
        click.echo(f"sheepdog serve: {signal.Signals(e.signum).name}: stopping", err=True)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # one stop at a time
        _stop_all(children)
    sys.exit(code)


def _ready_pipe(processes: int, where: str) -> tuple[int, str]:
    """The write end of a pipe for gunicorn's web processes (its number, for the
    environment); a thread says `ready` once `processes` of them wrote to it, and keeps
    reading (a restarted process writes too) until the last writer is gone."""
    read, write = os.pipe()

    def count() -> None:
        seen = 0
        while chunk := os.read(read, 64):
            seen += len(chunk)
            if seen >= processes > seen - len(chunk):
                click.echo(f"sheepdog serve: ready: {processes} web process"
                           f"{'es' if processes > 1 else ''} answering on {where}", err=True)
        os.close(read)

    threading.Thread(target=count, name="serve-ready", daemon=True).start()
    return write, str(write)


def _room_for(connections: int) -> None:
    """Enough file descriptors for every connection and its Redis link (the soft limit
    raised as far as the hard one allows; gunicorn inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))


def _parent_watch(parent: int, stop: Callable[[], None]) -> Callable[[threading.Event], None]:
    """A worker service: `stop` once the parent process is gone (this process is then
    another's child: a SIGKILLed parent sends no signal, and a parent-death signal would
    follow the thread that started the worker, not the process)."""
    def watch(stopping: threading.Event) -> None:
        while not stopping.wait(PARENT_WATCH):
            if os.getppid() != parent:
                click.echo("sheepdog worker: the process that started it is gone; stopping",
                           err=True)
                stop()
                return

    return watch


def _orphaned(conn: Any, w: Worker, job_id: str) -> None:
    """An Executor's worker whose interpreter is gone: nobody waits for its job's
    results, so the job is cancelled and the worker goes, at once (its calls run in
    its own threads, which cannot be stopped: the process ends)."""
    threading.Timer(KILL_GRACE, os._exit, args=(0,)).start()  # whatever happens below
    try:
        store.cancel_job(conn, job_id)
    except (redis.RedisError, SheepdogError):
        pass  # Redis is away too: the job stays open until retention takes it
    finally:
        w.stop(release=True)


def _no_control_socket() -> list[str]:
    """gunicorn 25.1 and later open a control socket, by default in ~/.gunicorn: `serve`
    stops its own gunicorn, and two services on one machine must not share one socket."""
    import gunicorn

    return ["--no-control-socket"] if gunicorn.version_info >= (25, 1) else []


class _Stopping(BaseException):
    """A signal told `serve` to stop (raised in its main thread)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_all(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each (gunicorn closes its websockets and drains; a worker hands its
    running pieces back), then SIGKILL whatever is still there after the grace."""
    stop_all(children, WORKER_STOP_WAIT)


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
    from .checks import check_host, local_gemma_version
    from .hosts import resolve

    target = resolve(host, _settings().inventory)
    checks = check_host(target, Cache(_settings().cache_dir), local_gemma_version())
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
    entries = Cache(_settings().cache_dir).entries()
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
    local = Cache(settings.cache_dir)
    entries = local.entries()
    for e in entries:
        local.remove(e.id)
    click.echo(f"removed {len(entries)} entries, {sum(e.size for e in entries):,d} bytes")


def _size(text: str) -> int:
    """10G, 500M, 2048K, 123 (bytes)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper().rstrip("B"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 10G, 500M or 123456") from None


def _age(text: str) -> float:
    """30d, 12h, 45m, 90s (seconds)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    unit = text[-1:].lower() if text[-1:].isalpha() else "s"
    try:
        return float(text[:-1] if text[-1:].isalpha() else text) * units[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not an age like 30d, 12h or 45m") from None


@cache.command("gc")
@click.option("--max-size", default=None, metavar="SIZE",
              help="Trim to at most SIZE (10G, 500M), least recently used first.")
@click.option("--older-than", default=None, metavar="AGE",
              help="Remove entries unused for AGE (30d, 12h).")
@click.option("--json", "as_json", is_flag=True)
def cache_gc(max_size: str | None, older_than: str | None, as_json: bool) -> None:
    """Trim the cache; never what a queued or running piece needs."""
    from .retention import gc, needed

    if max_size is None and older_than is None:
        raise click.UsageError("give --max-size SIZE and/or --older-than AGE")
    settings = _settings()
    keep = needed(_conn(settings))
    done = gc(Cache(settings.cache_dir), keep, _size(max_size) if max_size else None,
              _age(older_than) if older_than else None)
    if as_json:
        _print_json({"removed": [e.__dict__ for e in done.removed],
                     "kept_needed": done.kept_needed, "size_before": done.size_before,
                     "size_after": done.size_after})
        return
    click.echo(f"removed {len(done.removed)} entries, "
               f"{done.size_before - done.size_after:,d} bytes; {done.size_after:,d} bytes "
               f"left" + (f" ({done.kept_needed} kept: live pieces need them)"
                          if done.kept_needed else ""))


@cli.group("tokens")
def tokens_group() -> None:
    """API tokens with roles (read, submit, worker, admin), stored hashed."""


@tokens_group.command("add")
@click.option("--role", required=True, type=click.Choice(tokens.ROLES),
              help="read: jobs, logs, results; submit: also run workflows; worker: a pull "
                   "worker's protocol only; admin: everything, commands too.")
@click.option("--name", default=None, help="A name to list and revoke it by.")
@click.option("--trusted", is_flag=True,
              help="A worker whose outputs enter the shared cache, reused by every identical "
                   "piece of every job; an untrusted worker's serve only its own job.")
@click.option("--queue", "queues", multiple=True, metavar="NAME",
              help="A worker token takes pieces of this queue only (repeatable; default: "
                   "any queue).")
def tokens_add(role: str, name: str | None, trusted: bool, queues: tuple[str, ...]) -> None:
    """Make a token; it is printed once, alone on the last line."""
    path = tokens.tokens_file(_settings())
    entry, token = tokens.add(path, role, name, trusted, queues)
    extra = (", trusted" if entry.trusted else "") + (
        f", queues {', '.join(entry.queues)}" if entry.queues else "")
    click.echo(f"token {entry.name} (role {entry.role}{extra}) added to {path}; it is shown "
               "only now:")
    click.echo(token)


@tokens_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def tokens_list(as_json: bool) -> None:
    """The tokens' names and roles (never the tokens)."""
    path = tokens.tokens_file(_settings())
    found = tokens.load(path)
    if as_json:
        _print_json([{"name": e.name, "role": e.role, "created": e.created,
                      "trusted": e.trusted, "queues": e.queues} for e in found])
        return
    for e in found:
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
        click.echo(f"{e.name:24} {e.role:7} {made}")


@tokens_group.command("revoke")
@click.argument("name")
def tokens_revoke(name: str) -> None:
    """Remove a token: a running service refuses it from its next request."""
    path = tokens.tokens_file(_settings())
    if not tokens.revoke(path, name):
        raise click.ClickException(f"no token named {name!r} in {path}")
    click.echo(f"revoked {name}")


@cli.group("redis")
def redis_group() -> None:
    """The embedded Redis server used when SHEEPDOG_REDIS_URL is not set."""


@redis_group.command("status")
def redis_status() -> None:
    """Say which Redis is in use (starting the embedded one if needed)."""
    settings = _settings()
    conn = _conn(settings)
    info = conn.info("server")
    click.echo(f"{shown(url_for(settings))}  redis {info.get('redis_version')}  "
               f"pid {info.get('process_id')}  {info.get('executable', '')}")


@redis_group.command("stop")
def redis_stop() -> None:
    """Stop the embedded Redis server (its data stays on disk)."""
    home = _settings().home
    click.echo("stopped" if embedded.stop(home) else "not running")


@cli.command()
@click.argument("job_id")
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Write the result files here too.")
@click.option("--item", "item_key", default=None, metavar="KEY",
              help="One item's output (map jobs); an error says why it has none.")
@click.option("--json", "as_json", is_flag=True,
              help="All of it (without: lists cut to their first 10 entries).")
def result(job_id: str, out_dir: str | None, item_key: str | None, as_json: bool) -> None:
    """Print a finished job's result (and write its files to --out)."""
    settings = _settings()
    db = _conn(settings)
    job = store.get_job(db, job_id)
    workflow = workflows.find(job.workflow)
    if workflow is None:
        raise click.ClickException(f"job {job_id}'s workflow {job.workflow!r} is not installed")
    if item_key is not None:
        _print_json(workflow.item(db, settings, job, item_key))
        return
    # a workflow whose pieces are items keeps the results of those that succeeded
    if job.status != JobStatus.SUCCESS and not (workflow.partial_results and job.status.final):
        raise click.ClickException(f"job {job_id} is {job.status}, not a finished job "
                                   "with a result")
    found = (workflow.export(db, settings, job, Path(out_dir)) if out_dir
             else workflow.describe(db, settings, job))
    _print_json(found if as_json else readout.shortened(found))


def _main() -> int:
    on_sigterm()
    try:
        code = cli.main(standalone_mode=False)  # click's own Exit comes back as its code
        return code if isinstance(code, int) else 0
    except Terminated:
        return Terminated.exit_code
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
    own_signals()  # pieces get SIGINT as a program expects it, however this was started
    try:
        code = _main()
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = 0
    # Everything is written and every job's state is in Redis: skip the interpreter's
    # teardown of numpy/redis/rq modules (measured ≈0.3 s, a tenth of a cold BXD scan).
    os._exit(code)
