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
from sheepdog.gn3 import parse_command
from web import create_app


def _field(conn, key, name):
    value = conn.hget(key, name)
    return value.decode() if value is not None else None


def queue_cmd_as_gn3(conn, queue, cmd_id, cmd, env=None, gap=0.0):
    """gn3.commands.queue_cmd's order: the id first, then cmd, result, status, env."""
    conn.rpush(queue, cmd_id)
    fields = [("cmd", json.dumps(cmd)), ("result", ""), ("status", "queued")]
    if env is not None:
        fields.append(("env", json.dumps(env)))
    for name, value in fields:
        if gap:
            time.sleep(random.uniform(0, gap))
        conn.hset(cmd_id, name, value)


def _expected(i):
    return f"line {i}\n\nline {i}\nline {i}\n  spaced  \r\n".encode()


def test_a_thousand_commands_written_in_gn3s_order_all_run_exactly(conn, workers):
    workers.start("--gn3-queue", "-j", "2")
    time.sleep(1.0)  # the worker is already waiting when GN3 starts writing
    program = "printf 'line %s\\n\\nline %s\\nline %s\\n  spaced  \\r\\n' \"$0\" \"$0\" \"$0\""
    env_program = "printf '%s\\n' \"$GN3_VALUE\""
    rng = random.Random(7)
    ids = [f"cmd::2026-12-02-{i:04d}" for i in range(1000)]

    def gn3():
        for i, cmd_id in enumerate(ids):
            if i % 10 == 0:  # some carry an env, written last by GN3
                queue_cmd_as_gn3(conn, "GN3::job-queue", cmd_id, ["sh", "-c", env_program],
                                 env={"GN3_VALUE": f"v{i}", "PATH": os.environ["PATH"]},
                                 gap=rng.uniform(0, 0.004))
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
        assert result == (f"v{i}\n".encode() if i % 10 == 0 else _expected(i)), (cmd_id, result)


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
