"""sheepdog in GN3's place: its queue as GN3 writes it, its worker command, its routes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import wait_for
from web_helpers import conforms

from sheepdog import store
from sheepdog.defaults import GN3_SETTLE
from sheepdog.gn3 import parse_command
from web import create_app


def _field(conn, key, name):
    value = conn.hget(key, name)
    return value.decode() if value is not None else None


def queue_cmd_as_gn3(conn, queue, cmd_id, cmd, env=None, gap=0.0) -> float:
    """gn3.commands.queue_cmd's order: the id first, then cmd, result, status, env; the
    seconds from the status's write to the env's (0 without an env)."""
    conn.rpush(queue, cmd_id)
    fields = [("cmd", json.dumps(cmd)), ("result", ""), ("status", "queued")]
    if env is not None:
        fields.append(("env", json.dumps(env)))
    status_at = 0.0
    for name, value in fields:
        if gap:
            time.sleep(random.uniform(0, gap))
        if name == "status":
            status_at = time.monotonic()
        conn.hset(cmd_id, name, value)
    return time.monotonic() - status_at if env is not None else 0.0


def _expected(i):
    return f"line {i}\n\nline {i}\nline {i}\n  spaced  \r\n".encode()


def test_a_thousand_commands_written_in_gn3s_order_all_run_exactly(conn, workers):
    workers.start("--gn3-queue", "-j", "2")
    time.sleep(1.0)  # the worker is already waiting when GN3 starts writing
    program = "printf 'line %s\\n\\nline %s\\nline %s\\n  spaced  \\r\\n' \"$0\" \"$0\" \"$0\""
    env_program = "printf '%s\\n' \"$GN3_VALUE\""
    rng = random.Random(7)
    ids = [f"cmd::2026-12-02-{i:04d}" for i in range(1000)]

    late: set[int] = set()  # env written more than GN3_SETTLE after status (a stalled writer)

    def gn3():
        for i, cmd_id in enumerate(ids):
            if i % 10 == 0:  # some carry an env, written last by GN3
                took = queue_cmd_as_gn3(conn, "GN3::job-queue", cmd_id,
                                        ["sh", "-c", env_program],
                                        env={"GN3_VALUE": f"v{i}", "PATH": os.environ["PATH"]},
                                        gap=rng.uniform(0, 0.004))
                if took >= GN3_SETTLE:
                    late.add(i)
            else:
                queue_cmd_as_gn3(conn, "GN3::job-queue", cmd_id, ["sh", "-c", program, str(i)],
                                 gap=rng.uniform(0, 0.002))

    writer = threading.Thread(target=gn3)
    writer.start()
    writer.join()

    def finished():
        pipe = conn.pipeline(transaction=False)
        for cmd_id in ids:
            pipe.hget(cmd_id, "status")
        states = [s.decode() if s else None for s in pipe.execute()]
        return states if all(s in ("success", "error") for s in states) else None

    states = wait_for(finished, 600, every=1.0, what="1,000 GN3 commands to finish")
    failed = [ids[i] for i, s in enumerate(states) if s != "success"]
    assert not failed, [(c, conn.hget(c, "stderr")) for c in failed[:3]]
    for i, cmd_id in enumerate(ids):
        result = conn.hget(cmd_id, "result")
        if i in late:  # GN3 says nothing of an env to come: past the wait, run without it
            assert result in (f"v{i}\n".encode(), b"\n"), (cmd_id, result)
        else:
            assert result == (f"v{i}\n".encode() if i % 10 == 0 else _expected(i)), \
                (cmd_id, result)
    assert len(late) < 50, late  # most of the hundred with an env came in time, and ran with it


def test_ids_pushed_well_before_their_fields_are_not_lost(conn, workers):
    workers.start("--gn3-queue")
    time.sleep(0.5)
    ids = [f"cmd::late-{i}" for i in range(200)]
    for cmd_id in ids:
        conn.rpush("GN3::job-queue", cmd_id)
    time.sleep(0.3)  # a busy GN3: every id waits on the list before its hash exists
    for i, cmd_id in enumerate(ids):
        conn.hset(cmd_id, mapping={"cmd": json.dumps(["echo", str(i)]), "result": ""})
        conn.hset(cmd_id, "status", "queued")
    wait_for(lambda: all(_field(conn, c, "status") == "success" for c in ids), 180, every=0.5,
             what="late hashes to be picked up")
    assert [_field(conn, c, "result") for c in ids] == [f"{i}\n" for i in range(200)]


def test_several_queue_names_are_served(conn, workers):
    workers.start("--gn3-queue", "GN3::job-queue", "--gn3-queue", "production::GN3::job-queue")
    queue_cmd_as_gn3(conn, "GN3::job-queue", "cmd::a", ["echo", "plain"])
    queue_cmd_as_gn3(conn, "production::GN3::job-queue", "cmd::b", ["echo", "prefixed"])
    wait_for(lambda: _field(conn, "cmd::a", "status") == _field(conn, "cmd::b", "status")
             == "success", 60, what="both queues")
    assert _field(conn, "cmd::b", "result") == "prefixed\n"


def test_a_bad_cmd_is_an_error_with_the_reason_never_a_silent_skip(conn, workers):
    workers.start("--gn3-queue")
    conn.rpush("GN3::job-queue", "cmd::bad", "cmd::line")
    conn.hset("cmd::bad", mapping={"cmd": '["unterminated', "result": "", "status": "queued"})
    conn.hset("cmd::line", mapping={"cmd": "echo not json", "result": "", "status": "queued"})
    wait_for(lambda: _field(conn, "cmd::bad", "status") == "error", 30, what="bad cmd")
    assert "neither JSON nor a command line" in _field(conn, "cmd::bad", "stderr")
    wait_for(lambda: _field(conn, "cmd::line", "status") == "success", 30, what="plain line")
    assert _field(conn, "cmd::line", "result") == "not json\n"  # run as GN3 runs strings


def test_commands_split_as_gn3_runs_them():
    assert parse_command(json.dumps(["ls", "-l"])) == ["ls", "-l"]
    assert parse_command(json.dumps("a && b")) == ["/bin/sh", "-c", "a && b"]
    assert parse_command("gemma-wrapper --json -- -gk") == ["/bin/sh", "-c",
                                                           "gemma-wrapper --json -- -gk"]
    for bad in ('["open', "", json.dumps([]), json.dumps({"a": 1}), "  "):
        with pytest.raises(Exception, match="cmd"):
            parse_command(bad)


def test_a_gn3_command_whose_worker_dies_runs_at_most_once(conn, workers, tmp_path):
    marker = tmp_path / "runs"
    worker = workers.start("--gn3-queue")
    queue_cmd_as_gn3(conn, "GN3::job-queue", "cmd::once",
                     ["sh", "-c", f"echo run >> {marker}; sleep 60"])
    wait_for(lambda: marker.exists(), 30, what="the command to start")
    os.killpg(worker.pid, signal.SIGKILL)
    workers.start("--gn3-queue")  # another worker notices the lost one (heartbeat 2 s)
    wait_for(lambda: _field(conn, "cmd::once", "status") == "error", 60, what="error")
    assert "stopped sending heartbeats" in _field(conn, "cmd::once", "stderr")
    time.sleep(3)
    assert marker.read_text() == "run\n"  # not run again


def test_python_m_sheepdog_worker_runs_one_command_as_gn3s_one_shot(conn, env):
    queue_cmd_as_gn3(conn, "GN3::job-queue", "cmd::oneshot", ["sh", "-c", "echo out; echo e >&2"])
    done = subprocess.run([sys.executable, "-m", "sheepdog.worker", "--queue-name",
                           "GN3::job-queue", "--log-level", "warning"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _field(conn, "cmd::oneshot", "status") == "success"
    assert _field(conn, "cmd::oneshot", "result") == "out\n"
    job = next(j for j in store.list_jobs(conn) if j.gn3_id == "cmd::oneshot")
    assert job.status == "success"


def test_gn3s_launch_path_one_shot_worker_per_command_runs_every_command_once(conn, env,
                                                                             tmp_path):
    """run_async_cmd as GN3 has it: queue_cmd, then one `python -m sheepdog.worker` per
    command, all at once. Each one-shot takes its own id; none takes back what a live
    one holds; every command ends with GN3's status and result, once."""
    n = 200
    ledger = tmp_path / "ledger"
    ids = [f"cmd::launch-{i:03d}" for i in range(n)]
    procs = []
    try:
        for i, cmd_id in enumerate(ids):
            queue_cmd_as_gn3(conn, "GN3::job-queue", cmd_id,
                             ["sh", "-c", f'echo "$0" >> {ledger}; echo "out $0"', str(i)])
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sheepdog.worker", "--queue-name", "GN3::job-queue",
                 "--log-level", "info"], env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 600
        for p in procs:
            assert p.wait(max(1, deadline - time.monotonic())) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    statuses = {cmd_id: _field(conn, cmd_id, "status") for cmd_id in ids}
    assert list(statuses.values()) == ["success"] * n, {
        cmd_id: s for cmd_id, s in statuses.items() if s != "success"}
    assert [_field(conn, cmd_id, "result") for cmd_id in ids] == [f"out {i}\n" for i in range(n)]
    assert sorted(ledger.read_text().split(), key=int) == [str(i) for i in range(n)]  # once each
    assert conn.llen("GN3::job-queue") == 0
    assert not [k for k in conn.keys("sheepdog:gn3:taken:*") if conn.llen(k)]


