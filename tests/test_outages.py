"""Redis outages and killed runs, against real processes: workers come back, nothing
runs twice, reruns do not wait for heartbeats that cannot come."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import sheepdog, wait_for

from sheepdog import dispatch, jobs, keys, store
from sheepdog.models import JobStatus, TaskStatus
from web import create_app


def _submit_marking_jobs(conn, settings, marks, count, seconds):
    """Jobs whose command appends one line to its own file, then takes a while."""
    ids = []
    for i in range(count):
        mark = marks / f"job{i}"
        job, tasks = jobs.command_job(["sh", "-c", f"echo ran >> {mark}; sleep {seconds}"],
                                      settings)
        jobs.submit(conn, settings, job, tasks)
        ids.append(job.id)
    return ids


@pytest.mark.parametrize("down", [5, 60], ids=["5s", "60s"])
@pytest.mark.fault
def test_workers_ride_out_a_redis_outage_and_every_job_runs_once(
        conn, redis_server, settings, workers, tmp_path, down):
    from sheepdog.registration import live_workers

    procs = [workers.start("-j", "2"), workers.start("-j", "2")]
    wait_for(lambda: len(live_workers(conn, settings.queue)) == 2, 30, what="both workers")
    ids = _submit_marking_jobs(conn, settings, tmp_path, 12, 1.5)
    wait_for(lambda: sum(store.get_job(conn, j).status == JobStatus.RUNNING for j in ids) >= 2,
             30, what="jobs to be running")
    redis_server.kill9()
    time.sleep(down)
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs
                                                  if p.poll() is not None]
    redis_server.start()
    wait_for(lambda: all(JobStatus(store.get_job(conn, j).status).final for j in ids),
             120 + down, every=0.5, what="every job to end after the outage")
    assert [store.get_job(conn, j).status for j in ids] == [JobStatus.SUCCESS] * 12
    assert [(tmp_path / f"job{i}").read_text() for i in range(12)] == ["ran\n"] * 12
    assert all(p.poll() is None for p in procs), "a worker exited after the outage"
    assert store.active_task_ids(conn) == []
    assert conn.llen(dispatch.parked_key(conn, settings.queue)) == 0  # no stale RQ entries
    assert conn.llen(dispatch.queue_key(conn, settings.queue)) == 0
    for p in procs:
        p.send_signal(signal.SIGTERM)
    stderr = "".join(p.communicate(timeout=30)[1] for p in procs)
    assert stderr.count("Redis is unreachable") <= 2 * 2  # once per outage per loop, not per second


@pytest.mark.fault
def test_a_killed_workers_grandchildren_die_with_it(conn, settings, workers, tmp_path):
    ticks = tmp_path / "ticks"
    worker = workers.start()
    job, tasks = jobs.command_job(
        ["sh", "-c", f"(while :; do echo t >> {ticks}; sleep 0.1; done) & wait"], settings)
    jobs.submit(conn, settings, job, tasks)
    wait_for(lambda: ticks.exists() and ticks.stat().st_size > 10, 30, what="ticking")
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone, as the OOM killer would
    worker.wait()
    time.sleep(1.0)
    size = ticks.stat().st_size
    time.sleep(1.5)
    assert ticks.stat().st_size == size, "a grandchild kept running after its worker died"


@pytest.mark.fault
def test_a_killed_workers_map_items_and_theirs_die_with_it(env, conn, workers, tmp_path):
    """A map item run by a worker's thread (a light group of its own, by posix_spawn)
    and what it started go with the worker, SIGKILL included, as a guarded piece's do."""
    from sheepdog.registration import live_workers

    ticks = tmp_path / "ticks"
    worker = workers.start()
    # registered first: else `map --detach` leaves a worker of its own, which may take the
    # item, or rerun it (as it must) once this one is killed, and tick on
    wait_for(lambda: live_workers(conn, env["SHEEPDOG_QUEUE"]), 30, what="the worker")
    out = sheepdog("map", "--range", "1:1", "--chunk", "1", "-N0", "--detach", "--",
                   "sh", "-c", f"(while :; do echo t >> {ticks}; sleep 0.1; done) & wait",
                   env=env)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: ticks.exists() and ticks.stat().st_size > 10, 30, what="ticking")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    time.sleep(1.0)
    size = ticks.stat().st_size
    time.sleep(1.5)
    assert ticks.stat().st_size == size, "an item's child kept running after its worker died"


