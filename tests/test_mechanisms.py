"""One place for each mechanism: the process pump, the log writer through a Redis
outage, the watch loop's clean-up, scratch sweeping and Slurm's batched polling."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import wait_for

from sheepdog import jobs, keys, logs, piece, store
from sheepdog.backends.base import Backend, StatusUpdate, Submission
from sheepdog.backends.slurm import SlurmBackend, SlurmSettings, monitor_for
from sheepdog.backends.slurm import commands as cmd
from sheepdog.cache import Cache
from sheepdog.errors import BackendError
from sheepdog.maintenance import sweep_scratch
from sheepdog.models import Job, JobStatus, Task, TaskStatus
from sheepdog.process import LineSplitter, Process
from sheepdog.worker import Worker


def _wait_code(proc: Process, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (code := proc.poll()) is None:
        assert time.monotonic() < deadline, "the program never ended (blocked on its pipe?)"
        proc.wait(0.5)
    return code


def test_a_failing_sink_never_blocks_the_program_and_the_failure_reaches_the_piece(tmp_path):
    def sink(stream, lines):
        raise RuntimeError("Redis went away")

    # 5 MB: far more than a pipe holds, so a reader that died would block the program
    program = "import sys\nfor i in range(50000): sys.stdout.write('x' * 99 + '\\n')"
    proc = Process([sys.executable, "-c", program], str(tmp_path), None, sink)
    assert _wait_code(proc) == 0
    assert "RuntimeError: Redis went away" in proc.failure()


def test_lines_come_whole_across_chunks_and_redraws_collapse():
    s = LineSplitter(max_line=10_000_000)
    long_line = "y" * 3_000_000
    got = []
    for i in range(0, len(long_line), 65536):
        got += s.feed(long_line[i:i + 65536].encode())
    assert got == []  # no break yet: nothing emitted, nothing rescanned
    got += s.feed(b"\r")
    got += s.feed(b"\nnext\r50%\r50%\r60%\n")
    got += s.flush()
    assert got == [long_line, "next", "50%", "60%"]


def _chatty_task(tmp_path: Path, queue: str, lines: int, pause: float) -> Task:
    marker = tmp_path / "first-attempt"
    program = (f"import os, time\nfirst = not os.path.exists({str(marker)!r})\n"
               f"open({str(marker)!r}, 'a').close()\n"
               f"for i in range({lines} if first else 3):\n"
               f"    print('line', i, flush=True)\n"
               f"    time.sleep({pause} if first else 0)\n"
               "open('out.txt', 'w').write('done')\n")
    return Task(name="chatty", argv=[sys.executable, "-c", program], outputs=["out.txt"],
                queue=queue, max_attempts=3)


def _run_through_outage(conn, redis_server, settings, task, down_after, down_for):
    job = Job(id=jobs.new_job_id(), workflow="test", final_task=task.id, queue=task.queue)
    jobs.submit(conn, settings, job, [task])
    worker = Worker(conn, settings, [task.queue], register=False)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: store.get_task(conn, task.id).status == TaskStatus.RUNNING, 20,
                 what="the piece to start")
        time.sleep(down_after)
        redis_server.kill9()
        time.sleep(down_for)
        redis_server.start()
        wait_for(lambda: JobStatus(store.get_job(conn, job.id).status).final, 90,
                 every=0.2, what="the job to end after the outage")
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive(), "the worker did not stop"
    return job


def test_a_short_outage_loses_no_line(conn, redis_server, settings, tmp_path):
    """Redis killed for 3 s while a piece prints: its lines wait and arrive in order."""
    settings = replace(settings, heartbeat_timeout=30.0)
    task = _chatty_task(tmp_path, settings.queue, lines=200, pause=0.03)
    job = _run_through_outage(conn, redis_server, settings, task, down_after=1.0,
                              down_for=3.0)
    assert store.get_job(conn, job.id).status == JobStatus.SUCCESS
    assert store.get_task(conn, task.id).attempts == 1
    printed = [ln.text for ln in logs.read(conn, job.id, count=10_000) if ln.stream == "stdout"]
    assert printed == [f"line {i}" for i in range(200)]


def test_output_beyond_what_an_outage_can_hold_runs_the_piece_again(conn, redis_server,
                                                                   settings, tmp_path):
    """Redis unreachable mid-piece for longer than the log buffer lasts: the reader
    goes on draining (no hang), the loss reaches the piece, and it runs again."""
    settings = replace(settings, heartbeat_timeout=30.0, log_buffer_lines=20)
    task = _chatty_task(tmp_path, settings.queue, lines=300, pause=0.02)
    job = _run_through_outage(conn, redis_server, settings, task, down_after=0.5,
                              down_for=3.0)
    assert store.get_job(conn, job.id).status == JobStatus.SUCCESS
    assert store.get_task(conn, task.id).attempts == 2
    said = " ".join(ln.text for ln in logs.read(conn, job.id, count=10_000))
    assert "could not be recorded" in said and "trying again" in said


class _BrokenPoll(Backend):
    """A backend whose status query fails once the piece started (a dropped link)."""

    name = "broken"

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    @classmethod
    def open(cls, task, settings, cache):  # pragma: no cover - built directly
        return cls()

    def submit(self, task, sink):
        return Submission(task=task, handle="started")

    def poll(self, active):
        raise BackendError("squeue over a dropped ssh link", "login-node")
        yield StatusUpdate(active[0].task.id, 0)  # pragma: no cover

    def cancel(self, active):
        self.cancelled += [s.handle for s in active]


def test_a_failure_while_watching_cancels_the_submission(conn, settings):
    task = Task(name="watched", argv=["true"], queue=settings.queue)
    backend = _BrokenPoll()
    sub = backend.submit(task, lambda *_: None)
    writer = logs.LogWriter(conn, task.id, task.name, [], 100)
    stopper = piece._Stopper(task, threading.Event(), threading.Event())
    with pytest.raises(BackendError):
        piece._watch(backend, sub, task, piece.PieceOutput(writer, None), stopper)
    assert backend.cancelled == ["started"]


def test_abandoned_scratch_is_swept_but_never_a_running_pieces(conn, settings):
    cache = Cache(settings.cache_dir)
    old, active, fresh = "a" * 64, "b" * 64, "c" * 64
    paths = {name: cache.scratch(name) for name in (old, active, fresh)}
    for name in (old, active):
        (paths[name] / "partial.txt").write_text("half")
        stamp = time.time() - 3 * 24 * 3600
        os.utime(paths[name], (stamp, stamp))
    conn.sadd("sheepdog:tasks:active", active)
    worker = Worker(conn, settings, [settings.queue], burst=True)
    worker.run()  # a worker sweeps when it starts
    assert not paths[old].exists()
    assert paths[active].exists() and paths[fresh].exists()
    assert sweep_scratch(conn, settings) == 0


class CountingRunner:
    """Slurm as a cluster answers: canned sbatch/squeue text, the pieces' files read
    from their real control directories; every command counted."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.next_id = 1000
        self.lock = threading.Lock()
        self.gone: set[str] = set()
        self.scontrol: dict[str, str] = {}

    def run(self, argv):
        with self.lock:
            self.calls[argv[0]] = self.calls.get(argv[0], 0) + 1
            if argv[0] == "sbatch":
                self.next_id += 1
                return 0, f"{self.next_id}\n", ""
            if argv[0] == "squeue":
                ids = argv[argv.index("-j") + 1].split(",")
                return 0, "".join(f"{i} PENDING Resources\n" for i in ids
                                  if i not in self.gone), ""
            if argv[0] == "scontrol":
                return 0, self.scontrol.get(argv[-1], ""), ""
            return 0, "", ""

    def write(self, path, text):
        Path(path).write_text(text)

    def read_files(self, wanted):
        with self.lock:
            self.calls["read"] = self.calls.get("read", 0) + 1
        out = []
        for path, offset in wanted:
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    out.append(f.read())
            except FileNotFoundError:
                out.append(b"")
        return out


