"""`sheepdog run gemma` (no LOCO: one kinship of all SNPs) on real BXD data with real
GEMMA: equal to GEMMA's own serial `-gk 1` then `-lmm 9`, SNP by SNP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BXD, sheepdog, wait_for
from gemma_reference import ANNO, COVARIATES, GENO, PHENO, full_scan, read_assoc

from web import create_app

AUTH = {"Authorization": "Bearer t"}


def finished(client, job_id, timeout=120):
    def done():
        body = client.get(f"/jobs/{job_id}", headers=AUTH).get_json()
        return body if body["status"] in ("success", "error", "cancelled") else None
    return wait_for(done, timeout, every=0.1, what=f"job {job_id} to end")


@pytest.mark.parametrize("covariates", [False, True], ids=["plain", "covariates"])
def test_every_column_equals_gemmas_own_serial_full_genome_scan(env, tmp_path, covariates):
    extra = ["-c", str(COVARIATES)] if covariates else []
    r = sheepdog("run", "gemma", "-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO),
                 "--out", str(tmp_path / "out"), *extra, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = read_assoc(tmp_path / "out" / "assoc.txt")
    theirs = full_scan(tmp_path, covariates=COVARIATES if covariates else None)
    assert set(ours) == set(theirs) and len(ours) > 7300
    for rs, row in theirs.items():
        assert ours[rs] == row, (rs, ours[rs], row)  # every printed digit of every column
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["workflow"] == "gemma" and result["options"]["loco"] is False
    # one LMM piece, which keeps GEMMA's files, not its joined copy of the genotypes
    assert [f[0] for f in result["files"]] == [None]
    lmm = Path(result["files"][0][1]).parent.parent
    kept = {str(f.relative_to(lmm)) for f in lmm.rglob("*") if f.is_file()}
    assert kept == {"output/lmm.assoc.txt", "output/lmm.log.txt"}


def test_it_shares_the_kinship_pieces_with_loco_and_runs_from_rest(env, tmp_path, conn,
                                                                   redis_server, home, queue,
                                                                   workers):
    """The per-chromosome kinships are the same pieces as gemma-loco's (cached); the
    LMM pieces are its own. POST /jobs takes the workflow as the CLI does."""
    loco = sheepdog("run", "gemma-loco", "--example", "--json", env=env, timeout=300)
    assert loco.returncode == 0, loco.stderr[-2000:]
    full = sheepdog("run", "gemma", "--example", "--json", env=env, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    ids = [{p["name"]: p["id"] for p in json.loads(r.stdout)["pieces"]} for r in (loco, full)]
    kinships = [n for n in ids[0] if n.startswith("kinship chr")]
    assert len(kinships) == 20 and all(ids[0][n] == ids[1][n] for n in kinships)
    # one LMM of every SNP (GEMMA's batches of them: see _lmm_task), none per chromosome
    assert [n for n in ids[1] if n.startswith("lmm")] == ["lmm all SNPs"]
    assert ids[1]["lmm all SNPs"] not in ids[0].values() and len(ids[1]) == 20 + 2
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": ("t",), "queue": queue,
        "input_roots": (str(BXD),)}})
    client = app.test_client()
    r = client.post("/jobs", headers=AUTH, json={
        "workflow": "gemma", "inputs": {"geno": str(GENO), "pheno": str(PHENO),
                                        "anno": str(ANNO)}, "params": {"force": False}})
    assert r.status_code == 202, r.get_json()
    workers.start("-j", "2")
    job = finished(client, r.get_json()["id"])
    assert job["status"] == "success" and job["workflow"] == "gemma", job
    result = client.get(f"/jobs/{job['id']}/result", headers=AUTH).get_json()
    assert result["counts"]["analysed_snps"] == 7320


def test_gemmas_nan_is_missing_in_every_reader_and_never_a_hit(env, tmp_path):
    """GEMMA prints `p_lrt nan` for some BXD SNPs in the plain scan (two or three: which
    depends on the BLAS kernel): the merged file keeps GEMMA's lines, and every reader (top
    hits, permutation minimum, precompute, plot, LMDB hits, the wrapper's record) takes
    them as missing, never as p = 0."""
    import math

    from sheepdog.gemma.commands import p_value
    from sheepdog.gemma.precompute import steps as pcsteps
    from sheepdog.gemma.scan import lmdbout, merge, plot

    out = tmp_path / "out"
    r = sheepdog("run", "gemma", "--example", "--out", str(out), "--lmdb",
                 str(tmp_path / "scan.mdb"), env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_assoc(out / "assoc.txt")
    nan = {rs for rs, row in rows.items() if row["p_lrt"] in ("nan", "-nan")}
    theirs = full_scan(tmp_path)  # GEMMA's own output, on the BLAS this machine has
    assert nan == {rs for rs, row in theirs.items() if row["p_lrt"] in ("nan", "-nan")}
    assert {"rs29680149", "rs33754543"} <= nan
    finite = {rs: float(row["p_lrt"]) for rs, row in rows.items() if rs not in nan}
    best = min(finite, key=finite.__getitem__)
    result = json.loads((out / "result.json").read_text())
    assert result["top_hits"][0]["rs"] == best
    assert not nan & {h["rs"] for h in result["top_hits"]}
    assert merge.read_min_p(out / "assoc.txt")[2] == best
    assert merge.read_min_p(out / "assoc.txt", "gemma-wrapper")[2] == best
    precompute = pcsteps._read_assoc(out / "assoc.txt", "p_lrt")
    assert not nan & set(precompute) and len(precompute) == len(finite)
    _, by_chrom = plot._read(out / "assoc.txt")
    heights = [y for _, ys in by_chrom.values() for y in ys]
    assert len(heights) == len(finite) and max(heights) < 10
    meta, records = lmdbout.read(tmp_path / "scan.mdb")
    assert len(records) == len(rows)
    assert sum(math.isnan(v[-1]) for v in records.values()) == len(nan)
    assert not nan & {h[2] for h in meta["hits"]}
    for text in ("nan", "-nan", "inf", "-inf", "NaN", "x"):
        assert p_value(text) is None, text
    assert p_value("0") == 0.0 and p_value("1.5e-300") == 1.5e-300


def test_a_parameter_declared_once_reaches_help_openapi_requests_and_the_record(
        monkeypatch, redis_server, home, queue):
    """Adding a parameter to a workflow's declaration is the one edit: it is then an
    option in --help, in the OpenAPI document with its bounds, accepted in a POST /jobs
    body (and kept in the job's record), and refused out of bounds naming the field."""
    import click.testing
    import yaml

    from sheepdog import clirun, workflows
    from sheepdog.config import Settings
    from sheepdog.errors import FieldError
    from sheepdog.params import Param
    from web import prepare

    workflow = workflows.get("gemma-loco")
    window = Param("window", int, 3, "Markers on either side of a peak.", minimum=1,
                   maximum=10)
    monkeypatch.setattr(workflow, "params", workflow.params.plus(window))  # the one edit
    shown = click.testing.CliRunner().invoke(workflow.command(clirun), ["--help"])
    assert "--window" in shown.output and "Markers on either side" in shown.output
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": ("t",), "queue": queue}})
    spec = yaml.safe_load(app.test_client().get("/openapi.yaml").get_data(as_text=True))
    found = [s for s in _schemas(spec) if "window" in s.get("properties", {})]
    assert found and found[0]["properties"]["window"] == {
        "type": "integer", "description": "Markers on either side of a peak.", "default": 3,
        "minimum": 1, "maximum": 10}
    settings = Settings(redis_url=redis_server.url, home=home, queue=queue,
                        input_roots=(str(GENO.parent),))
    body = {"workflow": "gemma-loco", "inputs": {"geno": str(GENO), "pheno": str(PHENO),
                                                 "anno": str(ANNO)}, "params": {"window": 5}}
    job, _ = prepare.build("gemma-loco", body, {}, None, settings)  # POST /jobs' own path
    assert job.params["options"]["window"] == 5
    with pytest.raises(FieldError) as refused:
        prepare.build("gemma-loco", {**body, "params": {"window": 11}}, {}, None, settings)
    assert (refused.value.field, refused.value.problem) == ("params.window",
                                                           "must be at most 10")
    assert "window" not in json.dumps(workflows.get("gemma-permute").schema())  # its own


def _schemas(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _schemas(value)