@pytest.mark.fault
@pytest.mark.alone  # compares two runs' times: not while the other worker's load varies
def test_a_killed_run_is_rerun_at_once_not_after_the_heartbeat(env, tmp_path):
    """sheepdog run killed mid-scan; the rerun on the same host knows its attempts'
    process is gone and does not wait out the (default, 20 s) heartbeat timeout."""
    run_env = {k: v for k, v in env.items() if k != "SHEEPDOG_HEARTBEAT_TIMEOUT"}
    args = ["run", "gemma-loco", "--example", "--out", str(tmp_path / "o")]
    assert sheepdog(*args, env=run_env).returncode == 0  # split and GEMMA version cached
    started = time.perf_counter()
    assert sheepdog(*args, "--force", env=run_env).returncode == 0
    clean = time.perf_counter() - started
    victim = subprocess.Popen([sys.executable, "-m", "sheepdog", *args, "--force"],
                              env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    for line in victim.stdout:  # kill it while its LMM pieces run
        if "lmm chr" in line and "started" in line:
            break
    victim.kill()
    victim.wait()
    started = time.perf_counter()
    rerun = sheepdog(*args, env=run_env, timeout=120)
    took = time.perf_counter() - started
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert took <= 2 * clean + 0.5, f"rerun took {took:.1f}s, clean run {clean:.1f}s"


@pytest.fixture()
def client(redis_server, home, conn, queue):
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": ("t",), "queue": queue}})
    return app.test_client()


AUTH = {"Authorization": "Bearer t"}


def test_while_redis_is_down_every_route_answers_503_with_retry_after(client, redis_server):
    assert client.get("/jobs", headers=AUTH).status_code == 200  # connected once
    redis_server.kill9()
    try:
        for method, path, body in (("get", "/health", None), ("get", "/jobs", None),
                                   ("post", "/jobs", {"workflow": "command",
                                                      "command": ["true"]}),
                                   ("get", "/jobs/20261202-000000-abc", None),
                                   ("get", "/api/gemma/status/cmd::x", None)):
            r = getattr(client, method)(path, headers=AUTH, json=body)
            assert r.status_code == 503, (path, r.status_code, r.get_data(as_text=True)[:300])
            assert r.headers["Retry-After"].isdigit()
            assert "Redis" in r.get_json()["error"]
    finally:
        redis_server.start()
    assert client.get("/jobs", headers=AUTH).status_code == 200


@pytest.mark.parametrize("body,field", [
    ({"workflow": "command", "command": ["true"], "queue": "defualt"}, "queue"),
    ({"workflow": "command", "command": ["true"], "queue": 5}, "queue"),
    ({"workflow": "command", "command": ["true"], "host": ["a"]}, "host"),
    ({"workflow": "command", "command": ["true"], "backend": 3}, "backend"),
    ({"workflow": "command", "command": ["echo", "x" * (10 * 1024 * 1024)]}, "command"),
    ({"workflow": "command", "command": ["echo"] + ["a"] * 1_400_000}, "command"),
])
def test_never_runnable_jobs_are_refused_naming_the_field(client, body, field):
    r = client.post("/jobs", headers=AUTH, json=body)
    assert r.status_code == 400, r.get_json()
    assert r.get_json()["field"] == field


def test_a_queue_a_worker_served_is_accepted(client, conn, settings):
    from sheepdog.worker import Worker

    Worker(conn, settings, ["gpu"], burst=True).run()  # it registers what it serves
    r = client.post("/jobs", headers=AUTH, json={"workflow": "command", "command": ["true"],
                                                 "queue": "gpu"})
    assert r.status_code == 202
    assert store.get_task(conn, store.job_task_ids(conn, r.get_json()["id"])[0]).status \
        == TaskStatus.QUEUED


def test_a_lingering_burst_worker_waits_for_redis_only_as_long_as_it_lingers(
        conn, redis_server, settings, workers):
    """Idle, it waits for Redis no longer than it would have waited for work, not
    BURST_OUTAGE_LIMIT (60 s): `sheepdog redis stop` after a detached run."""
    from sheepdog.registration import live_workers

    proc = workers.start("--burst", "--linger", "5")
    wait_for(lambda: live_workers(conn, settings.queue), 30, what="the worker")
    redis_server.kill9()
    try:
        code = proc.wait(timeout=30)
    finally:
        redis_server.start()
    assert code == 0
    assert "gives up on Redis after 5s" in proc.stderr.read()


def test_a_killed_workers_registration_does_not_count_as_a_live_worker(conn, settings, env,
                                                                        workers):
    from sheepdog.registration import live_workers

    proc = workers.start("--queue", settings.queue)
    wait_for(lambda: live_workers(conn, settings.queue), timeout=30, what="the worker")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # its registration lives on for a heartbeat timeout, but this host knows it is dead:
    # `run --detach` and waiting clients start a worker instead of trusting it
    assert conn.smembers(keys.workers())
    assert live_workers(conn, settings.queue) == []
