"""More open streams than redis-py's default pool allows (100), on one `sheepdog serve`:
every one is served, none gets an HTTP error inside its websocket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from conftest import free_port, wait_for
from simple_websocket import Client

from sheepdog import jobs
from sheepdog.connection import connect

STREAMS = 130
TOKEN = "many"


def test_130_streams_at_once_are_all_served(env, conn, settings):
    assert connect(settings).connection_pool.max_connections >= 1000
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sheepdog", "serve", "--bind", f"127.0.0.1:{port}",
         "--local-workers", "0"],
        env=dict(env, SHEEPDOG_API_TOKENS=TOKEN, SHEEPDOG_MAX_STREAMS_PER_TOKEN="500",
                 SHEEPDOG_MAX_STREAMS_PER_JOB="500"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(f"http://{base}/health", timeout=1).status == 200
        except OSError:
            return False

    job, tasks = jobs.command_job(["true"], settings, queue="nobody-serves-this")
    jobs.submit(conn, settings, job, tasks)  # stays queued: its streams stay open
    clients: list[Client] = []
    try:
        wait_for(up, 30, every=0.1, what="sheepdog serve")

        def open_one(_: int) -> str:
            ws = Client.connect(f"ws://{base}/jobs/{job.id}/stream?token={TOKEN}")
            clients.append(ws)
            return json.loads(ws.receive(timeout=30))["type"]

        with ThreadPoolExecutor(STREAMS) as pool:
            first = list(pool.map(open_one, range(STREAMS)))
        assert first == ["progress"] * STREAMS
    finally:
        for ws in clients:
            try:
                ws.close()
            except Exception:  # noqa: BLE001  already closed by the server going away
                pass
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(15)
