"""Live-log costs: how long Redis is held by log writes, what lines past the cap cost,
and how late a line reaches a follower — each against a baseline in the same run.

    python3 bench/stream_bench.py [--lines 1000000] [--rate-seconds 10]

(a) A piece prints --lines lines as fast as it can (the log cap is 200,000). A second
    client PINGs Redis every millisecond meanwhile: the worst PING is how long one log
    write held Redis. Baseline: the same job with unbounded batches and no stop at the
    cap (the old writer).
(b) Redis calls per line once the job is past its cap, from INFO commandstats.
(c) A piece prints a timestamped line every 10 ms; a follower (logs.follow, what the CLI
    and race use) notes when each arrives: p50/p99 delay.
(d) The same through `sheepdog serve` (gunicorn) to a websocket client, as a browser
    sees it: 100 lines/s, then a burst of 20,000 lines in one second; p50/p99 delay from
    the timestamp in each line to its arrival, and every line checked present once, in
    order. Targets: p99 <= 50 ms at 100 lines/s, <= 250 ms in the burst.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"  # git-ignored: what a run leaves behind
OUT.mkdir(exist_ok=True)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RedisServer, free_port  # noqa: E402

from sheepdog import jobs, logs, store  # noqa: E402
from sheepdog.config import Settings  # noqa: E402
from sheepdog.models import JobStatus  # noqa: E402
from sheepdog.worker import Worker  # noqa: E402


class OldWriter(logs.LogWriter):
    """The writer as it was: one Lua call per flush however big (only kept under Redis'
    limit of a million arguments per command), no stop at the cap."""

    def _send(self, strict: bool = False) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._last = time.monotonic()
        step = 100_000 * 5
        for at in range(0, len(batch), step):
            self._seq += 1  # the script's calling convention of today, the old batching
            self._script(keys=[*self._keys, self._seqkey],
                         args=[self._cap, self._bytecap, self._seq, *batch[at:at + step]])


def run_job(conn: redis.Redis, settings: Settings, argv: list[str]) -> str:
    job, tasks = jobs.command_job(argv, settings)
    jobs.submit(conn, settings, job, tasks)
    worker = Worker(conn, settings, [settings.queue], burst=True, register=False)
    worker.run()
    ended = store.get_job(conn, job.id)
    if ended.status != JobStatus.SUCCESS:
        raise SystemExit(f"the benchmark job {ended.status}: {ended.error}")
    return job.id


PINGER = """
import sys, threading, time, redis
client = redis.Redis.from_url(sys.argv[1])
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
times = []
while not done.is_set():
    t = time.perf_counter()
    client.ping()
    times.append((time.perf_counter() - t) * 1000)
    time.sleep(0.001)
times.sort()
print(times[-1], times[int(len(times) * 0.99)])
"""


def pinged_during(url: str, work) -> tuple[float, float]:
    """(max, p99) PING round trip in ms while work() runs, from a process of its own
    (a thread here would measure this process's GIL, not Redis)."""
    pinger = subprocess.Popen([sys.executable, "-c", PINGER, url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    try:
        work()
    finally:
        out, _ = pinger.communicate("")
    worst, p99 = map(float, out.split())
    return worst, p99


def calls(conn: redis.Redis) -> tuple[int, int]:
    """(the writer's round trips: script calls, the commands Redis ran inside them)."""
    stats = conn.info("commandstats")
    trips = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))
    inner = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("xadd", "incr"))
    return trips, inner


def burst(conn, settings, url, lines: int) -> dict[str, float]:
    program = f"import sys\nw = sys.stdout.write\nfor i in range({lines}): w(f'line {{i}}\\n')"
    argv = [sys.executable, "-c", program]
    out: dict[str, float] = {}
    trips, inner = calls(conn)
    conn.config_set("slowlog-log-slower-than", 0)  # every command, with its duration
    conn.config_set("slowlog-max-len", 1_000_000)
    conn.slowlog_reset()
    started = time.perf_counter()
    out["max_ms"], out["p99_ms"] = pinged_during(url, lambda: run_job(conn, settings, argv))
    out["seconds"] = time.perf_counter() - started
    trips_after, inner_after = calls(conn)
    out["trips"] = trips_after - trips
    out["commands_per_line"] = (inner_after - inner) / lines
    scripts = [e["duration"] for e in conn.slowlog_get(1_000_000)
               if e["command"].split(b" ")[0].lower() in (b"evalsha", b"eval")]
    out["longest_script_ms"] = max(scripts) / 1000 if scripts else 0.0
    return out


def follow_delay(conn, settings, seconds: float) -> tuple[float, float, int]:
    count = int(seconds * 100)
    program = (f"import time\nfor i in range({count}):\n"
               "    print(repr(time.time()), flush=True)\n    time.sleep(0.01)\n")
    job, tasks = jobs.command_job([sys.executable, "-c", program], settings)
    jobs.submit(conn, settings, job, tasks)
    worker = Worker(conn, settings, [settings.queue], burst=True, register=False)
    runner = threading.Thread(target=worker.run)
    runner.start()
    delays = []

    def ended() -> bool:
        return JobStatus(store.get_job(conn, job.id).status).final

    for line in logs.follow(conn, job.id, ended):
        if line.stream == "stdout":
            delays.append((time.time() - float(line.text)) * 1000)
    runner.join()
    delays.sort()
    return statistics.median(delays), delays[int(len(delays) * 0.99)], len(delays)