def test_a_taken_id_goes_back_only_when_its_worker_is_dead(conn, settings):
    """Recovery takes ids from a dead worker's list, never from a live one's."""
    from sheepdog import keys, liveness
    from sheepdog.gn3 import Gn3Server

    queue_cmd_as_gn3(conn, "GN3::q3", "cmd::held-alive", ["true"])
    queue_cmd_as_gn3(conn, "GN3::q3", "cmd::held-dead", ["true"])
    for worker, process in (
            ("alive", liveness.this_process()),
            ("dead", f"{liveness.this_process().split()[0]} 999999999 1")):
        conn.lmove("GN3::q3", keys.gn3_taken("GN3::q3", worker), "LEFT", "RIGHT")
        conn.hset(keys.gn3_takers("GN3::q3"), worker,
                  json.dumps({"process": process, "at": time.time()}))
    server = Gn3Server(conn, settings, ["GN3::q3"], "me")
    server._register()
    server._recover()
    assert conn.lrange(keys.gn3_taken("GN3::q3", "alive"), 0, -1) == [b"cmd::held-alive"]
    assert conn.lrange(keys.gn3_taken("GN3::q3", "me"), 0, -1) == [b"cmd::held-dead"]
    assert [w.cmd_id for w in server.waiting] == ["cmd::held-dead"]
    assert set(conn.hkeys(keys.gn3_takers("GN3::q3"))) == {b"alive", b"me"}


