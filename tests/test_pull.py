"""Workers behind firewalls: pull workers that reach nothing but the web service over
HTTPS, under the same guarantees as every worker (kill, restart, cancel), and tokens
whose roles keep a worker token to its own business."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import tlscerts
from conftest import free_port, sheepdog, wait_for
from pullservice import Service, add_token, kill, network_namespace, start_worker, worker_env
from web_helpers import conforms

from sheepdog import store
from sheepdog.defaults import PULL_CLAIM_WAIT
from sheepdog.models import JobStatus, TaskStatus

HOST_IP, NS_IP = "10.231.7.1", "10.231.7.2"
LEASE = 4  # s: a short lease keeps the kill case quick (the default is checked below)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return tlscerts.make(tmp_path_factory.mktemp("certs"), more_ips=(HOST_IP,))


@pytest.fixture()
def service_env(env, tmp_path) -> dict[str, str]:
    e = dict(env, SHEEPDOG_TOKENS_FILE=str(tmp_path / "tokens.json"),
             SHEEPDOG_LEASE_TIMEOUT=str(LEASE))
    return e


@pytest.fixture()
def tokens(service_env) -> dict[str, str]:
    return {role: add_token(service_env, role, f"{role}-1")
            for role in ("read", "submit", "worker", "admin")}


@pytest.fixture()
def service(service_env, certs, tokens):
    s = Service(service_env, f"127.0.0.1:{free_port()}", certs.server_cert, certs.server_key,
                certs.ca)
    s.start()
    yield s
    s.stop()


@pytest.fixture()
def pull_workers(tmp_path):
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        kill(p)


def output(proc: subprocess.Popen) -> str:
    """What a process that has exited printed."""
    return kill(proc)


def _map_job(service: Service, token: str, command: list[str], items: list[str],
             cache: bool = True) -> str:
    answer = service.api("POST", "/jobs", token, json={
        "workflow": "map", "command": command, "items": items, "cache": cache})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def _job(service: Service, token: str, job_id: str) -> dict:
    return service.api("GET", f"/jobs/{job_id}", token).json()


def _wait_status(service, token, job_id, status, timeout=60.0) -> dict:
    return wait_for(lambda: (v := _job(service, token, job_id))["status"] == status and v,
                    timeout=timeout, what=f"job {job_id} to be {status}")


def _pull_tasks(conn, job_id):
    return [t for t in store.job_tasks(conn, job_id) if t.worker.startswith("pull:")]


# ------------------------------------------------------------- the whole way


def test_a_worker_in_a_network_namespace_runs_a_bxd_loco_scan(env, conn, tmp_path, certs,
                                                              service_env, tokens):
    # the local run first: the reference the pulled run must equal
    local = sheepdog("run", "gemma-loco", "--example", "--json", env=env, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    reference = json.loads(local.stdout)
    out_local = tmp_path / "local"
    assert sheepdog("result", reference["id"], "--out", str(out_local), env=env).returncode == 0
    conn.flushdb()

    with network_namespace(HOST_IP, NS_IP) as ns:
        # the service listens on the namespace's only way out; Redis stays on loopback
        service = Service(dict(service_env, SHEEPDOG_HOME=str(tmp_path / "service")),
                          f"{HOST_IP}:{free_port()}", certs.server_cert, certs.server_key,
                          certs.ca)
        Path(service.env["SHEEPDOG_HOME"]).mkdir()
        service.start()
        redis_port = conn.connection_pool.connection_kwargs["port"]
        probe = ("import socket,sys\nfor h in ('127.0.0.1', sys.argv[1]):\n try:\n"
                 "  socket.create_connection((h, int(sys.argv[2])), timeout=2); print('open')\n"
                 " except OSError: print('closed')")
        seen = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe, HOST_IP,
                               str(redis_port)], capture_output=True, text=True, check=True)
        assert seen.stdout.split() == ["closed", "closed"]  # no Redis from inside
        wenv = worker_env(env, tmp_path / "worker", tokens["worker"])
        worker = start_worker(service.url, wenv, "-j", "2", "--queue", env["SHEEPDOG_QUEUE"],
                              ca=certs.ca, netns=ns)
        try:
            wait_for(lambda: any(w.get("pull") for w in _live(conn)), timeout=30,
                     what="the pull worker to show up")
            # submitted as a researcher would (the CLI, the service's store); it waits
            # for the job and sees a live worker for the queue: it starts none itself
            run_env = dict(env, SHEEPDOG_HOME=service.env["SHEEPDOG_HOME"])
            pulled = sheepdog("run", "gemma-loco", "--example", "--json", env=run_env,
                              timeout=300)
            assert pulled.returncode == 0, pulled.stderr[-2000:] + kill(worker)
            result = json.loads(pulled.stdout)
            tasks = store.job_tasks(conn, result["id"])
            assert tasks and all(t.worker.startswith("pull:worker-1:") for t in tasks)
            for field in ("counts", "top_hits", "p_column"):
                assert result["result"][field] == reference["result"][field]
            out_pulled = tmp_path / "pulled"
            assert sheepdog("result", result["id"], "--out", str(out_pulled),
                            env=run_env).returncode == 0
            # the merged association table, byte for byte
            assert (out_pulled / "assoc.txt").read_bytes() == \
                (out_local / "assoc.txt").read_bytes()
            # its output reached the job's log live, line by line
            log = service.api("GET", f"/jobs/{result['id']}/log?limit=10000", tokens["read"])
            texts = [ln["text"] for ln in log.json()["lines"]]
            assert any("Start Eigen-Decomposition" in t for t in texts)
        finally:
            said = kill(worker, signal.SIGTERM)
            service.stop()
        # each input was fetched once, however many pieces used it
        fetched = [sha for line in re.findall(r"fetching ([0-9a-f ]+)$", said, re.M)
                   for sha in line.split()]
        found = re.findall(r": (\d+) of its \d+ files here already, (\d+) on their way", said)
        assert len(found) == len(tasks)  # every piece said where its files came from
        assert fetched and len(fetched) == len(set(fetched))
        # and pieces found files fetched for others: here already, or (pieces prefetched
        # together, staged at once) on their way by another piece's fetch, waited for
        assert sum(int(here) + int(coming) for here, coming in found) > 0


def _live(conn):
    from sheepdog.registration import live_workers

    return live_workers(conn)


# ------------------------------------------------------------- same guarantees


@pytest.mark.fault
def test_a_killed_pull_workers_piece_runs_again_after_its_lease(service, tokens, tmp_path,
                                                                conn, env, pull_workers):
    wenv = worker_env(env, tmp_path / "w1", tokens["worker"])
    first = start_worker(service.url, wenv, "--queue", env["SHEEPDOG_QUEUE"], "--name", "first",
                         ca=service.ca)
    pull_workers.append(first)
    job = _map_job(service, tokens["admin"], ["sh", "-c", "sleep 3; echo done {}"], ["a"])
    wait_for(lambda: _job(service, tokens["read"], job)["status"] == "running", timeout=30,
             what="the piece to start")
    killed_at = time.monotonic()
    kill(first)  # SIGKILL, its whole process group
    second = start_worker(service.url, worker_env(env, tmp_path / "w2", tokens["worker"]),
                          "--queue", env["SHEEPDOG_QUEUE"], "--name", "second", ca=service.ca)
    pull_workers.append(second)
    view = _wait_status(service, tokens["read"], job, "success", timeout=60)
    took = time.monotonic() - killed_at
    assert took >= LEASE - 1  # not before the lease ran out
    tasks = store.job_tasks(conn, job)  # the item's piece, then the map's gather
    assert [t.attempts for t in tasks] == [2, 1]
    assert all(t.status == TaskStatus.SUCCESS for t in tasks)
    assert [t.worker for t in tasks] == ["pull:worker-1:second"] * 2
    assert view["progress"]["done"] == view["progress"]["total"]
    item = service.api("GET", f"/jobs/{job}/items/a", tokens["read"]).json()
    assert "done a" in json.dumps(item)


@pytest.mark.fault
def test_a_service_restart_mid_piece_is_ridden_out(service_env, certs, tokens, tmp_path, conn,
                                                   env, pull_workers):
    # the default lease: a restart (its graceful stop included) takes longer than LEASE
    service = Service(dict(service_env, SHEEPDOG_LEASE_TIMEOUT=""),
                      f"127.0.0.1:{free_port()}", certs.server_cert, certs.server_key, certs.ca)
    service.start()
    try:
        worker = start_worker(service.url, worker_env(env, tmp_path / "w", tokens["worker"]),
                              "--queue", env["SHEEPDOG_QUEUE"], ca=service.ca)
        pull_workers.append(worker)
        job = _map_job(service, tokens["admin"],
                       ["sh", "-c", "echo before; sleep 3; echo after {}"], ["x"])
        wait_for(lambda: any("before" in ln["text"] for ln in service.api(
            "GET", f"/jobs/{job}/log", tokens["read"]).json()["lines"]), timeout=30,
            what="the piece's first line")
        service.stop()  # mid-piece: its log batches, renewals and report meet a closed port
        time.sleep(1.5)
        service.start()
        view = _wait_status(service, tokens["read"], job, "success", timeout=60)
        assert view["exit_code"] == 0
        tasks = _pull_tasks(conn, job)
        assert [t.attempts for t in tasks] == [1, 1]  # each finished once, recorded once
        lines = [ln["text"] for ln in service.api("GET", f"/jobs/{job}/log", tokens["read"])
                 .json()["lines"]]
        assert any("after x" in t for t in lines)
        assert worker.poll() is None  # still serving
    finally:
        service.stop()


@pytest.mark.fault
def test_cancel_stops_the_remote_process_group_within_seconds(service, tokens, tmp_path, env,
                                                              pull_workers):
    worker = start_worker(service.url, worker_env(env, tmp_path / "w", tokens["worker"]),
                          "--queue", env["SHEEPDOG_QUEUE"], ca=service.ca)
    pull_workers.append(worker)
    pids = tmp_path / "pids"
    job = _map_job(service, tokens["admin"],
                   ["sh", "-c", f"sleep 60 & echo $! >> {pids}; echo $$ >> {pids}; wait"],
                   ["one"], cache=False)
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout=30,
             what="the piece's processes")
    started = time.monotonic()
    assert service.api("DELETE", f"/jobs/{job}", tokens["submit"]).json()["cancelled"]

    def all_gone() -> bool:
        for pid in map(int, pids.read_text().split()):
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                continue
        return True

    wait_for(all_gone, timeout=15, what="the piece's process group to be stopped")
    assert time.monotonic() - started < 8
    assert _job(service, tokens["read"], job)["status"] == JobStatus.CANCELLED
    assert worker.poll() is None


def test_the_page_follows_a_pull_workers_output_live_over_wss(service, tokens, tmp_path, env,
                                                               pull_workers):
    import ssl

    from simple_websocket import Client

    pull_workers.append(start_worker(service.url, worker_env(env, tmp_path / "w",
                                                             tokens["worker"]),
                                     "--queue", env["SHEEPDOG_QUEUE"], ca=service.ca))
    job = _map_job(service, tokens["admin"], ["sh", "-c", "for i in 1 2 3; do echo line $i {};"
                                              " sleep 0.5; done"], ["w"])
    context = ssl.create_default_context(cafile=str(service.ca))
    ws = Client.connect(f"wss://{service.bind}/jobs/{job}/stream?token={tokens['read']}",
                        ssl_context=context)
    got, arrived = [], {}
    try:
        while not got or got[-1]["type"] != "end":
            got.append(json.loads(ws.receive(timeout=30)))
            if got[-1]["type"] == "line":
                arrived[got[-1]["text"]] = time.monotonic()
    finally:
        ws.close()
    assert got[-1]["status"] == "success"
    lines = [f"line {i} w" for i in (1, 2, 3)]
    assert all(line in arrived for line in lines)
    # live: each line came as it was printed, not all at the end
    assert arrived[lines[2]] - arrived[lines[0]] > 0.6


def test_the_default_lease_lets_a_lost_piece_run_again_within_a_minute():
    from sheepdog.config import Settings

    s = Settings()
    # lease, then at most one upkeep round (claims and renewals reap)
    assert s.lease_timeout + s.heartbeat_interval <= 60


# ------------------------------------------------------------- tokens and roles


def test_a_worker_token_is_refused_everywhere_but_the_worker_protocol(service, tokens):
    job = service.api("POST", "/jobs", tokens["admin"], json={
        "workflow": "command", "command": ["echo", "x"]}).json()["id"]
    w = tokens["worker"]
    refused = [("POST", "/jobs", {"json": {"workflow": "command", "command": ["id"]}}),
               ("POST", "/jobs", {"json": {"workflow": "gemma-loco"}}),
               ("GET", "/jobs", {}), ("GET", f"/jobs/{job}", {}),
               ("GET", f"/jobs/{job}/log", {}), ("GET", f"/jobs/{job}/result", {}),
               ("GET", f"/jobs/{job}/stream", {}), ("DELETE", f"/jobs/{job}", {}),
               ("GET", f"/jobs/{job}/page", {}), ("GET", "/", {}),
               ("GET", "/precompute", {})]
    for method, path, kw in refused:
        answer = service.api(method, path, w, **kw)
        assert answer.status_code in (403, 404) and answer.status_code != 200, (path, answer)
        if answer.status_code == 403:
            assert "worker" in answer.json()["error"]
    assert service.api("GET", "/jobs", w).status_code == 403
    # its own protocol: yes
    assert service.api("GET", "/api/v1/worker/hello", w).json()["service"] == "sheepdog"
    # other roles stay out of the worker protocol
    for role in ("read", "submit"):
        assert service.api("GET", "/api/v1/worker/hello", tokens[role]).status_code == 403


def test_roles_submit_read_admin(service, tokens):
    command = {"workflow": "command", "command": ["echo", "hi"]}
    answer = service.api("POST", "/jobs", tokens["submit"], json=command)
    assert answer.status_code == 403 and "admin" in answer.json()["error"]
    mapped = {"workflow": "map", "command": ["echo", "{}"], "items": ["a"]}
    assert service.api("POST", "/jobs", tokens["submit"], json=mapped).status_code == 403
    assert service.api("POST", "/jobs", tokens["read"], json=command).status_code == 403
    job = service.api("POST", "/jobs", tokens["admin"], json=command)
    assert job.status_code == 202
    # a submit token runs the named workflows (this one fails on its input, not its role)
    named = service.api("POST", "/jobs", tokens["submit"], json={"workflow": "gemma-loco"})
    assert named.status_code == 400 and "role" not in named.text
    for role in ("read", "submit", "admin"):
        assert service.api("GET", f"/jobs/{job.json()['id']}", tokens[role]).status_code == 200
    assert service.api("DELETE", f"/jobs/{job.json()['id']}", tokens["read"]).status_code == 403


def test_legacy_tokens_keep_every_role(service_env, certs, tmp_path):
    env = dict(service_env, SHEEPDOG_API_TOKENS="old-shared-token")
    s = Service(env, f"127.0.0.1:{free_port()}", certs.server_cert, certs.server_key, certs.ca)
    s.start()
    try:
        assert s.api("GET", "/api/v1/worker/hello", "old-shared-token").status_code == 200
        assert s.api("POST", "/jobs", "old-shared-token", json={
            "workflow": "command", "command": ["true"]}).status_code == 202
        assert s.api("GET", "/jobs", "old-shared-token").status_code == 200
    finally:
        s.stop()


def test_tokens_are_stored_hashed_and_revoked_without_a_restart(service, service_env, tokens):
    stored = Path(service_env["SHEEPDOG_TOKENS_FILE"]).read_text()
    assert all(t not in stored for t in tokens.values())
    assert oct(Path(service_env["SHEEPDOG_TOKENS_FILE"]).stat().st_mode & 0o777) == "0o600"
    listed = subprocess.run([sys.executable, "-m", "sheepdog", "tokens", "list"],
                            env=service_env, capture_output=True, text=True, check=True)
    assert "read-1" in listed.stdout and tokens["read"] not in listed.stdout
    assert service.api("GET", "/jobs", tokens["read"]).status_code == 200
    revoked = subprocess.run([sys.executable, "-m", "sheepdog", "tokens", "revoke", "read-1"],
                             env=service_env, capture_output=True, text=True)
    assert revoked.returncode == 0
    assert service.api("GET", "/jobs", tokens["read"]).status_code == 401  # same process


def test_a_refused_worker_says_so_and_exits(service, service_env, tokens, tmp_path, env):
    for token in ("sd_not-a-token", tokens["read"]):
        worker = start_worker(service.url, worker_env(env, tmp_path / "w", token),
                              ca=service.ca)
        worker.wait(30)
        out = output(worker)
        assert worker.returncode == 3, out
        assert ("refused the worker token (401" in out if token.startswith("sd_not")
                else "needs a token with the worker role" in out), out
    subprocess.run([sys.executable, "-m", "sheepdog", "tokens", "revoke", "worker-1"],
                   env=service_env, check=True, capture_output=True)
    worker = start_worker(service.url, worker_env(env, tmp_path / "w", tokens["worker"]),
                          ca=service.ca)
    assert worker.wait(30) == 3
    assert "revoked" in output(worker)


# ------------------------------------------------------------- bad peers


class _Fake(BaseHTTPRequestHandler):
    answer: tuple[int, str, str] = (404, "text/html", "<h1>Not Found</h1>")

    def do_GET(self) -> None:  # noqa: N802
        code, kind, body = self.answer
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *_):
        pass


@pytest.mark.parametrize("answer,said", [
    ((404, "text/html", "<h1>Not Found</h1>"), "is not a sheepdog service"),
    ((200, "application/json", json.dumps({"service": "sheepdog", "protocol": 2})),
     "speaks sheepdog worker protocol 2; this worker speaks protocol 1"),
])
def test_a_server_that_is_not_sheepdog_or_speaks_another_protocol(answer, said, tmp_path, env):
    handler = type("Handler", (_Fake,), {"answer": answer})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        worker = start_worker(f"http://127.0.0.1:{server.server_port}",
                              worker_env(env, tmp_path / "w", "sd_x"))
        assert worker.wait(30) == 3
        assert said in output(worker)
    finally:
        server.shutdown()


class _KeptAlive(BaseHTTPRequestHandler):
    """Answers the worker's hello over HTTP/1.1, counting the connections it is sent on."""

    protocol_version = "HTTP/1.1"
    connections: list[tuple[str, int]] = []

    def setup(self) -> None:
        super().setup()
        self.connections.append(self.client_address)

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"service": "sheepdog", "protocol": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


