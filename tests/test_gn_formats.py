"""GN .geno and R/qtl2 inputs: the same LOCO scan as BIMBAM, and clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import BXD, sheepdog
from gnformats import write_geno, write_qtl2

from sheepdog.cache import Cache
from sheepdog.errors import InputError
from sheepdog.gemma.formats import convert as formats
from sheepdog.gemma.formats import genofile, qtl2, traits

GENO = """# a tiny GN genotype file
@name:TINY
@type:riset
@mat:B
@pat:D
@het:H
@unk:U
Chr\tLocus\tcM\tMb\tS1\tS2\tS3
1\tm1\t0.5\t3.010274\tB\tD\tH
2\tm2\t1.0\t4.5\tU\tB\tD
"""


def test_geno_codes_follow_gn2_mat_1_pat_0_het_half_and_positions_from_mb(tmp_path):
    path = tmp_path / "tiny.geno"
    path.write_text(GENO)
    geno, anno = io.StringIO(), io.StringIO()
    found = genofile.convert(path, geno, anno)
    assert found.individuals == ["S1", "S2", "S3"] and found.header["type"] == "riset"
    assert geno.getvalue() == "m1, X, Y, 1, 0, 0.5\nm2, X, Y, NA, 1, 0\n"
    assert anno.getvalue() == "m1\t3010274\t1\nm2\t4500000\t2\n"


@pytest.mark.parametrize("text, problem", [
    (GENO.replace("\tH\n", "\tX\n"), "line 9: column 7 (S3): genotype 'X' is not one the "
                                     "header declares"),
    (GENO.replace("S3\n", "S1\n"), "line 8: individual 'S1' is named twice"),
    (GENO.replace("2\tm2", "2\tm1"), "line 10: column 2: marker 'm1' is also on line 9"),
    (GENO.replace("\t3.010274", "\tthree"), "line 9: column 4: position 'three' is not a "
                                            "number"),
    (GENO.replace("\tD\tH\n", "\tD\n"), "line 9: has 2 genotypes; the header names 3"),
])
def test_geno_errors_name_the_file_line_and_column(tmp_path, text, problem):
    path = tmp_path / "bad.geno"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        genofile.convert(path, io.StringIO(), io.StringIO())
    assert str(path) in str(e.value) and problem in str(e.value)


def _control(tmp_path: Path, crosstype: str, codes: dict[str, int], geno_rows: str) -> Path:
    (tmp_path / "g.csv").write_text("id,m1,m2\n" + geno_rows)
    (tmp_path / "pmap.csv").write_text("marker,chr,pos\nm1,1,3.5\nm2,2,7.25\n")
    control = tmp_path / "c.yaml"
    control.write_text(f"crosstype: {crosstype}\ngeno: g.csv\npmap: pmap.csv\n"
                       f"genotypes: {json.dumps(codes)}\nna.strings: ['-', 'NA']\n")
    return control


@pytest.mark.parametrize("crosstype, codes, rows, dosages", [
    ("risib", {"B": 1, "D": 2}, "a,B,D\nb,D,-\n", ["1, 0", "0, NA"]),
    ("riself", {"B": 1, "D": 2}, "a,D,D\nb,B,B\n", ["0, 1", "0, 1"]),
    ("dh", {"A": 1, "B": 2}, "a,A,B\nb,B,A\n", ["1, 0", "0, 1"]),
    ("bc", {"A": 1, "H": 2}, "a,A,H\nb,H,H\n", ["1, 0.5", "0.5, 0.5"]),
])
def test_qtl2_two_allele_crosses_count_the_first_allele(tmp_path, crosstype, codes, rows,
                                                       dosages):
    control = qtl2.read_control(_control(tmp_path, crosstype, codes, rows))
    geno, anno = io.StringIO(), io.StringIO()
    assert qtl2.convert(control, geno, anno) == ["a", "b"]
    assert geno.getvalue().splitlines() == [f"m1, X, Y, {dosages[0]}", f"m2, X, Y, {dosages[1]}"]
    assert anno.getvalue() == "m1\t3500000\t1\nm2\t7250000\t2\n"


def test_qtl2_errors_name_the_missing_file_the_cross_and_the_code(tmp_path):
    control = _control(tmp_path, "risib", {"B": 1, "D": 2}, "a,B,Q\n")
    with pytest.raises(InputError, match="marker m2: genotype 'Q' is not in the control"):
        qtl2.convert(qtl2.read_control(control), io.StringIO(), io.StringIO())
    control.write_text(control.read_text().replace("pmap.csv", "nowhere.csv"))
    with pytest.raises(InputError, match="'pmap' names 'nowhere.csv', which does not exist"):
        qtl2.read_control(control)
    control.write_text("crosstype: cc\ngeno: g.csv\n")
    with pytest.raises(InputError, match="crosstype 'cc': sheepdog reads the two-allele"):
        qtl2.read_control(control)


@pytest.mark.parametrize("text, problem", [
    ("id\ttA\ttA\nS1\t1\t2\n", "line 1: column 3: trait id 'tA' is also column 2"),
    ("id\ttA\nS1\t1\nS1\t2\n", "line 3: column 1: individual 'S1' is also on line 2"),
    ("id\ttA\ttB\nS1\t1\tmuch\n", "line 2: column 3 (tB): 'much' is not a number"),
    ("id\ttA\nS1\t1\nS9\t2\n", "line 3: individual 'S9' is not in the genotypes"),
])
def test_trait_table_errors_name_file_line_and_column(tmp_path, text, problem):
    path = tmp_path / "traits.tsv"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        traits.align(traits.read(path), ["S1", "S2"], Path("tiny.geno"))
    assert str(path) in str(e.value) and problem in str(e.value)


def test_traits_match_by_id_and_count_the_genotyped_without_values(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,tA,tB\nS3,3,NA\nS1,1,-1\n")
    aligned = traits.align(traits.read(path), ["S1", "S2", "S3"], Path("g"))
    assert aligned.without_values == 1
    np.testing.assert_array_equal(aligned.values, [[1, -1], [np.nan, np.nan], [3, np.nan]])


def test_id_keyed_covariates_get_an_intercept_unless_they_have_one(tmp_path):
    out = tmp_path / "c.txt"
    traits.covariate_file(np.array([[0.5], [np.nan]]), out)
    assert out.read_text() == "1\t0.5\n1\tNA\n"
    traits.covariate_file(np.array([[1.0, 2.0], [1.0, 3.0]]), out)
    assert out.read_text() == "1.0\t2.0\n1.0\t3.0\n"


def test_bimbam_genotypes_need_an_annotation_and_the_others_refuse_one(tmp_path):
    cache = Cache(tmp_path / "store")
    with pytest.raises(InputError, match="BIMBAM genotypes need an annotation file"):
        formats.load(cache, BXD / "BXD_geno.txt.gz", None)
    geno, _ = write_geno(tmp_path)
    with pytest.raises(InputError, match="an annotation file is only for BIMBAM genotypes"):
        formats.load(cache, geno, BXD / "BXD_snps.txt")


def test_geno_and_qtl2_copies_of_bxd_scan_exactly_as_the_bimbam_files(env, tmp_path):
    """The copies name the strains and shuffle the phenotype rows: matched by id."""
    base = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "bimbam"),
                    env=env, timeout=300)
    assert base.returncode == 0, base.stderr[-2000:]
    geno, traits_file = write_geno(tmp_path)
    control = write_qtl2(tmp_path)
    for name, args in (("geno", ["-g", str(geno), "-p", str(traits_file)]),
                       ("qtl2", ["--control", str(control)])):
        r = sheepdog("run", "gemma-loco", *args, "--out", str(tmp_path / name), env=env,
                     timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        ours = (tmp_path / name / "assoc.txt").read_bytes()
        assert ours == (tmp_path / "bimbam" / "assoc.txt").read_bytes(), name
        assert len(ours.splitlines()) == 1 + sum(1 for _ in BXD.joinpath("BXD_snps.txt").open())


def test_a_geno_run_with_an_unknown_individual_fails_before_any_piece(env, tmp_path):
    geno, traits_file = write_geno(tmp_path)
    traits_file.write_text(traits_file.read_text() + "BXD_999\t1.5\n")
    r = sheepdog("run", "gemma-loco", "-g", str(geno), "-p", str(traits_file), env=env)
    assert r.returncode == 2
    last = len(traits_file.read_text().splitlines())
    assert f"{traits_file}, line {last}: individual 'BXD_999' is not in the genotypes" in r.stderr


def test_n_picks_a_column_of_an_id_keyed_table_and_permutations_match_too(env, tmp_path):
    geno, one = write_geno(tmp_path)
    lines = one.read_text().splitlines()
    two = tmp_path / "two.tsv"  # another trait first: -n 2 is GEMMA's phenotype
    two.write_text("id\tother\ttrait\n" + "".join(
        f"{ln.split()[0]}\t{i}\t{ln.split()[1]}\n" for i, ln in enumerate(lines[1:])))
    runs = {}
    for name, args in (("bimbam", ["--example"]),
                       ("geno", ["-g", str(geno), "-p", str(two), "-n", "2"])):
        r = sheepdog("run", "gemma-permute", *args, "--permutations", "3", "--seed", "11",
                     "--batch-size", "3", "--out", str(tmp_path / name), env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = json.loads((tmp_path / name / "permutations.json").read_text())
    assert (tmp_path / "geno" / "assoc.txt").read_bytes() == \
        (tmp_path / "bimbam" / "assoc.txt").read_bytes()
    assert runs["geno"]["minima"] == runs["bimbam"]["minima"]
