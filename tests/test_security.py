"""What a security review found, each case pinned: no 500 from a bad request, no
existence oracle, tokens compared safely, the embedded Redis private to its owner."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from conftest import BXD, sheepdog

from sheepdog import embedded
from web import create_app

pytestmark = pytest.mark.security

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


@pytest.mark.alone
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


# ---------------------------------------------------------------- review 2, with roles

@pytest.fixture()
def roles(redis_server, home, conn, queue):
    """A service with stored tokens of each kind: (client, {name: token})."""
    from sheepdog import tokens

    path = home / "tokens.json"
    made = {}
    for name, role, extra in (("admin", "admin", {}), ("sub", "submit", {}),
                              ("other", "submit", {}), ("worker", "worker", {}),
                              ("trusted", "worker", {"trusted": True}),
                              ("narrow", "worker", {"queues": ("gpu",)})):
        made[name] = tokens.add(path, role, name, **extra)[1]
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "queue": queue, "tokens_file": str(path),
        "input_roots": (str(BXD),), "trusted_proxies": 1}})
    return app.test_client(), made


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _claimed(client, made: dict[str, str], token: str, body: dict) -> str:
    """Submit a cacheable map job and claim its item with `token` as a pull worker;
    the lease (the item's task id)."""
    assert client.post("/jobs", headers=_as(made["admin"]), json=body).status_code == 202
    answer = client.post("/api/v1/worker/claim", headers=_as(token),
                         json={"worker": "w", "wait": 5}).get_json()
    return answer["pieces"][0]["lease"]


def _forge(client, made: dict[str, str], token: str, body: dict) -> str:
    """... and report made-up outputs for it."""
    lease = _claimed(client, made, token, body)
    forged = b'{"forged": true}\n'
    sha = hashlib.sha256(forged).hexdigest()
    done = client.post("/api/v1/worker/finish", headers=_as(token), json={
        "worker": "w", "lease": lease, "exit_code": 0, "files": {"results.jsonl": sha},
        "blobs": {sha: base64.b64encode(forged).decode()}}).get_json()
    assert done["recorded"] and done["status"] == "success", done
    return lease


@pytest.mark.parametrize("worker,reused", [("worker", False), ("trusted", True)])
def test_an_untrusted_workers_outputs_are_not_reused_by_another_job(roles, conn, worker,
                                                                   reused):
    """Review 2, med: a pull worker reported exit 0 with a forged output, and every
    identical job of every user reused it. Now only a --trusted worker's outputs enter
    the shared cache."""
    from sheepdog import store

    client, made = roles
    body = {"workflow": "map", "command": ["echo", "{}"], "items": ["a"], "cache": True}
    task_id = _forge(client, made, made[worker], body)
    again = client.post("/jobs", headers=_as(made["admin"]), json=body).get_json()
    task = store.get_task(conn, task_id)
    assert task is not None
    assert task_id in store.job_task_ids(conn, again["id"])
    if reused:
        assert task.status == "success" and not task.untrusted
    else:
        assert task.status == "queued" and not task.untrusted  # computed again


def test_a_worker_token_takes_only_its_queues(roles):
    client, made = roles
    r = client.post("/api/v1/worker/claim", headers=_as(made["narrow"]),
                    json={"worker": "n", "queues": ["default"], "wait": 0})
    assert r.status_code == 403 and r.get_json()["field"] == "queues"
    r = client.post("/api/v1/worker/renew", headers=_as(made["narrow"]),
                    json={"worker": "n", "queues": ["cpu"], "leases": []})
    assert r.status_code == 403
    r = client.post("/api/v1/worker/claim", headers=_as(made["narrow"]),
                    json={"worker": "n", "wait": 0})  # its own queue by default
    assert r.status_code == 200 and r.get_json()["pieces"] == []


def test_the_four_500s_of_review_2_are_4xx(roles):
    client, made = roles
    w = _as(made["worker"])
    cases = [
        client.post("/api/v1/worker/claim", headers=w, data="[" * 100_000 + "]" * 100_000,
                    content_type="application/json"),
        client.post("/api/v1/worker/renew", headers=w,
                    json={"worker": "w", "queues": [], "leases": []}),
        client.get("/precompute/none/hits?limit=²", headers=_as(made["admin"])),
    ]
    for r in cases:
        assert r.status_code < 500, (r.status_code, r.get_data(as_text=True)[:300])
    assert cases[1].status_code == 200  # no queues: the service's own
    from sheepdog.errors import FieldError
    from sheepdog.pullwork import _clean_files

    sha = "a" * 64
    with pytest.raises(FieldError, match="both as a file and as a folder"):
        _clean_files({"a": sha, "a/b": sha})


def test_a_cookie_alone_changes_nothing_from_another_page(roles):
    """Review 2, low: a POST with only the cookie and Content-Type text/plain was
    accepted (SameSite=Strict stops other sites, not sibling subdomains)."""
    client, made = roles
    r = client.get(f"/?token={made['admin']}", headers={"X-Forwarded-Proto": "https"})
    assert r.status_code == 303
    cookie = r.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie  # behind a proxy that says https
    body = '{"workflow": "command", "command": ["true"]}'
    cross = client.post("/jobs", data=body, content_type="text/plain")
    assert cross.status_code == 403 and "Origin" in cross.get_json()["error"]
    sibling = client.post("/jobs", data=body, content_type="application/json",
                          headers={"Origin": "https://evil.genenetwork.org"})
    assert sibling.status_code == 403
    gone = client.delete("/jobs/20261202-000000-0123456789")
    assert gone.status_code == 403
    own = client.post("/jobs", data=body, content_type="application/json",
                      headers={"Origin": "http://localhost"})
    assert own.status_code == 202, own.get_json()
    header = client.post("/jobs", data=body, content_type="application/json",
                         headers=_as(made["admin"]))
    assert header.status_code == 202  # a token sent on purpose is no forgery


def test_a_precompute_dataset_belongs_to_the_token_that_made_it(roles):
    client, made = roles
    example = Path(__file__).resolve().parents[1] / "sheepdog" / "examples" / "bxd"
    body = {"workflow": "gemma-precompute", "name": "mine",
            "inputs": {"geno": "BXD.geno.gz", "pheno": "BXD_traits.tsv"},
            "params": {"sample": 2}}

    def post(token: str):
        files = {"geno": (io.BytesIO((example / "BXD.geno.gz").read_bytes()), "BXD.geno.gz"),
                 "pheno": (io.BytesIO((example / "BXD_traits.tsv").read_bytes()),
                           "BXD_traits.tsv")}
        return client.post("/jobs", headers=_as(token), content_type="multipart/form-data",
                           data={"job": json.dumps(body), **files})

    first = post(made["sub"])
    assert first.status_code == 202, first.get_json()
    assert post(made["sub"]).status_code == 202  # its owner may add to it
    other = post(made["other"])
    assert other.status_code == 403 and other.get_json()["field"] == "name"


def test_an_upload_is_bounded_and_its_partial_file_goes_with_the_piece(roles, home):
    """Review 2, med: `Upload-Length: 10^12` was accepted, and a partial upload stayed
    in store/tmp after its piece ended."""
    client, made = roles
    body = {"workflow": "map", "command": ["echo", "{}"], "items": ["u"], "cache": True}
    lease = _claimed(client, made, made["worker"], body)
    url = f"/api/v1/worker/uploads/{'c' * 64}?worker=w&lease={lease}"
    worker = _as(made["worker"])
    huge = client.put(url, headers={**worker, "Upload-Length": str(10**12)}, data=b"x")
    assert huge.status_code == 413 and huge.get_json()["field"] == "Upload-Length"
    half = client.put(url, headers={**worker, "Upload-Length": "10"}, data=b"12345")
    assert half.status_code == 202 and half.get_json()["offset"] == 5
    partial = list((home / "store" / "tmp").glob(f"up.{lease[:16]}.*"))
    assert len(partial) == 1
    done = client.post("/api/v1/worker/finish", headers=worker, json={
        "worker": "w", "lease": lease, "exit_code": 1, "error": "gave up"})
    assert done.status_code == 200
    assert not partial[0].exists()


def test_gemma_flags_pass_by_allow_list_only():
    """Review 2, low: `gemma_flags` was a block list; `-snps FILE` and `-mk FILE` opened
    server paths."""
    from sheepdog.errors import ConfigError
    from sheepdog.gemma.commands import check_gemma_flags
    from sheepdog.gemma.scan.build import SCAN_PARAMS

    assert check_gemma_flags(["-miss", "0.1", "-no-check", "-r2", "0.99"]) == [
        "-miss", "0.1", "-no-check", "-r2", "0.99"]
    for flags, said in ((["-snps", "/etc/passwd"], "not among the flags"),
                        (["-mk", "/etc/shadow"], "not among the flags"),
                        (["-miss", "/etc/passwd"], "takes a number"),
                        (["-miss"], "takes a number"),
                        (["-maf", "0.1"], "use --maf (params.maf over HTTP)"),
                        (["-o", "x"], "sheepdog names the outputs")):
        with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace(")", r"\)")):
            check_gemma_flags(flags, SCAN_PARAMS.gemma_advice())


