"""Pure Redis logic of the task graph, on fakeredis (fast; no server needed)."""

from __future__ import annotations

import time

import fakeredis
import pytest

from sheepdog import keys, store
from sheepdog.models import Job, Task


@pytest.fixture()
def fake():
    return fakeredis.FakeRedis()


def _graph():
    a = Task(name="a", argv=["a"])
    b = Task(name="b", argv=["b"], deps=[a.id])
    c = Task(name="c", argv=["c"], deps=[a.id, b.id])
    return a, b, c


def _run(fake, task_id, code=0, error=""):
    assert store.claim(fake, task_id, "w1", 5) is not None
    return store.finish(fake, task_id, "w1", code, error)


def _queued(fake):
    return sorted(keys.task_of_rq_job(j.decode()) for j in fake.lrange("rq:queue:default", 0, -1))


def test_only_tasks_without_pending_dependencies_are_dispatched(fake):
    a, b, c = _graph()
    store.submit(fake, Job(id="j1", workflow="t"), [a, b, c])
    assert _queued(fake) == [a.id]
    assert store.get_task(fake, c.id).pending == 2
    _run(fake, a.id)
    assert store.get_task(fake, b.id).status == "queued"
    assert store.get_task(fake, c.id).pending == 1
    _run(fake, b.id)
    _run(fake, c.id)
    job = store.get_job(fake, "j1")
    assert (job.status, job.done, job.total, job.exit_code) == ("success", 3, 3, 0)


def test_a_resubmitted_graph_is_all_cache_hits(fake):
    a, b, c = _graph()
    store.submit(fake, Job(id="j1", workflow="t"), [a, b, c])
    for t in (a, b, c):
        _run(fake, t.id)
    job = store.submit(fake, Job(id="j2", workflow="t"), list(_graph()))
    assert (job.status, job.cached) == ("success", 3)


def test_an_identical_submission_in_flight_shares_the_running_task(fake):
    a, b, c = _graph()
    store.submit(fake, Job(id="j1", workflow="t"), [a, b, c])
    store.claim(fake, a.id, "w1", 5)
    store.submit(fake, Job(id="j2", workflow="t"), list(_graph()))
    assert len(fake.lrange("rq:queue:default", 0, -1)) == 1  # a is not started twice
    store.finish(fake, a.id, "w1", 0)
    assert store.get_job(fake, "j2").done == 1 and store.get_job(fake, "j1").done == 1


def test_a_final_failure_cancels_downstream_and_fails_every_waiting_job(fake):
    a, b, c = _graph()
    store.submit(fake, Job(id="j1", workflow="t"), [a, b, c])
    assert _run(fake, a.id, 1, "exit code 1: ERROR: Enforce failed") == "error"
    job = store.get_job(fake, "j1")
    assert job.status == "error" and "piece 'a' failed" in job.error and "Enforce" in job.error
    assert store.get_task(fake, c.id).status == "cancelled"
    assert not fake.smembers(keys.active_tasks())


def test_failures_are_retried_when_the_policy_says_so(fake):
    t = Task(name="gemma", argv=["x"], retry_on_failure=True, max_attempts=2)
    store.submit(fake, Job(id="j1", workflow="t"), [t])
    assert _run(fake, t.id, 137, "killed") == "queued"  # the OOM killer, say
    assert _run(fake, t.id, 0) == "success"
    assert store.get_task(fake, t.id).attempts == 2


@pytest.mark.parametrize("code", [1, 2, 134])
def test_a_program_that_failed_by_itself_is_not_retried(fake, code):
    """GEMMA's "error! unrecognized option" (exit 1) or a GSL abort() (134) would fail
    the same way again: retrying all 20 LMM pieces only hid GEMMA's own message."""
    t = Task(name="gemma", argv=["x"], retry_on_failure=True, max_attempts=3)
    store.submit(fake, Job(id="j1", workflow="t"), [t])
    assert _run(fake, t.id, code, "exit") == "error"
    assert store.get_task(fake, t.id).attempts == 1


def test_a_cancelled_task_cannot_be_claimed(fake):
    t = Task(name="x", argv=["x"])
    store.submit(fake, Job(id="j1", workflow="t"), [t])
    assert store.cancel_job(fake, "j1")
    assert store.claim(fake, t.id, "w1", 5) is None
    assert not store.cancel_job(fake, "j1")  # already ended


def test_task_ids_are_content_addresses():
    assert Task(name="x", argv=["gemma"], inputs={"g": "1"}).id == \
        Task(name="other name", argv=["gemma"], inputs={"g": "1"}).id
    assert Task(name="x", argv=["gemma"], inputs={"g": "1"}).id != \
        Task(name="x", argv=["gemma"], inputs={"g": "2"}).id
    assert Task(name="x", argv=["a"], cacheable=False, nonce="j1").id != \
        Task(name="x", argv=["a"], cacheable=False, nonce="j2").id


