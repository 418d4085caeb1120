"""What a security review found, each case pinned: no 500 from a bad request, no
existence oracle, tokens compared safely, the embedded Redis private to its owner."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile

import pytest
from conftest import BXD, sheepdog

from sheepdog import embedded
from web import create_app

TOKEN = "sec-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def client(redis_server, home, conn, queue):
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": (TOKEN,), "queue": queue,
        "input_roots": (str(BXD),)}})
    return app.test_client()


def _tar(members: dict[str, bytes | None], gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _post_bundle(client, blob: bytes):
    job = {"workflow": "gemma-loco", "inputs": {"geno": "g", "pheno": "p", "anno": "a"}}
    return client.post("/jobs", headers=AUTH, content_type="multipart/form-data",
                       data={"job": json.dumps(job), "bundle": (io.BytesIO(blob), "b.tgz")})


def test_bad_requests_are_4xx_never_500(client):
    cases = [
        client.get("/jobs", headers={"Authorization": "Bearer tökén-ü"}),
        client.get("/jobs/20261202-000000-abc:tasks", headers=AUTH),
        client.post("/jobs", headers=AUTH, json={"workflow": "command", "command": ["true"],
                                                 "queue": ["a"]}),
        client.post("/jobs", headers=AUTH, data='{"workflow": "gemma-loco", "params": '
                    '{"maf": 1e400}}', content_type="application/json"),
        client.post("/jobs", headers=AUTH, data='{"workflow": "gemma-loco", "params": '
                    '{"lmm": ' + "9" * 5000 + "}}", content_type="application/json"),
        client.post("/jobs", headers=AUTH, data="[" * 100_000 + "]" * 100_000,
                    content_type="application/json"),
        client.post("/jobs", headers=AUTH, json={"workflow": "gemma-loco", "inputs": {
            "geno": str(BXD / "BXD_geno.txt.gz") + "\0x", "pheno": "p", "anno": "a"}}),
        client.get("/jobs?offset=1e20", headers=AUTH),
        _post_bundle(client, _tar({".": None, "g": b"x"})),
        _post_bundle(client, _tar({"a": b"file", "a/b": b"inside"})),
        _post_bundle(client, _tar({"g": b"x" * 100_000})[:200]),  # a truncated gzip
    ]
    for r in cases:
        assert 400 <= r.status_code < 500, (r.status_code, r.get_data(as_text=True)[:300])
        assert "Traceback" not in r.get_data(as_text=True)
    assert client.get("/jobs?offset=" + "9" * 30, headers=AUTH).status_code == 200


def test_an_unknown_job_with_a_wrong_token_is_401_like_a_known_one(client):
    job = client.post("/jobs", headers=AUTH, json={"workflow": "command",
                                                    "command": ["true"]}).get_json()
    known = client.get(f"/jobs/{job['id']}", headers={"Authorization": "Bearer wrong"})
    unknown = client.get("/jobs/20261202-000000-0123456789",
                         headers={"Authorization": "Bearer wrong"})
    assert known.status_code == unknown.status_code == 401
    assert known.get_json() == unknown.get_json()


def test_the_embedded_redis_listens_only_on_an_owner_only_socket(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    home = tmp_path / "xdg" / "sheepdog"
    try:
        assert sheepdog("redis", "status", env=env).returncode == 0
        sock = embedded.socket_path(home)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0  # no group, no others
        assert stat.S_IMODE((home / "redis").stat().st_mode) & 0o077 == 0
        import redis

        server = redis.Redis(unix_socket_path=str(sock))
        assert server.config_get("port")["port"] == "0"  # no TCP at all
    finally:
        embedded.stop(home)


def test_an_api_token_in_a_page_link_becomes_a_cookie_and_leaves_no_trace(client):
    job = client.post("/jobs", headers=AUTH, json={"workflow": "command",
                                                    "command": ["true"]}).get_json()
    r = client.get(f"/jobs/{job['id']}/page?token={TOKEN}")
    assert r.status_code == 303
    assert TOKEN not in r.headers["Location"]
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = client.get(r.headers["Location"])  # the test client keeps the cookie
    assert page.status_code == 200 and TOKEN not in page.get_data(as_text=True)
    index = client.get("/")
    assert index.status_code == 200 and TOKEN not in index.get_data(as_text=True)
    shared = client.get(job["urls"]["page"])  # the read-token link works, and only shows it
    assert job["read_token"] in shared.get_data(as_text=True)


def test_a_read_token_view_shows_no_server_paths_or_hosts(client, conn, home):
    body = {"workflow": "command", "command": ["true"]}
    job = client.post("/jobs", headers=AUTH, json=body).get_json()
    full = client.get(f"/jobs/{job['id']}", headers=AUTH).get_json()
    assert "host" in full
    shared = client.get(f"/jobs/{job['id']}?token={job['read_token']}", headers={})
    text = shared.get_data(as_text=True)
    assert shared.status_code == 200 and str(home) not in text
    view = shared.get_json()
    assert "host" not in view and "out_dir" not in view
    assert all("worker" not in p and "host" not in p for p in view["pieces"])


def test_a_proxyjump_with_two_hops_is_refused_not_half_taken():
    from sheepdog.errors import BackendError
    from sheepdog.hosts import Host
    from sheepdog.ssh import Connection

    with pytest.raises(BackendError, match="2 hops"):
        Connection(Host(name="far", hostname="127.0.0.1", port=1, proxy_jump="near,inner"))


def test_names_fetched_back_and_variables_sent_are_checked():
    from sheepdog.errors import BackendError
    from sheepdog.remote import check_env_names, safe_name

    for bad in ("../x", "a/b", "..", ".", ""):
        with pytest.raises(BackendError):
            safe_name(bad, "host")
    assert safe_name("assoc.txt", "host") == "assoc.txt"
    with pytest.raises(BackendError, match="not a valid name"):
        check_env_names({"X; rm -rf /": "1"})
    check_env_names({"OPENBLAS_CORETYPE": "Haswell"})


def test_a_small_gzip_of_one_huge_line_is_refused_cheaply(tmp_path):
    import gzip
    import resource

    from sheepdog.cache import Cache
    from sheepdog.errors import InputError
    from sheepdog.gemma.scan.build import GemmaRequest, prepare

    bomb = tmp_path / "anno.txt.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        for _ in range(200):  # 200 MB of one line, a few hundred KB gzipped
            f.write(b"r" * (1 << 20))
    assert bomb.stat().st_size < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError) as e:
        prepare(GemmaRequest(geno=BXD / "BXD_geno.txt.gz", pheno=BXD / "BXD_pheno.txt",
                             anno=bomb), Cache(tmp_path / "cache"))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert "line is longer than" in str(e.value) and len(str(e.value)) < 500
    assert grown_mb < 100, f"the process grew by {grown_mb:.0f} MB"


def test_the_work_one_request_may_ask_for_is_bounded(client, tmp_path):
    inputs = {"geno": str(BXD / "BXD_geno.txt.gz"), "pheno": str(BXD / "BXD_pheno.txt"),
              "anno": str(BXD / "BXD_snps.txt")}
    for params, said in (({"permutations": 200_000}, "max_permutations"),
                         ({"permutations": 20_000, "batch_size": 1}, "max_pieces")):
        r = client.post("/jobs", headers=AUTH, json={"workflow": "gemma-permute",
                                                     "inputs": inputs, "params": params})
        assert r.status_code == 400 and said in r.get_json()["error"], r.get_json()
        assert r.get_json()["field"] == "params"


def test_six_hundred_chromosomes_are_refused_before_any_file_is_opened(tmp_path):
    from sheepdog.cache import Cache
    from sheepdog.errors import InputError
    from sheepdog.gemma.scan.build import GemmaRequest, prepare

    anno = tmp_path / "anno.txt"
    snps = [ln.split()[0] for ln in (BXD / "BXD_snps.txt").read_text().splitlines()]
    anno.write_text("".join(f"{rs} {i * 10} {i % 600 + 1}\n" for i, rs in enumerate(snps)))
    with pytest.raises(InputError, match="600 chromosomes; at most 100"):
        prepare(GemmaRequest(geno=BXD / "BXD_geno.txt.gz", pheno=BXD / "BXD_pheno.txt",
                             anno=anno), Cache(tmp_path / "cache"))


def test_validating_and_splitting_runs_outside_the_web_process_within_limits(
        redis_server, home, queue, tmp_path):
    import gzip
    import resource
    import threading
    import time

    # 140,000 markers: a few MB to send, seconds of CPU to validate and split
    geno, anno = tmp_path / "big_geno.txt.gz", tmp_path / "big_snps.txt"
    rows = gzip.open(BXD / "BXD_geno.txt.gz", "rt").read().splitlines()
    snps = (BXD / "BXD_snps.txt").read_text().splitlines()
    with gzip.open(geno, "wt", compresslevel=1) as g, open(anno, "w") as a:
        for rep in range(20):
            g.writelines(f"r{rep}_{row}\n" for row in rows)
            a.writelines(f"r{rep}_{snp}\n" for snp in snps)
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": (TOKEN,), "queue": queue,
        "input_roots": (str(BXD), str(tmp_path)), "prepare_seconds": 1.0}})
    client = app.test_client()
    small = {"geno": str(BXD / "BXD_geno.txt.gz"), "pheno": str(BXD / "BXD_pheno.txt"),
             "anno": str(BXD / "BXD_snps.txt")}
    assert client.post("/jobs", headers=AUTH, json={"workflow": "gemma-loco",
                                                    "inputs": small}).status_code == 202
    before = resource.getrusage(resource.RUSAGE_SELF)
    answers: list = []
    heavy = threading.Thread(target=lambda: answers.append(client.post(
        "/jobs", headers=AUTH, json={"workflow": "gemma-loco",
                                     "inputs": dict(small, geno=str(geno), anno=str(anno))})))
    heavy.start()
    health = []
    while heavy.is_alive():  # the service answers while the heavy request is prepared
        started = time.monotonic()
        assert client.get("/health").status_code == 200
        health.append(time.monotonic() - started)
        time.sleep(0.05)
    heavy.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    r = answers[0]
    assert r.status_code == 413 and r.get_json()["field"] == "inputs", r.get_json()
    assert "prepare_seconds" in r.get_json()["error"]
    assert health and max(health) < 0.5, health
    # the CPU went to a child process, not to this (the web) process
    assert after.ru_utime - before.ru_utime < 0.5
    # a bad input found in the child is the same clear 400 as before
    bad = tmp_path / "bad_pheno.txt"
    bad.write_text("1.5\nx\n")
    r = client.post("/jobs", headers=AUTH, json={"workflow": "gemma-loco",
                                                 "inputs": dict(small, pheno=str(bad))})
    assert r.status_code == 400 and r.get_json()["field"] == "inputs.pheno", r.get_json()
    assert "line 2" in r.get_json()["error"], r.get_json()


def test_job_views_stay_small_for_a_job_of_a_thousand_pieces(client, conn, queue):
    from sheepdog import keys, store
    from sheepdog.models import Job, Task
    from web.stream import _progress_event

    job_id = "20261202-000000-manypieces"
    tasks = [Task(name=f"item {i}", argv=["true", str(i)], queue=queue, cacheable=False,
                  nonce=job_id) for i in range(1000)]
    store.submit(conn, Job(id=job_id, workflow="command", queue=queue), tasks)
    for t in tasks[:3]:
        assert store.claim(conn, t.id, "w1", 30) is not None
    store.finish(conn, tasks[0].id, "w1", 0)
    r = client.get(f"/jobs/{job_id}", headers=AUTH)
    view = r.get_json()
    assert len(r.data) < 100_000
    assert (len(view["pieces"]), view["pieces_total"], view["pieces_next"]) == (200, 1000, 200)
    assert view["progress"]["running"] == 2 and view["progress"]["done"] == 1
    last = client.get(f"/jobs/{job_id}?offset=900&limit=200", headers=AUTH).get_json()
    assert [p["name"] for p in last["pieces"]] == [f"item {i}" for i in range(900, 1000)]
    assert last["pieces_next"] is None
    # the live page's progress events carry counts, not a thousand pieces
    event = _progress_event(conn, job_id)
    assert event["pieces"] == [] and event["pieces_total"] == 1000
    assert len(json.dumps(event)) < 1000
    # the running set holds what was claimed and not yet ended, and heals itself
    store.finish(conn, tasks[1].id, "w1", 1, "failed")
    assert conn.scard(keys.job_running(job_id)) <= 2


@pytest.mark.parametrize("named", ["/etc/passwd", "../../../../etc/passwd", "{secret}"])
def test_a_control_file_cannot_name_a_server_file(client, tmp_path, named):
    """Review 2, high: an uploaded R/qtl2 control file named /etc/passwd as its `geno`;
    the parse error quoted the file's lines. Now refused before the file is opened, and
    the answer names neither the file's content nor where the server keeps uploads."""
    secret = tmp_path / "service.env"  # a file the service can read, outside every root
    secret.write_text("SHEEPDOG_REDIS_URL=redis://:hunter2@127.0.0.1/0\n")
    named = named.format(secret=secret)
    control = json.dumps({"crosstype": "risib", "geno": named, "pmap": "pm.csv", "sep": "="})
    job = {"workflow": "gemma-loco", "inputs": {"geno": "c.json", "pheno": "p.csv",
                                                "covariates": "pm.csv"}}
    r = client.post("/jobs", headers=AUTH, content_type="multipart/form-data", data={
        "job": json.dumps(job), "geno": (io.BytesIO(control.encode()), "c.json"),
        "pheno": (io.BytesIO(b"id,t\nBXD1,1\n"), "p.csv"),
        "covariates": (io.BytesIO(b"marker,chr,pos\nm,1,1\n"), "pm.csv")})
    text = r.get_data(as_text=True)
    assert r.status_code == 400, text
    assert "not beside the control file" in text
    own = text.replace(named, "")  # what the requester sent may be quoted back
    for leak in ("root:", "hunter2", "daemon", str(tmp_path), "/uploads", "looked for"):
        assert leak not in own, (leak, text)


def test_a_control_file_may_name_files_beside_it_and_under_input_roots(tmp_path):
    from sheepdog.errors import InputError
    from sheepdog.gemma.formats import qtl2

    (tmp_path / "g.csv").write_text("id,m\nA,B\n")
    (tmp_path / "pm.csv").write_text("marker,chr,pos\nm,1,1\n")
    control = tmp_path / "c.json"
    control.write_text(json.dumps({"crosstype": "f2", "geno": "g.csv", "pmap": "pm.csv"}))
    found = qtl2.read_control(control, confine=(str(tmp_path),))
    assert found.geno == tmp_path / "g.csv"
    control.write_text(json.dumps({"crosstype": "f2", "geno": str(BXD / "BXD_pheno.txt"),
                                   "pmap": "pm.csv"}))
    assert qtl2.read_control(control, confine=(str(tmp_path), str(BXD))).geno.parent == BXD
    with pytest.raises(InputError, match="not beside the control file"):
        qtl2.read_control(control, confine=(str(tmp_path),))
    assert qtl2.read_control(control).geno.parent == BXD  # a user's own command line
