"""`sheepdog run gemma-loco` on real BXD data with real GEMMA."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import sheepdog
from gemma_reference import (
    ANNO,
    COVARIATES,
    GENO,
    PHENO,
    SINGULAR_COVARIATES,
    chromosomes,
    gemma,
    loco_scan,
    read_assoc,
)

from sheepdog import store
from sheepdog.gemma.formats.bimbam import chromosome_order


def _loco(env, out, *extra):
    return sheepdog("run", "gemma-loco", "-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO),
                    "--out", str(out), *extra, env=env, timeout=300)


@pytest.mark.parametrize("covariates", [False, True], ids=["plain", "covariates"])
def test_every_p_lrt_equals_gemmas_own_serial_loco(env, tmp_path, gemma_loco_kinships,
                                                   covariates):
    work, kinships = gemma_loco_kinships
    extra = ["-c", str(COVARIATES)] if covariates else []
    r = _loco(env, tmp_path / "out", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = read_assoc(tmp_path / "out" / "assoc.txt")
    theirs = loco_scan(work, kinships, covariates=COVARIATES if covariates else None,
                       tag="c" if covariates else "p")
    assert set(ours) == set(theirs)
    for rs, row in theirs.items():
        # GEMMA's printed digits, column by column (af, beta, se, l_mle, p_lrt)
        for column in ("af", "beta", "se", "p_lrt"):
            assert ours[rs][column] == row[column], (rs, column, ours[rs], row)


def test_result_files_hold_one_header_every_snp_once_in_genome_order(env, tmp_path):
    r = _loco(env, tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    lines = (out / "assoc.txt").read_text().splitlines()
    header = lines[0].split("\t")
    assert header == ["chr", "rs", "ps", "n_miss", "allele1", "allele0", "af", "beta", "se",
                      "l_mle", "p_lrt"]
    assert sum(1 for ln in lines if ln.startswith("chr\t")) == 1
    rows = [ln.split("\t") for ln in lines[1:]]
    snps = [r[1] for r in rows]
    assert len(snps) == len(set(snps)) == 7320  # BXD: every SNP passes -maf 0.1
    keys = [(chromosome_order(r[0]), int(r[2])) for r in rows]
    assert keys == sorted(keys)
    assert [c for c in dict.fromkeys(r[0] for r in rows)] == chromosomes()
    result = json.loads((out / "result.json").read_text())
    assert result["type"] == "GWA" and result["errno"] == 0 and result["cache_hit"] is False
    assert result["gemma_version"].startswith("0.98")
    assert result["inputs"]["geno"]["sha256"] and result["options"]["lmm"] == 9
    assert len(result["files"]) == 20 and result["counts"]["analysed_snps"] == 7320
    assert result["counts"]["analysed_individuals"] == 67
    best = min(rows, key=lambda r: float(r[10]))
    assert result["top_hits"][0]["rs"] == best[1]
    assert "kinship chr 1" in result["timings"]["pieces"]
    assert (out / "manhattan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "manhattan.svg").read_bytes()[:500]
    job = json.loads(r.stdout)
    assert job["status"] == "success" and job["progress"]["done"] == job["progress"]["total"]
    assert {p["name"] for p in job["pieces"]} >= {"kinship chr X", "lmm chr 1", "gather"}


@pytest.fixture()
def counting_gemma(tmp_path, env):
    """GEMMA on PATH behind a wrapper that records every run (the real binary still runs)."""
    real = shutil.which("gemma")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "gemma-calls"
    wrapper = bindir / "gemma"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    counting_env = dict(env, PATH=f"{bindir}:{env['PATH']}")

    def count() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    return counting_env, count


def test_a_repeated_run_starts_no_gemma_and_says_cache_hit(counting_gemma, tmp_path, conn):
    env, count = counting_gemma
    assert _loco(env, tmp_path / "a").returncode == 0
    first = count()
    assert first >= 20
    r = _loco(env, tmp_path / "b")
    assert r.returncode == 0 and count() == first
    assert "cache hit: 41/41 pieces" in r.stderr
    assert json.loads((tmp_path / "b" / "result.json").read_text())["cache_hit"] is True
    assert (tmp_path / "a" / "assoc.txt").read_text() == (tmp_path / "b" / "assoc.txt").read_text()
    r = _loco(env, tmp_path / "c", "--force")
    assert r.returncode == 0 and count() == 2 * first - 1  # all again, but the version probe


def test_two_identical_submissions_at_once_share_one_computation(counting_gemma, tmp_path,
                                                                 conn, workers):
    env, count = counting_gemma
    a = sheepdog("run", "gemma-loco", "--example", "--detach", "--out", str(tmp_path / "a"),
                 env=env)
    b = sheepdog("run", "gemma-loco", "--example", "--detach", "--out", str(tmp_path / "b"),
                 env=env)
    ids = [a.stdout.strip(), b.stdout.strip()]
    workers.start("-j", "2", env=env)
    for job_id in ids:
        sheepdog("logs", job_id, "--follow", env=env, timeout=300)
        assert store.get_job(conn, job_id).status == "success"
    assert count() == 20 + 1  # one LMM per chromosome, one version probe
    assert (tmp_path / "a" / "assoc.txt").read_text() == (tmp_path / "b" / "assoc.txt").read_text()


def test_gemmas_own_error_text_fails_the_job_and_names_the_piece(env, tmp_path, conn):
    r = _loco(env, tmp_path / "out", "-c", str(SINGULAR_COVARIATES))
    assert r.returncode != 0, r.stderr[-4000:]
    assert "GSL ERROR: matrix is singular" in r.stderr
    job = store.list_jobs(conn, limit=1)[0]
    assert job.status == "error" and "piece 'lmm chr" in job.error
    assert "matrix is singular" in job.error
    assert not (tmp_path / "out" / "assoc.txt").exists()  # never a partial result


def test_kinships_equal_gemmas_own_for_the_genome_and_by_the_loco_identity(
        tmp_path, gemma_loco_kinships):
    import numpy as np

    from sheepdog.gemma.formats.bimbam import split_genotypes
    from sheepdog.gemma.scan.kinship import BLOCK, centered_kinship, read_genotypes
    from sheepdog.gemma.scan.loco import loco_from

    _, gemmas_loco = gemma_loco_kinships
    gemma(["-g", str(GENO), "-p", str(PHENO), "-gk", "1", "-o", "all"], tmp_path)
    genome, snps = centered_kinship(read_genotypes(GENO))
    assert snps > 3 * BLOCK  # computed block by block
    # GEMMA prints 10 significant digits of values below 1
    np.testing.assert_allclose(genome, np.loadtxt(tmp_path / "output" / "all.cXX.txt"),
                               rtol=0, atol=1e-9)
    split = split_genotypes(GENO, ANNO, tmp_path / "split")
    per_chromosome = [(c, centered_kinship(read_genotypes(info["matrix"])))
                      for c, info in split.chromosomes.items()]
    for c in ("1", "11", "X"):
        np.testing.assert_allclose(loco_from(c, per_chromosome), np.loadtxt(gemmas_loco[c]),
                                   rtol=0, atol=1e-9)


def test_gemma_stops_on_a_singular_matrix_however_sheepdog_was_started(env, tmp_path):
    """A shell runs `cmd &` with SIGINT ignored, and an ignored signal stays ignored
    across exec: GEMMA, which stops itself with SIGINT on a singular matrix, went on and
    the scan was reported a success. sheepdog gives its pieces SIGINT back."""
    import signal
    import subprocess
    import sys


    r = subprocess.run([sys.executable, "-m", "sheepdog", "run", "gemma-loco", "-g", str(GENO),
                        "-p", str(PHENO), "-a", str(ANNO), "-c", str(SINGULAR_COVARIATES),
                        "--out", str(tmp_path / "out")], env=env, capture_output=True,
                       text=True, timeout=300,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode != 0, r.stderr[-2000:]
    assert "attempt 2" not in r.stderr  # it would stop the same way again: not retried
    assert not (tmp_path / "out" / "assoc.txt").exists()
