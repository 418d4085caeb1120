"""Bounded storage: finished jobs leave Redis after the retention setting; `cache gc`
trims the least recently used entries but never one a live piece needs."""

from __future__ import annotations

import json
import os
import time

from conftest import sheepdog, wait_for

from sheepdog import jobs, keys, store
from sheepdog.cache import Cache
from sheepdog.models import Job, Task
from sheepdog.retention import expire_finished, gc
from sheepdog.worker import Worker

DAY = 86400.0


def _run_to_end(conn, settings, argv):
    job, tasks = jobs.command_job(argv, settings)
    jobs.submit(conn, settings, job, tasks)
    Worker(conn, settings, [settings.queue], burst=True, register=False).run()
    wait_for(lambda: store.get_job(conn, job.id).status.final, 30, what="the job")
    return job.id


def test_finished_jobs_leave_redis_after_the_retention_with_their_logs(conn, settings):
    old = _run_to_end(conn, settings, ["echo", "old"])
    task_id = store.job_task_ids(conn, old)[0]
    waiting, tasks = jobs.command_job(["echo", "never run"], settings, queue="nobody-serves")
    jobs.submit(conn, settings, waiting, tasks)
    assert conn.exists(keys.job_log(old)) and conn.exists(keys.task(task_id))
    for jid in (old, waiting.id):  # a job's own directory (a CWL run's) goes with it
        (settings.jobs_dir / jid / "out").mkdir(parents=True)
    assert expire_finished(conn, 30 * DAY, jobs_dir=settings.jobs_dir) == 0  # not yet
    gone = expire_finished(conn, 30 * DAY, now=time.time() + 31 * DAY,
                           jobs_dir=settings.jobs_dir)
    assert gone == 1
    assert not (settings.jobs_dir / old).exists()
    assert (settings.jobs_dir / waiting.id / "out").is_dir()
    assert not any(conn.exists(k) for k in keys.job_keys(old))
    assert not conn.exists(keys.task(task_id)) and not conn.exists(keys.task_jobs(task_id))
    assert old.encode() not in conn.zrange(keys.jobs_index(), 0, -1)
    assert store.get_job(conn, waiting.id).status == "queued"  # not ended: it stays
    assert sheepdog_status_unknown(conn, old)


def sheepdog_status_unknown(conn, job_id):
    try:
        store.get_job(conn, job_id)
    except Exception as e:  # noqa: BLE001  UnknownJob: the id is simply not known any more
        return "unknown job id" in str(e)
    return False


def _age(conn, job_id, days):
    """Make a job look as if it was submitted and ended `days` ago."""
    when = time.time() - days * DAY
    conn.hset(keys.job(job_id), mapping={"submitted": repr(when), "ended": repr(when)})
    conn.zadd(keys.jobs_index(), {job_id: when})


def test_a_task_a_newer_job_took_from_the_cache_outlives_the_expired_job(conn, settings):
    task = Task(name="shared", argv=["echo", "x"], outputs=[], queue=settings.queue)
    first = Job(id="expire-first", workflow="command", queue=settings.queue,
                final_task=task.id)
    jobs.submit(conn, settings, first, [task])
    Worker(conn, settings, [settings.queue], burst=True, register=False).run()
    assert store.get_job(conn, "expire-first").status == "success"
    _age(conn, "expire-first", 40)
    conn.hset(keys.task(task.id), "ended", repr(time.time() - 40 * DAY))
    second = Job(id="expire-second", workflow="command", queue=settings.queue,
                 final_task=task.id)
    store.submit(conn, second, [task])  # from the cache: done at once
    assert store.get_job(conn, "expire-second").status == "success"
    assert expire_finished(conn, 30 * DAY) == 1
    assert not conn.exists(keys.job("expire-first"))
    assert conn.exists(keys.task(task.id))  # expire-second still shows it
    assert [t.id for t in store.job_tasks(conn, "expire-second")] == [task.id]
    _age(conn, "expire-second", 35)
    conn.hset(keys.task(task.id), "used", repr(time.time() - 35 * DAY))
    assert expire_finished(conn, 30 * DAY) == 1
    assert not conn.exists(keys.task(task.id))


def test_cache_gc_trims_least_recently_used_and_keeps_what_live_pieces_need(env, conn,
                                                                            settings):
    assert sheepdog("run", "gemma-loco", "--example", env=env, timeout=300).returncode == 0
    local = Cache(settings.cache_dir)
    entries = local.entries()
    assert len(entries) > 20
    long_ago = time.time() - 90 * DAY
    for i, e in enumerate(entries):  # all old, in a known order
        path = local.task_dir(e.id) if e.kind == "task" else local.blob(e.id)
        os.utime(path, (long_ago + i, long_ago + i))
    tasks_ = [e for e in entries if e.kind == "task"]
    blobs = [e for e in entries if e.kind == "input"]
    needs = Task(name="live", argv=["true"], inputs={"x": blobs[0].id}, deps=[tasks_[0].id],
                 queue="nobody-serves")
    store.submit(conn, Job(id="live-job", workflow="command", queue="nobody-serves",
                           final_task=needs.id), [needs], published=lambda _t: False)
    r = sheepdog("cache", "gc", "--max-size", "1K", "--json", env=env)
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    left = {e.id for e in local.entries()}
    assert left == {blobs[0].id, tasks_[0].id}  # only what the queued piece needs
    assert done["kept_needed"] == 2 and done["size_after"] < done["size_before"]
    removed = [e["id"] for e in done["removed"]]
    assert removed == [e.id for e in entries if e.id not in left]  # oldest first


def test_gc_by_age_leaves_recent_entries_and_says_what_it_needs(tmp_path, env):
    local = Cache(tmp_path / "store")
    old, new = local.put_bytes(b"old input"), local.put_bytes(b"new input")
    os.utime(local.blob(old), (time.time() - 40 * DAY,) * 2)
    done = gc(local, set(), older_than=30 * DAY)
    assert [e.id for e in done.removed] == [old] and local.blob(new).exists()
    r = sheepdog("cache", "gc", env=env)
    assert r.returncode == 2 and "--max-size SIZE and/or --older-than AGE" in r.stderr
    r = sheepdog("cache", "gc", "--max-size", "lots", env=env)
    assert r.returncode == 2 and "not a size like 10G" in r.stderr
