"""sheepdog-gemma-wrapper as GN2 calls it, GN's GEMMA defaults, and gemma2lmdb output."""

from __future__ import annotations

import json
import math
import shlex
import struct
import subprocess
from pathlib import Path

import lmdb
import pytest
from conftest import sheepdog
from gemma_reference import ANNO, GENO, PHENO, chromosomes, loco_scan

from sheepdog.gemma.merge import read_min_p

WRAPPER = "sheepdog-gemma-wrapper"


def gn2_parse_loco_output(gwa_json: Path) -> list[dict]:
    """GN2's parse_loco_output (gn2/wqflask/marker_regression/gemma_mapping.py), as is:
    the record's `files`, third item each, read line by line."""
    if gwa_json.stat().st_size == 0:
        return []
    data = json.loads(gwa_json.read_text())
    marker_obs = []
    previous_chr = 0
    for this_file in [f[2] for f in data["files"]]:
        if not Path(this_file).is_file():
            break
        for line in Path(this_file).read_text().splitlines(keepends=True):
            if line.startswith("chr\t"):
                continue
            cols = line.split("\t")
            marker = {"name": cols[1]}
            if cols[0] not in ("X", "X/Y", "Y", "M"):
                marker["chr"] = int(cols[0][3:]) if "chr" in cols[0] else int(cols[0])
                if marker["chr"] > int(previous_chr):
                    previous_chr = marker["chr"]
                elif marker["chr"] < int(previous_chr):
                    break
            else:
                marker["chr"] = cols[0]
            marker["Mb"] = float(cols[2]) / 1000000
            marker["p_value"] = float(cols[10])
            marker["additive"] = -(float(cols[7]) / 2)
            marker_obs.append(marker)
    return marker_obs


def _gn2(command: str, env: dict[str, str]) -> None:
    """GN2 runs its gemma-wrapper lines with os.system: a shell, stdout redirected."""
    subprocess.run(["/bin/sh", "-c", command], env=env, check=True, timeout=300)


