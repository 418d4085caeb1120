"""sheepdog.Executor: a real concurrent.futures.Executor on real workers and Redis."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import executor_calls as calls
import pytest
from conftest import ROOT, sheepdog, wait_for

from sheepdog import Executor, store
from sheepdog.executor import TaskFailed
from sheepdog.models import JobStatus

TESTS = str(ROOT / "tests")


@pytest.fixture()
def call_env(env):
    """Workers started by a test import the functions from tests/."""
    return dict(env, PYTHONPATH=TESTS)


def test_futures_work_with_as_completed_wait_and_map(settings, conn):
    with Executor(max_workers=2, settings=settings, batch_size=1) as ex:
        fs = [ex.submit(calls.square, x) for x in range(20)]
        done = {f.result() for f in concurrent.futures.as_completed(fs, timeout=60)}
        assert done == {x * x for x in range(20)}
        assert list(ex.map(calls.square, range(7), chunksize=3)) == [x * x for x in range(7)]
        waited = concurrent.futures.wait([ex.submit(calls.square, 9)], timeout=30)
        assert [f.result() for f in waited.done] == [81]
        job_id = ex.job.id
    job = store.get_job(conn, job_id)
    assert job.workflow == "python" and job.status == JobStatus.SUCCESS
    assert job.total == job.done == 20 + 3 + 1  # one piece per call, per chunk of map


def test_tiny_calls_are_packed_into_few_pieces_each_keeping_its_own_outcome(settings, conn):
    with Executor(max_workers=2, settings=settings) as ex:
        fs = [ex.submit(calls.square, x) if x % 500 else ex.submit(calls.fail, f"call {x}")
              for x in range(3000)]
        concurrent.futures.wait(fs, timeout=120)
        job_id = ex.job.id
    for x, f in enumerate(fs):
        if x % 500:
            assert f.result() == x * x
        else:
            with pytest.raises(ValueError) as e:
                f.result()
            assert str(e.value) == f"call {x}"  # its own exception, not a neighbour's
    job = store.get_job(conn, job_id)
    # every piece ran, but calls raised: the job says so (it was a green "success")
    assert job.status == JobStatus.ERROR
    assert job.error == "6 of 3,000 calls raised; the first: ValueError: call 0"
    assert job.total < 300  # 3,000 calls in far fewer pieces
    with pytest.raises(ValueError, match="batch_size"):
        Executor(settings=settings, start_workers=False, batch_size=0)


def test_an_exception_comes_back_with_the_workers_traceback(settings):
    with Executor(max_workers=1, settings=settings) as ex:
        future = ex.submit(calls.fail, "no such trait")
        with pytest.raises(ValueError, match="no such trait") as e:
            future.result(timeout=60)
        assert ex.submit(calls.square, 3).result(timeout=60) == 9  # the job goes on
    notes = "\n".join(e.value.__notes__)
    assert "traceback on the worker" in notes and "executor_calls.py" in notes
    idle = Executor(settings=settings, start_workers=False)
    with pytest.raises(TypeError, match="top level of a module"):
        idle.submit(lambda: 1)
    idle.shutdown()
    # nothing reached it: no "success 0/0" job left to list
    assert all(j.id != idle.job.id for j in store.list_jobs(idle._conn, limit=1000))


def test_setup_runs_once_per_worker_process_and_reaches_every_call(settings, tmp_path,
                                                                  monkeypatch):
    count = tmp_path / "setups"
    monkeypatch.setenv("SETUP_COUNT_FILE", str(count))
    with Executor(max_workers=2, setup="executor_calls:load_model", settings=settings) as ex:
        results = list(ex.map(calls.score, range(30)))
    assert [r[0] for r in results] == [6 * x for x in range(30)]
    setups = count.read_text().split()
    assert len(setups) == len(set(setups)) <= 2  # once per worker process
    assert {str(r[1]) for r in results} <= set(setups)


def test_a_call_not_started_can_be_cancelled(settings, conn):
    ex = Executor(settings=settings, start_workers=False)  # nobody runs anything
    future = ex.submit(calls.square, 4)
    time.sleep(0.1)  # flushed into Redis
    assert future.cancel() and future.cancelled()
    ex.shutdown(wait=True)
    assert store.get_job(conn, ex.job.id).status == JobStatus.SUCCESS


def test_shutdown_can_cancel_what_has_not_started(settings, conn):
    ex = Executor(settings=settings, start_workers=False)
    fs = [ex.submit(calls.square, x) for x in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in fs)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(calls.square, 1)


def test_a_lost_workers_call_runs_again_elsewhere(settings, workers, call_env, tmp_path):
    marker = tmp_path / "started"
    first = workers.start("--concurrency", "1", env=call_env)
    ex = Executor(settings=settings, start_workers=False)
    future = ex.submit(calls.slow, 2.0, str(marker))
    wait_for(lambda: marker.exists(), timeout=30, what="the call to start")
    os.killpg(first.pid, signal.SIGKILL)
    workers.start("--concurrency", "1", env=call_env)
    assert future.result(timeout=90) == "finished"
    assert len(marker.read_text().split()) == 2  # run again after its worker was lost
    ex.shutdown()


def test_a_killed_worker_is_replaced_and_its_call_runs_again_at_once(settings, tmp_path):
    """Issue 30: a worker SIGKILLed beside another stalled its calls until the other's
    upkeep looked (every heartbeat_timeout / 4); the Executor that started it sees it die
    and its pieces go back to the queue at once, and another worker takes its place."""
    import dataclasses

    marker = tmp_path / "started"
    slow_upkeep = dataclasses.replace(settings, heartbeat_timeout=40.0)  # 10 s rounds
    with Executor(max_workers=2, settings=slow_upkeep, batch_size=1) as ex:
        future = ex.submit(calls.slow, 1.0, str(marker))
        wait_for(lambda: marker.exists() and marker.read_text().strip(), timeout=60,
                 what="the call to start")
        pid = int(marker.read_text().split()[0])
        assert pid in ex.worker_pids
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: len(marker.read_text().split()) == 2, timeout=30,
                 what="the call to start again")
        assert time.monotonic() - killed < 3.0  # not a heartbeat's round later
        assert future.result(timeout=60) == "finished"
        wait_for(lambda: len(ex.worker_pids) == 2, timeout=30, what="a new worker")
        assert pid not in ex.worker_pids


def test_no_workers_left_is_a_clear_error_not_a_hang(settings):
    ex = Executor(max_workers=1, settings=settings)
    future = ex.submit(calls.slow, 30.0, "/dev/null")
    for p in ex._pool.processes:
        wait_for(lambda p=p: p.poll() is not None or future.running(), timeout=30)
        p.kill()
    with pytest.raises(TaskFailed, match="no workers left"):
        future.result(timeout=60)
    ex.shutdown()


def test_an_executor_job_is_listed_and_logged_like_any_other(settings, env):
    with Executor(max_workers=1, settings=settings) as ex:
        assert ex.submit(calls.square, 5).result(timeout=60) == 25
    listed = sheepdog("list", env=env)
    assert ex.job.id in listed.stdout and "python" in listed.stdout
    log = sheepdog("logs", ex.job.id, env=env)
    assert "square #1: success" in log.stderr + log.stdout


def test_one_call_from_the_command_line(call_env, tmp_path):
    r = sheepdog("run", "python", "executor_calls:square", env=call_env, cwd=str(tmp_path))
    assert r.returncode != 0  # square needs its argument
    r = sheepdog("run", "python", "os.path:join", "a", "b", env=call_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '"a/b"'


def test_a_script_defined_function_travels_by_its_file(settings, tmp_path):
    script = tmp_path / "myscript.py"
    script.write_text("def triple(x):\n    return 3 * x\n")
    import importlib.util
    spec = importlib.util.spec_from_file_location("__main__", script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.triple.__module__ = "__main__"
    import sys
    main = sys.modules["__main__"]
    saved = getattr(main, "__file__", None)
    main.__file__ = str(script)
    try:
        with Executor(max_workers=1, settings=settings) as ex:
            assert ex.submit(module.triple, 5).result(timeout=60) == 15
    finally:
        if saved is not None:
            main.__file__ = saved
    assert Path(script).exists()


def test_an_executor_never_shut_down_closes_its_job_and_workers_at_exit(env, conn, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "forgetful.py"
    script.write_text(
        "import executor_calls\n"
        "from sheepdog import Executor\n"
        "ex = Executor(max_workers=1)\n"
        "print(ex.submit(executor_calls.square, 7).result(timeout=60))\n"
        "print(ex.job.id, *ex.worker_pids)\n")
    r = subprocess.run([sys.executable, str(script)], env=dict(env, PYTHONPATH=TESTS),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    answer, line = r.stdout.splitlines()
    job_id, *pids = line.split()
    assert answer == "49" and pids
    assert store.get_job(conn, job_id).status == JobStatus.SUCCESS
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(
            f"/proc/{pid}/stat").read_text().split()[2]


def test_a_function_from_a_script_on_stdin_is_refused_with_why(env):
    """It failed on the worker as `No module named '/tmp/.../<stdin>'`."""
    script = ("from sheepdog import Executor\n"
              "def f(x):\n    return x\n"
              "ex = Executor(start_workers=False)\n"
              "try:\n    ex.submit(f, 1)\nexcept TypeError as e:\n    print(e)\n"
              "ex.shutdown()\n")
    r = subprocess.run([sys.executable, "-"], input=script, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "read from stdin" in r.stdout and "define it in a module" in r.stdout
