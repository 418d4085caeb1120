"""The cache: nothing partial after a kill, listing with sizes, clearing."""

from __future__ import annotations

import json
import os
import signal

from conftest import sheepdog, wait_for

from sheepdog import registration, store
from sheepdog.cache import Cache


def test_a_run_killed_midway_leaves_nothing_partial_and_the_rerun_is_right(
        env, tmp_path, conn, workers, home):
    clean = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "clean"),
                     env=dict(env, SHEEPDOG_HOME=str(tmp_path / "other-home")), timeout=300)
    assert clean.returncode == 0
    w = workers.start()
    # registered first: else `run --detach` leaves a worker of its own, which would run
    # the scan on beside it and finish it after this one is killed
    wait_for(lambda: registration.live_workers(conn, env["SHEEPDOG_QUEUE"]), 30,
             what="the worker to register")
    job_id = sheepdog("run", "gemma-loco", "--example", "--detach", "--out",
                      str(tmp_path / "out"), env=env).stdout.strip()

    def some_lmm_done() -> bool:
        return any(t.name.startswith("lmm") and t.status == "success"
                   for t in store.job_tasks(conn, job_id))

    wait_for(some_lmm_done, 60, every=0.01, what="the first LMM piece")
    os.killpg(w.pid, signal.SIGKILL)
    local = Cache(home / "store")
    for entry in local.entries():
        if entry.kind != "task":
            continue
        d = local.task_dir(entry.id)
        names = {p.name for p in d.rglob("*")}
        assert names & {"centred.npy", "lmm.assoc.txt"}, f"{d} holds an unknown output"
        if "lmm.assoc.txt" in names:
            assert "total computation time" in (d / "output" / "lmm.log.txt").read_text()
    assert not (tmp_path / "out" / "assoc.txt").exists()
    r = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "rerun"), env=env,
                 timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "rerun" / "assoc.txt").read_text() == \
        (tmp_path / "clean" / "assoc.txt").read_text()


def test_cache_list_shows_sizes_and_clear_makes_the_next_run_compute(env, tmp_path):
    assert sheepdog("run", "gemma-loco", "--example", env=env, timeout=300).returncode == 0
    entries = json.loads(sheepdog("cache", "list", "--json", env=env).stdout)
    tasks = [e for e in entries if e["kind"] == "task"]
    assert len(tasks) == 41 and all(e["size"] > 0 for e in entries)
    human = sheepdog("cache", "list", env=env).stdout
    assert f"{len(entries)} entries" in human and "bytes" in human
    cleared = sheepdog("cache", "clear", env=env)
    assert f"removed {len(entries)} entries" in cleared.stdout
    assert json.loads(sheepdog("cache", "list", "--json", env=env).stdout) == []
    again = sheepdog("run", "gemma-loco", "--example", "--json", env=env, timeout=300)
    assert json.loads(again.stdout)["progress"]["cached"] == 0
