#!/usr/bin/env python3
"""sheepdog beside the tools people would otherwise use, on the same work, same run.

    python3 bench/peers_bench.py [--calls 10000] [--sleeps 1000] [--items 100000]
                                 [--hashes 200] [--workers 2] [--skip NAME ...]

Each alternative runs when it is installed here, and the table says "not installed"
when it is not (pip install loky "dask[distributed]" parsl rq; apt-get install
parallel). All use --workers processes; Redis-backed ones one redis-server (AOF, fsync
always, as deploy/redis.conf) started here.

(a) --calls no-op Python calls: sheepdog.Executor (its own workers), the standard
    library's ProcessPoolExecutor, loky, Parsl (HighThroughputExecutor), dask.distributed
    (LocalCluster) and RQ (SimpleWorker, one job per call).
(b) --sleeps calls of 10 ms each (ideal: sleeps x 10 ms / workers).
(c) --items `true` items: `sheepdog map -N0 --chunk 1000`, `xargs -P` (the floor of
    starting them) and GNU parallel.
(d) --hashes `sha256sum` of a 256 MiB file (about half a second each): `sheepdog map`
    and GNU parallel.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import rq_tasks  # noqa: E402
from conftest import RedisServer, free_port  # noqa: E402

Result = float | str  # seconds, or why it did not run


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, redis_url: str) -> None:
        self.args, self.work, self.url = args, work, redis_url
        self.env = dict(os.environ, SHEEPDOG_REDIS_URL=redis_url,
                        SHEEPDOG_HOME=str(work / "home"),
                        PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), str(ROOT)]))

    # -- Python calls
    def sheepdog_calls(self, fn: Callable[[int], object], n: int) -> float:
        from sheepdog import Executor
        from sheepdog.config import Settings

        settings = Settings(redis_url=self.url, home=self.work / "home", queue="peers")
        with Executor(max_workers=self.args.workers, settings=settings) as ex:
            ex.submit(fn, 0).result()  # its workers are up: time the calls, not the start
            return timed(lambda: concurrent.futures.wait([ex.submit(fn, i)
                                                          for i in range(n)]))

    def pool_calls(self, make: Callable[[], concurrent.futures.Executor],
                   fn: Callable[[int], object], n: int) -> float:
        with make() as pool:
            list(pool.map(fn, range(self.args.workers)))  # warm
            return timed(lambda: concurrent.futures.wait([pool.submit(fn, i)
                                                          for i in range(n)]))

    def loky_calls(self, fn: Callable[[int], object], n: int) -> Result:
        if not installed("loky"):
            return "not installed"
        from loky import get_reusable_executor

        return self.pool_calls(lambda: get_reusable_executor(self.args.workers), fn, n)

    def dask_calls(self, fn: Callable[[int], object], n: int) -> Result:
        if not installed("distributed"):
            return "not installed"
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=self.args.workers, threads_per_worker=1,
                          processes=True) as cluster, Client(cluster) as client:
            client.gather(client.map(fn, range(self.args.workers), pure=False))
            return timed(lambda: client.gather(client.map(fn, range(n), pure=False)))

    def parsl_calls(self, fn: Callable[[int], object], n: int) -> Result:
        if not installed("parsl"):
            return "not installed"
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor

        parsl.load(Config(executors=[HighThroughputExecutor(
            max_workers_per_node=self.args.workers)], run_dir=str(self.work / "parsl")))
        try:
            app = parsl.python_app(fn)
            [f.result() for f in [app(i) for i in range(self.args.workers)]]
            return timed(lambda: [f.result() for f in [app(i) for i in range(n)]])
        finally:
            parsl.dfk().cleanup()
            parsl.clear()

    def rq_calls(self, function: str, n: int) -> Result:
        if not installed("rq"):
            return "not installed"
        import redis
        from rq import Queue

        conn = redis.Redis.from_url(self.url)
        queue = Queue("peers-rq", connection=conn)
        started = time.perf_counter()
        with conn.pipeline() as pipe:
            for i in range(n):
                queue.enqueue(function, i, result_ttl=0, pipeline=pipe)
            pipe.execute()
        workers = [subprocess.Popen([sys.executable, "-m", "rq.cli", "worker", "--burst",
                                     "--url", self.url, "--worker-class",
                                     "rq.worker.SimpleWorker", "--quiet", "peers-rq"],
                                    env=self.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
                   for _ in range(self.args.workers)]
        for w in workers:
            w.wait()
        return time.perf_counter() - started

    # -- programs
    def sheepdog_map(self, extra: list[str], command: list[str]) -> float:
        workers = [subprocess.Popen([sys.executable, "-m", "sheepdog", "worker", "--queue",
                                     "peers-map"], env=self.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
                   for _ in range(self.args.workers)]
        try:
            time.sleep(2)  # registered and waiting
            return timed(lambda: subprocess.run(
                [sys.executable, "-m", "sheepdog", "map", "--queue", "peers-map", *extra,
                 "--json", "--", *command], env=self.env, capture_output=True, check=True))
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(30)

    def xargs(self, items: int, command: list[str]) -> Result:
        if not shutil.which("xargs"):
            return "not installed"
        listing = self.work / "items.txt"
        listing.write_text("".join(f"{i}\n" for i in range(items)))
        return timed(lambda: subprocess.run(
            # `true ITEM`: xargs cannot leave the item out (coreutils' true then sets up
            # its locale, ~40% dearer than `true` alone: the floor is lower still)
            ["xargs", "-P", str(self.args.workers), "-n", "1", "-a", str(listing), *command],
            check=True, stdout=subprocess.DEVNULL))

    def gnu_parallel(self, items: int, command: list[str]) -> Result:
        if not shutil.which("parallel"):
            return "not installed"
        listing = self.work / "items.txt"
        listing.write_text("".join(f"{i}\n" for i in range(items)))
        return timed(lambda: subprocess.run(
            ["parallel", "-j", str(self.args.workers), "-N0", "-a", str(listing), *command],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def show(title: str, rows: list[tuple[str, Callable[[], Result]]], skip: list[str]) -> None:
    print(title)
    for name, run in rows:
        if any(s.lower() in name.lower() for s in skip):
            print(f"  {name:38s} skipped")
            continue
        try:
            got = run()
        except Exception as e:  # noqa: BLE001  one peer failing must not hide the rest
            got = f"failed: {type(e).__name__}: {str(e)[:120]}"
        print(f"  {name:38s} {got:8.2f} s" if isinstance(got, float) else
              f"  {name:38s} {got}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--sleeps", type=int, default=1_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--hashes", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="names (or parts) to skip")
    args = parser.parse_args()
    # the calls' module, for every worker process of every tool
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT)])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = RedisServer(free_port(), work)
        server.start()
        try:
            b = Bench(args, work, server.url)
            w = args.workers
            stdlib = functools.partial(concurrent.futures.ProcessPoolExecutor, w)
            n, s = args.calls, args.sleeps
            show(f"(a) {n:,d} no-op Python calls, {w} workers", [
                ("sheepdog.Executor", lambda: b.sheepdog_calls(rq_tasks.noop, n)),
                ("stdlib ProcessPoolExecutor", lambda: b.pool_calls(stdlib, rq_tasks.noop, n)),
                ("loky", lambda: b.loky_calls(rq_tasks.noop, n)),
                ("Parsl HighThroughputExecutor", lambda: b.parsl_calls(rq_tasks.noop, n)),
                ("dask.distributed", lambda: b.dask_calls(rq_tasks.noop, n)),
                ("RQ SimpleWorker", lambda: b.rq_calls("rq_tasks.noop", n))], args.skip)
            show(f"(b) {s:,d} calls of 10 ms, {w} workers (ideal {s * 0.01 / w:.1f} s)", [
                ("sheepdog.Executor", lambda: b.sheepdog_calls(rq_tasks.sleep10, s)),
                ("stdlib ProcessPoolExecutor", lambda: b.pool_calls(stdlib, rq_tasks.sleep10, s)),
                ("loky", lambda: b.loky_calls(rq_tasks.sleep10, s)),
                ("Parsl HighThroughputExecutor", lambda: b.parsl_calls(rq_tasks.sleep10, s)),
                ("dask.distributed", lambda: b.dask_calls(rq_tasks.sleep10, s))], args.skip)
            i = args.items
            show(f"(c) {i:,d} `true` items, {w} at a time", [
                ("sheepdog map -N0 --chunk 1000", lambda: b.sheepdog_map(
                    ["--range", f"1:{i}", "-N0", "--chunk", "1000"], ["true"])),
                (f"xargs -P{w} (the floor)", lambda: b.xargs(i, ["true"])),
                ("GNU parallel", lambda: b.gnu_parallel(i, ["true"]))], args.skip)
            h = args.hashes
            blob = work / "blob"
            with open(blob, "wb") as f:
                f.truncate(256 << 20)
            show(f"(d) {h} x `sha256sum` of 256 MiB, {w} at a time", [
                ("sheepdog map", lambda: b.sheepdog_map(
                    ["--range", f"1:{h}", "-N0", "--chunk", "1"], ["sha256sum", str(blob)])),
                ("GNU parallel", lambda: b.gnu_parallel(h, ["sha256sum", str(blob)]))],
                args.skip)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