def test_a_wrong_token_does_the_same_work_for_a_known_and_an_unknown_job(client, monkeypatch):
    """Review 2, low: a wrong token on a known job id answered in 3.9 ms, on an unknown
    one in 3.0 (the known one read the whole job). Now both read one field and compare
    the token against something: the same work, whichever the id."""
    from sheepdog import store, tokens

    job = client.post("/jobs", headers=AUTH, json={"workflow": "command",
                                                    "command": ["true"]}).get_json()
    work: list[tuple[str, ...]] = []
    read, same = store.job_read_token, tokens.same
    monkeypatch.setattr(store, "job_read_token",
                        lambda conn, jid: work.append(("read",)) or read(conn, jid))
    monkeypatch.setattr(tokens, "same", lambda a, b: work.append(("compare", str(len(b))))
                        or same(a, b))
    monkeypatch.setattr(store, "get_job", lambda *a: pytest.fail("the whole job was read"))
    rounds = []
    for job_id in (job["id"], "20261202-000000-0123456789"):
        work.clear()
        r = client.get(f"/jobs/{job_id}?token=wrong-but-long-enough-to-compare")
        assert r.status_code == 401
        rounds.append([w for w in work if w[0] != "compare" or w[1] != "64"])
    assert rounds[0] == rounds[1] and ("read",) in rounds[0], rounds