def _entries(fake, queue="default"):
    return [j.decode() for j in fake.lrange(f"rq:queue:{queue}", 0, -1)]


def test_every_dispatch_gets_its_own_queue_entry(fake):
    a = Task(name="a", argv=["a"], retry_on_failure=True)
    store.submit(fake, Job(id="j1", workflow="t"), [a])
    first = _entries(fake)
    assert first == [store.get_task(fake, a.id).rq_id]
    fake.lpop("rq:queue:default")
    _run(fake, a.id, code=137)  # retried: dispatched again
    second = _entries(fake)
    assert second == [store.get_task(fake, a.id).rq_id] and second != first


def test_a_queue_entry_lost_by_its_taker_is_dispatched_again_after_two_sightings(fake):
    a = Task(name="a", argv=["a"])
    store.submit(fake, Job(id="j1", workflow="t"), [a])
    fake.lpop("rq:queue:default")  # taken by a worker that died before claiming it
    time.sleep(0.06)
    # the first sighting could be a taker between taking and claiming: wait
    assert not store.redispatch_stranded(fake, a.id, older_than=0.05)
    assert _entries(fake) == []
    time.sleep(0.06)
    assert store.redispatch_stranded(fake, a.id, older_than=0.05)
    assert _entries(fake) == [store.get_task(fake, a.id).rq_id]
    assert _run(fake, a.id) == "success"


def test_a_taken_and_claimed_task_is_never_dispatched_again(fake):
    a = Task(name="a", argv=["a"])
    store.submit(fake, Job(id="j1", workflow="t"), [a])
    fake.lpop("rq:queue:default")
    time.sleep(0.06)
    assert not store.redispatch_stranded(fake, a.id, older_than=0.05)
    assert store.claim(fake, a.id, "w1", 5) is not None
    time.sleep(0.06)
    assert not store.redispatch_stranded(fake, a.id, older_than=0.05)
    assert _entries(fake) == []


def test_several_waiting_pieces_are_taken_and_claimed_in_one_round_trip(fake):
    """A pull worker's claim of several pieces: each call of the batch takes its own
    entry; those that find the queue empty say so (None), and nothing is taken twice."""
    tasks = [Task(name=f"t{i}", argv=["t", str(i)]) for i in range(3)]
    store.submit(fake, Job(id="j1", workflow="t"), tasks)
    got = store.take_and_claim_many(fake, ["default"], "w1", 5, 5, drop_entry=True)
    assert got[3:] == [None, None]
    claimed = sorted(one[1][0].id for one in got[:3])
    assert claimed == sorted(t.id for t in tasks)
    assert all(store.get_task(fake, tid).status == "running" for tid in claimed)
    assert fake.llen("rq:queue:default") == 0


def test_a_success_from_an_untrusted_worker_is_marked_in_the_same_call(fake):
    """finish_piece(untrusted=True) marks what mark_untrusted marks, as the success is
    recorded; a trusted success marks nothing."""
    a, b = Task(name="a", argv=["a"]), Task(name="b", argv=["b"])
    store.submit(fake, Job(id="j1", workflow="t"), [a, b])
    for t, untrusted in ((a, True), (b, False)):
        assert store.claim(fake, t.id, "w1", 5) is not None
        done = store.finish_piece(fake, t.id, "w1", 0, untrusted=untrusted)
        assert done.status == "success"
    assert store.get_task(fake, a.id).untrusted == "w1"
    assert not store.get_task(fake, b.id).untrusted
    assert store.untrusted(fake, [a.id, b.id]) == [a.id]


def test_a_task_run_again_belongs_only_to_the_jobs_waiting_for_it_now(fake):
    a = Task(name="a", argv=["a"])
    b = Task(name="b", argv=["b"], deps=[a.id])
    store.submit(fake, Job(id="j1", workflow="t"), [a, b])
    _run(fake, a.id)
    fake.delete(keys.task(a.id))  # its outputs were cleared from the cache meanwhile
    store.submit(fake, Job(id="j2", workflow="t"), [Task(name="a", argv=["a"])])
    assert store.job_ids_of_task(fake, a.id) == ["j2"]
    _run(fake, a.id)
    assert store.get_job(fake, "j1").done == 1  # not counted twice for j1
    assert store.get_job(fake, "j2").status == "success"


