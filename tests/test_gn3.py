"""`sheepdog worker --gn3-queue` serves GN3's existing Redis LIST queue."""

from __future__ import annotations

import json

from conftest import wait_for

from sheepdog import logs, store


def _enqueue_gn3(conn, cmd, env=None, queue="GN3::job-queue", cmd_id="cmd::2026-test-1"):
    conn.rpush(queue, cmd_id)
    conn.hset(cmd_id, mapping={"cmd": json.dumps(cmd), "result": "", "status": "queued"})
    if env is not None:
        conn.hset(cmd_id, "env", json.dumps(env))
    return cmd_id


def _field(conn, key, name):
    value = conn.hget(key, name)
    return value.decode() if value is not None else None


def test_a_gn3_list_command_succeeds_with_stdout_as_result(conn, workers):
    cmd_id = _enqueue_gn3(conn, ["sh", "-c", "echo hello gn3; echo warn >&2"])
    workers.start("--gn3-queue")
    wait_for(lambda: _field(conn, cmd_id, "status") == "success", 30, what="gn3 success")
    assert _field(conn, cmd_id, "result") == "hello gn3\n"
    assert _field(conn, cmd_id, "stderr") is None
    # it also ran as a sheepdog job whose log streamed the output
    job = next(j for j in store.list_jobs(conn) if j.gn3_id == cmd_id)
    assert [ln.text for ln in logs.read(conn, job.id) if ln.stream == "stdout"] == ["hello gn3"]


def test_a_failing_gn3_string_command_records_error_and_stderr(conn, workers):
    cmd_id = _enqueue_gn3(conn, "echo out; echo broken >&2; exit 4", queue="GN3::other",
                          cmd_id="cmd::2026-test-2")
    workers.start("--gn3-queue", "GN3::other")
    wait_for(lambda: _field(conn, cmd_id, "status") == "error", 30, what="gn3 error")
    assert _field(conn, cmd_id, "stderr") == "broken\n"
    assert _field(conn, cmd_id, "result") == "broken\n"


def test_gn3_env_replaces_the_environment_and_non_queued_ids_are_skipped(conn, workers):
    cmd_id = _enqueue_gn3(conn, ["/usr/bin/env"], env={"ONLY": "this"})
    conn.rpush("GN3::job-queue", "cmd::already-done")
    conn.hset("cmd::already-done", mapping={"cmd": json.dumps(["true"]), "status": "success"})
    workers.start("--gn3-queue")
    wait_for(lambda: _field(conn, cmd_id, "status") == "success", 30, what="gn3 env job")
    assert _field(conn, cmd_id, "result") == "ONLY=this\n"
    assert _field(conn, "cmd::already-done", "status") == "success"
    assert not any(j.gn3_id == "cmd::already-done" for j in store.list_jobs(conn))