def test_a_line_length_error_names_the_field_not_the_upload_folder(client, home):
    from sheepdog.gemma.formats.bimbam import MAX_INPUT_LINE

    long_line = b"BXD1," + b"1" * (MAX_INPUT_LINE + 10) + b"\n"
    job = {"workflow": "gemma-loco", "inputs": {"geno": "g.txt", "pheno": "p.txt",
                                                "anno": "a.txt"}}
    r = client.post("/jobs", headers=AUTH, content_type="multipart/form-data", data={
        "job": json.dumps(job), "geno": (io.BytesIO(long_line), "g.txt"),
        "pheno": (io.BytesIO(b"1\n"), "p.txt"), "anno": (io.BytesIO(b"rs1 1 1\n"), "a.txt")})
    text = r.get_data(as_text=True)
    assert r.status_code == 400 and "longer than" in text, text[:300]
    assert str(home) not in text and "upload" not in text.lower(), text[:300]


def test_a_browser_without_a_token_gets_a_page_that_says_how_to_open_the_service(client):
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    r = client.get("/", headers=browser)
    text = r.get_data(as_text=True)
    assert r.status_code == 401 and r.mimetype == "text/html"
    assert "sheepdog tokens add" in text and 'name="token"' in text and TOKEN not in text
    wrong = client.get("/?token=nope", headers=browser)
    assert wrong.status_code == 401 and "does not open" in wrong.get_data(as_text=True)
    assert client.get("/", headers={"Accept": "*/*"}).get_json()["status"] == 401  # curl


def test_a_finished_jobs_page_says_its_state_without_its_script(client, conn, settings):
    from sheepdog import jobs, store

    job, tasks = jobs.command_job(["true"], settings)
    jobs.submit(conn, settings, job, tasks)
    task = tasks[0]
    assert store.claim(conn, task.id, "w", 5) is not None
    store.finish(conn, task.id, "w", 0)
    page = client.get(f"/jobs/{job.id}/page", headers=AUTH).get_data(as_text=True)
    assert "100.0% (1/1 pieces)" in page and f"job {job.id} success" in page
