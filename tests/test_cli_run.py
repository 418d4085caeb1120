"""`sheepdog run` and friends, as a user types them, against a real redis-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import free_port, sheepdog, wait_for

from sheepdog import jobs, keys, liveness, registration, store
from sheepdog.models import JobStatus


def test_run_streams_both_streams_and_exits_with_the_commands_code(env):
    r = sheepdog("run", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3", env=env)
    assert r.returncode == 3
    assert r.stdout.splitlines() == ["to-out"]
    assert "to-err" in r.stderr.splitlines()
    assert "Traceback" not in r.stderr


def test_run_success_and_arguments_reach_the_program_unchanged(env):
    r = sheepdog("run", "--", "printf", "%s|", "a b", "$HOME", "'q'", env=env)
    assert r.returncode == 0
    assert r.stdout == "a b|$HOME|'q'|\n"


def test_detach_prints_only_the_id_and_a_worker_runs_it(env, conn):
    r = sheepdog("run", "--detach", "--", "sh", "-c", "echo detached", env=env)
    assert r.returncode == 0
    job_id = r.stdout.strip()
    assert len(r.stdout.splitlines()) == 1
    wait_for(lambda: store.get_job(conn, job_id).status == "success", 30, what="detached job")
    s = sheepdog("status", job_id, "--json", env=env)
    view = json.loads(s.stdout)
    assert view["status"] == "success" and view["exit_code"] == 0
    assert view["pieces"][0]["attempts"] == 1
    assert view["started"] and view["ended"] >= view["started"] >= view["submitted"]
    logs = sheepdog("logs", job_id, env=env)
    assert "detached" in logs.stdout


def test_the_worker_a_detached_run_starts_is_still_there_for_the_next_job(env, conn, queue):
    """A shell loop of `run --detach`: the worker the first job started (nobody served
    its queue) waits, idle, for DETACHED_LINGER, so the next job finds it instead of
    starting a worker of its own (which took every other job of such a loop 100 ms)."""
    from sheepdog.defaults import DETACHED_LINGER

    def ran_by(job_id: str) -> str:
        wait_for(lambda: store.get_job(conn, job_id).status == "success", 30,
                 what=f"job {job_id}")
        return store.get_task(conn, store.get_job(conn, job_id).final_task).worker

    first = ran_by(sheepdog("run", "--detach", "--", "true", env=env).stdout.strip())
    time.sleep(1.0)  # idle for ten of its upkeep rounds: a plain burst worker was gone
    second = ran_by(sheepdog("run", "--detach", "--", "true", env=env).stdout.strip())
    assert first and second == first
    (live,) = registration.live_workers(conn, queue)
    pid = int(live["pid"])
    try:
        argv = open(f"/proc/{pid}/cmdline").read().split("\0")
        assert argv[argv.index("--linger") + 1] == f"{DETACHED_LINGER:g}" and "--burst" in argv
    finally:
        os.kill(pid, signal.SIGTERM)  # not left to linger into the next test
    wait_for(lambda: not registration.live_workers(conn, queue), 30, what="it to go")


def test_linger_is_for_a_burst_worker(env):
    r = sheepdog("worker", "--linger", "5", env=env, timeout=60)
    assert r.returncode == 2 and "--linger goes with --burst" in r.stderr


def test_a_burst_worker_lingers_idle_as_long_as_it_is_told_then_goes(env, conn, settings,
                                                                     workers):
    w = workers.start("--burst", "--linger", "3")
    wait_for(lambda: registration.live_workers(conn, settings.queue), 30, what="the worker")
    time.sleep(1.0)
    assert w.poll() is None  # idle, and still there
    job, tasks = jobs.command_job(["true"], settings)
    job_id = jobs.submit(conn, settings, job, tasks).id
    wait_for(lambda: store.get_job(conn, job_id).status == "success", 30, what="the job")
    time.sleep(1.0)
    assert w.poll() is None  # idle again, for less than its 3 s
    assert w.wait(30) == 0  # and then it goes by itself
    assert not registration.live_workers(conn, settings.queue)


def test_list_json_has_id_status_and_exit_code(env):
    sheepdog("run", "--", "true", env=env)
    sheepdog("run", "--", "false", env=env)
    r = sheepdog("list", "--json", env=env)
    jobs = json.loads(r.stdout)
    assert [(j["status"], j["exit_code"]) for j in jobs] == [("error", 1), ("success", 0)]
    assert all(j["id"] for j in jobs)


def test_logs_follow_replays_then_follows_until_the_end(env, workers, conn):
    workers.start()
    job_id = sheepdog("run", "--detach", "--", "sh", "-c",
                      "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done",
                      env=env).stdout.strip()
    wait_for(lambda: store.get_job(conn, job_id).status == "running", what="job to start")
    r = sheepdog("logs", job_id, "--follow", "--json", env=env)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    out = [x["text"] for x in lines if x["stream"] == "stdout"]
    assert out == [f"line {i}" for i in range(1, 6)]
    assert store.get_job(conn, job_id).status == "success"
    ids = [x["id"] for x in lines]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    # resume after the third stdout line: exactly the rest, nothing twice
    third = next(x["id"] for x in lines if x["text"] == "line 3")
    rest = sheepdog("logs", job_id, "--after", third, "--json", env=env)
    texts = [json.loads(x)["text"] for x in rest.stdout.splitlines()]
    assert [t for t in texts if t.startswith("line")] == ["line 4", "line 5"]


def test_cancel_of_a_queued_job_never_runs_it(env, workers, conn, settings, tmp_path):
    marker = tmp_path / "ran"
    job, tasks = jobs.command_job(["touch", str(marker)], settings,
                                      queue="nobody-serves-this")
    job_id = jobs.submit(conn, settings, job, tasks).id
    assert store.get_job(conn, job_id).status == "queued"
    assert sheepdog("cancel", job_id, env=env).returncode == 0
    assert store.get_job(conn, job_id).status == JobStatus.CANCELLED
    w = workers.start("--burst", "--queue", "nobody-serves-this")
    w.wait(30)
    assert not marker.exists()
    assert store.get_job(conn, job_id).status == "cancelled"


def test_cancel_of_a_running_job_kills_its_whole_process_group(env, workers, conn, tmp_path):
    workers.start()
    pids = tmp_path / "pids"
    job_id = sheepdog("run", "--detach", "--", "sh", "-c",
                      f"sleep 60 & echo $! > {pids}; sleep 60", env=env).stdout.strip()
    wait_for(lambda: pids.exists() and pids.read_text().strip(), what="child pid")
    child = int(pids.read_text())
    sheepdog("cancel", job_id, env=env)
    wait_for(lambda: not _alive(child), timeout=15, what="background child to die")
    assert store.get_job(conn, job_id).status == "cancelled"


def test_timeout_kills_the_command_and_says_so(env):
    start = time.monotonic()
    r = sheepdog("run", "--timeout", "1", "--", "sh", "-c", "sleep 30 & sleep 30", env=env)
    assert time.monotonic() - start < 20
    assert r.returncode == 124  # as timeout(1) exits
    assert "timed out after 1s" in r.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return os.path.exists(f"/proc/{pid}")


def _stored(conn, job_id):
    """A job's hash and its piece's, without what differs between two submissions."""
    job = {k.decode(): v.decode() for k, v in conn.hgetall(f"sheepdog:job:{job_id}").items()}
    task = {k.decode(): v.decode() for k, v in
            conn.hgetall(f"sheepdog:task:{job['final_task']}").items()}
    for volatile in ("id", "final_task", "submitted", "read_token"):
        job.pop(volatile)
    for volatile in ("id", "nonce", "rq_id", "queued_at"):
        task.pop(volatile)
    return job, task


def test_detach_is_submitted_without_redis_py_and_stores_what_the_full_path_stores(
        env, conn, queue, workers):
    """`run --detach -- CMD` (sheepdog.quick) loads no redis-py, click or RQ while a
    worker serves its queue (it starts one otherwise, which does), and stores the same
    job, piece and queue entry as the full command line (reached here by a --queue
    option, which the quick path leaves to it)."""
    # a worker on the queue as far as anyone can tell, that takes nothing: both jobs
    # stay as they were stored
    registration.announce(conn, "idle", [queue], 60, process=liveness.this_process())
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "sheepdog", "run",
                          "--detach", "--", "echo", "quick"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
              if line.startswith("import time:") and "|" in line}
    assert not loaded & {"redis", "click", "rq", "numpy"}, sorted(loaded & {"redis", "click"})
    quick_id = out.stdout.strip()
    full = sheepdog("run", "--detach", "--queue", queue, "--", "echo", "quick", env=env)
    assert full.returncode == 0, full.stderr
    full_id = full.stdout.strip().splitlines()[-1]
    assert _stored(conn, quick_id) == _stored(conn, full_id)
    entries = [e.decode() for e in conn.lrange(f"rq:queue:{queue}", 0, -1)]
    assert [keys.task_of_rq_job(e) for e in entries] == [
        store.get_job(conn, j).final_task for j in (quick_id, full_id)]
    registration.unregister(conn, "idle")
    workers.start("--queue", queue)
    for j in (quick_id, full_id):  # and a worker runs both
        wait_for(lambda j=j: store.get_job(conn, j).status == "success", 60, what=j)


def _imports_and_output(args: list[str], env: dict[str, str], full: bool
                        ) -> tuple[set[str], tuple[int, str, str]]:
    """What a command line loaded, and its exit code, stdout and stderr; `full`:
    through sheepdog.cli (what the `sheepdog` script falls back to)."""
    entry = (["-c", "from sheepdog.cli import main; main()"] if full
             else ["-m", "sheepdog"])
    out = subprocess.run([sys.executable, "-X", "importtime", *entry, *args], env=env,
                         capture_output=True, text=True, timeout=60)
    lines = out.stderr.splitlines(keepends=True)
    loaded = {line.rsplit("|", 1)[1].strip() for line in lines
              if line.startswith("import time:") and "|" in line}
    said = "".join(line for line in lines if not line.startswith("import time:"))
    return loaded, (out.returncode, out.stdout, said)


def test_status_list_logs_and_result_are_read_without_redis_py_as_the_full_path_reads_them(
        env, conn, queue, workers):
    """`status JOB`, `list`, `logs JOB` and a command's `result JOB` (with and without
    --json) are read by sheepdog.quick over sheepdog.wire: no redis-py, click or RQ
    loaded, and the same output, byte for byte and stream by stream, as the full command
    line's; an unknown job is left to the full command line, which says so."""
    workers.start("--queue", queue)
    r = sheepdog("run", "--detach", "--queue", queue, "--", "sh", "-c",
                 "echo out; echo err >&2; echo more", env=env)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    wait_for(lambda: store.get_job(conn, job_id).status == "success", 60, what=job_id)
    for args in (["status", job_id], ["status", "--json", job_id], ["list"],
                 ["list", "--json"], ["logs", job_id], ["logs", job_id, "--json"],
                 ["result", job_id], ["result", "--json", job_id]):
        loaded, quick = _imports_and_output(args, env, full=False)
        assert not loaded & {"redis", "click", "rq", "numpy"}, (args, loaded & {"redis"})
        full_loaded, full = _imports_and_output(args, env, full=True)
        assert "redis" in full_loaded and "click" in full_loaded
        assert quick == full, args
        assert quick[0] == 0 and job_id in quick[1] + quick[2], args
    _, (code, out, err) = _imports_and_output(["logs", job_id], env, full=False)
    assert out == "out\nmore\n" and "err\n" in err and "[sheepdog]" in err
    loaded, (code, out, err) = _imports_and_output(["status", "nosuchjob"], env, full=False)
    assert code != 0 and "unknown job id 'nosuchjob'" in err and "click" in loaded


