"""Clean shutdown: SIGTERM/SIGINT to `sheepdog worker`, `serve` and a waiting `run` stop
everything they started within 10 s, hand running pieces back, and leave no process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_port, sheepdog, wait_for
from simple_websocket import Client, ConnectionClosed

from sheepdog import registration, store

pytestmark = pytest.mark.fault
STOP_WITHIN = 10.0
TOKEN = "stop-token"


def _once_then_quick(tmp_path, tag):
    """A piece that sleeps the first time it runs (its pid in TAG.pid) and finishes at
    once the second."""
    flag, pid = tmp_path / f"{tag}.ran", tmp_path / f"{tag}.pid"
    return ["sh", "-c", f"if [ -e {flag} ]; then echo second run; else touch {flag}; "
            f"echo first run; echo $$ > {pid}.tmp; mv {pid}.tmp {pid}; exec sleep 300; fi"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _piece(tmp_path, tag) -> int:
    """The sleeping piece's pid, once it runs."""
    path = tmp_path / f"{tag}.pid"
    wait_for(path.exists, 20, what="the piece to start")
    return int(path.read_text())


def _group_alive(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,comm=", "-g", str(pgid)], capture_output=True,
                         text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _running_task(conn, job_id):
    tasks = store.job_tasks(conn, job_id)
    return tasks[0] if tasks else None


def _submit(env, argv):
    r = sheepdog("run", "--detach", "--", *argv, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_sigterm_to_a_worker_hands_its_piece_back_and_it_runs_again(env, conn, tmp_path,
                                                                   workers):
    tag = f"w{os.getpid()}x{time.time_ns()}"
    worker = workers.start("-j", "1")
    # registered first: else `run --detach` starts a worker of its own, which would take
    # the piece handed back before it can be seen queued
    wait_for(lambda: registration.live_workers(conn, env["SHEEPDOG_QUEUE"]), 30,
             what="the worker to register")
    job_id = _submit(env, _once_then_quick(tmp_path, tag))
    piece = _piece(tmp_path, tag)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    worker.wait(STOP_WITHIN)
    assert time.monotonic() - started < STOP_WITHIN
    assert not _alive(piece)
    task = _running_task(conn, job_id)
    assert task.status == "queued" and task.attempts == 0, task  # handed back, not failed
    workers.start("--burst")
    wait_for(lambda: store.get_job(conn, job_id).status == "success", 30, what="the rerun")
    assert "second run" in sheepdog("logs", job_id, env=env).stdout


def test_sigterm_to_a_waiting_run_leaves_the_job_to_other_workers(env, conn, tmp_path,
                                                                 workers):
    tag = f"r{os.getpid()}x{time.time_ns()}"
    run = subprocess.Popen([sys.executable, "-m", "sheepdog", "run", "--",
                            *_once_then_quick(tmp_path, tag)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    piece = _piece(tmp_path, tag)
    started = time.monotonic()
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=STOP_WITHIN)
    assert run.returncode == 143 and time.monotonic() - started < STOP_WITHIN, err
    assert "was left to other workers" in err
    assert not _alive(piece)
    job_id = next(line.split()[3] for line in err.splitlines() if "was left to" in line)
    job_id = job_id.rstrip(",")
    assert store.get_job(conn, job_id).status in ("queued", "running")
    workers.start("--burst")
    wait_for(lambda: store.get_job(conn, job_id).status == "success", 30, what="the rerun")


def _receive(ws, within: float, waiting_for: str) -> dict:
    """The next event of a stream, waiting at most `within` seconds in all (a loaded
    machine may take its time; a silent stream fails saying what it waited for)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        raw = ws.receive(timeout=left)
        if raw is not None:
            return json.loads(raw)
    raise AssertionError(f"the stream said nothing for {within:g}s while waiting for "
                         f"{waiting_for}")


def _serve(env, port):
    return subprocess.Popen([sys.executable, "-m", "sheepdog", "serve", "--bind",
                             f"127.0.0.1:{port}", "--local-workers", "1"],
                            env=dict(env, SHEEPDOG_API_TOKENS=TOKEN),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _up(base):
    try:
        return urllib.request.urlopen(f"{base}/health", timeout=1).status == 200
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_server_leaves_nothing_and_its_streams_resume_after_a_restart(
        env, conn, tmp_path, sig):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = _serve(env, port)
    try:
        wait_for(lambda: _up(base), 30, every=0.1, what="sheepdog serve")
        # its local worker registered first: else `run --detach` starts a worker of its
        # own, which takes the piece the stopped server hands back and runs it again
        wait_for(lambda: registration.live_workers(conn, env["SHEEPDOG_QUEUE"]), 30,
                 what="serve's local worker")
        tag = f"s{os.getpid()}x{time.time_ns()}"
        job_id = _submit(env, _once_then_quick(tmp_path, tag))
        piece = _piece(tmp_path, tag)
        ws = Client.connect(f"ws://127.0.0.1:{port}/jobs/{job_id}/stream?token={TOKEN}")
        got = []
        while not any(m.get("type") == "line" and "first run" in m.get("text", "")
                      for m in got):
            got.append(_receive(ws, 60, "the piece's first line"))
        started = time.monotonic()
        server.send_signal(sig)
        try:
            while True:
                got.append(_receive(ws, STOP_WITHIN, "going-away"))
                if got[-1]["type"] == "going-away":
                    break
        except ConnectionClosed:
            pass
        server.wait(STOP_WITHIN)
        assert time.monotonic() - started < STOP_WITHIN
        assert got[-1]["type"] == "going-away", got[-3:]
        last_id = got[-1]["last_id"]
        assert not _up(base)  # the port is free, nothing answers
        assert _group_alive(server.pid) == []  # gunicorn, its worker, the local worker
        assert not _alive(piece)
        assert _running_task(conn, job_id).status == "queued"  # handed back
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    again = _serve(env, port)
    try:
        wait_for(lambda: _up(base), 30, every=0.1, what="sheepdog serve, again")
        ws = Client.connect(f"ws://127.0.0.1:{port}/jobs/{job_id}/stream?token={TOKEN}"
                            f"&after={last_id}")
        rest = []
        while not rest or rest[-1]["type"] != "end":
            rest.append(_receive(ws, 60, "the rest of the job's stream"))
        seen = [m["id"] for m in got + rest if m["type"] == "line"]
        assert len(seen) == len(set(seen))  # nothing twice
        assert rest[-1]["status"] == "success"
        assert any("second run" in m.get("text", "") for m in rest)
    finally:
        os.killpg(again.pid, signal.SIGTERM)
        again.wait(STOP_WITHIN)


def test_serve_keeps_nothing_in_the_users_home(env, tmp_path):
    """gunicorn 25.1+ opens a control socket in ~/.gunicorn unless told not to: `serve`
    runs its own gunicorn and tells it not to (two services would share one socket)."""
    port = free_port()
    home = tmp_path / "user"  # the user's $HOME (tmp_path/home is SHEEPDOG_HOME)
    home.mkdir()
    bare = {k: v for k, v in env.items() if k != "XDG_RUNTIME_DIR"}
    server = _serve(dict(bare, HOME=str(home)), port)
    try:
        wait_for(lambda: _up(f"http://127.0.0.1:{port}"), 30, every=0.1, what="sheepdog serve")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(STOP_WITHIN)
    assert sorted(p.name for p in home.iterdir()) == []