def test_gn2s_two_calls_give_the_record_gn2_parses_with_gemmas_p_values(
        env, tmp_path, gemma_loco_kinships):
    work, kinships = gemma_loco_kinships
    q = shlex.quote
    chr_list = ",".join(chromosomes())
    k_json, gwa_json = tmp_path / "K.json", tmp_path / "GWA.json"
    _gn2(f"{WRAPPER} --json --loco {chr_list} -- -debug -g {q(str(GENO))} -p "
         f"{q(str(PHENO))} -a {q(str(ANNO))} -gk > {q(str(k_json))}", env)
    k = json.loads(k_json.read_text())
    assert k["type"] == "K" and k["errno"] == 0
    assert [f[0] for f in k["files"]] == chromosomes()
    _gn2(f"{WRAPPER} --json --loco --input {q(str(k_json))} --cache-dir "
         f"{q(str(tmp_path / 'cache'))} -- -debug -g {q(str(GENO))} -p {q(str(PHENO))} "
         f"-a {q(str(ANNO))} -lmm 9 -maf 0.01 > {q(str(gwa_json))}", env)
    record = json.loads(gwa_json.read_text())
    assert record["type"] == "GWA" and record["errno"] == 0
    assert isinstance(record["gemma_command"], str) and "-lmm 9" in record["gemma_command"]
    assert all(Path(log).is_file() and Path(assoc).is_file()
               for _, log, assoc in record["files"])
    assert all("total computation time" in Path(log).read_text()
               for _, log, _ in record["files"])
    markers = gn2_parse_loco_output(gwa_json)
    assert len(markers) == 7320  # GN2 read every chromosome, in order
    theirs = loco_scan(work, kinships)  # GEMMA's own serial -loco (all BXD SNPs pass both mafs)
    for m in markers:
        assert m["p_value"] == float(theirs[m["name"]]["p_lrt"]), m["name"]
    again = subprocess.run(["/bin/sh", "-c", f"{WRAPPER} --json --loco --input "
                            f"{q(str(k_json))} --cache-dir {q(str(tmp_path / 'cache'))} -- "
                            f"-debug -g {q(str(GENO))} -p {q(str(PHENO))} -a {q(str(ANNO))} -lmm 9 "
                            "-maf 0.01"], env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["cache_hit"] is True


@pytest.mark.parametrize("args,named", [
    (["--json", "--slurm", "--", "-g", "x", "-gk"], "--slurm"),
    (["--json", "--frobnicate", "--", "-g", "x", "-gk"], "--frobnicate"),
    (["--json", "--loco", "--", "-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO), "-gk",
      "2"], "-gk 2"),
    (["--json", "--loco", "--", "-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO), "-gk",
      "-miss", "0.1"], "-miss"),
    (["--json", "--", "-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO), "-gk"], "--loco"),
])
def test_what_sheepdog_cannot_run_as_asked_is_refused_naming_it(env, args, named):
    r = subprocess.run([WRAPPER, *args], env=env, capture_output=True, text=True, timeout=60)
    record = json.loads(r.stdout)
    assert r.returncode != 0 and record["errno"] != 0
    assert named in record["error"], record["error"]


def test_gemma_flags_that_break_the_split_are_refused_in_the_lmm_call(env, tmp_path):
    k_json = tmp_path / "K.json"
    k_json.write_text(json.dumps({"type": "K", "files": [["1", "l", "k"]]}))
    for flag in ("-o", "-loco", "-k", "-outdir"):
        r = subprocess.run([WRAPPER, "--json", "--loco", "--input", str(k_json), "--", "-g",
                            str(GENO), "-p", str(PHENO), "-a", str(ANNO), "-lmm", "9", flag,
                            "x"], env=env, capture_output=True, text=True, timeout=60)
        assert f"GEMMA flag {flag} is not allowed" in json.loads(r.stdout)["error"]


def test_gemma_loco_defaults_to_gemmas_maf_and_passes_extra_gemma_flags(env, tmp_path):
    r = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "o"), "--",
                 "-no-check", env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["options"]["maf"] == 0.01
    assert result["options"]["gemma_flags"] == ["-no-check"]
    logs = [Path(f[1]).read_text() for f in result["files"]]
    assert all("-maf 0.01 -no-check" in log for log in logs)  # GEMMA's own command line
    bad = sheepdog("run", "gemma-loco", "--example", "--", "-outdir", "x", env=env)
    assert bad.returncode == 2 and "GEMMA flag -outdir is not allowed" in bad.stderr


def test_gemma_wrappers_permutation_minimum_skips_zero_p(tmp_path):
    assoc = tmp_path / "a.assoc.txt"
    assoc.write_text("chr\trs\tps\tn_miss\tallele1\tallele0\taf\tbeta\tse\tl_mle\tp_lrt\n"
                     "1\trs1\t10\t0\tA\tB\t0.5\t1\t1\t1\t0\n"
                     "1\trs2\t20\t0\tA\tB\t0.5\t1\t1\t1\t3e-5\n"
                     "1\trs3\t30\t0\tA\tB\t0.5\t1\t1\t1\t0.2\n")
    assert read_min_p(assoc) == (0.0, "1", "rs1")
    assert read_min_p(assoc, "gemma-wrapper") == (3e-5, "1", "rs2")


def test_min_rule_gemma_wrapper_runs_its_own_permutation_pieces(env, tmp_path):
    args = ["run", "gemma-permute", "--example", "--permutations", "4", "--batch-size", "2",
            "--seed", "3", "--json"]
    ours = sheepdog(*args, env=env, timeout=600)
    theirs = sheepdog(*args, "--min-rule", "gemma-wrapper", env=env, timeout=600)
    assert ours.returncode == theirs.returncode == 0, theirs.stderr[-2000:]
    a, b = json.loads(ours.stdout), json.loads(theirs.stdout)
    batches = {p["id"] for p in a["pieces"] if p["name"].startswith("permutations")}
    assert batches.isdisjoint(p["id"] for p in b["pieces"])  # cached apart
    assert a["result"]["permutations"]["permutations"] == 4
    assert b["params"]["options"]["min_rule"] == "gemma-wrapper"


def test_lmdb_output_in_gemma2lmdbs_layout(env, tmp_path):
    db = tmp_path / "bxd.mdb"
    r = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "o"), "--lmdb",
                 str(db), env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln.split("\t") for ln in (tmp_path / "o" / "assoc.txt").read_text().splitlines()[1:]]
    with lmdb.open(str(db), subdir=False, readonly=True, lock=False) as e, e.begin() as txn:
        meta = json.loads(txn.get(b"meta"))
        assert meta["type"] == "gemma-assoc" and meta["key-format"] == ">cL"
        assert txn.stat()["entries"] == len(rows) + 1
        keys = [k for k, _ in txn.cursor() if k != b"meta"]
        for row in rows:
            code = ord("X") if row[0] == "X" else int(row[0])
            value = txn.get(struct.pack(">cL", bytes([code]), int(row[2])))
            af, beta, se, l_mle, p_lrt = struct.unpack("=fffff", value)
            assert math.isclose(p_lrt, float(row[10]), rel_tol=1e-6)
            assert math.isclose(beta, float(row[7]), rel_tol=1e-6, abs_tol=1e-30)
    assert keys == sorted(keys)  # genome order from the key format alone
    expected_hits = [r[1] for r in rows if float(r[10]) == 0 or -math.log10(float(r[10])) >= 4]
    assert [h[2] for h in meta["hits"]] == expected_hits
    assert set(meta["log"]) == {f"chr {c}" for c in chromosomes()}