def test_the_lua_scripts_build_the_keys_keys_py_builds(fake):
    """The scripts learn of tasks and jobs while they run and build their keys from
    keys.script_parts(): the same strings as keys.py's functions, and the same task id
    read back from a queue entry's id."""
    task_part, jobs, deps, beat, job_part, running, log, head, tail = keys.script_parts()
    written = fake.eval(store._PARTS + "return {TASK, JOBS, DEPS, BEAT, JOB, RUNNING, LOG, "
                        "RQ_HEAD, tostring(RQ_TAIL), ARGV[10]}", 0, "mine")
    assert [x.decode() for x in written] == [*keys.script_parts(), "mine"]  # then its own
    tid = "ab" * 32
    assert (task_part + tid, task_part + tid + jobs, task_part + tid + deps,
            task_part + tid + beat) == (keys.task(tid), keys.task_jobs(tid),
                                        keys.task_dependents(tid), keys.task_heartbeat(tid))
    assert (job_part + "j1", job_part + "j1" + running, job_part + "j1" + log) == (
        keys.job("j1"), keys.job_running("j1"), keys.job_log("j1"))
    for task_id in (tid, "short", "x" * 40):
        rq_id = keys.rq_job_id(task_id, "0123456789ab")
        read = fake.eval(store._PARTS + "return task_of(ARGV[10])", 0, rq_id).decode()
        assert read == keys.task_of_rq_job(rq_id) == ("" if len(task_id) == 40 else task_id)
    assert keys.task_of_rq_job("some-other-entry") == ""


def test_a_success_records_in_one_call_what_the_transaction_did(fake):
    """The one-call success (store._SUCCEED) and the transaction path (a success found
    queued again after an outage) leave the same task, job, dependents and log."""
    results = []
    for one_call in (True, False):
        fake.flushall()
        a, b, c = _graph()
        store.submit(fake, Job(id="j1", workflow="t", final_task=c.id), [a, b, c])
        for t in (a, b, c):
            assert store.claim(fake, t.id, "w1", 5) is not None
            if one_call:
                assert store.finish(fake, t.id, "w1", 0) == "success"
            else:  # taken back after an outage, nobody claimed it since: the transaction
                fake.hset(keys.task(t.id), mapping={"status": "queued", "requeued_from": "w1"})
                assert store.finish(fake, t.id, "w1", 0, attempt=1) == "success"
        job = store.get_job(fake, "j1")
        lines = [f[b"text"].decode().split(" in ")[0] for _, f in fake.xrange(keys.job_log("j1"))]
        results.append((job.status, job.done, job.total, job.exit_code,
                        [store.get_task(fake, t.id).status for t in (a, b, c)],
                        fake.scard(keys.active_tasks()), lines[-1]))
    assert results[0] == results[1]
    assert results[0][-1] == "job j1 success (exit code 0)"


def test_stream_places_are_shared_capped_and_freed_when_their_lease_runs_out(fake):
    """Every web process counts open streams in the same sets; a place a killed process
    held comes free once its lease ran out."""
    from web.stream import _HOLD

    hold = fake.register_script(_HOLD)
    places = [keys.stream_places("job", "j1"), keys.stream_places("token", "t")]

    def take(member, now, per_job=2, per_token=5):
        return hold(keys=places, args=[now, now + 30, member, per_job, per_token])

    assert take("a", 1000) == 1 and take("b", 1000) == 1
    assert take("c", 1010) == 0  # the job's two places are held
    assert fake.zcard(places[1]) == 2  # the refused one took no token place either
    assert take("c", 1031) == 1  # a's and b's leases ran out (never renewed: a dead process)
    assert take("d", 1031, per_token=1) == 0  # the token's cap counts too


@pytest.mark.parametrize("at_front", [False, True])
def test_entries_are_written_as_rq_writes_them(fake, at_front):
    """dispatch writes a queue entry itself, not through an RQ Job and Queue: the same
    keys, commands and fields as RQ's own enqueue_call (timestamps aside), and RQ reads
    it back as the call to worker.run_task it would have made."""
    from rq import Queue
    from rq.job import Job as RQJob

    from sheepdog import dispatch

    task_id, rq_id = "cd" * 32, keys.rq_job_id("cd" * 32, "0123456789ab")
    theirs = fake.pipeline(transaction=True)
    theirs.multi()
    queue = Queue("q1", connection=fake)
    queue.enqueue_call(dispatch.RUN_TASK, args=(task_id,), job_id=rq_id, timeout=-1,
                       result_ttl=0, failure_ttl=3600, pipeline=theirs, at_front=at_front)
    encode = fake.get_encoder().encode
    expected = [[encode(a) for a in args] for args, _ in theirs.command_stack]
    ours = [[encode(a) for a in c] for c in dispatch.entry_commands(task_id, "q1", rq_id,
                                                                     at_front)]

    def timeless(commands):  # RQ's timestamps: when each was made
        return [[b"T" if i > 0 and c[i - 1] in (b"created_at", b"enqueued_at") else a
                 for i, a in enumerate(c)] for c in commands]

    assert timeless(ours) == timeless(expected)
    assert (keys.rq_queue("q1"), keys.rq_taken("q1"), keys.RQ_QUEUES) == (
        queue.key, queue.intermediate_queue_key, Queue.redis_queues_keys)
    job_key = RQJob.key_for(rq_id)
    assert keys.rq_job(rq_id) == (job_key.decode() if isinstance(job_key, bytes) else job_key)
    for command in dispatch.entry_commands(task_id, "q1", rq_id, at_front):
        fake.execute_command(*command)
    read = RQJob.fetch(rq_id, connection=fake)
    assert (read.func_name, read.args, read.origin) == (dispatch.RUN_TASK, (task_id,), "q1")
    assert queue.job_ids[0 if at_front else -1] == rq_id


