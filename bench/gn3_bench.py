#!/usr/bin/env python3
"""GN3's path through sheepdog: from `queue_cmd` of `echo hi` to `status: success`.

    python3 bench/gn3_bench.py [--runs 20]

GN3 pushes a command's id on its Redis list, then writes the command's hash (cmd,
result, status), exactly as gn3.commands.queue_cmd does; a long-running
`python -m sheepdog.worker --daemon` (GN3's worker command, served by sheepdog) runs it
and writes its status back. Each of --runs commands is queued once the previous one
succeeded; the time until GN3 would read `success` (polled every millisecond): median
and slowest (target: median <= 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RedisServer, free_port  # noqa: E402

QUEUE = "GN3::job-queue"  # GN3's default


def queue_cmd(conn: redis.Redis, cmd: list[str]) -> str:
    """gn3.commands.queue_cmd's writes, in its order: the id first, then the fields."""
    unique_id = f"cmd::{time.strftime('%Y-%m-%d%H-%M%S')}-{uuid.uuid4()}"
    conn.rpush(QUEUE, unique_id)
    for key, value in {"cmd": json.dumps(cmd), "result": "", "status": "queued"}.items():
        conn.hset(name=unique_id, key=key, value=value)
    return unique_id


def until_success(conn: redis.Redis, cmd_id: str, timeout: float = 30) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        status = conn.hget(cmd_id, "status")
        if status == b"success":
            return time.perf_counter() - started
        if status == b"error":
            raise SystemExit(f"{cmd_id} failed: {conn.hgetall(cmd_id)}")
        time.sleep(0.001)
    raise SystemExit(f"{cmd_id} did not succeed within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(free_port(), Path(tmp))
        server.start()
        env = dict(os.environ, SHEEPDOG_REDIS_URL=server.url,
                   SHEEPDOG_HOME=str(Path(tmp) / "home"))
        worker = subprocess.Popen([sys.executable, "-m", "sheepdog.worker", "--daemon"],
                                  env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            conn = redis.Redis.from_url(server.url)
            until_success(conn, queue_cmd(conn, ["echo", "warm"]))  # the worker is up
            took = [until_success(conn, queue_cmd(conn, ["echo", "hi"]))
                    for _ in range(args.runs)]
            print(f"GN3 queue_cmd(`echo hi`) to status success, {args.runs} commands one "
                  f"after another, a long-running `python -m sheepdog.worker --daemon`: "
                  f"median {statistics.median(took) * 1000:.0f} ms, slowest "
                  f"{max(took) * 1000:.0f} ms (target: median <= 50 ms)")
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
            server.stop()


if __name__ == "__main__":
    main()
