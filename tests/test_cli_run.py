"""`sheepdog run` and friends, as a user types them, against a real redis-server."""

from __future__ import annotations

import json
import os
import time

from conftest import sheepdog, wait_for

from sheepdog import jobs, store
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