def test_detach_leaves_what_it_cannot_do_to_the_full_command_line(env, home):
    """A URL the quick path does not speak (TLS), a server that is not up, a command the
    checks refuse: the full command line answers, in its words."""
    refused = sheepdog("run", "--detach", "--", "", env=env)
    assert refused.returncode != 0 and "empty command" in refused.stderr
    down = dict(env, SHEEPDOG_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                SHEEPDOG_OUTAGE_PATIENCE="0")
    r = sheepdog("run", "--detach", "--", "true", env=down, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "127.0.0.1" in r.stderr  # the full path names the server it could not reach
    tls = dict(env, SHEEPDOG_REDIS_URL=env["SHEEPDOG_REDIS_URL"].replace("redis://",
                                                                          "rediss://"))
    r = sheepdog("run", "--detach", "--", "true", env=tls, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_wire_speaks_to_a_real_server_as_redis_py_does(redis_server, conn, tmp_path):
    """sheepdog.wire: replies as redis-py gives them, a Lua script loaded when the
    server does not know it, errors as WireError; a password and a database number in
    the URL, and a unix socket."""
    import redis as redis_py

    from sheepdog.lua import script
    from sheepdog.wire import Wire, WireError

    wire = Wire.open(redis_server.url)
    conn.sadd("s", "a", "b")
    conn.set("k1", "v1")
    assert wire.smembers("s") == conn.smembers("s") == {b"a", b"b"}
    assert wire.mget(["k1", "nope"]) == conn.mget(["k1", "nope"]) == [b"v1", None]
    assert wire.srem("s", "a") == 1 and wire.scard("s") == 1
    conn.script_flush()
    run = script(wire, "return {KEYS[1], ARGV[1]}")
    assert run(keys=["x"], args=["y"]) == [b"x", b"y"]  # NOSCRIPT, then EVAL
    assert run(keys=["x"], args=["z"]) == [b"x", b"z"]  # by SHA
    with pytest.raises(WireError, match="WRONGTYPE"):
        wire.call("LPUSH", "s", "x")
    # the reads `status`, `list` and `logs` make
    conn.hset("h", mapping={"a": "1", "b": "2"})
    conn.rpush("l", "x", "y", "z")
    conn.zadd("z", {"p": 1, "q": 2})
    for n in range(3):
        conn.xadd("x", {"n": str(n), "t": "line"})
    assert wire.hgetall("h") == conn.hgetall("h") and wire.hgetall("none") == {}
    assert wire.llen("l") == conn.llen("l") == 3
    assert wire.lrange("l", 1, -1) == conn.lrange("l", 1, -1) == [b"y", b"z"]
    assert wire.zrevrange("z", 0, 9) == conn.zrevrange("z", 0, 9) == [b"q", b"p"]
    assert wire.xrange("x", min="-", max="+", count=2) == conn.xrange("x", count=2)
    assert len(wire.xrange("x")) == 3
    batch = wire.pipeline(transaction=False)
    batch.hgetall("h").hgetall("none")
    assert batch.execute() == [conn.hgetall("h"), {}] and batch.execute() == []
    with pytest.raises(TypeError):
        wire.pipeline()
    wire.close()
    assert Wire.open("rediss://127.0.0.1:1/0") is None
    with pytest.raises(WireError, match="cannot reach"):
        Wire.open(f"redis://127.0.0.1:{free_port()}/0")
    # a server of its own, with a password and a unix socket
    sock, port = tmp_path / "r.sock", free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--unixsocket", str(sock), "--requirepass", "s3cret",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 10, what="the second redis-server")
        other = redis_py.Redis(port=port, password="s3cret", db=3)
        wait_for(lambda: other.ping(), 10, what="it to answer")
        other.set("here", "3")
        assert Wire.open(f"redis://:s3cret@127.0.0.1:{port}/3").call("GET", "here") == b"3"
        assert Wire.open(f"unix://:s3cret@{sock}?db=3").call("GET", "here") == b"3"
        with pytest.raises(WireError, match="WRONGPASS|invalid"):
            Wire.open(f"redis://:wrong@127.0.0.1:{port}/0")
    finally:
        proc.terminate()
        proc.wait(10)