def test_gn3_fields_are_run_cmds_exactly_on_error_and_readable_when_not_utf8(conn, workers):
    """An error with empty stderr leaves result and stderr empty (GN2 json.loads a
    non-empty result); bytes that are not UTF-8 are readable by GN3's decoding clients,
    and the exact bytes stay in sheepdog's own record."""
    import redis as redis_lib

    from sheepdog import logs
    workers.start("--gn3-queue")
    queue_cmd_as_gn3(conn, "GN3::job-queue", "cmd::quiet-fail", ["sh", "-c", "exit 1"])
    queue_cmd_as_gn3(conn, "GN3::job-queue", "cmd::loud-fail",
                     ["sh", "-c", "echo out; printf 'bad\\n  spaced' >&2; exit 3"])
    queue_cmd_as_gn3(conn, "GN3::job-queue", "cmd::latin1",
                     ["sh", "-c", "printf 'caf\\351 \\377\\n'"])
    for cmd_id in ("cmd::quiet-fail", "cmd::loud-fail", "cmd::latin1"):
        wait_for(lambda c=cmd_id: _field(conn, c, "status") in ("success", "error"), 60,
                 what=cmd_id)
    gn3 = redis_lib.Redis(connection_pool=redis_lib.ConnectionPool(
        **conn.connection_pool.connection_kwargs, decode_responses=True))
    assert gn3.hgetall("cmd::quiet-fail") == {
        "cmd": json.dumps(["sh", "-c", "exit 1"]), "result": "", "stderr": "",
        "status": "error"}
    assert gn3.hget("cmd::loud-fail", "result") == "bad\n  spaced"
    assert gn3.hget("cmd::loud-fail", "stderr") == "bad\n  spaced"
    assert gn3.hget("cmd::latin1", "status") == "success"
    assert gn3.hget("cmd::latin1", "result") == "caf\ufffd \ufffd\n"
    job = next(j for j in store.list_jobs(conn) if j.gn3_id == "cmd::latin1")
    assert logs.raw_output(conn, job.final_task, "stdout") == b"caf\xe9 \xff\n"
    failed = next(j for j in store.list_jobs(conn) if j.gn3_id == "cmd::quiet-fail")
    assert any("exit code 1" in line.text for line in logs.read(conn, failed.id))


def test_python_m_sheepdog_worker_daemon_serves_until_stopped(conn, env):
    proc = subprocess.Popen([sys.executable, "-m", "sheepdog.worker", "--daemon",
                             "--queue-name", "GN3::q2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        for i in range(3):
            queue_cmd_as_gn3(conn, "GN3::q2", f"cmd::d{i}", ["echo", str(i)])
            wait_for(lambda i=i: _field(conn, f"cmd::d{i}", "status") == "success", 60,
                     what="daemon command")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture()
def open_client(redis_server, home, conn, queue):
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": ("t",), "queue": queue,
        "gn3_routes_open": True}})
    return app.test_client()


def test_gn3s_routes_answer_as_gn3_and_may_be_open(open_client, conn):
    conn.hset("cmd::s", mapping={"cmd": '["true"]', "status": "running", "result": ""})
    assert open_client.get("/api/gemma/status/cmd::s").get_json() == {"status": "running"}
    state = open_client.get("/api/async_commands/state/cmd::s")
    assert state.status_code == 200
    assert state.get_json() == {"cmd": '["true"]', "status": "running", "result": ""}
    unknown = open_client.get("/api/gemma/status/cmd::nope")
    assert unknown.status_code == 500
    assert unknown.get_json() == {"status": 128, "error": "The unique id you used does not exist!"}
    conforms(unknown.get_json(), "Gn3UnknownId")
    missing = open_client.get("/api/async_commands/state/cmd::nope")
    assert missing.status_code == 404
    assert missing.get_json() == {"error": "The command id provided does not exist.",
                                  "status": "error"}
    assert open_client.get("/jobs").status_code == 401  # only those two are open