RATE_PROGRAM = """
import sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
per_tick = max(1, int(rate / 100))
start, n = time.time(), 0
while n < rate * seconds:
    now = time.time()
    sys.stdout.write("".join(f"{n + k} {now!r}\\n" for k in range(per_tick)))
    sys.stdout.flush()
    n += per_tick
    time.sleep(max(0.0, start + n / rate - time.time()))
"""


def websocket_delays(base: str, token: str, rate: float, seconds: float
                     ) -> tuple[float, float, int, bool]:
    """(p50 ms, p99 ms, lines, whole and in order) for one job's lines over a websocket."""
    import json
    import urllib.request

    from simple_websocket import Client

    body = {"workflow": "command", "command": [sys.executable, "-c", RATE_PROGRAM,
                                               str(rate), str(seconds)]}
    req = urllib.request.Request(f"{base}/jobs", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    job = json.loads(urllib.request.urlopen(req, timeout=30).read())
    ws = Client.connect(f"{base.replace('http', 'ws')}/jobs/{job['id']}/stream?token={token}")
    delays, numbers = [], []
    while True:
        message = json.loads(ws.receive(timeout=60))
        if message["type"] == "line" and message["stream"] == "stdout":
            arrived = time.time()
            number, stamp = message["text"].split()
            numbers.append(int(number))
            delays.append((arrived - float(stamp)) * 1000)
        elif message["type"] == "end":
            break
    ws.close()
    delays.sort()
    whole = numbers == list(range(len(numbers))) and len(numbers) >= int(rate * seconds)
    return (statistics.median(delays), delays[int(len(delays) * 0.99)], len(delays), whole)


def through_serve(url: str, home: Path) -> dict[str, tuple[float, float, int, bool]]:
    import os
    import signal
    import urllib.request

    port = free_port()
    base, token = f"http://127.0.0.1:{port}", "bench"
    env = dict(os.environ, SHEEPDOG_REDIS_URL=url, SHEEPDOG_HOME=str(home),
               SHEEPDOG_API_TOKENS=token, SHEEPDOG_QUEUE="bench-ws")
    server = subprocess.Popen([sys.executable, "-m", "sheepdog", "serve", "--bind",
                               f"127.0.0.1:{port}", "--local-workers", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        return {"100 lines/s for 10 s": websocket_delays(base, token, 100, 10),
                "20,000 lines in 1 s": websocket_delays(base, token, 20000, 1)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument("--websocket-only", action="store_true", help="(d) alone")
    args = parser.parse_args()
    if args.websocket_only:
        work = Path(tempfile.mkdtemp(prefix="sheepdog-stream-bench-", dir=OUT))
        server = RedisServer(free_port(), work)
        server.start()
        try:
            websocket = through_serve(server.url, work / "serve-home")
        finally:
            server.stop()
        _print_websocket(websocket)
        return
    work = Path(tempfile.mkdtemp(prefix="sheepdog-stream-bench-", dir=OUT))
    server = RedisServer(free_port(), work)
    server.start()
    try:
        conn = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, home=work / "home", queue="bench")
        now = burst(conn, settings, server.url, args.lines)
        original = logs.LogWriter
        logs.LogWriter = OldWriter  # type: ignore[misc]
        try:
            old = burst(conn, settings, server.url, args.lines)
        finally:
            logs.LogWriter = original  # type: ignore[misc]
        p50, p99, got = follow_delay(conn, settings, args.rate_seconds)
    finally:
        server.stop()
    # (d) on a Redis of its own: after (a)'s million lines its AOF is rewritten in the
    # background, which is (a)'s cost, not the stream's
    fresh = RedisServer(free_port(), work / "d")
    (work / "d").mkdir()
    fresh.start()
    try:
        websocket = through_serve(fresh.url, work / "serve-home")
    finally:
        fresh.stop()
    print(f"(a) {args.lines:,d} lines at full speed, cap 200,000")
    print(f"    longest log write inside Redis: {now['longest_script_ms']:.1f} ms; old writer "
          f"{old['longest_script_ms']:.1f} ms")
    print(f"    worst PING while logging: {now['max_ms']:.1f} ms (p99 {now['p99_ms']:.2f} ms);"
          f" old writer {old['max_ms']:.1f} ms (p99 {old['p99_ms']:.2f} ms): "
          f"{old['max_ms'] / now['max_ms']:.1f}x shorter")
    print(f"(b) writer round trips: {now['trips']:,.0f} (old {old['trips']:,.0f}); commands "
          f"Redis ran per line: {now['commands_per_line']:.2f} (old "
          f"{old['commands_per_line']:.2f}: every line past the cap still cost one); "
          f"job {now['seconds']:.1f} s (old {old['seconds']:.1f} s)")
    print(f"(c) {got} lines at 100 lines/s to logs.follow: delay p50 {p50:.0f} ms, "
          f"p99 {p99:.0f} ms")
    _print_websocket(websocket)


def _print_websocket(websocket: dict[str, tuple[float, float, int, bool]]) -> None:
    for name, (w50, w99, count, whole) in websocket.items():
        print(f"(d) {name} through sheepdog serve to a websocket: {count:,d} lines, delay "
              f"p50 {w50:.0f} ms, p99 {w99:.0f} ms; "
              + ("every line once, in order" if whole else "LINES LOST OR OUT OF ORDER"))


if __name__ == "__main__":
    main()
