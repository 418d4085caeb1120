"""`sheepdog run gemma-loco` on real BXD data with real GEMMA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    # an LMM piece keeps GEMMA's assoc and log, not the LOCO kinship it formed (remade
    # from the kinship pieces, ~0.6 MB a chromosome here: it made a scan's cache 10x)
    lmm = [Path(f[1]).parent.parent for f in result["files"]]
    kept = {str(f.relative_to(d)) for d in lmm for f in d.rglob("*") if f.is_file()}
    assert kept == {"output/lmm.assoc.txt", "output/lmm.log.txt"}


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


def _pieces(tmp_path):
    """Kinship pieces of BXD, written in reverse: their ranks give the file's order."""
    from sheepdog.gemma.formats.bimbam import split_genotypes
    from sheepdog.gemma.scan import kinship

    split = split_genotypes(GENO, ANNO, tmp_path / "split")
    in_file = list(split.chromosomes)
    pieces = {}
    for c in reversed(in_file):
        genotypes = kinship.read_genotypes(split.chromosomes[c]["matrix"])
        (tmp_path / "k" / c).mkdir(parents=True)
        kinship.write(tmp_path / "k" / c, kinship.centred(genotypes), genotypes.shape[1],
                      in_file.index(c))
        pieces[c] = tmp_path / "k" / c
    return in_file, pieces


def test_kinships_are_gemmas_own_digit_for_digit_for_the_genome_and_every_loco(
        tmp_path, gemma_loco_kinships):
    import numpy as np

    from sheepdog.gemma.scan import blas, kinship, loco

    _, gemmas_loco = gemma_loco_kinships
    gemma(["-g", str(GENO), "-p", str(PHENO), "-gk", "1", "-o", "all"], tmp_path)
    in_file, pieces = _pieces(tmp_path)
    genome = kinship.centred(kinship.read_genotypes(GENO))
    assert len(genome) > 3 * kinship.BLOCK  # centred block by block, as the pieces are
    assert np.array_equal(genome, np.concatenate([kinship.read(pieces[c]) for c in in_file]))
    gemmas = blas.gemmas()
    assert gemmas.name != "numpy", gemmas.why  # the BLAS Debian's GEMMA is linked with
    numpys = blas.Blas("numpy", "numpy's BLAS")
    wanted = {None: tmp_path / "output" / "all.cXX.txt", **gemmas_loco}
    for c, theirs in wanted.items():
        ours = tmp_path / f"ours.{c}.txt"
        loco.write_matrix(ours, loco.kinship_of(pieces, c, gemmas))
        assert ours.read_text().split() == theirs.read_text().split(), c  # every digit
        # numpy's BLAS sums in another order: the same kinship to GEMMA's printed digits
        np.testing.assert_allclose(loco.kinship_of(pieces, c, numpys), np.loadtxt(theirs),
                                   rtol=0, atol=1e-9)


def test_a_batch_padded_to_its_snps_plus_pad_sums_as_gemmas_full_width_batch(
        tmp_path, monkeypatch):
    """GEMMA multiplies a 20,000-column buffer whatever the SNPs; the shorter product
    must give the same bits, with this BLAS, in one batch and in several."""
    import numpy as np

    from sheepdog.gemma.scan import blas, kinship, loco

    _, pieces = _pieces(tmp_path)
    gemmas = blas.gemmas()
    for batch in (kinship.BATCH, 5000):  # 5000: one full batch, then one cut short
        monkeypatch.setattr(kinship, "BATCH", batch)
        monkeypatch.setattr(kinship, "PAD", 2048)
        assert kinship._width(198, 1000) == 3048 and kinship._width(10, 1000) == batch
        short = loco.kinship_of(pieces, "5", gemmas)
        monkeypatch.setattr(kinship, "PAD", batch)  # every product batch columns wide
        full = loco.kinship_of(pieces, "5", gemmas)
        assert np.array_equal(short, full), batch


def test_gemmas_blas_is_the_first_library_that_defines_cblas_dgemm_itself(tmp_path):
    import os
    import shutil

    from sheepdog.gemma.scan import blas

    found = blas.gemmas()
    libraries = blas.linked_libraries(os.path.realpath(shutil.which("gemma")))
    # libgsl comes first and reaches cblas_dgemm through its own libgslcblas: not GEMMA's
    assert found.name in libraries
    for earlier in libraries[:libraries.index(found.name)]:
        try:
            function = __import__("ctypes").CDLL(earlier).cblas_dgemm
        except (OSError, AttributeError):
            continue
        assert blas._defined_in(function) != os.path.realpath(earlier)
    script = tmp_path / "gemma"
    script.write_text("#!/bin/sh\nexec gemma \"$@\"\n")
    script.chmod(0o755)
    wrapped = blas.gemmas("gemma", str(tmp_path))
    assert wrapped.name == "numpy" and str(script) in wrapped.why, wrapped.why
    assert "not on PATH" in blas.gemmas("no-such-gemma").why


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
