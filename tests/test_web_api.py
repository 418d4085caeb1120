"""The REST API (web/), through Flask's test client, on a real Redis with real workers."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path

import pytest
from conftest import BXD, wait_for
from web_helpers import SPEC, conforms

from sheepdog import keys
from web import create_app

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def client(redis_server, home, conn, queue):
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": (TOKEN,), "queue": queue,
        "input_roots": (str(BXD),), "cors_origins": ("https://genenetwork.org",),
        "upload_limit_mb": 1}})
    return app.test_client()


def _finished(client, job_id, timeout=120):
    def done():
        body = client.get(f"/jobs/{job_id}", headers=AUTH).get_json()
        return body if body["status"] in ("success", "error", "cancelled") else None
    return wait_for(done, timeout, every=0.1, what=f"job {job_id} to end")


def test_health_is_public_and_everything_else_needs_a_token(client):
    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.get("/openapi.yaml").status_code == 200
    for method, path in (("get", "/jobs"), ("post", "/jobs"), ("get", "/jobs/x"),
                         ("delete", "/jobs/x"), ("get", "/api/gemma/status/x"),
                         ("get", "/"), ("get", "/jobs/x/page")):
        r = getattr(client, method)(path)
        assert r.status_code == 401, (method, path)
        conforms(r.get_json(), "Error")
    r = client.get("/jobs", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_a_command_job_is_accepted_at_once_then_runs(client, workers):
    r = client.post("/jobs", json={"workflow": "command",
                                   "command": ["sh", "-c", "echo one; echo two >&2"]},
                    headers=AUTH)
    assert r.status_code == 202
    created = r.get_json()
    conforms(created, "JobCreated")
    assert created["status"] == "queued"
    workers.start()
    job = _finished(client, created["id"])
    conforms(job, "Job")
    assert (job["status"], job["exit_code"]) == ("success", 0)
    assert job["progress"]["done"] == job["progress"]["total"] == 1
    page = client.get(f"/jobs/{created['id']}/log", headers=AUTH).get_json()
    conforms(page, "LogPage")
    texts = [(ln["stream"], ln["text"]) for ln in page["lines"]]
    assert ("stdout", "one") in texts and ("stderr", "two") in texts and page["ended"]
    # resumable: after the first line, exactly the rest
    first = page["lines"][0]["id"]
    rest = client.get(f"/jobs/{created['id']}/log?after={first}", headers=AUTH).get_json()
    assert [ln["id"] for ln in rest["lines"]] == [ln["id"] for ln in page["lines"][1:]]
    listing = client.get("/jobs?limit=1", headers=AUTH).get_json()
    conforms(listing, "JobList")
    assert listing["jobs"][0]["id"] == created["id"] and listing["total"] == 1
    assert client.get(f"/jobs/{created['id']}/result", headers=AUTH).get_json()["exit_code"] == 0


def test_a_jobs_links_are_the_routes_own_urls_behind_a_prefix_and_over_https(client):
    """The links a POST /jobs answer carries (built from one url_for) are exactly what
    each route's url_for gives, with the app mounted under a prefix and reached over
    HTTPS too (the stream then wss://); each one is a route (a result: not yet)."""
    from flask import url_for

    from sheepdog.models import Job
    from web.api import urls

    app = client.application
    # each base twice (the second time from what the first one worked out), and an id
    # a URL must quote
    for base in ("http://localhost/", "https://gn.example.org/gn/") * 2:
        for job_id in ("a job/1", "20261206-000000-abc"):
            with app.test_request_context("/", base_url=base):
                job = Job(id=job_id, workflow="command", read_token="t-_0k3n")
                want = {"job": url_for("api.get_job", job_id=job.id),
                        "log": url_for("api.get_log", job_id=job.id),
                        "result": url_for("api.get_result", job_id=job.id),
                        "stream": url_for("job_stream", job_id=job.id, _external=True),
                        "page": url_for("pages.job_page", job_id=job.id,
                                        token=job.read_token)}
                assert urls(job) == want, (base, job_id)
    assert want["stream"] == "wss://gn.example.org/gn/jobs/20261206-000000-abc/stream"
    created = client.post("/jobs", json={"workflow": "command", "command": ["true"]},
                          headers=AUTH).get_json()
    for name in ("job", "log"):
        assert client.get(created["urls"][name], headers=AUTH).status_code == 200, name
    assert client.get(created["urls"]["result"], headers=AUTH).status_code == 409  # not yet
    assert client.get(created["urls"]["page"]).status_code == 200


def test_gemma_loco_from_server_paths_gives_results(client, workers):
    r = client.post("/jobs", headers=AUTH, json={
        "workflow": "gemma-loco",
        "inputs": {"geno": str(BXD / "BXD_geno.txt.gz"), "pheno": str(BXD / "BXD_pheno.txt"),
                   "anno": str(BXD / "BXD_snps.txt")}, "params": {"maf": 0.1}})
    assert r.status_code == 202, r.get_json()
    workers.start("-j", "2")
    job = _finished(client, r.get_json()["id"])
    assert job["status"] == "success", job
    assert any(p["name"] == "lmm chr X" for p in job["pieces"])
    result = client.get(f"/jobs/{job['id']}/result", headers=AUTH).get_json()
    assert result["counts"]["analysed_snps"] == 7320 and result["top_hits"]
    png = client.get(result["urls"]["manhattan.png"], headers=AUTH)
    assert png.status_code == 200 and png.data[:8] == b"\x89PNG\r\n\x1a\n"
    assoc = client.get(result["urls"]["assoc.txt"], headers=AUTH)
    assert assoc.data.splitlines()[0].startswith(b"chr\trs\tps")
    missing = client.get(f"/jobs/{job['id']}/result/permutations.json", headers=AUTH)
    assert missing.status_code == 404 and missing.get_json()["field"] == "name"


def _bxd_file(name):
    return (io.BytesIO((BXD / name).read_bytes()), name)


def test_uploaded_inputs_run_and_names_cannot_escape(client, workers, home):
    data = {"job": json.dumps({"workflow": "gemma-loco"}),
            "geno": (io.BytesIO((BXD / "BXD_geno.txt.gz").read_bytes()), "../../escape.gz"),
            "pheno": _bxd_file("BXD_pheno.txt"), "anno": _bxd_file("BXD_snps.txt")}
    r = client.post("/jobs", headers=AUTH, data=data, content_type="multipart/form-data")
    assert r.status_code == 202, r.get_json()
    saved = list((home / "uploads").rglob("*"))
    assert all(p.resolve().is_relative_to((home / "uploads").resolve()) for p in saved)
    assert not (home.parent / "escape.gz").exists()
    workers.start("-j", "2")
    assert _finished(client, r.get_json()["id"])["status"] == "success"


def test_a_tar_gz_bundle_works_and_members_cannot_escape(client, workers):
    def bundle(members):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, source in members.items():
                blob = (BXD / source).read_bytes()
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        buf.seek(0)
        return buf

    good = bundle({"g.txt.gz": "BXD_geno.txt.gz", "p.txt": "BXD_pheno.txt",
                   "a.txt": "BXD_snps.txt"})
    job = {"workflow": "gemma-loco", "inputs": {"geno": "g.txt.gz", "pheno": "p.txt",
                                                "anno": "a.txt"}}
    r = client.post("/jobs", headers=AUTH, content_type="multipart/form-data",
                    data={"job": json.dumps(job), "bundle": (good, "meta.tar.gz")})
    assert r.status_code == 202, r.get_json()
    evil = bundle({"../evil.txt": "BXD_pheno.txt"})
    r = client.post("/jobs", headers=AUTH, content_type="multipart/form-data",
                    data={"job": json.dumps(job), "bundle": (evil, "evil.tar.gz")})
    assert r.status_code == 400 and r.get_json()["field"] == "bundle"


@pytest.mark.parametrize("body,field", [
    ({"workflow": "bogus"}, "workflow"),
    ({"workflow": "cwl"}, "inputs.process"),
    ({"workflow": "cwl", "inputs": {"process": str(BXD / "BXD_pheno.txt")}},
     "inputs.process"),  # not CWL: cwltool's words
    ({"workflow": "cwl", "inputs": {"process": str(BXD / "BXD_pheno.txt")},
      "job_order": [1]}, "job_order"),
    ({"workflow": "command", "command": "echo hi"}, "command"),
    ({"workflow": "command", "command": []}, "command"),
    ({"workflow": "gemma-loco", "inputs": {"geno": str(BXD / "BXD_geno.txt.gz")}},
     "inputs.pheno"),
    ({"workflow": "gemma-loco", "inputs": {"geno": "/etc/passwd", "pheno": "x", "anno": "y"}},
     "inputs.geno"),
    ({"workflow": "gemma-loco", "inputs": {"geno": str(BXD / "../../../etc/passwd"),
                                           "pheno": "x", "anno": "y"}}, "inputs.geno"),
    ({"workflow": "gemma-loco", "inputs": {}, "params": {"maf": "lots"}}, "params.maf"),
    ({"workflow": "gemma-loco", "inputs": {}, "params": {"speed": 11}}, "params.speed"),
    ({"workflow": "gemma-loco", "inputs": {"geno": str(BXD / "BXD_pheno.txt"),
                                           "pheno": str(BXD / "BXD_pheno.txt"),
                                           "anno": str(BXD / "BXD_snps.txt")}}, "inputs.geno"),
])
def test_bad_requests_get_4xx_json_naming_the_field(client, body, field):
    r = client.post("/jobs", json=body, headers=AUTH)
    assert r.status_code == 400, r.get_json()
    conforms(r.get_json(), "Error")
    assert r.get_json()["field"] == field


def test_malformed_json_and_unknown_ids(client):
    r = client.post("/jobs", data="{not json", headers={**AUTH, "Content-Type":
                                                        "application/json"})
    assert r.status_code == 400 and r.get_json()["field"] == "body"
    for path in ("/jobs/nope", "/jobs/nope/log", "/jobs/nope/result"):
        r = client.get(path, headers=AUTH)
        assert r.status_code == 404 and "unknown job id" in r.get_json()["error"]
    assert client.delete("/jobs/nope", headers=AUTH).status_code == 404


def test_an_upload_over_the_limit_is_413(client):
    big = io.BytesIO(b"0" * (2 * 1024 * 1024))
    r = client.post("/jobs", headers=AUTH, content_type="multipart/form-data",
                    data={"job": json.dumps({"workflow": "gemma-loco"}), "geno": (big, "g")})
    assert r.status_code == 413 and r.get_json()["status"] == 413


def test_delete_cancels_a_queued_job(client, conn):
    conn.sadd(keys.queues_served(), "nobody")  # a worker served it once; none does now
    created = client.post("/jobs", json={"workflow": "command", "command": ["sleep", "5"],
                                         "queue": "nobody"}, headers=AUTH).get_json()
    r = client.delete(f"/jobs/{created['id']}", headers=AUTH)
    conforms(r.get_json(), "Cancelled")
    assert r.get_json() == {"id": created["id"], "status": "cancelled", "cancelled": True}


def test_gn3_endpoints_answer_in_gn3_shapes(client, conn, workers):
    created = client.post("/jobs", json={"workflow": "command", "command": ["echo", "gn3"]},
                          headers=AUTH).get_json()
    status = client.get(f"/api/gemma/status/{created['id']}", headers=AUTH)
    conforms(status.get_json(), "Gn3Status")
    workers.start()
    _finished(client, created["id"])
    state = client.get(f"/api/async_commands/state/{created['id']}", headers=AUTH).get_json()
    conforms(state, "Gn3State")
    assert state["status"] == "success" and state["result"] == "gn3\n"
    conn.hset("cmd::2026-x", mapping={"cmd": '["true"]', "status": "queued", "result": ""})
    legacy = client.get("/api/async_commands/state/cmd::2026-x", headers=AUTH).get_json()
    assert legacy == {"cmd": '["true"]', "status": "queued", "result": ""}
    r = client.get("/api/gemma/status/nope", headers=AUTH)
    assert r.status_code == 500  # GN3's own answer to an unknown id
    conforms(r.get_json(), "Gn3UnknownId")
    r = client.get("/api/async_commands/state/cmd::nope", headers=AUTH)
    assert r.status_code == 404
    conforms(r.get_json(), "Gn3Error")


def test_a_read_token_opens_its_own_job_only(client, conn):
    conn.sadd(keys.queues_served(), "q1")  # a worker served it once; none does now
    a = client.post("/jobs", json={"workflow": "command", "command": ["true"],
                                   "queue": "q1"}, headers=AUTH).get_json()
    b = client.post("/jobs", json={"workflow": "command", "command": ["true"],
                                   "queue": "q1"}, headers=AUTH).get_json()
    read = a["read_token"]
    assert client.get(f"/jobs/{a['id']}?token={read}").status_code == 200
    assert client.get(f"/jobs/{a['id']}/page?token={read}").status_code == 200
    assert client.get(f"/jobs/{b['id']}?token={read}").status_code == 401
    assert client.get(f"/jobs?token={read}").status_code == 401
    assert client.delete(f"/jobs/{a['id']}?token={read}").status_code == 401
    assert client.post(f"/jobs?token={read}", json={}).status_code == 401


def test_cors_answers_configured_origins_only(client):
    r = client.get("/health", headers={"Origin": "https://genenetwork.org"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://genenetwork.org"
    r = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_the_spec_lists_every_route(client):
    documented = set(SPEC["paths"])
    # Flask's <name> and <converter:name> are OpenAPI's {name}
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(rule))
              for rule in client.application.url_map.iter_rules()
              if not str(rule).startswith("/static")}
    assert routes - {"/", "/jobs/{job_id}/page", "/openapi.yaml", "/favicon.ico"} <= documented
    time.sleep(0)


def test_force_in_a_request_recomputes_as_the_cli_does(client, workers):
    """`"force": true` forgets the job's pieces before they are dispatched: nothing of the
    second, identical job comes from the cache."""
    body = {"workflow": "gemma-loco",
            "inputs": {"geno": str(BXD / "BXD_geno.txt.gz"), "pheno": str(BXD / "BXD_pheno.txt"),
                       "anno": str(BXD / "BXD_snps.txt")}}
    workers.start("-j", "2")
    first = client.post("/jobs", headers=AUTH, json=body).get_json()
    assert _finished(client, first["id"])["status"] == "success"
    again = client.post("/jobs", headers=AUTH, json=body).get_json()
    assert _finished(client, again["id"])["progress"]["cached"] == 41  # all of it cached
    forced = client.post("/jobs", headers=AUTH, json={**body, "params": {"force": True}})
    assert forced.status_code == 202, forced.get_json()
    job = _finished(client, forced.get_json()["id"])
    assert job["status"] == "success" and job["progress"]["cached"] == 0, job["progress"]


def test_metrics_for_prometheus(client, conn, queue):
    assert client.get("/metrics").status_code == 401  # a read token, as any view
    client.post("/jobs", headers=AUTH, json={"workflow": "command", "command": ["true"]})
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.mimetype == "text/plain"
    values = {line.split()[0]: float(line.split()[1]) for line in r.get_data(as_text=True)
              .splitlines() if line and not line.startswith("#")}
    assert values["sheepdog_jobs"] == 1 and values["sheepdog_pieces_active"] == 1
    assert values[f'sheepdog_queue_waiting{{queue="{queue}"}}'] == 1
    assert values["sheepdog_redis_ping_seconds"] < 5 and "sheepdog_workers" in values


def test_an_unknown_top_level_field_is_refused_naming_it(client):
    r = client.post("/jobs", headers=AUTH, json={"workflow": "command", "command": ["true"],
                                                 "bogus": 1})
    assert r.status_code == 400 and r.get_json()["field"] == "bogus"
    r = client.post("/jobs", headers=AUTH, json={"command": ["true"]})
    assert r.status_code == 400 and r.get_json()["field"] == "workflow"
    assert "None" not in r.get_json()["error"] and "missing" in r.get_json()["error"]


def test_a_cwl_run_whose_runner_holds_the_only_slot_still_runs(client, workers):
    """POST /jobs cwl with the tool in an uploaded bundle and the input object inline
    (its paths relative to the tool): a worker of one slot takes the runner piece, the
    runner sees no slot left for the invocation and starts a worker of its own; the
    output file comes from its result URL."""
    example = Path(__file__).resolve().parent.parent / "examples" / "cwl"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("wc-tool.cwl", "text2.txt"):
            tar.add(example / name, arcname=name)
    buf.seek(0)
    body = {"workflow": "cwl", "inputs": {"process": "wc-tool.cwl"},
            "job_order": {"text": {"class": "File", "path": "text2.txt"}}}
    workers.start("-j", "1")
    r = client.post("/jobs", headers=AUTH, content_type="multipart/form-data",
                    data={"job": json.dumps(body), "bundle": (buf, "wc.tar.gz")})
    assert r.status_code == 202, r.get_json()
    job = _finished(client, r.get_json()["id"])
    said = client.get(f"/jobs/{job['id']}/log", headers=AUTH).get_json()["lines"]
    assert job["status"] == "success", [line["text"] for line in said]
    assert [p["name"] for p in job["pieces"]] == ["cwl-runner", "wc-tool.cwl"]
    result = client.get(f"/jobs/{job['id']}/result", headers=AUTH).get_json()
    count = client.get(result["output"]["count"]["location"], headers=AUTH)
    assert count.status_code == 200 and int(count.data) == 6
    assert client.get(f"/jobs/{job['id']}/result/nothing.txt",
                      headers=AUTH).status_code == 404


def test_a_refused_cwl_request_keeps_nothing(client, home):
    """A document cwltool does not accept is a 400 in cwltool's words, naming the field,
    and nothing of the request stays in the service's home."""
    r = client.post("/jobs", headers=AUTH, json={
        "workflow": "cwl", "inputs": {"process": str(BXD / "BXD_pheno.txt")},
        "job_order": {"x": 1}})  # (an inline input object is written before the check)
    assert r.status_code == 400 and r.get_json()["field"] == "inputs.process"
    assert r.get_json()["error"].strip() != "inputs.process:"
    assert list((home / "jobs").glob("*")) == []
