"""Worker processes on this machine, started and stopped together, and the one rule for
when they are needed: `serve`'s local workers, the burst worker a detached `run`
leaves behind, an Executor's workers. (A waiting `run` with nobody to serve it runs
its job in threads of its own instead: runner.Helpers, by the same rule.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from .config import Settings
from .defaults import DETACHED_LINGER
from .registration import live_workers

if TYPE_CHECKING:
    import redis


def unserved(conn: redis.Redis, queue: str) -> bool:
    """No live worker serves `queue`: whoever waits on it must bring its own."""
    return not live_workers(conn, queue)


def spawn_detached_worker(settings: Settings, queue: str) -> int:
    """A background `sheepdog worker --burst` for `run --detach` when no worker serves
    the queue: it goes once nothing has been left for it for DETACHED_LINGER seconds."""
    return Pool(settings).start(1, queue, concurrency=os.cpu_count() or 1, burst=True,
                                linger=DETACHED_LINGER, quiet="all")[0].pid


class Pool:
    """`sheepdog worker` processes on one queue."""

    def __init__(self, settings: Settings, env: dict[str, str] | None = None) -> None:
        url = settings.redis_url
        if not url:
            from .connection import url_for  # (redis-py): starts the embedded one if need be

            url = url_for(settings)
        # the same Redis (an embedded one by its URL), plus what the caller adds
        self.env = dict(os.environ, SHEEPDOG_REDIS_URL=url, **(env or {}))
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, count: int, queue: str, concurrency: int = 1, burst: bool = False,
              linger: float = 0.0, quiet: str = "", session: bool = True, parent_job: str = "",
              nice: int = 0) -> list[subprocess.Popen[bytes]]:
        """`count` workers of `concurrency` threads each; `burst`: each goes when nothing
        has been left for it for `linger` seconds. `quiet`: "all" sends their
        output to /dev/null (a worker nobody watches), "stdout" only their stdout (the
        caller's stdout is its own; their warnings still show); `session`: each in a
        session of its own (False: in the caller's process group, as `serve`'s are, so
        a signal to the group reaches them too); `parent_job`: when this process is
        gone, however it ended, they cancel that job and exit (an Executor's); `nice`:
        they and their pieces run at that much lower a CPU priority."""
        argv = [sys.executable, "-m", "sheepdog", "worker", "--queue", queue,
                "--concurrency", str(concurrency), *(["--burst"] if burst else []),
                *(["--linger", f"{linger:g}"] if burst and linger else []),
                *(["--with-parent", f"{os.getpid()}:{parent_job}"] if parent_job else [])]
        out = subprocess.DEVNULL if quiet in ("all", "stdout") else None
        err = subprocess.DEVNULL if quiet == "all" else None
        if nice:
            argv = ["nice", "-n", str(nice), *argv]
        started = [subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=session)
                   for _ in range(count)]
        self.processes += started
        return started

    def stop(self, grace: float) -> None:
        """SIGTERM to each (a worker hands its running pieces back and goes), then
        SIGKILL to whatever is still there after `grace` seconds."""
        stop_all(self.processes, grace)
        self.processes.clear()


def stop_all(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM to each, then SIGKILL what is still there after `grace` seconds in all."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
