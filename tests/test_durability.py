"""Nothing lost: killed workers, a restarted Redis, capped logs, bad input."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace

import pytest
from conftest import sheepdog, wait_for

from sheepdog import dispatch, jobs, logs, registration, store
from sheepdog.models import JobStatus, TaskStatus
from sheepdog.worker import Worker

FLAKY = ('if [ -e {m} ]; then echo second run; else touch {m}; echo first run; sleep 60; fi')


def _running_on(conn, job_id, worker_pid):
    task = store.job_tasks(conn, job_id)[0]
    return task.status == "running" and f".{worker_pid}." in task.worker


@pytest.mark.fault
def test_a_sigkilled_worker_is_noticed_and_its_job_rerun_elsewhere(env, workers, conn, tmp_path):
    a = workers.start()
    # registered first: else `run --detach` leaves a worker of its own, which may take it
    wait_for(lambda: registration.live_workers(conn, env["SHEEPDOG_QUEUE"]), 30,
             what="worker A to register")
    job_id = sheepdog("run", "--detach", "--", "sh", "-c",
                      FLAKY.format(m=tmp_path / "marker"), env=env).stdout.strip()
    wait_for(lambda: _running_on(conn, job_id, a.pid), 20, what="worker A to run the job")
    wait_for(lambda: "first run" in [ln.text for ln in logs.read(conn, job_id)], 10,
             what="the first run's output to be visible")
    os.kill(a.pid, signal.SIGKILL)  # the worker only; its child must die with it
    killed_at = time.monotonic()
    workers.start()
    wait_for(lambda: store.get_job(conn, job_id).status == "success", 30, what="re-run")
    assert time.monotonic() - killed_at < 15  # heartbeat timeout is 2 s in these tests
    task = store.job_tasks(conn, job_id)[0]
    assert task.attempts == 2
    text = [line.text for line in logs.read(conn, job_id)]
    assert "first run" in text and "second run" in text
    assert any("stopped sending heartbeats" in t for t in text)


def test_a_job_lost_too_often_ends_in_error_with_the_reason(env, workers, conn, settings):
    job, tasks = jobs.command_job(["sleep", "60"], replace(settings, max_attempts=2))
    job_id = jobs.submit(conn, settings, job, tasks).id
    for attempt in (1, 2):
        w = workers.start(env=env)
        wait_for(lambda w=w: _running_on(conn, job_id, w.pid), 30, what=f"attempt {attempt}")
        os.killpg(w.pid, signal.SIGKILL)
    workers.start(env=env)  # someone alive must notice the second loss
    wait_for(lambda: store.get_job(conn, job_id).status == "error", 30, what="giving up")
    job = store.get_job(conn, job_id)
    assert "gave up after 2 attempts" in job.error
    assert store.job_tasks(conn, job_id)[0].status == TaskStatus.ERROR
    assert not store.active_task_ids(conn)


@pytest.mark.fault
def test_a_redis_restart_between_submit_and_run_loses_no_job(redis_server, conn, settings,
                                                             workers, tmp_path):
    marker = tmp_path / "ran"
    job, tasks = jobs.command_job(["touch", str(marker)], settings)
    jobs.submit(conn, settings, job, tasks)
    redis_server.kill9()
    redis_server.start()
    w = workers.start("--burst")
    assert w.wait(60) == 0
    assert marker.exists()
    assert store.get_job(conn, job.id).status == "success"


def test_a_flood_of_output_is_capped_with_an_explicit_marker(env, conn):
    env = dict(env, SHEEPDOG_LOG_MAX_LINES="50")
    r = sheepdog("run", "--", "seq", "1", "5000", env=env)
    assert r.returncode == 0
    job_id = json.loads(sheepdog("list", "--json", env=env).stdout)[0]["id"]
    lines = logs.read(conn, job_id, count=10_000)
    output = [ln for ln in lines if ln.stream in ("stdout", "stderr")]
    assert [ln.text for ln in output] == [str(i) for i in range(1, 51)]
    marks = [i for i, ln in enumerate(lines) if ln.truncated]
    assert len(marks) == 1 and "log truncated" in lines[marks[0]].text
    assert marks[0] > lines.index(output[-1])  # the marker says where the cut is
    assert store.get_job(conn, job_id).exit_code == 0


def test_progress_bars_redrawn_with_carriage_returns_become_lines(env, conn):
    script = r"printf '  0%%\r== 50%%\r==== 100%%\r\ndone\n'"
    r = sheepdog("run", "--", "sh", "-c", script, env=env)
    assert r.stdout.splitlines() == ["  0%", "== 50%", "==== 100%", "done"]


def test_unknown_job_id_is_a_clear_error(env):
    for cmd in (("status", "nope"), ("logs", "nope"), ("cancel", "nope")):
        r = sheepdog(*cmd, env=env)
        assert r.returncode == 2
        assert "unknown job id 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_empty_command_is_refused(env):
    r = sheepdog("run", "--", env=env)
    assert r.returncode == 2 and "empty command" in r.stderr


def test_unreachable_redis_url_is_named(env):
    env = dict(env, SHEEPDOG_REDIS_URL="redis://127.0.0.1:1/0")
    for cmd in (("run", "--", "true"), ("worker", "--burst"), ("list",)):
        r = sheepdog(*cmd, env=env, timeout=30)
        assert r.returncode == 2
        assert "cannot reach Redis at redis://127.0.0.1:1/0" in r.stderr
        assert "Traceback" not in r.stderr


def test_a_missing_program_fails_the_job_with_its_name(env):
    r = sheepdog("run", "--", "/no/such/program", env=env)
    assert r.returncode == 1
    assert "/no/such/program" in r.stderr


def test_job_status_moves_queued_running_success(conn, settings, workers):
    job, tasks = jobs.command_job(["sleep", "1"], settings)
    jobs.submit(conn, settings, job, tasks)
    assert store.get_job(conn, job.id).status == JobStatus.QUEUED
    workers.start()
    wait_for(lambda: store.get_job(conn, job.id).status == "running", what="running")
    wait_for(lambda: store.get_job(conn, job.id).status == "success", what="success")


def test_a_task_dispatched_twice_runs_once_and_leaves_no_queue_entries(conn, settings,
                                                                        tmp_path):
    marker = tmp_path / "runs"
    job, tasks = jobs.command_job(["sh", "-c", f"echo x >> {marker}"], settings)
    jobs.submit(conn, settings, job, tasks)
    pipe = conn.pipeline()
    pipe.multi()  # as inside store's transactions
    dispatch.push(pipe, conn, tasks[0].id, settings.queue)  # e.g. a reaper's duplicate
    pipe.execute()
    later, more = jobs.command_job(["true"], settings)
    jobs.submit(conn, settings, later, more)
    w = Worker(conn, settings, [settings.queue], concurrency=1, burst=True, register=False)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the worker stopped taking work after a duplicate entry"
    assert marker.read_text() == "x\n"
    assert store.get_job(conn, later.id).status == "success"
    assert conn.llen(dispatch.queue_key(conn, settings.queue)) == 0
    assert conn.llen(dispatch.parked_key(conn, settings.queue)) == 0
    assert not [k for k in conn.keys("rq:job:*")]
