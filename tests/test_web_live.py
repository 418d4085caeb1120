"""The web service as deployed: `sheepdog serve` (gunicorn), a websocket client, Chromium."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import BXD, free_port, wait_for
from simple_websocket import Client, ConnectionClosed

TOKEN = "live-token"
STREAM_CAP = 16  # max_streams_per_job, set low so the test reaches it


@pytest.fixture()
def server(env):
    port = free_port()
    server_env = dict(env, SHEEPDOG_API_TOKENS=TOKEN, SHEEPDOG_INPUT_ROOTS=str(BXD),
                      SHEEPDOG_MAX_STREAMS_PER_JOB=str(STREAM_CAP))
    proc = subprocess.Popen([sys.executable, "-m", "sheepdog", "serve", "--bind",
                             f"127.0.0.1:{port}", "--local-workers", "2"], env=server_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(f"{base}/health", timeout=1).status == 200
        except OSError:
            return False

    wait_for(up, 30, every=0.1, what="sheepdog serve")
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def api(base, method, path, body=None, token=TOKEN):
    req = urllib.request.Request(f"{base}{path}", method=method,
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def read_stream(base, job_id, after="0-0", stop_after=None, token=TOKEN):
    ws = Client.connect(f"{base.replace('http', 'ws')}/jobs/{job_id}/stream"
                        f"?after={after}&token={token}")
    got = []
    try:
        while True:
            message = json.loads(ws.receive(timeout=60))
            got.append(message)
            if message["type"] == "end":
                break
            if stop_after and sum(m["type"] == "line" for m in got) >= stop_after:
                break
    finally:
        try:
            ws.close()
        except (ConnectionClosed, OSError):
            pass  # the server closes first after `end`
    return got


SLOW = ["sh", "-c", "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.4; done; echo bye >&2"]


def test_the_stream_replays_then_follows_and_a_reconnect_misses_nothing(server):
    job = api(server, "POST", "/jobs", {"workflow": "command", "command": SLOW})
    first = read_stream(server, job["id"], stop_after=3)
    lines = [m for m in first if m["type"] == "line"]
    rest = read_stream(server, job["id"], after=lines[-1]["id"])
    lines += [m for m in rest if m["type"] == "line"]
    ids = [m["id"] for m in lines]
    assert len(ids) == len(set(ids))  # nothing twice
    out = [m["text"] for m in lines if m["stream"] == "stdout"]
    assert out == [f"line {i}" for i in range(1, 7)]  # nothing missed
    assert any(m["stream"] == "stderr" and m["text"] == "bye" for m in lines)
    assert all({"id", "piece", "stream", "text", "time"} <= set(m) for m in lines)
    assert any(m["type"] == "progress" for m in first + rest)
    end = rest[-1]
    assert end == {**end, "type": "end", "status": "success", "exit_code": 0}
    full = [m["id"] for m in read_stream(server, job["id"]) if m["type"] == "line"]
    assert full == ids  # a late reader replays exactly the same


def test_resuming_after_the_closing_line_gets_end_and_bad_ids_a_clear_close(server):
    job = api(server, "POST", "/jobs", {"workflow": "command", "command": ["echo", "done"]})
    full = read_stream(server, job["id"])
    closing = [m for m in full if m["type"] == "line"][-1]
    assert closing["end"]
    again = read_stream(server, job["id"], after=closing["id"])
    assert [m["type"] for m in again if m["type"] != "progress"] == ["end"]
    assert again[-1]["status"] == "success"
    for bad, field in (("garbage", "after"), ("0-0&x=1", None)):
        ws = Client.connect(f"{server.replace('http', 'ws')}/jobs/{job['id']}/stream"
                            f"?after={bad}&token={TOKEN}")
        if field is None:  # after=0-0 then a stray parameter: a normal replay
            assert json.loads(ws.receive(timeout=30))["type"] == "line"
            ws.close()
            continue
        message = json.loads(ws.receive(timeout=30))
        assert message == {**message, "type": "error", "field": field}
        with pytest.raises(ConnectionClosed) as closed:
            ws.receive(timeout=30)
        assert closed.value.reason == 1008 and "not a log id" in closed.value.message
    ws = Client.connect(f"{server.replace('http', 'ws')}/jobs/20261202-000000-nope/stream"
                        f"?token={TOKEN}")
    message = json.loads(ws.receive(timeout=30))
    assert message["type"] == "error" and "unknown job id" in message["error"]


@pytest.mark.alone
def test_closed_streams_free_their_threads_and_streams_are_capped(server, conn):
    from sheepdog import keys

    conn.sadd(keys.queues_served(), "parked")  # served once, by nobody now: stays queued
    job = api(server, "POST", "/jobs", {"workflow": "command", "command": ["true"],
                                        "queue": "parked"})
    url = f"{server.replace('http', 'ws')}/jobs/{job['id']}/stream?token={TOKEN}"
    for _ in range(100):  # each opened, then closed by its client
        ws = Client.connect(url)
        ws.close()
    started = time.monotonic()
    assert urllib.request.urlopen(f"{server}/health", timeout=5).status == 200
    assert time.monotonic() - started < 1.0
    # each closed stream's thread notices within a round (a quarter second) and gives its
    # place back: within a second alone, longer when the machine is busy
    wait_for(lambda: conn.zcard(keys.stream_places("job", job["id"])) == 0, 5,
             what="the closed streams to give their places back")
    held = [Client.connect(url) for _ in range(STREAM_CAP)]  # max_streams_per_job
    try:
        assert all(json.loads(ws.receive(timeout=10))["type"] != "error" for ws in held)
        extra = Client.connect(url)
        message = json.loads(extra.receive(timeout=10))
        assert message["type"] == "error" and "too many open streams" in message["error"]
        assert urllib.request.urlopen(f"{server}/health", timeout=5).status == 200
    finally:
        for ws in held:
            ws.close()


def test_a_websocket_without_a_token_is_refused(server):
    job = api(server, "POST", "/jobs", {"workflow": "command", "command": ["true"]})
    with pytest.raises((ConnectionClosed, ConnectionError, OSError, RuntimeError)):
        read_stream(server, job["id"], token="")
    with pytest.raises(urllib.error.HTTPError) as e:
        api(server, "GET", f"/jobs/{job['id']}", token="wrong")
    assert e.value.code == 401


@pytest.fixture()
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def test_the_progress_page_shows_lines_live_then_100_percent(server, browser, tmp_path):
    job = api(server, "POST", "/jobs", {"workflow": "command", "command": SLOW})
    page = browser.new_page()
    page.goto(f"{server}{job['urls']['page']}")
    page.wait_for_selector("#log .line.stdout", timeout=15_000)
    shown_while_running = page.inner_text("#status")
    assert shown_while_running in ("queued", "running")
    page.wait_for_function("document.getElementById('job').dataset.ended === 'success'",
                           timeout=30_000)
    assert page.inner_text("#bar-text").startswith("100%")
    log = page.inner_text("#log")
    assert "line 6" in log and "! bye" in log
    assert page.locator("#log .stderr").count() == 1
    page.screenshot(path=str(tmp_path / "command.png"), full_page=True)
    assert (tmp_path / "command.png").stat().st_size > 10_000


def test_a_gemma_page_ends_with_the_plot_and_top_hits(server, browser, tmp_path):
    job = api(server, "POST", "/jobs", {"workflow": "gemma-loco", "inputs": {
        "geno": str(BXD / "BXD_geno.txt.gz"), "pheno": str(BXD / "BXD_pheno.txt"),
        "anno": str(BXD / "BXD_snps.txt")}})
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"{server}{job['urls']['page']}")
    page.wait_for_selector("#grid .cell", timeout=15_000)
    page.wait_for_function("document.getElementById('job').dataset.ended === 'success'",
                           timeout=120_000)
    page.wait_for_selector("#hits tbody tr", timeout=15_000)
    page.wait_for_function("document.getElementById('manhattan').naturalWidth > 0",
                           timeout=15_000)
    assert page.locator("#grid .cell.success").count() == 41
    assert page.locator("#log details").count() >= 41
    assert page.inner_text("#bar-text").startswith("100%")
    top = page.locator("#hits tbody tr").first.inner_text()
    result = api(server, "GET", f"/jobs/{job['id']}/result")
    assert result["top_hits"][0]["rs"] in top
    page.screenshot(path=str(tmp_path / "gemma.png"), full_page=True)


def test_a_failed_job_shows_the_error_panel(server, browser):
    job = api(server, "POST", "/jobs", {"workflow": "command",
                                        "command": ["sh", "-c", "echo boom >&2; exit 7"]})
    page = browser.new_page()
    page.goto(f"{server}{job['urls']['page']}")
    page.wait_for_function("document.getElementById('job').dataset.ended === 'error'",
                           timeout=30_000)
    page.wait_for_selector("#error:not([hidden])", timeout=5_000)
    assert "exit code 7" in page.inner_text("#error-text")
    assert "boom" in page.inner_text("#error-text")


def test_the_index_lists_recent_jobs_with_links(server, browser):
    job = api(server, "POST", "/jobs", {"workflow": "command", "command": ["true"]})
    page = browser.new_page()
    page.goto(f"{server}/?token={TOKEN}")
    link = page.locator(f"a:has-text('{job['id']}')")
    assert link.count() == 1
    link.click()
    page.wait_for_selector("#job")
    assert job["id"] in page.inner_text("h1")


def test_a_page_of_a_thousand_items_stays_small_and_lists_failures_on_demand(server,
                                                                           browser):
    items = [f"s{i:04d}" for i in range(1000)]
    job = api(server, "POST", "/jobs", {
        "workflow": "map", "items": items,
        "command": ["sh", "-c", 'echo "done {}"; case {} in *00) exit 3;; esac']})
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"{server}{job['urls']['page']}")
    page.wait_for_function("document.getElementById('job').dataset.ended === 'error'",
                           timeout=180_000)
    page.wait_for_selector("#items:not([hidden])", timeout=10_000)
    wait_for(lambda: "1,000/1,000 items" in page.inner_text("#bar-text"), timeout=15,
             what="the item counts")
    counts = page.inner_text("#items-counts")
    assert "990 succeeded" in counts and "10 failed" in counts
    assert "started on local" not in page.inner_text("#log")  # per-piece notes left out
    # no element per piece or per item: counts, one shared log section, capped lines
    assert page.locator("#grid .cell").count() == 0
    assert page.locator("#log details").count() <= 2
    assert page.locator("#log .line").count() <= 2 * 2000
    page.click("#show-failed")
    page.wait_for_selector("#failed-items li", timeout=10_000)
    failed = page.locator("#failed-items li").all_inner_texts()
    assert [f.split(":")[0] for f in failed] == [k for k in items if k.endswith("00")]
    assert "exit 3" in failed[0]


def test_a_cwl_workflow_posted_with_curl_runs_and_its_page_counts_the_scatter(
        server, browser, tmp_path):
    """POST /jobs with curl, the way a user would: the example's scatter workflow and
    its input object uploaded as one bundle (the texts they name beside them). The job
    runs as its runner piece plus one piece per invocation, the page shows the scatter
    step's counts, GET /jobs/<id>/result gives the output object with a URL per file
    and no server path, and those URLs give the counts."""
    import tarfile
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "cwl"
    bundle = tmp_path / "wc.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        for path in sorted(example.iterdir()):
            tar.add(path, arcname=path.name)

    def curl(*args: str) -> str:
        done = subprocess.run(["curl", "-sS", "--fail-with-body", "-H",
                               f"Authorization: Bearer {TOKEN}", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    body = {"workflow": "cwl", "inputs": {"process": "wc-scatter.cwl", "job": "job.yml"}}
    job = json.loads(curl("-F", f"job={json.dumps(body)}", "-F", f"bundle=@{bundle}",
                          f"{server}/jobs"))
    page = browser.new_page()
    page.goto(f"{server}{job['urls']['page']}")
    page.wait_for_function("document.getElementById('job').dataset.ended === 'success'",
                           timeout=120_000)
    assert "count: 6/6 done" in page.inner_text("#steps")
    view = api(server, "GET", f"/jobs/{job['id']}")
    assert {s["step"]: s["done"] for s in view["steps"]} == {"cwl-runner": 1, "count": 6,
                                                             "sum": 1}
    result = api(server, "GET", f"/jobs/{job['id']}/result")
    assert str(tmp_path) not in json.dumps(result) and '"path"' not in json.dumps(result)
    counts = [int(curl(f"{server}{f['location']}")) for f in result["output"]["counts"]]
    assert counts == [3, 6, 9, 12, 15, 18]
    assert int(curl(f"{server}{result['output']['total']['location']}")) == 63


def test_serve_says_ready_once_every_web_process_listens_on_its_own_socket(env, tmp_path):
    """`serve` says `ready` after each of its web processes loaded the app (a burst sent
    when only the first answers meets half the service); its own worker runs at nice 19;
    each process has a listening socket of its own (--reuse-port), whose waiting
    connections it takes all at once (gunicorn's one-a-turn is for a shared socket); 60
    clients connecting together are all answered."""
    import socket as socketlib

    from sheepdog.serve_worker import _OwnSocketServer, own_sockets

    port, log = free_port(), tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "sheepdog", "serve", "--bind",
                             f"127.0.0.1:{port}", "--local-workers", "1", "--processes", "2"],
                            env=dict(env, SHEEPDOG_API_TOKENS=TOKEN), stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), start_new_session=True)
    try:
        wait_for(lambda: "serve: ready:" in log.read_text(), 60, every=0.05, what="ready")
        text = log.read_text()
        assert "ready: 2 web processes answering on http://127.0.0.1:" in text
        assert text.count("Booting worker with pid") == 2
        assert text.index("serve: ready:") > text.rindex("Booting worker with pid")
        # its own worker (and so its pieces) at the lowest CPU priority: requests first
        worker = int(subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "--",
                                     "-m sheepdog worker"],
                                    capture_output=True, text=True).stdout.split()[0])
        assert os.getpriority(os.PRIO_PROCESS, worker) == 19
        if own_sockets(True):  # gunicorn 24 and later
            hex_port = f"{port:04X}"
            listening = [line for line in open("/proc/net/tcp").read().splitlines()[1:]
                         if line.split()[1].endswith(f":{hex_port}") and line.split()[3] == "0A"]
            assert len(listening) == 2, listening
        clients = [socketlib.create_connection(("127.0.0.1", port)) for _ in range(60)]
        for c in clients:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = []
        for c in clients:
            c.settimeout(30)
            answers.append(c.recv(64).split(b"\r\n")[0])
            c.close()
        assert answers == [b"HTTP/1.1 200 OK"] * 60
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    listener = socketlib.socket()
    server = _OwnSocketServer(listener, handle=lambda *_: None)
    server.max_accept = 1  # what gunicorn's run() sets when there are several workers
    assert server.max_accept == 100
    listener.close()
