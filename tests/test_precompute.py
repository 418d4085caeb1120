"""`sheepdog run gemma-precompute`: every trait of a dataset, exact, stored, served."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import BXD, free_port, sheepdog, wait_for
from gemma_reference import loco_scan
from gnformats import bimbam_rows, ids, write_geno

TOKEN = "pc-token"


def write_traits(path: Path, extra: dict[str, list[str]] | None = None,
                 change: str | None = None) -> Path:
    """liver (GEMMA's BXD phenotype, 67 strains), liver2 (the same, rescaled), full (all
    198 strains, a planted QTL), sparse (5 strains) and flat (constant): keyed by id."""
    liver = (BXD / "BXD_pheno.txt").read_text().split()
    rng = np.random.default_rng(5)
    qtl = np.array([float(g) for g in bimbam_rows()[3000][3:]])
    full = [f"{v:.5f}" for v in rng.normal(size=len(liver)) + 1.5 * qtl]
    columns = {
        "liver": liver,
        "liver2": ["NA" if v == "NA" else f"{float(v) * 2 + (1 if change else 0):.4f}"
                   for v in liver],
        "full": full,
        "sparse": [v if i < 5 else "NA" for i, v in enumerate(full)],
        "flat": ["2.5" if v != "NA" else "NA" for v in liver],
        **(extra or {}),
    }
    names = ids(len(liver))
    path.write_text("id\t" + "\t".join(columns) + "\n" + "".join(
        name + "\t" + "\t".join(col[i] for col in columns.values()) + "\n"
        for i, name in enumerate(names)))
    return path


def _run(env, tmp_path, traits, out, *extra):
    geno = tmp_path / "genotypes" / "BXD.geno"
    if not geno.exists():
        geno.parent.mkdir()
        write_geno(geno.parent)  # (with a traits.tsv of its own, unused here)
    return sheepdog("run", "gemma-precompute", "-g", str(geno), "-p", str(traits), "--out",
                    str(out), *extra, env=env, timeout=300)


def _show(env, out, trait, *extra):
    return sheepdog("precompute", "show", str(out), trait, "--json", *extra, env=env)


def test_every_trait_is_stored_exactly_as_serial_gemma_loco(env, tmp_path, gemma_loco_kinships):
    traits = write_traits(tmp_path / "traits.tsv")
    out = tmp_path / "bxd-liver"
    r = _run(env, tmp_path, traits, out, "--maf", "0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 of 5 traits; 3 to scan" in r.stderr
    work, kinships = gemma_loco_kinships
    for trait in ("liver", "full"):
        shown = _show(env, out, trait, "--vector")
        assert shown.returncode == 0, shown.stderr
        found = json.loads(shown.stdout)
        column = traits.read_text().splitlines()[0].split("\t").index(trait)
        pheno = work / f"{trait}.txt"  # BIMBAM order: the copies name column i BXD_{i+1}
        pheno.write_text("".join(line.split("\t")[column] + "\n"
                                 for line in traits.read_text().splitlines()[1:]))
        theirs = loco_scan(work, kinships, pheno=pheno, tag=f"pc{trait}")
        ours = {s["rs"]: s for s in found["snps"]}
        assert len(ours) == 7320 and set(theirs) <= set(ours)
        for rs, row in theirs.items():  # GEMMA's printed p, beta, se and af, every SNP
            assert ours[rs]["p"] == float(row["p_lrt"]), (trait, rs)
            assert ours[rs]["beta"] == pytest.approx(float(row["beta"]), rel=1e-6)
            assert ours[rs]["se"] == pytest.approx(float(row["se"]), rel=1e-6)
            assert ours[rs]["af"] == pytest.approx(float(row["af"]), rel=1e-6)
            logp = -np.log10(float(row["p_lrt"]))
            assert abs(ours[rs]["logp"]) == pytest.approx(logp, rel=1e-6)
            assert np.sign(ours[rs]["logp"]) == np.sign(float(row["beta"]))
        best = min(theirs.values(), key=lambda row: float(row["p_lrt"]))
        assert found["top"]["locus"] == best["rs"]
        assert found["metadata"]["gemma_version"] and found["metadata"]["guix"] == "none"
        assert found["metadata"]["inputs"]["geno"]["sha256"]
        assert all(p["logp"] >= 4 for p in found["peaks"])
    for trait, why in (("sparse", "only 5 measured individuals"), ("flat", "constant")):
        shown = _show(env, out, trait)
        assert shown.returncode == 1 and f"{trait}: skipped: {why}" in shown.stderr
    assert _show(env, out, "nope").returncode == 2
    hits = (out / "hits.tsv").read_text().splitlines()
    assert hits[0] == "trait\tlocus\tchr\tmb\tlogp\teffect\tn"
    assert sorted(h.split("\t")[0] for h in hits[1:]) == ["full", "liver", "liver2"]
    key = json.loads(_show(env, out, "liver").stdout)["key"]
    vector = np.load(out / "vectors" / f"{key}.npy")  # numpy alone reads the store
    assert vector.dtype.names == ("logp", "beta", "se", "af", "p", "l_mle")
    assert len(vector) == 7320
    assert np.load(out / "snps.npy")["rs"][0] == "rs31443144"
    with sqlite3.connect(out / "precompute.sqlite") as db:
        plan = db.execute("EXPLAIN QUERY PLAN SELECT trait FROM peaks WHERE chr = '4' "
                          "AND mb BETWEEN 120 AND 135").fetchall()
    assert "peaks_region" in str(plan)


def test_a_rerun_scans_only_the_changed_and_the_added_traits(env, tmp_path):
    out = tmp_path / "ds"
    first = _run(env, tmp_path, write_traits(tmp_path / "a.tsv"), out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {t: json.loads(_show(env, out, t).stdout)["key"] for t in ("liver", "full")}
    new = [f"{v:.3f}" for v in np.random.default_rng(9).normal(size=198)]
    second = _run(env, tmp_path, write_traits(tmp_path / "b.tsv", {"added": new}, "liver2"),
                  out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "6 of 6 traits; 2 to scan" in second.stderr
    scanned = sorted(line.split(":")[0].removeprefix("trait ")
                     for line in second.stdout.splitlines() + second.stderr.splitlines()
                     if line.startswith("trait ") and ": n " in line)
    assert scanned == ["added", "liver2"]
    assert {t: json.loads(_show(env, out, t).stdout)["key"] for t in before} == before
    assert len(list((out / "vectors").glob("*.npy"))) == 5  # liver2's old one kept apart


def test_sample_and_trait_lists_choose_and_bad_tables_stop_before_any_piece(env, tmp_path):
    traits = write_traits(tmp_path / "traits.tsv")
    runs = [_run(env, tmp_path, traits, tmp_path / f"s{i}", "--sample", "2", "--seed", "4",
                 "--traits", "liver,liver2,full") for i in (1, 2)]
    chosen = []
    for i, r in enumerate(runs, start=1):
        assert r.returncode == 0, r.stderr[-2000:]
        assert "2 of 5 traits" in r.stderr
        with sqlite3.connect(tmp_path / f"s{i}" / "precompute.sqlite") as db:
            chosen.append(sorted(x for (x,) in db.execute("SELECT id FROM traits")))
    assert chosen[0] == chosen[1] and len(chosen[0]) == 2
    assert "2 of 5 traits; 0 to scan" in runs[1].stderr  # the cache had both
    bad = _run(env, tmp_path, traits, tmp_path / "x", "--traits", "liver,kidney")
    assert bad.returncode == 2 and "--traits names 'kidney'" in bad.stderr
    traits.write_text(traits.read_text().replace("\tfull\t", "\tliver\t", 1))
    dup = _run(env, tmp_path, traits, tmp_path / "y")
    assert dup.returncode == 2
    assert f"{traits}, line 1: column 4: trait id 'liver' is also column 2" in dup.stderr
    assert not (tmp_path / "y").exists()


def test_gemma_refusing_a_trait_is_recorded_and_the_dataset_still_finishes(env, tmp_path):
    """GEMMA's own BXD covariates are singular over the measured strains: GEMMA stops."""
    traits = tmp_path / "t.tsv"
    liver = (BXD / "BXD_pheno.txt").read_text().split()
    traits.write_text("id\tliver\n" + "".join(f"s{i}\t{v}\n" for i, v in enumerate(liver)))
    r = sheepdog("run", "gemma-precompute", "-g", str(BXD / "BXD_geno.txt.gz"), "-a",
                 str(BXD / "BXD_snps.txt"), "-p", str(traits), "-c",
                 str(BXD / "BXD_covariates.txt"), "--out", str(tmp_path / "f"), env=env,
                 timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    shown = _show(env, tmp_path / "f", "liver")
    assert shown.returncode == 1 and "liver: failed: GEMMA failed on chromosome" in \
        shown.stderr, (r.stderr[-3000:], shown.stdout[-1500:])


# ------------------------------------------------------------------ served by key
@pytest.fixture()
def server(env, tmp_path):
    port = free_port()
    server_env = dict(env, SHEEPDOG_API_TOKENS=TOKEN, SHEEPDOG_INPUT_ROOTS=str(tmp_path))
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


def get(base, path, body=None, token=TOKEN):
    req = urllib.request.Request(f"{base}{path}", method="POST" if body else "GET",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return r.status, (json.loads(data) if r.headers.get_content_type() ==
                              "application/json" else data.decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_dataset_posted_to_the_service_is_served_by_trait_and_region(server, tmp_path,
                                                                       browser):
    (tmp_path / "genotypes").mkdir()
    geno, _ = write_geno(tmp_path / "genotypes")
    traits = write_traits(tmp_path / "traits.tsv")
    status, job = get(server, "/jobs", {"workflow": "gemma-precompute", "name": "bxd-liver",
                                        "inputs": {"geno": str(geno), "pheno": str(traits)}})
    assert status == 202, job
    wait_for(lambda: get(server, f"/jobs/{job['id']}")[1]["status"] == "success", 120,
             every=0.5, what="the precompute")
    status, listed = get(server, "/precompute")
    assert [d["name"] for d in listed["datasets"]] == ["bxd-liver"]
    assert listed["datasets"][0]["traits"] == {"done": 3, "skipped": 2}
    status, liver = get(server, "/precompute/bxd-liver/traits/liver")
    assert status == 200 and liver["top"]["locus"] and "snps" not in liver
    status, with_vector = get(server, "/precompute/bxd-liver/traits/liver?vector=1")
    assert len(with_vector["snps"]) == 7320
    assert set(with_vector["snps"][0]) == {"rs", "chr", "ps", "logp", "beta", "se", "af", "p",
                                           "l_mle"}
    assert get(server, "/precompute/bxd-liver/traits/nope") == (
        404, {"error": "no such trait 'nope' in bxd-liver", "field": "trait", "status": 404})
    status, skipped = get(server, "/precompute/bxd-liver/traits/flat")
    assert status == 409 and "skipped: constant" in skipped["error"]
    assert get(server, "/precompute/nothing")[0] == 404
    top = get(server, "/precompute/bxd-liver/traits/full")[1]["top"]  # its planted QTL
    assert top["logp"] > 4
    status, region = get(server, f"/precompute/bxd-liver/hits?chr={top['chr']}&start="
                                 f"{top['mb'] - 1}&end={top['mb'] + 1}&min=4")
    assert status == 200 and "full" in [h["trait"] for h in region["hits"]]
    assert all(h["chr"] == top["chr"] and h["logp"] >= 4 for h in region["hits"])
    status, bad = get(server, "/precompute/bxd-liver/hits?start=abc")
    assert status == 400 and bad["field"] == "start"
    assert get(server, "/precompute/bxd-liver/hits", token="wrong")[0] == 401
    status, svg = get(server, "/precompute/bxd-liver/map.svg")
    assert status == 200, svg
    assert svg.count("<a href=") == 3 and "/precompute/bxd-liver/manhattan/liver" in svg
    labels = [m for m in re.findall(r'text-anchor="middle">([^<]+)</text>', svg)
              if m not in ("chromosome", "-log10 p") and ":" not in m]
    assert labels == [*map(str, range(1, 20)), "X"]  # every chromosome, hits or not
    page = browser.new_page()
    page.goto(f"{server}/precompute/bxd-liver/page?token={TOKEN}")
    page.wait_for_selector("#map:not([hidden])", timeout=15_000)
    assert page.inner_text("#status") == "success"
    assert "3 done" in page.inner_text("#counts")
    page.wait_for_function("document.getElementById('map-svg').contentDocument && "
                           "document.getElementById('map-svg').contentDocument"
                           ".querySelectorAll('a').length === 3", timeout=15_000)
    link = page.evaluate("document.getElementById('map-svg').contentDocument"
                         ".querySelector('a').getAttribute('href')")
    page.goto(f"{server}{link}")
    assert page.locator("svg circle").count() > 7000  # that trait's Manhattan plot


@pytest.fixture()
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def test_precompute_commands_read_a_dataset_directory(env, tmp_path):
    out = tmp_path / "ds"
    assert _run(env, tmp_path, write_traits(tmp_path / "t.tsv"), out).returncode == 0
    hits = json.loads(sheepdog("precompute", "hits", str(out), "--min", "0", "--json",
                               env=env).stdout)
    assert hits["total"] >= 1 and hits["hits"] == sorted(hits["hits"],
                                                         key=lambda h: -h["logp"])
    (out / "hits.tsv").unlink()
    exported = sheepdog("precompute", "export", str(out), env=env)
    assert exported.returncode == 0 and "3 traits written" in exported.stdout
    assert len((out / "hits.tsv").read_text().splitlines()) == 4
    missing = sheepdog("precompute", "hits", str(tmp_path / "none"), env=env)
    assert missing.returncode == 2 and "holds no precomputed dataset" in missing.stderr


def test_traits_keep_their_own_ids_whatever_their_values(env, tmp_path):
    """Results are cached by a trait's values and filed by its id: two identical traits
    in one dataset, and a later dataset whose traits equal an earlier one's, are stored,
    shown and listed under their own ids."""
    liver = (BXD / "BXD_pheno.txt").read_text().split()
    first = _run(env, tmp_path, write_traits(tmp_path / "a.tsv", {"twin": liver}),
                 tmp_path / "first")
    assert first.returncode == 0, first.stderr[-3000:]
    for trait in ("liver", "twin"):  # within one dataset: one key, two ids
        shown = json.loads(_show(env, tmp_path / "first", trait).stdout)
        assert shown["trait"] == trait
    traits = ["copyA", "copyB", "other"]
    table = tmp_path / "b.tsv"  # another dataset: two copies of liver, and a new trait
    other = [f"{v:.3f}" for v in np.random.default_rng(3).normal(size=len(liver))]
    table.write_text("id\t" + "\t".join(traits) + "\n" + "".join(
        f"{name}\t{liver[i]}\t{liver[i]}\t{other[i]}\n"
        for i, name in enumerate(ids(len(liver)))))
    second = _run(env, tmp_path, table, tmp_path / "second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 of 3 traits; 1 to scan" in second.stderr  # the copies came from the cache
    keys = {}
    for trait in traits:
        shown = _show(env, tmp_path / "second", trait)
        assert shown.returncode == 0, (trait, shown.stderr)
        found = json.loads(shown.stdout)
        assert found["trait"] == trait and found["metadata"]["id"] == trait
        assert found["metadata"]["dataset"] == "second"
        keys[trait] = found["key"]
    assert keys["copyA"] == keys["copyB"] != keys["other"]
    assert json.loads(_show(env, tmp_path / "second", "copyA").stdout)["metadata"][
        "computed_by"]["dataset"] == "first"
    hits = (tmp_path / "second" / "hits.tsv").read_text().splitlines()[1:]
    assert sorted(h.split("\t")[0] for h in hits) == traits
    assert _show(env, tmp_path / "second", "liver").returncode == 2  # not this dataset's
    with sqlite3.connect(tmp_path / "second" / "precompute.sqlite") as db:
        assert sorted(r[0] for r in db.execute("SELECT id FROM traits")) == traits


def test_the_bundled_example_runs_and_equals_the_loco_scan(env, tmp_path):
    """`gemma-precompute --example`: the BXD .geno and trait table shipped in the package;
    its liver trait is the gemma-loco --example scan, p for p."""
    r = sheepdog("run", "gemma-precompute", "--example", "--out", str(tmp_path / "pc"),
                 env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 of 2 traits; 2 to scan" in r.stderr and "2 done" in r.stderr
    loco = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "loco"),
                    env=env, timeout=300)
    assert loco.returncode == 0, loco.stderr[-3000:]
    shown = json.loads(_show(env, tmp_path / "pc", "liver", "--vector").stdout)
    ours = {s["rs"]: s["p"] for s in shown["snps"]}
    theirs = {line.split("\t")[1]: float(line.split("\t")[10])
              for line in (tmp_path / "loco" / "assoc.txt").read_text().splitlines()[1:]}
    assert ours == theirs


def test_lmdb_writes_each_trait_as_gemma2lmdb_does(env, tmp_path):
    """--lmdb DIR: one gemma2lmdb file per scanned trait, its records GEMMA's printed
    af, beta, se, l_mle, p_lrt (float32) for the SNPs GEMMA tested, keyed by chromosome
    byte and position; the same as gemma-loco --lmdb gives for the same trait."""
    from sheepdog.gemma.scan import lmdbout

    r = sheepdog("run", "gemma-precompute", "--example", "--out", str(tmp_path / "pc"),
                 "--lmdb", str(tmp_path / "mdb"), env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "mdb").iterdir()) == ["liver.mdb", "pheno2.mdb"]
    loco = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "loco"),
                    "--lmdb", str(tmp_path / "loco.mdb"), env=env, timeout=300)
    assert loco.returncode == 0, loco.stderr[-3000:]
    meta, records = lmdbout.read(tmp_path / "mdb" / "liver.mdb")
    theirs_meta, theirs = lmdbout.read(tmp_path / "loco.mdb")
    assert records == theirs and len(records) == 7320
    assert meta["key-format"] == ">cL" and meta["rec-format"] == "=fffff"
    assert meta["hits"] == theirs_meta["hits"]
    assert meta["sheepdog"]["id"] == "liver" and meta["sheepdog"]["dataset"] == "pc"
    again = sheepdog("precompute", "lmdb", str(tmp_path / "pc"), str(tmp_path / "mdb2"),
                     env=env)
    assert again.returncode == 0 and "2 traits written" in again.stdout