def test_a_workers_pieces_share_its_connections_to_the_service():
    """Each piece of a pull worker runs on a thread of its own: their requests go on the
    connections earlier ones opened (a TLS handshake, two round trips to a far service,
    is not paid per piece)."""
    from socketserver import ThreadingMixIn

    from sheepdog.pullclient import Client

    handler = type("Handler", (_KeptAlive,), {"connections": []})
    server = type("Server", (ThreadingMixIn, HTTPServer), {"daemon_threads": True})(
        ("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{server.server_port}", "sd_x")
        for _ in range(12):  # one piece after another, each on a new thread
            piece = threading.Thread(target=client.hello)
            piece.start()
            piece.join()
        at_once = [threading.Thread(target=client.hello) for _ in range(4)]
        for t in at_once:
            t.start()
        for t in at_once:
            t.join()
    finally:
        server.shutdown()
    assert 1 <= len(handler.connections) <= 4  # 16 requests: at most 4 at once


def test_the_service_names_both_protocol_versions(service, tokens):
    import requests

    answer = requests.get(service.url + "/api/v1/worker/hello", verify=str(service.ca),
                          headers={"Authorization": f"Bearer {tokens['worker']}",
                                   "X-Sheepdog-Protocol": "99"}, timeout=10)
    assert answer.status_code == 426
    assert "protocol 1" in answer.json()["error"] and "protocol 99" in answer.json()["error"]


def test_a_certificate_that_does_not_verify_is_refused_with_the_fix(service, tokens, tmp_path,
                                                                     env, certs):
    for ca in (None, certs.other_ca):
        worker = start_worker(service.url, worker_env(env, tmp_path / "w", tokens["worker"]),
                              ca=ca)
        assert worker.wait(30) == 3
        out = output(worker)
        assert "cannot verify the certificate" in out and "--ca-file" in out


# ------------------------------------------------------------- the protocol itself


@pytest.fixture()
def held(service_env, tokens, conn, tmp_path):
    """A Flask test client of the service, and a piece a worker holds there."""
    from sheepdog import config
    from web import create_app

    os.environ["SHEEPDOG_TOKENS_FILE"] = service_env["SHEEPDOG_TOKENS_FILE"]
    try:
        settings = config.load(redis_url=service_env["SHEEPDOG_REDIS_URL"],
                               home=Path(service_env["SHEEPDOG_HOME"]),
                               queue=service_env["SHEEPDOG_QUEUE"], lease_timeout=30.0)
        app = create_app({"TESTING": True, "SETTINGS": {
            k: getattr(settings, k) for k in ("redis_url", "home", "queue", "lease_timeout",
                                              "tokens_file")}})
    finally:
        del os.environ["SHEEPDOG_TOKENS_FILE"]
    api = app.test_client()
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    worker = {"Authorization": f"Bearer {tokens['worker']}", "X-Sheepdog-Protocol": "1"}
    posted = api.post("/jobs", headers=admin, json={
        "workflow": "map", "command": ["sh", "-c", "echo {} > out.txt"], "items": ["z"],
        "cache": True})
    assert posted.status_code == 202, posted.get_json()
    claim = api.post("/api/v1/worker/claim", headers=worker, json={
        "worker": "proto", "slots": 1, "wait": 5})
    pieces = claim.get_json()["pieces"]
    assert len(pieces) == 1
    return api, worker, admin, pieces[0], posted.get_json()["id"]


def test_uploads_resume_and_a_wrong_hash_is_refused(held, service_env):
    import hashlib

    api, worker, admin, piece, job = held
    lease = piece["lease"]
    q = f"?worker=proto&lease={lease}"
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    first = api.put(f"/api/v1/worker/uploads/{sha}{q}", data=data[:100_000], headers={
        **worker, "Upload-Offset": "0", "Upload-Length": str(len(data))})
    assert first.status_code == 202 and first.get_json()["offset"] == 100_000
    state = api.get(f"/api/v1/worker/uploads/{sha}{q}", headers=worker).get_json()
    assert state == {"complete": False, "offset": 100_000}
    conforms(state, "UploadState")
    conforms(piece, "LeasedPiece")
    conforms(api.get("/api/v1/worker/hello", headers=worker).get_json(), "WorkerHello")
    wrong_place = api.put(f"/api/v1/worker/uploads/{sha}{q}", data=data[50_000:], headers={
        **worker, "Upload-Offset": "50000", "Upload-Length": str(len(data))})
    assert wrong_place.status_code == 409 and "100000" in wrong_place.get_json()["error"]
    rest = api.put(f"/api/v1/worker/uploads/{sha}{q}", data=data[100_000:], headers={
        **worker, "Upload-Offset": "100000", "Upload-Length": str(len(data))})
    assert rest.status_code == 201 and rest.get_json()["complete"]
    damaged = bytearray(data)
    damaged[7] ^= 1
    other = hashlib.sha256(b"what it should have been").hexdigest()
    bad = api.put(f"/api/v1/worker/uploads/{other}{q}", data=bytes(damaged), headers={
        **worker, "Upload-Offset": "0", "Upload-Length": str(len(damaged))})
    assert bad.status_code == 422 and "refused" in bad.get_json()["error"]
    assert api.get(f"/api/v1/worker/uploads/{other}{q}", headers=worker).get_json()[
        "offset"] == 0  # nothing of it kept
    # a success names the files it still lacks, then records once they are there
    out = b""
    out_sha = hashlib.sha256(out).hexdigest()
    report = {"worker": "proto", "lease": lease, "exit_code": 0, "error": "",
              "files": {piece["task"]["outputs"][0]: out_sha}}
    missing = api.post("/api/v1/worker/finish", headers=worker, json=report)
    assert missing.status_code == 409 and missing.get_json()["missing"] == [out_sha]
    api.put(f"/api/v1/worker/uploads/{out_sha}{q}", data=out, headers={
        **worker, "Upload-Offset": "0", "Upload-Length": str(len(out))})
    # an upload begun and never finished goes with the piece's end
    begun = hashlib.sha256(b"0123456789" * 2).hexdigest()
    assert api.put(f"/api/v1/worker/uploads/{begun}{q}", data=b"0123456789", headers={
        **worker, "Upload-Offset": "0", "Upload-Length": "20"}).status_code == 202
    home = Path(service_env["SHEEPDOG_HOME"])
    assert len(list(home.rglob(f"up.{lease[:16]}.*"))) == 1
    done = api.post("/api/v1/worker/finish", headers=worker, json=report)
    assert done.status_code == 200 and done.get_json() == {"status": "success", "recorded": True}
    assert not list(home.rglob(f"up.{lease[:16]}.*"))
    again = api.post("/api/v1/worker/finish", headers=worker, json=report)  # a repeated report
    assert again.get_json() == {"status": "success", "recorded": False}


def test_reports_of_several_pieces_go_in_one_request_each_answered(held, conn):
    api, worker, admin, piece, _ = held
    posted = api.post("/jobs", headers=admin, json={
        "workflow": "command", "command": ["true"]}).get_json()
    second = api.post("/api/v1/worker/claim", headers=worker, json={
        "worker": "proto", "slots": 1, "wait": 5}).get_json()["pieces"][0]
    report = {"worker": "proto", "exit_code": 1, "error": "exit code 1"}
    answer = api.post("/api/v1/worker/finish", headers=worker, json={
        "worker": "proto", "reports": [dict(report, lease=piece["lease"]),
                                       dict(report, lease="0" * 64),
                                       dict(report, lease=second["lease"])]})
    assert answer.status_code == 200, answer.get_json()
    first, unknown, last = answer.get_json()["answers"]
    assert first["recorded"] and last["recorded"] and first["status"] == last["status"]
    assert "no piece" in unknown["gone"]
    assert store.get_job(conn, posted["id"]).status == "error"
    assert api.post("/api/v1/worker/finish", headers=worker, json={
        "worker": "proto", "reports": "not a list"}).get_json()["field"] == "reports"


def test_a_worker_fetches_only_what_its_pieces_use(held, service_env, conn):
    api, worker, _, _, _ = held
    from sheepdog import jobs
    from sheepdog.cache import Cache
    from sheepdog.config import Settings
    from sheepdog.models import Job, Task

    home = Path(service_env["SHEEPDOG_HOME"])
    cache = Cache(home / "store")
    data = cache.put_bytes(b"this piece's input")
    secret = cache.put_bytes(b"another job's input")
    task = Task(name="reads its input", argv=["cat", {"input": "data"}], inputs={"data": data},
                queue=service_env["SHEEPDOG_QUEUE"])
    settings = Settings(redis_url=service_env["SHEEPDOG_REDIS_URL"], home=home)
    jobs.submit(conn, settings, Job(id=jobs.new_job_id(), workflow="command"), [task])
    pieces = api.post("/api/v1/worker/claim", headers=worker, json={
        "worker": "proto", "slots": 1, "wait": 5}).get_json()["pieces"]
    assert [p["lease"] for p in pieces] == [task.id]
    q = f"?worker=proto&lease={task.id}"
    got = api.get(f"/api/v1/worker/blobs/{data}{q}", headers=worker)
    assert got.status_code == 200 and got.data == b"this piece's input"
    refused = api.get(f"/api/v1/worker/blobs/{secret}{q}", headers=worker)
    assert refused.status_code == 410 and "not an input" in refused.get_json()["error"]
    # another worker name under the same token holds nothing
    assert api.get(f"/api/v1/worker/blobs/{data}?worker=other&lease={task.id}",
                   headers=worker).status_code == 410
    bad_paths = api.post("/api/v1/worker/finish", headers=worker, json={
        "worker": "proto", "lease": task.id, "exit_code": 0, "files": {"../x": data}})
    assert bad_paths.status_code == 400 and bad_paths.get_json()["field"] == "files"


def test_an_idle_worker_costs_one_request_per_long_poll(service, tokens, tmp_path, env, conn):
    worker = start_worker(service.url, worker_env(env, tmp_path / "w", tokens["worker"]),
                          "--queue", "nothing-here", ca=service.ca)
    try:
        wait_for(lambda: any(w.get("pull") for w in _live(conn)), timeout=20,
                 what="the worker's first claim")
        time.sleep(5)
        served = Path(service.logs[-1]).read_text()  # a request is logged when it ends
        assert served.count("/api/v1/worker/hello") == 1
        assert served.count("/api/v1/worker/claim") == 0  # its one long poll is still open
        assert PULL_CLAIM_WAIT >= 25
    finally:
        kill(worker, signal.SIGTERM)


def test_a_busy_worker_claims_its_next_pieces_with_its_reports(service, tokens, tmp_path,
                                                               env, conn):
    """One request per piece: a report brings the next piece back in its answer."""
    from sheepdog import jobs
    from sheepdog.config import Settings
    from sheepdog.models import Job, Task

    queue = "busy"
    tasks = [Task(name=f"quick {i}", argv=["true", str(i)], queue=queue) for i in range(40)]
    job = Job(id=jobs.new_job_id(), workflow="command")
    jobs.submit(conn, Settings(redis_url=env["SHEEPDOG_REDIS_URL"]), job, tasks)
    worker = start_worker(service.url, worker_env(env, tmp_path / "w", tokens["worker"]),
                          "--queue", queue, "-j", "1", ca=service.ca)
    try:
        wait_for(lambda: store.get_job(conn, job.id).status == "success", timeout=60,
                 what="the 40 pieces")
        time.sleep(0.5)  # a request is logged when it ends
        served = Path(service.logs[-1]).read_text()
        # reports that end together go together: no more requests than pieces
        assert 0 < served.count("/api/v1/worker/finish") <= 40
        assert served.count("/api/v1/worker/claim") < 10, served.count("/api/v1/worker/claim")
    finally:
        kill(worker, signal.SIGTERM)


def test_redis_is_not_needed_by_a_pull_worker(tmp_path, env):
    # no SHEEPDOG_REDIS_URL, no embedded Redis started: it only asks the URL
    worker = start_worker("http://127.0.0.1:9", worker_env(env, tmp_path / "w", "sd_x"))
    time.sleep(2)
    told = time.monotonic()
    out = kill(worker, signal.SIGTERM)
    assert time.monotonic() - told < 10  # a stop cuts its wait for the service short
    assert worker.returncode == 0, out
    assert "127.0.0.1:9 is unreachable" in out and "redis" not in out.lower()
    assert not (tmp_path / "w" / "redis").exists()


def test_a_web_process_asks_for_its_upkeep_turn_a_few_times_an_interval_not_per_claim(
        conn, settings, monkeypatch):
    """A busy pull worker claims with every report; each claim asked Redis (a write)
    whether it was this web process's turn to reap. Now a process asks at most four
    times a heartbeat interval; when its turn comes it still reaps."""
    from sheepdog import keys, pullwork

    asked: list[str] = []
    real_set = conn.set
    monkeypatch.setattr(conn, "set", lambda key, *a, **k: asked.append(key) or real_set(
        key, *a, **k))
    monkeypatch.setattr(pullwork, "_upkeep_asked", -float("inf"))
    reaped: list[int] = []
    monkeypatch.setattr(pullwork, "reap_lost", lambda *a: reaped.append(1))
    for _ in range(50):
        pullwork.upkeep(conn, settings)
    assert asked == [keys.pull_upkeep()] and reaped == [1]
    # a quarter interval later (as if), the interval's turn over
    pullwork._upkeep_asked -= settings.heartbeat_interval / 4 + 0.01
    conn.delete(keys.pull_upkeep())
    pullwork.upkeep(conn, settings)
    assert asked == [keys.pull_upkeep()] * 2 and reaped == [1, 1]


def test_a_pull_worker_holds_enough_short_pieces_to_cover_two_report_round_trips(settings):
    """Pieces shorter than a report's round trip are prefetched deep enough to keep the
    slot busy while reports travel: at 2.5 ms a piece and 60 ms a report, 49 pieces (it
    held at most 16, and the slot waited); long pieces, or none measured yet, one."""
    from sheepdog.defaults import PULL_PREFETCH, PULL_PREFETCH_MOST
    from sheepdog.pull import PullWorker

    w = PullWorker(object(), settings, ["q"], concurrency=1)
    assert w._prefetch() == PULL_PREFETCH  # nothing measured yet
    w._run_seconds, w._report_seconds = 0.0025, 0.060
    assert w._prefetch() == 49 <= PULL_PREFETCH_MOST
    w._run_seconds = 5.0  # long pieces: one held beyond the slot, no more
    assert w._prefetch() == PULL_PREFETCH
    w._run_seconds, w.concurrency = 0.0001, 8  # bounded however short the pieces
    assert w._prefetch() == PULL_PREFETCH_MOST
