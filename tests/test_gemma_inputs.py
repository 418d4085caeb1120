"""Bad input is refused before any task runs, naming the file, the line and the problem."""

from __future__ import annotations

import gzip
import shutil

import pytest
from conftest import BXD, sheepdog

from sheepdog.cache import Cache
from sheepdog.errors import InputError
from sheepdog.gemma.scan.build import GemmaRequest, prepare

GENO, PHENO, ANNO = BXD / "BXD_geno.txt.gz", BXD / "BXD_pheno.txt", BXD / "BXD_snps.txt"


@pytest.fixture()
def files(tmp_path):
    """Plain copies of the BXD inputs to damage one at a time."""
    geno = tmp_path / "geno.txt"
    geno.write_bytes(gzip.decompress(GENO.read_bytes()))
    pheno, anno = tmp_path / "pheno.txt", tmp_path / "anno.txt"
    shutil.copy(PHENO, pheno)
    shutil.copy(ANNO, anno)
    return geno, pheno, anno


def _check(tmp_path, geno, pheno, anno, covariates=None, column=None):
    request = GemmaRequest(geno=geno, pheno=pheno, anno=anno, covariates=covariates,
                           column=column)
    with pytest.raises(InputError) as e:
        prepare(request, Cache(tmp_path / "store"))
    return str(e.value)


def _edit_line(path, number, change):
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = change(lines[number - 1])
    path.write_text("".join(lines))


def test_a_missing_file_is_named(tmp_path, files):
    geno, pheno, anno = files
    msg = _check(tmp_path, tmp_path / "nope.txt", pheno, anno)
    assert "nope.txt" in msg and "does not exist" in msg


def test_a_directory_instead_of_a_file_is_named(tmp_path, files):
    geno, pheno, anno = files
    assert "not a file" in _check(tmp_path, geno, tmp_path, anno)


def test_a_bad_gzip_file_is_named(tmp_path, files):
    _, pheno, anno = files
    bad = tmp_path / "geno.txt.gz"
    bad.write_bytes(GENO.read_bytes()[:4000])  # cut short
    msg = _check(tmp_path, bad, pheno, anno)
    assert "geno.txt.gz" in msg and "gzip" in msg


def test_ragged_genotype_rows_name_the_line(tmp_path, files):
    geno, pheno, anno = files
    _edit_line(geno, 17, lambda ln: ln.rstrip().rstrip(",") + ", 1\n")
    msg = _check(tmp_path, geno, pheno, anno)
    assert f"{geno}, line 17" in msg and "ragged" in msg


def test_a_non_numeric_genotype_names_line_and_column(tmp_path, files):
    geno, pheno, anno = files
    _edit_line(geno, 5, lambda ln: ln.replace(", 1,", ", x1,", 1))
    msg = _check(tmp_path, geno, pheno, anno)
    assert f"{geno}, line 5" in msg and "'x1' is not a number" in msg and "column" in msg


def test_genotype_count_must_equal_phenotype_rows(tmp_path, files):
    geno, pheno, anno = files
    pheno.write_text("".join(pheno.read_text().splitlines(keepends=True)[:-1]))
    msg = _check(tmp_path, geno, pheno, anno)
    assert str(pheno) in msg and "197 rows" in msg and "198 individuals" in msg


def test_a_snp_missing_from_the_annotation_is_named(tmp_path, files):
    geno, pheno, anno = files
    anno.write_text("".join(ln for ln in anno.read_text().splitlines(keepends=True)
                            if not ln.startswith("rs6269442\t")))
    msg = _check(tmp_path, geno, pheno, anno)
    assert f"{geno}, line 2" in msg and "rs6269442" in msg and "annotation" in msg


def test_an_unknown_chromosome_is_named(tmp_path, files):
    geno, pheno, anno = files
    _edit_line(anno, 3, lambda ln: ln.rsplit("\t", 1)[0] + "\tbanana\n")
    msg = _check(tmp_path, geno, pheno, anno)
    assert f"{anno}, line 3" in msg and "unknown chromosome 'banana'" in msg


def test_an_empty_file_is_named(tmp_path, files):
    geno, pheno, anno = files
    geno.write_text("")
    assert "empty" in _check(tmp_path, geno, pheno, anno)


def test_an_all_na_phenotype_is_refused(tmp_path, files):
    geno, pheno, anno = files
    pheno.write_text("NA\n" * 198)
    assert "NA for every individual" in _check(tmp_path, geno, pheno, anno)


def test_a_phenotype_column_beyond_the_file_is_named(tmp_path, files):
    geno, pheno, anno = files
    msg = _check(tmp_path, geno, pheno, anno, column=2)
    assert f"{pheno}, line 1" in msg and "column 2" in msg


def test_a_covariate_row_count_mismatch_is_named(tmp_path, files):
    geno, pheno, anno = files
    cov = tmp_path / "cov.txt"
    cov.write_text("".join((BXD / "BXD_covariates2.txt").read_text().splitlines(True)[:150]))
    msg = _check(tmp_path, geno, pheno, anno, covariates=cov)
    assert str(cov) in msg and "150 rows" in msg


def test_the_cli_exits_2_with_the_message_and_no_traceback(env, tmp_path, files):
    geno, pheno, anno = files
    _edit_line(geno, 9, lambda ln: ln.replace(", 0,", ", zero,", 1))
    r = sheepdog("run", "gemma-loco", "-g", str(geno), "-p", str(pheno), "-a", str(anno),
                 env=env)
    assert r.returncode == 2
    assert f"{geno}, line 9" in r.stderr and "Traceback" not in r.stderr
    assert sheepdog("list", "--json", env=env).stdout.strip() == "[]"  # no job was made


def test_windows_line_endings_and_plain_files_give_the_same_result(env, tmp_path, files):
    geno, pheno, anno = files
    for path in (geno, pheno, anno):
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    a = sheepdog("run", "gemma-loco", "-g", str(geno), "-p", str(pheno), "-a", str(anno),
                 "--out", str(tmp_path / "crlf"), env=env, timeout=300)
    b = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "gz"), env=env,
                 timeout=300)
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:]
    assert (tmp_path / "crlf" / "assoc.txt").read_text() == \
        (tmp_path / "gz" / "assoc.txt").read_text()


def test_the_split_writes_each_chromosome_as_text_for_gemma_and_as_a_matrix(tmp_path):
    import numpy as np

    from sheepdog.gemma.formats.bimbam import split_genotypes
    from sheepdog.gemma.scan.kinship import read_genotypes

    geno, anno = tmp_path / "g.txt", tmp_path / "a.txt"
    geno.write_text("rs1, A, T, 0, 1.5, NA\r\nrs2, A, T, 2, 0.25, 1\nrs3, G, C, NA, 0, 2e-1\n")
    anno.write_text("rs1 100 1\nrs2 50 2\nrs3 300 1\n")
    split = split_genotypes(geno, anno, tmp_path / "out")
    one = split.chromosomes["1"]
    matrix = read_genotypes(one["matrix"])
    assert matrix.shape == (2, 3)
    assert np.array_equal(matrix, read_genotypes(one["geno"]), equal_nan=True)
    assert np.array_equal(matrix, [[0, 1.5, np.nan], [np.nan, 0, 0.2]], equal_nan=True)
    assert np.load(split.chromosomes["2"]["matrix"]).tolist() == [[2, 0.25, 1]]
