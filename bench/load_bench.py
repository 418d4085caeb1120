#!/usr/bin/env python3
"""The web service under load, through `sheepdog serve` (gunicorn) on a real Redis.

    python3 bench/load_bench.py [--posts 1000] [--clients 50] [--followers 200]
                                [--stored 100000]

(a) --posts concurrent `POST /jobs` (command jobs) from --clients threads: none lost
    (every one accepted and finished), no 5xx, latency p50/p99; Redis memory per
    finished job (INFO used_memory before and after, divided by the jobs); the CPU a
    POST of the web processes, of Redis and of `serve`'s own worker while they came.
(b) --followers websocket clients at once, each following its own job (a line every
    0.1 s for 3 s) with that job's read token: every client gets every line and `end`;
    the slowest client's time to `end`, and the p99 line delay.
(c) `GET /jobs` paging (limit 200) through --stored stored jobs: time per page p50/p99
    and for the whole walk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"  # git-ignored: what a run leaves behind
OUT.mkdir(exist_ok=True)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RedisServer, free_port  # noqa: E402

from sheepdog import keys  # noqa: E402
from sheepdog.models import Job, JobStatus, to_hash  # noqa: E402

TOKEN = "load"


def call(base: str, method: str, path: str, body: object = None) -> tuple[int, object, float]:
    req = urllib.request.Request(f"{base}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - started
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def curl_posts(base: str, body: object, count: int, clients: int,
               work: Path) -> list[tuple[int, object, float]]:
    """The POSTs sent by curl (--parallel, --clients at once): a client that is not
    itself the bottleneck, as 50 Python threads sharing one interpreter were."""
    (work / "body.json").write_text(json.dumps(body))
    config = work / "curl.conf"
    config.write_text("".join(
        f'url = "{base}/jobs"\noutput = "{work / "answers"}/{i}.json"\n' for i in range(count)))
    (work / "answers").mkdir(exist_ok=True)
    done = subprocess.run(
        ["curl", "-s", "--parallel", "--parallel-immediate", "--parallel-max", str(clients),
         "-K", str(config), "-X", "POST", "-H", f"Authorization: Bearer {TOKEN}",
         "-H", "Content-Type: application/json", "--data-binary", f"@{work / 'body.json'}",
         "-w", "%{http_code} %{time_total} %{filename_effective}\n"],
        capture_output=True, text=True, check=True)
    answers = []
    for line in done.stdout.splitlines():
        code, seconds, path = line.split(" ", 2)
        text = Path(path).read_text()
        answers.append((int(code), json.loads(text) if code == "202" else text,
                        float(seconds)))
    return answers


def _descendants(pid: int) -> list[int]:
    """The processes under `pid` (Linux /proc), nearest first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cpu(pids: list[int], waited: bool = False) -> float:
    """Seconds of CPU the processes used (`waited`: with their children's they waited for)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15 if waited else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def _parts(service: int) -> tuple[list[int], list[int]]:
    """(the web processes, `serve`'s own worker) under `serve`'s pid."""
    web, worker = [], []
    for pid in _descendants(service):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in argv and any(a.endswith(b"sheepdog") for a in argv):
            worker.append(pid)
        elif any(b"gunicorn" in a for a in argv):
            web.append(pid)
    return web, worker


def posts(base: str, conn: redis.Redis, count: int, clients: int,
          work: Path, service: int = 0) -> dict[str, float]:
    before = int(conn.info("memory")["used_memory"])
    body = {"workflow": "command", "command": ["true"]}
    web, worker = _parts(service) if service else ([], [])
    cpu = (_cpu(web), _cpu(worker, waited=True), _redis_cpu(conn))
    if shutil.which("curl"):
        answers = curl_posts(base, body, count, clients, work)
    else:
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda _: call(base, "POST", "/jobs", body), range(count)))
    spent = (_cpu(web) - cpu[0], _cpu(worker, waited=True) - cpu[1], _redis_cpu(conn) - cpu[2])
    ids = [a[1]["id"] for a in answers if a[0] == 202 and isinstance(a[1], dict)]
    server_errors = sum(1 for a in answers if a[0] >= 500)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        pipe = conn.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(keys.job(job_id), "status")
        states = [s.decode() if s else "" for s in pipe.execute()]
        if all(s and JobStatus(s).final for s in states):
            break
        time.sleep(0.5)
    finished = sum(1 for s in states if s == "success")
    after = int(conn.info("memory")["used_memory"])
    latencies = [a[2] * 1000 for a in answers]
    return {"accepted": len(ids), "finished": finished, "lost": count - finished,
            "5xx": server_errors, "p50_ms": statistics.median(latencies),
            "p99_ms": percentile(latencies, 0.99),
            "bytes_per_job": (after - before) / max(1, finished),
            "web_ms": spent[0] * 1000 / count, "worker_ms": spent[1] * 1000 / count,
            "redis_ms": spent[2] * 1000 / count}


def _redis_cpu(conn: redis.Redis) -> float:
    info = conn.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


FOLLOWED = ("import time\nfor i in range(30):\n    print(i, repr(time.time()), flush=True)\n"
            "    time.sleep(0.1)\n")


def follow_one(base: str, job: dict) -> tuple[int, float, list[float]]:
    from simple_websocket import Client

    started = time.perf_counter()
    ws = Client.connect(f"{base.replace('http', 'ws')}/jobs/{job['id']}/stream"
                        f"?token={job['read_token']}")
    lines, delays = 0, []
    try:
        while True:
            message = json.loads(ws.receive(timeout=120))
            if message["type"] == "line" and message["stream"] == "stdout":
                lines += 1
                delays.append((time.time() - float(message["text"].split()[1])) * 1000)
            elif message["type"] == "end":
                break
    finally:
        ws.close()
    return lines, time.perf_counter() - started, delays


def _follow_many(base: str, jobs: list[dict]) -> list[tuple[int, float, list[float]]]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda j: _safe_follow(base, j), jobs))


def _safe_follow(base: str, job: dict) -> tuple[int, float, list[float]]:
    started = time.perf_counter()
    try:
        return follow_one(base, job)
    except Exception as e:  # noqa: BLE001  counted as a client that did not get it all
        print(f"client of {job['id']} in {os.getpid()} after "
              f"{time.perf_counter() - started:.1f} s: {type(e).__name__}: {e}", file=sys.stderr)
        return -1, 0.0, []


def followers(base: str, count: int) -> dict[str, float]:
    """Clients in four processes (as four browsers' worth of sockets, not one Python
    process holding them all)."""
    from concurrent.futures import ProcessPoolExecutor

    body = {"workflow": "command", "command": [sys.executable, "-c", FOLLOWED]}
    jobs = [call(base, "POST", "/jobs", body)[1] for _ in range(count)]
    groups = [jobs[i::4] for i in range(4)]
    with ProcessPoolExecutor(4) as pool:
        results = [r for part in pool.map(_follow_many, [base] * 4, groups) for r in part]
    whole = sum(1 for lines, _, _ in results if lines == 30)
    if whole < count:
        from collections import Counter
        print(f"lines per client: {sorted(Counter(r[0] for r in results).items())}",
              file=sys.stderr)
    delays = [d for _, _, ds in results for d in ds]
    return {"clients": count, "whole": whole, "slowest_s": max(r[1] for r in results),
            "p99_delay_ms": percentile(delays, 0.99)}


def store_jobs(conn: redis.Redis, count: int) -> None:
    """`count` finished jobs written as the store writes them (hash + index)."""
    now = time.time()
    pipe = conn.pipeline(transaction=False)
    for i in range(count):
        job = Job(id=f"stored-{i:07d}", workflow="command", status=JobStatus.SUCCESS,
                  command=["true"], submitted=now - count + i, ended=now - count + i + 0.5,
                  total=1, done=1, exit_code=0)
        pipe.hset(keys.job(job.id), mapping=to_hash(job))
        pipe.zadd(keys.jobs_index(), {job.id: job.submitted})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def paging(base: str) -> dict[str, float]:
    times, offset, seen = [], 0, 0
    walk = time.perf_counter()
    while True:
        status, page, took = call(base, "GET", f"/jobs?limit=200&offset={offset}")
        assert status == 200, page
        times.append(took * 1000)
        seen += len(page["jobs"])  # type: ignore[index]
        if len(page["jobs"]) < 200:  # type: ignore[index]
            break
        offset += 200
    return {"jobs": seen, "pages": len(times), "p50_ms": statistics.median(times),
            "p99_ms": percentile(times, 0.99), "walk_s": time.perf_counter() - walk}


def ready(web: subprocess.Popen[bytes], log: Path) -> None:
    """Until `serve` says every web process answers (a burst sent as soon as the first
    one does would measure the others' start-up, not the load)."""
    deadline = time.monotonic() + 120
    while "serve: ready:" not in log.read_text():
        if web.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the service did not start; its log: {log}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--followers", type=int, default=200)
    parser.add_argument("--stored", type=int, default=100_000)
    parser.add_argument("--posts-only", action="store_true", help="(a) only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sheepdog-load-", dir=OUT))
    server = RedisServer(free_port(), work)
    server.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SHEEPDOG_REDIS_URL=server.url, SHEEPDOG_HOME=str(work / "home"),
               SHEEPDOG_API_TOKENS=TOKEN, SHEEPDOG_QUEUE="load",
               SHEEPDOG_MAX_STREAMS_PER_TOKEN=str(args.followers + 10))
    web = subprocess.Popen([sys.executable, "-m", "sheepdog", "serve", "--bind",
                            f"127.0.0.1:{port}", "--local-workers", "8"], env=env,
                           stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "w"),
                           start_new_session=True)
    try:
        conn = redis.Redis.from_url(server.url)
        ready(web, work / "serve.log")
        a = posts(base, conn, args.posts, args.clients, work, web.pid)
        if not args.posts_only:
            b = followers(base, args.followers)
            store_jobs(conn, args.stored)
            c = paging(base)
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(20)
        server.stop()
    print(f"(the service's log: {work / 'serve.log'})")
    sender = "curl --parallel" if shutil.which("curl") else "Python threads"
    print(f"(a) {args.posts:,d} concurrent POST /jobs from {args.clients} clients ({sender}): "
          f"{a['accepted']:,.0f} accepted, {a['finished']:,.0f} finished, {a['lost']:.0f} lost, "
          f"{a['5xx']:.0f} 5xx; latency p50 {a['p50_ms']:.0f} ms, p99 {a['p99_ms']:.0f} ms; "
          f"Redis memory per finished job {a['bytes_per_job'] / 1024:.1f} KiB "
          f"(target: p99 <= 150 ms, none lost)")
    print(f"    CPU a POST while they came: the web processes {a['web_ms']:.2f} ms, Redis "
          f"{a['redis_ms']:.2f} ms, serve's own worker running the jobs {a['worker_ms']:.2f} ms")
    if args.posts_only:
        return
    print(f"(b) {b['clients']:.0f} websocket clients following a job each: {b['whole']:.0f} "
          f"got every line and `end`; slowest {b['slowest_s']:.1f} s (jobs of 3 s); line "
          f"delay p99 {b['p99_delay_ms']:.0f} ms")
    print(f"(c) GET /jobs through {c['jobs']:,.0f} stored jobs in {c['pages']:.0f} pages of "
          f"200: p50 {c['p50_ms']:.0f} ms, p99 {c['p99_ms']:.0f} ms per page, "
          f"{c['walk_s']:.1f} s in all")


if __name__ == "__main__":
    main()