def test_slurm_status_for_200_pending_pieces_is_one_query_per_cycle(settings):
    monitor_for(None).pieces.clear()
    runner = CountingRunner()
    cache = Cache(settings.cache_dir)
    backends = [SlurmBackend(SlurmSettings(), cache, runner=runner) for _ in range(8)]
    subs: list[list[Submission]] = [[] for _ in backends]
    for i in range(200):
        task = Task(name=f"piece {i}", argv=["true", str(i)], queue=settings.queue)
        subs[i % 8].append(backends[i % 8].submit(task, lambda *_: None))
    assert runner.calls["sbatch"] == 200
    ended: list[StatusUpdate] = []
    stop = time.monotonic() + 4.5

    def watch(backend, mine):  # one worker thread's loop: poll, then wait
        while time.monotonic() < stop and mine:
            for update in backend.poll(list(mine)):
                ended.append(update)
                mine[:] = [s for s in mine if s.task.id != update.task_id]
            backend.wait(mine, 0.2)

    finishing = [sub for mine in subs for sub in mine[: len(mine) // 2]]
    vanishing = subs[0][-1]
    threads = [threading.Thread(target=watch, args=(b, s))
               for b, s in zip(backends, subs, strict=True)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    # half of the pieces finish (their scripts wrote an exit status), one vanishes
    for sub in finishing:
        Path(sub.workdir, cmd.EXIT_FILE).write_text("0\n")
    runner.gone.add(vanishing.handle)
    for t in threads:
        t.join()
    # 4.5 s of polling: an squeue every 2 s and a look at the files every 0.25 s, for
    # all 200 pieces together (per-piece polling would be thousands of commands)
    assert runner.calls["squeue"] <= 4
    assert runner.calls["read"] <= 4.5 / 0.25 + 2 + 2  # + the vanished piece's re-checks
    finished = [u for u in ended if not u.lost]
    lost = [u for u in ended if u.lost]
    assert len(finished) == len(finishing) and all(u.exit_code == 0 for u in finished)
    assert len(lost) == 1 and "vanished" in lost[0].error
    monitor_for(None).pieces.clear()


def test_a_signal_exit_is_the_clusters_doing_only_when_the_controller_says_so(settings):
    # Slurm kills a job's processes one by one: the script may outlive its command for
    # long enough to record 143 for a scancel or a time limit
    monitor_for(None).pieces.clear()
    runner = CountingRunner()
    backend = SlurmBackend(SlurmSettings(), Cache(settings.cache_dir), runner=runner)
    subs = [backend.submit(Task(name=f"piece {i}", argv=["true", str(i)],
                                queue=settings.queue), lambda *_: None) for i in range(3)]
    states = ["TIMEOUT Reason=TimeLimit", "FAILED Reason=NonZeroExitCode", "COMPLETED"]
    for sub, code, state in zip(subs, (143, 139, 0), states, strict=True):
        Path(sub.workdir, cmd.EXIT_FILE).write_text(f"{code}\n")
        runner.scontrol[sub.handle] = f"JobId={sub.handle} JobState={state}"
    time.sleep(0.3)
    got = {u.task_id: u for u in backend.poll(subs)}
    timed_out, crashed, fine = (got[s.task.id] for s in subs)
    assert timed_out.lost and f"{subs[0].handle} ended TIMEOUT (TimeLimit)" in timed_out.error
    assert not crashed.lost and crashed.exit_code == 139  # the program's own crash
    assert not fine.lost and fine.exit_code == 0
    assert runner.calls["scontrol"] == 2  # asked only about the deaths by signal
    monitor_for(None).pieces.clear()


def test_a_line_longer_than_the_limit_is_cut_saying_so():
    s = LineSplitter(max_line=1000)
    got = []
    for _ in range(200):  # 13 MB in one line, fed as a program would write it
        got += s.feed(b"z" * 65536)
    got += s.feed(b"\nnext\n")
    assert got == ["z" * 1000 + f" …[line cut: {200 * 65536:,d} characters]", "next"]


def test_a_jobs_log_is_bounded_in_bytes_with_one_marker(conn, settings):
    settings = replace(settings, log_max_bytes=20_000)
    job, tasks = jobs.command_job(
        [sys.executable, "-c", "for i in range(2000): print(f'{i:04d}' + 'x' * 95)"], settings)
    jobs.submit(conn, settings, job, tasks)
    Worker(conn, settings, [settings.queue], burst=True, register=False).run()
    lines = logs.read(conn, job.id, count=100_000)
    kept = [ln for ln in lines if ln.stream == "stdout"]
    assert sum(len(ln.text) for ln in kept) <= 20_000
    assert len(kept) == 20_000 // 99
    markers = [ln for ln in lines if ln.truncated]
    assert len(markers) == 1 and "20000 bytes" in markers[0].text
    assert store.get_job(conn, job.id).status == JobStatus.SUCCESS


def test_a_burst_worker_idle_too_early_leaves_no_ready_work_behind(conn, settings,
                                                                  monkeypatch):
    """A burst worker may judge itself idle between a thread taking an entry and counting
    itself busy; that piece still runs, and what it makes ready must run too."""
    first = Task(name="first", argv=["sleep", "0.5"], cacheable=False, nonce="race1",
                 queue=settings.queue)
    second = Task(name="second", argv=["true"], deps=[first.id], cacheable=False,
                  nonce="race1", queue=settings.queue)
    job = Job(id="20261203-000000-burstrace", workflow="command", queue=settings.queue,
              final_task=second.id)
    store.submit(conn, job, [first, second])
    worker = Worker(conn, settings, [settings.queue], concurrency=1, burst=True,
                    register=False)
    original = Worker._finished
    fooled = []

    def idle_too_early(self: Worker) -> bool:
        if not fooled:  # the moment of the race: the first piece taken, nothing waiting
            wait_for(lambda: store.get_task(conn, first.id).status == TaskStatus.RUNNING,
                     10, what="the first piece to start")
            fooled.append(True)
            return True
        return original(self)

    monkeypatch.setattr(Worker, "_finished", idle_too_early)
    runner = threading.Thread(target=worker.run)
    runner.start()
    runner.join(30)
    assert not runner.is_alive()
    assert fooled
    assert store.get_job(conn, job.id).status == JobStatus.SUCCESS


def test_a_burst_worker_going_leaves_no_job_of_a_submitter_that_found_it_registered(
        conn, settings, monkeypatch):
    """`run --detach` enqueues, then starts no worker when one serves the queue; a burst
    worker going unregisters before its last look at the queue, so a job enqueued by a
    submitter that still found it registered is seen by that look and run."""
    from sheepdog import registration

    job, tasks = jobs.command_job(["true"], settings)
    worker = Worker(conn, settings, [settings.queue], concurrency=1, burst=True)
    original = registration.unregister
    raced = []

    def submitter_between(conn_: object, name: str) -> None:
        if not raced:  # enqueued while the worker is still registered: no worker started
            assert registration.live_workers(conn, settings.queue)
            jobs.submit(conn, settings, job, tasks)
            raced.append(True)
        original(conn_, name)  # type: ignore[arg-type]

    monkeypatch.setattr(registration, "unregister", submitter_between)
    runner = threading.Thread(target=worker.run)
    runner.start()
    runner.join(30)
    assert not runner.is_alive() and raced
    assert store.get_job(conn, job.id).status == JobStatus.SUCCESS
    assert not registration.live_workers(conn, settings.queue)


def test_a_failures_message_quotes_the_programs_own_error_from_stdout():
    """GEMMA prints `error! unrecognized option` on stdout and only its banner on
    stderr: the piece's error quotes its own words, not just `exit code 1`."""
    class Lines:
        def __init__(self) -> None:
            self.got: list[tuple[str, str]] = []

        def write(self, stream: str, lines: list[str]) -> None:
            self.got += [(stream, line) for line in lines]

    output = piece.PieceOutput(Lines(), None)  # type: ignore[arg-type]
    output("stdout", ["Reading Files ...", "error! unrecognized option: -bogusflag"])
    output("stderr", ["GEMMA 0.98.5 (2021-08-25) by Xiang Zhou"])
    explained = piece.explain(piece.Outcome(1, ""), output)
    assert explained.error == ("exit code 1: error! unrecognized option: -bogusflag | "
                               "GEMMA 0.98.5 (2021-08-25) by Xiang Zhou")


def test_scripts_run_together_in_one_round_trip_even_after_the_server_forgot_them(conn):
    """lua.run_many: replies in order; a server that lost its scripts (a restart, SCRIPT
    FLUSH) answers NOSCRIPT without running them, and each is run again by its text —
    once: the counter shows no call ran twice. A script's own error is raised."""
    from sheepdog.lua import run_many

    count = "return redis.call('INCR', KEYS[1])"
    for round_ in range(2):
        conn.delete("n")
        conn.script_flush()
        assert run_many(conn, [(count, ["n"], [])] * 3) == [1, 2, 3], round_
        assert int(conn.get("n")) == 3
    with pytest.raises(Exception, match="boom"):
        run_many(conn, [(count, ["n"], []), ("return redis.error_reply('boom')", [], [])])


def test_a_new_jobs_arguments_arrive_exactly_as_json_text_or_as_bytes(conn):
    """A job of new pieces is one script call; its commands travel as one JSON text, a
    bytes value as an argument of its own that the text points to: stored byte for byte
    (quotes, backslashes, newlines, non-ASCII, a NUL, a float's repr, binary), and a
    piece already there stops the whole call."""
    odd = ["printf", 'a "quoted" \\ back\nslash', "Müller ∂ 𝔊", "nul\x00here", "-0.1"]
    job = Job(id="json-1", workflow="command", command=odd, submitted=1733450000.123456)
    piece = Task(name="run", argv=odd, cacheable=False, nonce="j1")
    assert store._argv([("HSET", "k", "f", odd[1], "n", 3, "x", 0.1)]) == [
        '[["HSET", "k", "f", "a \\"quoted\\" \\\\ back\\nslash", "n", "3", "x", "0.1"]]']
    assert store._argv([("HSET", "k", "s", JobStatus.SUCCESS)]) == [
        '[["HSET", "k", "s", "success"]]']  # an enum as its text, as redis-py sends it
    assert store._argv([("HSET", "k", "f", b"\x80\x00", "g", b"")]) == [
        '[["HSET", "k", "f", 2, "g", 3]]', b"\x80\x00", b""]
    store.submit(conn, job, [piece])
    stored = store.get_job(conn, "json-1")
    assert stored.command == odd and stored.submitted == job.submitted
    assert store.get_task(conn, piece.id).argv == odd
    store._submit_new(conn, Job(id="json-2", workflow="command"), [piece], False)
    assert not conn.exists(keys.job("json-2"))  # its piece exists: nothing written
    conn.delete(keys.task(piece.id), keys.job("json-1"))
    raw = Job(id="bytes-1", workflow="command")
    pipe = store._Commands()
    pipe.hset(keys.job("bytes-1"), mapping={"blob": b"\x80\xff\x00"})
    run = store.script(conn, store._IF_NEW)
    assert run(keys=[keys.task("none")], args=store._argv(pipe.stack)) == 1
    assert conn.hget(keys.job(raw.id), "blob") == b"\x80\xff\x00"


_GREEN_CHECK = """
from gevent import monkey
monkey.patch_all()
import sys, gevent, redis
from web import green

stock = redis.Redis.from_url(sys.argv[1])
ours = redis.Redis.from_url(sys.argv[1], **green.options())
stock.ping(); ours.ping()
print(type(ours.connection_pool.get_connection()._parser).__name__)
c = ours.connection_pool.get_connection()
ran = []
gevent.spawn(ran.append, 1)
print(c._parser.can_read(0), ran)
c2 = stock.connection_pool.get_connection()
ran2 = []
gevent.spawn(ran2.append, 1)
print(c2._parser.can_read(0), ran2)
c.send_command("PING")
gevent.sleep(0.05)
print(c._parser.can_read(0), c.read_response())
print(ours.set("green", "1"), ours.get("green"))
"""


def test_redis_py_in_the_web_process_asks_is_anything_to_read_without_yielding(
        redis_server, tmp_path):
    """Under gevent (gunicorn's worker) redis-py's zero-timeout "anything left to
    read?" check, made before every command, waited a whole turn of the event loop
    (another greenlet runs meanwhile); web.green's parser asks the kernel: nothing runs
    meanwhile, pending data is still seen, and commands work."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _GREEN_CHECK, redis_server.url],
                          capture_output=True, text=True, timeout=60, cwd=root)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == ["Parser", "False []", "False [1]", "True b'PONG'", "True b'1'"], lines


def test_the_calls_of_one_turn_of_the_event_loop_go_to_redis_together():
    """web.green.Together (no monkey patching needed): twenty greenlets started in one
    turn make their calls in one round trip, each gets its own replies back; calls made
    while that round trip is out go in the next one, sent meanwhile, not after it."""
    import gevent

    from web.green import Together

    sent: list[list[tuple[str, int]]] = []
    out_at_once = [0, 0]

    def send(_pool: object, commands: list[tuple[str, int]]) -> list[tuple[str, int]]:
        sent.append(list(commands))
        out_at_once[0] += 1
        out_at_once[1] = max(out_at_once)
        gevent.sleep(0.05)  # the round trip
        out_at_once[0] -= 1
        return [("reply", n) for _, n in commands]

    together = Together(send)
    first = [gevent.spawn(together, None, [("EVALSHA", i), ("EVALSHA", 100 + i)])
             for i in range(20)]
    gevent.sleep(0.01)  # the first group is out
    later = [gevent.spawn(together, None, [("EVALSHA", 200 + i)]) for i in range(5)]
    gevent.joinall(first + later, timeout=10, raise_error=True)
    assert [g.value for g in first] == [[("reply", i), ("reply", 100 + i)] for i in range(20)]
    assert [g.value for g in later] == [[("reply", 200 + i)] for i in range(5)]
    assert [len(group) for group in sent] == [40, 5]
    assert out_at_once[1] == 2  # the second group did not wait for the first's replies


def test_a_failed_round_trip_fails_every_call_in_it_and_leaves_none_waiting(monkeypatch):
    """Together: a lost connection raises in each caller of its group, not only the one
    that sent it; a sender stopped during its round trip (shutdown) fails the others'
    calls as a lost connection, not silently; one stopped before sending leaves the
    others to send theirs; calls after any of these are sent as before."""
    import gevent
    from redis.exceptions import ConnectionError as RedisConnectionError

    from web.green import Together

    down, sent = [True], []

    def send(_pool: object, commands: list[tuple[str, int]]) -> list[int]:
        sent.append([n for _, n in commands])
        gevent.sleep(0.05)
        if down[0]:
            raise RedisConnectionError("Connection closed by server.")
        return [n for _, n in commands]

    together = Together(send)
    calls = [gevent.spawn(together, None, [("EVALSHA", i)]) for i in range(6)]
    gevent.joinall(calls, timeout=10)
    assert [type(g.exception).__name__ for g in calls] == ["ConnectionError"] * 6
    down[0] = False
    sender = gevent.spawn(together, None, [("EVALSHA", 1)])
    others = [gevent.spawn(together, None, [("EVALSHA", i)]) for i in (2, 3)]
    gevent.sleep(0.01)  # the three are out in one round trip
    sender.kill()
    gevent.joinall(others, timeout=10)
    assert [type(g.exception).__name__ for g in others] == ["ConnectionError"] * 2
    assert "stopped (GreenletExit)" in str(others[0].exception)

    sleep = gevent.sleep

    def stopped_before_sending(seconds: float = 0) -> None:
        if gevent.getcurrent() is first:
            raise gevent.GreenletExit
        sleep(seconds)

    monkeypatch.setattr(gevent, "sleep", stopped_before_sending)
    sent.clear()
    first = gevent.spawn(together, None, [("EVALSHA", 4)])
    rest = [gevent.spawn(together, None, [("EVALSHA", i)]) for i in (5, 6)]
    gevent.joinall([first, *rest], timeout=10, raise_error=True)
    monkeypatch.undo()
    assert [g.value for g in rest] == [[5], [6]] and [4] not in sent
    again = [gevent.spawn(together, None, [("EVALSHA", i)]) for i in range(3)]
    gevent.joinall(again, timeout=10, raise_error=True)
    assert [g.value for g in again] == [[0], [1], [2]]


_TOGETHER_CHECK = """
from gevent import monkey
monkey.patch_all()
import sys, gevent, redis
from sheepdog import lua
from web import green

client = green.together(redis.Redis.from_url(sys.argv[1], **green.options()))
together = client.connection_pool.send_together
groups = []
send = lua._send
lua._send = lambda pool, commands: groups.append(len(commands)) or send(pool, commands)
echo = lua.script(client, "if ARGV[1] == 'bad' then return redis.error_reply('a bad one') "
                          "end redis.call('INCR', KEYS[1]) return ARGV[1]")

echo(keys=["loaded"], args=["first"])  # the server knows the script from now on
groups.clear()

def call(i):
    try:
        return echo(keys=["together"], args=["bad" if i == 7 else f"v{i}"]).decode()
    except redis.ResponseError as e:
        return str(e)

calls = [gevent.spawn(call, i) for i in range(30)]
gevent.joinall(calls, raise_error=True)
print(",".join(g.value for g in calls))
print(len(groups) < 30, sum(groups), client.get("together").decode())
"""


def test_a_web_process_sends_its_requests_script_calls_to_redis_together(redis_server):
    """Under gevent (gunicorn's worker) with a real Redis: thirty script calls made at
    once go in fewer round trips than calls (after the first, which loads the script),
    each caller gets its own reply, and one call's error reply is that caller's alone."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _TOGETHER_CHECK, redis_server.url],
                          capture_output=True, text=True, timeout=60, cwd=root)
    assert done.returncode == 0, done.stderr
    replies, counts = done.stdout.splitlines()
    assert replies.split(",") == [
        "a bad one" if i == 7 else f"v{i}" for i in range(30)], replies
    assert counts == "True 30 29", counts


def test_a_piece_that_asks_for_several_cores_holds_as_many_slots(conn, settings, tmp_path):
    """A worker of two slots: two pieces that ask for one core each run side by side;
    two that ask for two cores each (CWL's ResourceRequirement) run one after the other."""
    def spans(cores: int) -> list[tuple[float, float]]:
        job, tasks = Job(id=jobs.new_job_id(), workflow="test", queue=settings.queue), []
        for n in range(2):
            out = tmp_path / f"span-{cores}-{n}"
            tasks.append(Task(name=f"p{n}", argv=[sys.executable, "-c", (
                "import time,sys; a=time.time(); time.sleep(0.6); "
                "open(sys.argv[1],'w').write(f'{a} {time.time()}')"), str(out)],
                cacheable=False, nonce=f"{job.id}-{n}", queue=settings.queue, cores=cores))
        jobs.submit(conn, settings, job, tasks)
        Worker(conn, settings, [settings.queue], concurrency=2, burst=True,
               register=False).run()
        assert store.get_job(conn, job.id).status == JobStatus.SUCCESS
        return sorted(tuple(map(float, (tmp_path / f"span-{cores}-{n}").read_text().split()))
                      for n in range(2))

    first, second = spans(1)
    assert second[0] < first[1]  # overlapped
    first, second = spans(2)
    assert second[0] >= first[1]  # one after the other


def test_a_program_is_looked_up_once_for_every_directory_and_again_once_it_moved(tmp_path):
    """Pieces each start in a scratch directory of their own: PATH is searched once for
    all of them (it was once for each), unless a PATH entry is relative; a program that
    moved since is found where it is now."""
    from sheepdog import process

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    tool = first / "sd-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    path = f"{first}{os.pathsep}{second}"
    process._found.cache_clear()
    assert process._program("sd-tool", "/x", path) == str(tool)
    assert process._program("sd-tool", "/y", path) == str(tool)
    assert process._found.cache_info().misses == 1  # the directory did not count
    assert process._program("sd-tool", "/z", f".{os.pathsep}{path}") == str(tool)
    assert process._found.cache_info().misses == 2  # "." is the directory: it counts
    tool.rename(second / "sd-tool")
    pid, out, err = process._spawn(["sd-tool"], str(tmp_path), {"PATH": path})
    os.close(out)
    os.close(err)
    assert os.waitpid(pid, 0)[1] == 0  # started from where it is now
    assert process._program("sd-tool", "/x", path) == str(second / "sd-tool")


def test_a_manifest_is_kept_for_files_hashed_and_not_for_a_piece_without_files(settings):
    """A pull worker's report lists a piece's files by hash: worked out once and kept
    where there were files to hash; a piece that wrote none leaves no file behind."""
    cache = Cache(settings.cache_dir)
    some = cache.scratch("a" * 64)
    (some / "out.txt").write_text("hello\n")
    cache.publish("a" * 64, some, ["out.txt"])
    files = cache.manifest("a" * 64)
    assert list(files) == ["out.txt"] and cache.blob(files["out.txt"]).read_text() == "hello\n"
    kept = cache.root / "manifests" / f"{'a' * 64}.json"
    assert kept.is_file()
    (cache.task_dir("a" * 64) / "out.txt").write_text("changed in place\n")
    assert cache.manifest("a" * 64) == files  # the kept one: not hashed again
    cache.publish("b" * 64, cache.scratch("b" * 64), [])
    assert cache.manifest("b" * 64) == {}
    assert not (cache.root / "manifests" / f"{'b' * 64}.json").exists()


def test_a_spawned_piece_starts_in_its_directory_without_moving_the_worker(tmp_path):
    """Where glibc's posix_spawn moves the child itself, the calling thread starts the
    piece and stays where it was; elsewhere a thread of its own moves there first.
    Either way the program runs in its directory, and its output and code come back."""
    from sheepdog import process

    here = os.getcwd()
    lines: list[tuple[str, list[str]]] = []
    proc = process.Spawned(["sh", "-c", "pwd; echo oops >&2; exit 3"], str(tmp_path),
                           dict(os.environ), lambda stream, got: lines.append((stream, got)))
    proc.wait(30)
    assert proc.poll() == 3
    assert ("stdout", [str(tmp_path)]) in lines and ("stderr", ["oops"]) in lines
    assert os.getcwd() == here
    with pytest.raises(FileNotFoundError):
        process.Spawned(["sh"], str(tmp_path / "gone"), dict(os.environ), lambda *_: None)
    with pytest.MonkeyPatch.context() as mp:  # the same through a thread that moves there
        mp.setattr(process, "spawn_moves_child", lambda: False)
        lines.clear()
        proc = process.Spawned(["pwd"], str(tmp_path), dict(os.environ),
                               lambda stream, got: lines.append((stream, got)))
        proc.wait(30)
        assert proc.poll() == 0 and lines == [("stdout", [str(tmp_path)])]
        assert os.getcwd() == here


def test_a_killed_spawned_piece_is_reaped_and_waited_for(tmp_path):
    from sheepdog import process

    proc = process.Spawned(["sleep", "30"], str(tmp_path), dict(os.environ), lambda *_: None)
    proc.wait(0.2)
    assert proc.poll() is None
    started = time.monotonic()
    proc.kill(grace=1)
    assert proc.poll() is not None and time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def test_new_cacheable_pieces_are_stored_in_script_calls_and_known_ones_as_before(
        conn, redis_server, monkeypatch):
    """A first run's pieces (none stored yet) go in script calls, never a transaction:
    2,500 of them as the job with its whole list in order (pushed in parts a script can
    unpack) and its first 64 pieces, then the rest in parts of 128, 256, 512, 1,000 and
    540, each one call; then nobody holds the job. A rerun, some pieces done already,
    takes the watched transaction: those count as cached and are not queued again."""
    import subprocess as sp

    pieces = [Task(name=f"p{i}", argv=["true", str(i)], outputs=[], queue="by-call")
              for i in range(2500)]
    assert all(p.cacheable for p in pieces)
    conn.script_flush()  # as after a restart: the server knows no script yet
    mine = f"[0 {conn.client_info()['addr']}]"  # the session's server: others' calls too
    watch = sp.Popen(["redis-cli", "-p", str(redis_server.port), "monitor"], stdout=sp.PIPE,
                     text=True)
    try:
        assert watch.stdout.readline().strip() == "OK"
        store.submit(conn, Job(id="first", workflow="command"), pieces)
        conn.set("monitor-end", "1")
        said = []
        while "monitor-end" not in (line := watch.stdout.readline()):
            said.append(line)
    finally:
        watch.terminate()
        watch.wait()
    outside = [line.split('"')[1].upper() for line in said if mine in line]
    # (each script new to this server: asked for and loaded first, not sent twice)
    assert outside == ["EXISTS", "SCRIPT", "SCRIPT", "EVALSHA", "SCRIPT", "SCRIPT",
                       "EVALSHA", *["SCRIPT", "EVALSHA"] * 4, "HDEL"], outside
    queued = [line for line in said if '"RPUSH" "rq:queue:by-call"' in line]
    assert len(queued) == 2500
    assert [t.id for t in store.job_tasks(conn, "first")] == [p.id for p in pieces]
    assert store.get_job(conn, "first").total == 2500
    assert not conn.hexists(keys.open_jobs(), "first")
    conn.hset(keys.task(pieces[0].id), "status", TaskStatus.SUCCESS)
    rerun = store.submit(conn, Job(id="again", workflow="command"), pieces[:3],
                         published=lambda tid: tid == pieces[0].id)
    assert (rerun.total, rerun.done, rerun.cached) == (3, 1, 1)
    assert conn.sismember(keys.task_jobs(pieces[1].id), "again")  # shared, still queued
    # more new pieces than one script call holds: the transaction, as before
    calls: list[int] = []
    one_call = store._submit_new
    monkeypatch.setattr(store, "NEW_MOST", 2)
    monkeypatch.setattr(store, "_submit_new", lambda *a: calls.append(1) or one_call(*a))
    more = [Task(name=f"q{i}", argv=["true", "q", str(i)]) for i in range(3)]
    assert store.submit(conn, Job(id="big", workflow="command"), more).total == 3
    assert not calls and [t.id for t in store.job_tasks(conn, "big")] == [t.id for t in more]
    store.submit(conn, Job(id="small", workflow="command"),
                 [Task(name=f"r{i}", argv=["true", "r", str(i)]) for i in range(2)])
    assert calls == [1]  # two new ones: one call


def test_a_piece_whose_reader_cannot_start_is_not_left_running(tmp_path, monkeypatch):
    """Started on the caller's thread, a program whose reader thread cannot be had (out
    of threads) is killed and reaped there and then; the error is the caller's."""
    import _thread

    from sheepdog import process

    assert process.spawn_moves_child()  # glibc 2.29 and later (see test_spawn)
    started: list[int] = []
    spawn = process._spawn

    def spawned(*a, **kw):
        started.append((got := spawn(*a, **kw))[0])
        return got

    def no_thread(*_a):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(process, "_spawn", spawned)
    monkeypatch.setattr(_thread, "start_new_thread", no_thread)
    with pytest.raises(RuntimeError, match="new thread"):
        process.Spawned(["sleep", "30"], str(tmp_path), dict(os.environ), lambda *_: None)
    with pytest.raises(ChildProcessError):
        os.waitpid(started[0], os.WNOHANG)  # killed and reaped already


def _step_task(settings, script: str, timeout: float = 0) -> Task:
    spec = {"items": [{"key": "1", "argv": [["sh"], ["-c"], [script]]}]}
    return Task(name="one item", argv=[{"python": True}, "-m", "sheepdog.mapping.step", "run",
                                       json.dumps(spec)],
                queue=settings.queue, timeout=timeout)


def test_an_in_process_step_runs_on_its_watchers_thread_and_publishes_its_item(
        conn, settings, monkeypatch):
    """A map piece's step runs on the thread that watches it (no thread of its own),
    and a one-item chunk's files, whatever their names, come back under files/0."""
    from sheepdog.mapping import step

    threads: list[int] = []
    real = step.run_chunk
    monkeypatch.setattr(step, "run_chunk",
                        lambda *a, **k: (threads.append(threading.get_ident()), real(*a, **k)))
    task = _step_task(settings, 'echo hi; mkdir -p "$SHEEPDOG_ITEM_DIR/d"; '
                      'for f in files results.jsonl results.jsonl.part d/x; do '
                      'echo $f > "$SHEEPDOG_ITEM_DIR/$f"; done')
    cache = Cache(settings.cache_dir)
    writer = logs.LogWriter(conn, task.id, task.name, [], 100)
    outcome = piece.run(task, settings, cache, piece.PieceOutput(writer, None),
                        threading.Event(), threading.Event())
    assert (outcome.exit_code, outcome.error) == (0, "")
    assert threads == [threading.get_ident()]
    done = cache.task_dir(task.id)
    [record] = [json.loads(x) for x in (done / "results.jsonl").read_text().splitlines()]
    assert (record["status"], record["output"]) == ("success", "hi\n")
    assert record["files"] == sorted(["d/x", "files", "results.jsonl", "results.jsonl.part"])
    for name in record["files"]:
        assert (done / "files" / "0" / name).read_text() == name + "\n"
    assert sorted(p.name for p in done.iterdir()) == ["files", "results.jsonl"]


@pytest.mark.parametrize("why", ["cancelled", "timeout", "leaving"])
def test_an_in_process_step_on_its_watchers_thread_stops_when_told(conn, settings, tmp_path,
                                                                    why):
    """Cancelled, timed out or its worker leaving while its item runs: the item's
    process is killed at once, the outcome says why, and nothing is published."""
    pidfile = tmp_path / "pid"
    task = _step_task(settings, f'echo $$ > {pidfile}; exec sleep 60',
                      timeout=1.5 if why == "timeout" else 0)
    cache = Cache(settings.cache_dir)
    revoked, leaving = threading.Event(), threading.Event()
    if why != "timeout":
        def tell() -> None:
            wait_for(pidfile.exists, timeout=30)
            (revoked if why == "cancelled" else leaving).set()
        threading.Thread(target=tell, daemon=True).start()
    writer = logs.LogWriter(conn, task.id, task.name, [], 100)
    started = time.monotonic()
    outcome = piece.run(task, settings, cache, piece.PieceOutput(writer, None), revoked,
                        leaving)
    assert time.monotonic() - started < 20
    expected = {"cancelled": "cancelled", "timeout": "timed out after 1.5s",
                "leaving": piece.RELEASED}[why]
    assert outcome.error == expected
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not cache.task_dir(task.id).exists()
    assert not list(cache.tmp.iterdir())


def _run_queued(conn, queue: str) -> list[str]:
    """Run every piece queued on `queue` to success, as a worker records it; their ids."""
    ran = []
    while (got := store.take_and_claim(conn, [queue], "w1", 30.0)) is not None:
        entry, claimed = got
        assert claimed is not None
        store.finish_piece(conn, claimed[0].id, "w1", 0, "", entry=entry)
        ran.append(claimed[0].id)
    return ran


def test_a_big_jobs_later_part_meets_a_piece_another_job_stored_and_ran_meanwhile(
        conn, monkeypatch):
    """Between the parts of a big first run, another job stores one of its later pieces
    and runs it: that part is stored as a transaction reads it (the piece runs again
    for this job, which counts it once); the piece that waits for all of them, told of
    it with the first part, counted its first end, and runs once, after the others."""
    queue = "parts"
    pieces = [Task(name=f"p{i}", argv=["true", "parts", str(i)], queue=queue)
              for i in range(300)]
    last = Task(name="all", argv=["true", "all"], deps=[p.id for p in pieces], queue=queue)
    meddled = pieces[250]  # in the third part
    real = store._add_part

    def meddle(conn_, job_id, part):
        if meddled in part and not conn.exists(keys.task(meddled.id)):
            store.submit(conn, Job(id="other", workflow="command"), [meddled])
            assert _run_queued(conn, queue) == [p.id for p in pieces[:64 + 128]] + [meddled.id]
        return real(conn_, job_id, part)

    monkeypatch.setattr(store, "_add_part", meddle)
    store.submit(conn, Job(id="big", workflow="command", final_task=last.id), [*pieces, last])
    assert store.get_task(conn, last.id).status == TaskStatus.WAITING
    assert store.get_task(conn, last.id).pending == 300 - 64 - 128 - 1
    ran = _run_queued(conn, queue)  # the rest, the meddled one again, and then the last
    assert ran == [p.id for p in pieces[64 + 128:]] + [last.id]
    job = store.get_job(conn, "big")
    assert (job.status, job.done, job.total) == (JobStatus.SUCCESS, 301, 301)
    assert store.get_job(conn, "other").status == JobStatus.SUCCESS
    assert not conn.hexists(keys.open_jobs(), "big")


def test_a_big_job_whose_sender_died_midway_is_ended_saying_so(conn, monkeypatch):
    """The process storing a big job in parts holds it until the last part is in: if it
    dies midway, the job does not wait for pieces that will never come."""
    from sheepdog import liveness
    from sheepdog.maintenance import end_orphaned

    pieces = [Task(name=f"d{i}", argv=["true", "died", str(i)], queue="died")
              for i in range(200)]
    last = Task(name="all", argv=["true", "died"], deps=[p.id for p in pieces], queue="died")

    def dies(*_args):
        raise KeyboardInterrupt  # the sender killed between its parts

    monkeypatch.setattr(store, "_add_part", dies)
    with pytest.raises(KeyboardInterrupt):
        store.submit(conn, Job(id="half", workflow="command"), [*pieces, last])
    assert conn.hget(keys.open_jobs(), "half").decode() == liveness.this_process()
    assert store.get_job(conn, "half").total == 201
    assert not end_orphaned(conn)  # its sender lives: nothing happens
    conn.hset(keys.open_jobs(), "half", liveness.this_process() + "0")  # now it has died
    [said] = end_orphaned(conn)
    assert "before it had added them all" in said
    assert store.get_job(conn, "half").status == JobStatus.ERROR


def test_a_pieces_success_takes_the_next_piece_in_the_same_round_trip(conn, settings,
                                                                      monkeypatch):
    """Issue 30: one round trip per piece. A worker thread's success is sent with its
    next take, both in one write to Redis; the piece taken so runs next, its heartbeat
    kept from the take on; every piece runs once and the job succeeds."""
    from sheepdog import lua

    job = Job(id=jobs.new_job_id(), workflow="test", queue=settings.queue)
    tasks = [Task(name=f"p{n}", argv=["true"], cacheable=False, nonce=f"{job.id}-{n}",
                  queue=settings.queue) for n in range(12)]
    jobs.submit(conn, settings, job, tasks)
    sends: list[list[str]] = []  # the scripts of each round trip, by name
    send = lua._send
    named = {lua._lua(store._SUCCEED).sha: "finish", lua._lua(store._TAKE).sha: "take"}

    def recording(pool, commands):
        sends.append([named.get(c[1], c[0]) for c in commands])
        return send(pool, commands)

    monkeypatch.setattr(lua, "_send", recording)
    beats = []  # each piece's heartbeat kept: when it was taken (all but the first), and run
    worker = Worker(conn, settings, [settings.queue], concurrency=1, burst=True,
                    register=False)
    real_adopt = worker.beats.adopt
    worker.beats.adopt = lambda tid: beats.append(tid) or real_adopt(tid)
    worker.run()
    assert store.get_job(conn, job.id).status == JobStatus.SUCCESS
    finishes = [s for s in sends if "finish" in s]
    assert len(finishes) == len(tasks), sends
    # each success but the last found a piece waiting and took it in its own round trip
    assert all(s == ["finish", "take"] for s in finishes), finishes
    alone = [s for s in sends if s == ["take"]]
    assert len(alone) <= 2, sends  # the first piece, and the look that found nothing
    assert sorted(int(store.get_task(conn, t.id).attempts) for t in tasks) == [1] * len(tasks)
    assert len(beats) == 2 * len(tasks) - 1


def test_a_piece_taken_with_the_last_ones_success_goes_back_unstarted_if_the_worker_leaves(
        conn, settings, tmp_path, monkeypatch):
    """A worker leaving (SIGTERM) right after a success took its next piece: that piece
    goes back to the queue as it was (its attempt not counted, nothing run) and another
    worker runs it."""
    from sheepdog import worker as worker_module

    job = Job(id=jobs.new_job_id(), workflow="test", queue=settings.queue)
    marks = [tmp_path / f"ran-{n}" for n in range(2)]
    # run at most once (GN3's commands): one stopped midway would fail, not go back
    tasks = [Task(name=f"p{n}", argv=["touch", str(marks[n])], cacheable=False,
                  nonce=f"{job.id}-{n}", queue=settings.queue, max_attempts=1)
             for n in range(2)]
    jobs.submit(conn, settings, job, tasks)
    worker = Worker(conn, settings, [settings.queue], concurrency=1, register=False)
    hold = worker_module.PieceRunner._hold

    def leave_when_taken(runner, taken):  # the next piece came with the first's success
        assert taken is not None
        worker.stop(release=True)
        return hold(runner, taken)

    monkeypatch.setattr(worker_module.PieceRunner, "_hold", leave_when_taken)
    worker.run()
    ran = [m.exists() for m in marks]
    assert ran.count(True) == 1, ran  # the first ran; the taken one did not start
    second = next(t for t, m in zip(tasks, marks, strict=True) if not m.exists())
    got = store.get_task(conn, second.id)
    assert got.status == TaskStatus.QUEUED and int(got.attempts) == 0, got
    Worker(conn, settings, [settings.queue], burst=True, register=False).run()
    assert all(m.exists() for m in marks)
    assert store.get_job(conn, job.id).status == JobStatus.SUCCESS
