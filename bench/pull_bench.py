#!/usr/bin/env python3
"""Pull workers (HTTPS) against Redis workers, measured in the same run.

    python3 bench/pull_bench.py [--pieces 2000] [--rounds 3]

(a) --pieces no-op pieces (`true`) through one pull worker (-j 1, over HTTPS to
    `sheepdog serve` with a test certificate) and through one Redis worker (-j 1):
    pieces per second each, best of --rounds; target: the pull worker's throughput
    at least 0.8 of the Redis worker's. Enough pieces for the steady rate: 300 (under
    a second) measured mostly the pull worker's first claims, before its prefetch
    deepens, and the ratio of one tree moved 0.66-0.99 within an hour.
(b) the BXD LOCO scan (`sheepdog run gemma-loco --example`, cold) through a pull worker
    (-j 2, its own empty cache: every input travels over HTTPS) against the same scan
    run locally (the CLI's own worker); target: within 1.5x.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"  # git-ignored: what a run leaves behind
OUT.mkdir(exist_ok=True)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tlscerts  # noqa: E402
from conftest import RedisServer, free_port  # noqa: E402
from pullservice import Service, add_token, kill, start_worker, worker_env  # noqa: E402

from sheepdog import jobs, store  # noqa: E402
from sheepdog.config import Settings  # noqa: E402
from sheepdog.models import Job, JobStatus, Task  # noqa: E402


def wait_done(conn: redis.Redis, job_id: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = store.get_job(conn, job_id).status
        if status.final:
            assert status == JobStatus.SUCCESS, f"job {job_id} ended {status}"
            return
        time.sleep(0.01)
    tasks = store.job_tasks(conn, job_id)
    states: dict[str, int] = {}
    for t in tasks:
        states[f"{t.status}/{t.worker}"] = states.get(f"{t.status}/{t.worker}", 0) + 1
    raise AssertionError(f"job {job_id} did not finish: {states}")


def noop_job(conn: redis.Redis, settings: Settings, n: int, tag: str) -> float:
    """Submit n no-op pieces; seconds until the job succeeded."""
    tasks = [Task(name=f"noop {i}", argv=["true", tag, str(i)], queue=settings.queue)
             for i in range(n)]
    job = Job(id=jobs.new_job_id(), workflow="command")
    started = time.perf_counter()
    jobs.submit(conn, settings, job, tasks)
    wait_done(conn, job.id)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pieces", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-scan", action="store_true", help="(a) only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pull-bench-", dir=OUT))
    server = RedisServer(free_port(), work)
    server.start()
    conn = redis.Redis.from_url(server.url)
    certs = tlscerts.make(work / "certs")
    base = dict(os.environ, SHEEPDOG_REDIS_URL=server.url, SHEEPDOG_HOME=str(work / "service"),
                SHEEPDOG_QUEUE="bench", SHEEPDOG_TOKENS_FILE=str(work / "tokens.json"),
                PYTHONUNBUFFERED="1")
    (work / "service").mkdir()
    token = add_token(base, "worker", "bench")
    service = Service(base, f"127.0.0.1:{free_port()}", certs.server_cert, certs.server_key,
                      certs.ca)
    service.start()
    settings = Settings(redis_url=server.url, home=work / "service", queue="bench")
    procs: list[subprocess.Popen] = []
    try:
        # (a) no-op pieces, one worker of each kind, alternating rounds
        best = {"redis": float("inf"), "pull": float("inf")}
        for r in range(args.rounds):
            for kind in ("redis", "pull"):
                if kind == "redis":
                    proc = subprocess.Popen([sys.executable, "-m", "sheepdog", "worker",
                                             "--queue", "bench", "-j", "1"], env=base,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True)
                else:
                    proc = start_worker(service.url, worker_env(base, work / f"w{r}", token),
                                        "--queue", "bench", "-j", "1", ca=certs.ca)
                procs.append(proc)
                time.sleep(2)  # up and waiting
                best[kind] = min(best[kind], noop_job(conn, settings, args.pieces, f"{kind}{r}"))
                kill(proc, signal.SIGTERM)
        rate = {k: args.pieces / v for k, v in best.items()}
        print(f"(a) {args.pieces} no-op pieces, one worker (-j 1), best of {args.rounds}:")
        print(f"    Redis worker {rate['redis']:7.1f} pieces/s   pull worker over HTTPS "
              f"{rate['pull']:7.1f} pieces/s   ratio {rate['pull'] / rate['redis']:.2f} "
              "(target >= 0.8)")
        if args.no_scan:
            return

        # (b) the BXD LOCO scan, cold, local against a pull worker
        local_env = dict(base, SHEEPDOG_HOME=str(work / "local"), SHEEPDOG_QUEUE="local")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sheepdog", "run", "gemma-loco",
                               "--example"], env=local_env, capture_output=True, text=True)
        local = time.perf_counter() - started
        assert done.returncode == 0, done.stderr[-2000:]
        conn.flushdb()
        worker = start_worker(service.url, worker_env(base, work / "wloco", token),
                              "--queue", "bench", "-j", "2", ca=certs.ca)
        procs.append(worker)
        time.sleep(2)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sheepdog", "run", "gemma-loco",
                               "--example"], env=base, capture_output=True, text=True)
        pulled = time.perf_counter() - started
        assert done.returncode == 0, done.stderr[-2000:]
        print(f"(b) BXD LOCO scan, cold: local {local:.2f} s   through a pull worker "
              f"(-j 2, empty cache) {pulled:.2f} s   ratio {pulled / local:.2f} "
              "(target <= 1.5)")
    finally:
        for p in procs:
            kill(p)
        service.stop()
        server.stop()


if __name__ == "__main__":
    main()