def _commands_sent(fake, monkeypatch) -> list[str]:
    """The name of each command the client sends from now on, by redis-py's path or
    as a script call packed by sheepdog.lua."""
    from sheepdog import lua

    calls: list[str] = []
    run, send = fake.execute_command, lua._send
    fake.execute_command = lambda *a, **k: calls.append(a[0]) or run(*a, **k)
    monkeypatch.setattr(lua, "_send", lambda pool, commands: calls.extend(
        c[0] for c in commands) or send(pool, commands))
    return calls


def test_new_pieces_join_an_open_job_in_one_call_and_an_ended_one_refuses(fake, monkeypatch):
    """A CWL run's invocations (new, uncacheable) go into its open job as one script
    call (no WATCH: the job's finishing pieces would make it retry); the job counts and
    dispatches them; an unknown or ended job refuses, as the transaction did."""
    from sheepdog.errors import JobEnded, UnknownJob
    from sheepdog.models import JobStatus

    job = Job(id="open-1", workflow="cwl")
    store.submit(fake, job, [], open_=True)
    piece = Task(name="count_2", argv=["wc", "-w"], cacheable=False, nonce="n1")
    calls = _commands_sent(fake, monkeypatch)
    store.add_tasks(fake, "open-1", [piece])
    assert "WATCH" not in calls and calls.count("EVALSHA") == 1
    assert store.get_job(fake, "open-1").total == 2  # the piece, and the one close removes
    assert [t.id for t in store.job_tasks(fake, "open-1")] == [piece.id]
    assert _queued(fake) == [piece.id]
    with pytest.raises(UnknownJob):
        store.add_tasks(fake, "nope", [Task(name="x", argv=["x"], cacheable=False, nonce="2")])
    store.stop_job(fake, "open-1", JobStatus.ERROR, "failed")
    with pytest.raises(JobEnded):
        store.add_tasks(fake, "open-1", [Task(name="y", argv=["y"], cacheable=False,
                                              nonce="3")])


def test_a_follower_reads_lines_that_keep_coming_in_batches_and_a_backlog_at_once(
        fake, monkeypatch):
    """After a read that brought lines, the follower pauses FOLLOW_GAP so that the next
    read brings what came meanwhile (a busy job's notes, one round trip apiece, cost its
    follower a tenth of a core); a full read (a backlog) goes on at once."""
    from sheepdog import defaults, logs

    log = keys.job_log("j")
    for n in range(defaults.FOLLOW_COUNT + 3):
        fake.xadd(log, logs.note_fields(f"line {n}"))
    pauses: list[float] = []

    def pause(seconds: float) -> None:  # while the follower pauses, the job ends
        pauses.append(seconds)
        fake.xadd(log, logs.end_fields("success", 0, "", "j"))

    monkeypatch.setattr(logs.time, "sleep", pause)
    got = list(logs.follow(fake, "j", lambda: False))
    assert [x.text for x in got[:-1]] == [f"line {n}" for n in range(defaults.FOLLOW_COUNT + 3)]
    assert got[-1].end
    assert pauses == [defaults.FOLLOW_GAP]  # after the 3, not after the full read


def test_scripts_sent_in_one_round_trip_each_get_their_own_reply_or_error(fake):
    """lua.run_many packs the calls itself (not redis-py's command path): each call's
    reply comes back in order, an error reply as that call's own (the others' replies are
    not lost with it), or raised when asked; a script the server forgot is sent again by
    its text."""
    import redis

    from sheepdog import lua

    calls = [("return 1", [], []), ("return redis.call('GET')", [], []),
             ("return ARGV[1] .. KEYS[1]", ["k"], ["v"])]
    replies = lua.run_many(fake, calls, raise_on_error=False)
    assert replies[0] == 1 and replies[2] == b"vk"
    assert isinstance(replies[1], redis.ResponseError)
    with pytest.raises(redis.ResponseError):
        lua.run_many(fake, calls)
    fake.script_flush()
    assert lua.run_many(fake, [calls[0], calls[2]]) == [1, b"vk"]
    assert lua.script(fake, "return 2")() == 2
