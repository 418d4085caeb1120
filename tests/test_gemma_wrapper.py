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
from gemma_reference import (
    ANNO,
    COVARIATES,
    GENO,
    PHENO,
    chromosomes,
    full_scan,
    loco_scan,
    read_assoc,
)

from sheepdog.gemma.scan.merge import read_min_p

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


def gn2_run_gemma(use_loco: bool, covariates: Path | None, tmp: Path) -> tuple[str, str, Path]:
    """The two command lines GN2's run_gemma builds (gemma_mapping.py, as is, GEMMAOPTS
    "-debug", no --cache-dir: gemma-wrapper's default, the temporary directory)."""
    q = shlex.quote
    geno, pheno, snps = q(str(GENO)), q(str(PHENO)), q(str(ANNO))
    k_json, gwa_json = q(str(tmp / "K.json")), tmp / "GWA.json"
    if use_loco:
        k_cmd = (f"{WRAPPER} --json --loco {','.join(chromosomes())} -- -debug -g {geno} -p "
                 f"{pheno} -a {snps} -gk > {k_json}")
        gwa = f"{WRAPPER} --json --loco --input {k_json} -- -debug -g {geno} -p {pheno} "
        if covariates:
            gwa += f"-c {q(str(covariates))} -a {snps} -lmm 9 -maf 0.01 > {q(str(gwa_json))}"
        else:
            gwa += f"-a {snps} -lmm 9 -maf 0.01 > {q(str(gwa_json))}"
    else:
        k_cmd = f"{WRAPPER} --json -- -debug  -g {geno} -p {pheno} -a {snps} -gk > {k_json}"
        gwa = (f"{WRAPPER} --json --input {k_json} -- -debug -a {snps} -lmm 9 -g {geno} "
               f"-p {pheno} ")
        if covariates:
            gwa += f" -c {q(str(covariates))} > {q(str(gwa_json))}"
        else:
            gwa += f" > {q(str(gwa_json))}"
    return k_cmd, gwa, gwa_json


@pytest.mark.parametrize("use_loco", [True, False], ids=["loco", "no-loco"])
@pytest.mark.parametrize("covariates", [None, COVARIATES], ids=["plain", "covariates"])
def test_gn2s_four_gemma_paths_give_records_gn2_reads_with_gemmas_p_values(
        env, tmp_path, gemma_loco_kinships, use_loco, covariates):
    """LOCO with GN2's chromosome list and not, with covariates and not: each record
    read as parse_loco_output reads it gives GEMMA's own serial p-values."""
    k_cmd, gwa_cmd, gwa_json = gn2_run_gemma(use_loco, covariates, tmp_path)
    _gn2(k_cmd, env)
    k = json.loads((tmp_path / "K.json").read_text())
    assert k["type"] == "K" and k["errno"] == 0
    assert [f[0] for f in k["files"]] == (chromosomes() if use_loco else [None])
    _gn2(gwa_cmd, env)
    record = json.loads(gwa_json.read_text())
    assert record["type"] == "GWA" and record["errno"] == 0, record
    assert [f[0] for f in record["files"]] == (chromosomes() if use_loco else [None])
    markers = gn2_parse_loco_output(gwa_json)
    if use_loco:
        work, kinships = gemma_loco_kinships
        theirs = loco_scan(work, kinships, covariates=covariates,
                           tag="gn2c" if covariates else "gn2p")
    else:
        theirs = full_scan(tmp_path, covariates=covariates)
        assert read_assoc(Path(record["files"][0][2])) == theirs  # the file, every column
    assert len(markers) == len(theirs) > 7300  # GN2 read every chromosome, in order
    for m in markers:  # GEMMA's `nan` is a nan here too
        assert repr(m["p_value"]) == repr(float(theirs[m["name"]]["p_lrt"])), m["name"]


def gn3_compose_gemma_cmd(gemma_wrapper_cmd: str, gemma_wrapper_kwargs: dict | None,
                          gemma_kwargs: dict, gemma_args: list) -> str:
    """GN3's gn3.commands.compose_gemma_cmd, as is."""
    cmd = f"{gemma_wrapper_cmd} --json"
    if gemma_wrapper_kwargs:
        cmd += " "
        cmd += " ".join([f"--{key} {val}" for key, val in gemma_wrapper_kwargs.items()])
    cmd += " -- "
    if gemma_kwargs:
        cmd += " ".join([f"-{key} {val}" for key, val in gemma_kwargs.items()])
    if gemma_args:
        cmd += " "
        cmd += " ".join([f"{arg}" for arg in gemma_args])
    return cmd


def test_gn3s_k_compute_and_gwa_command_lines_all_run(env, tmp_path, conn, workers):
    """GN3's /api/gemma routes queue generate_gemma_cmd's lines (each ends `-gk > OUT`,
    so gemma-wrapper computes a K record for every one); through GN3's queue and a
    sheepdog worker, every line ends `success` with a K record."""
    from test_gn3_dropin import queue_cmd_as_gn3

    token = tmp_path / "token"
    token.mkdir()
    files = {"g": str(GENO), "p": str(PHENO), "a": str(ANNO)}

    def line(name: str, wrapper: dict | None = None, **more) -> tuple[str, str]:
        out = token / f"{name}-output.json"
        return name, gn3_compose_gemma_cmd(WRAPPER, wrapper, {**files, **more},
                                           ["-gk", ">", str(out)])

    k_json = token / "k-compute-output.json"
    lines = [
        line("k-compute"),
        line("k-compute-loco", {"loco": ",".join(chromosomes())}),
        line("gwa-compute", {"input": str(k_json)}, lmm=9),
        line("gwa-compute-covars", {"input": str(k_json)}, c=str(COVARIATES), lmm=9),
        line("gwa-loco-maf", {"loco": f"--input {k_json}"}, lmm=9, maf=0.05),
        line("gwa-loco-covars-maf", {"loco": f"--input {k_json}"}, c=str(COVARIATES), lmm=9,
             maf=0.05),
    ]
    k_gwa = [line("k-gwa-k")[1], line("k-gwa-gwa", {"input": str(k_json)}, lmm=9)[1]]
    lines.append(("k-gwa", " && ".join(k_gwa)))
    workers.start("--gn3-queue", "-j", "3")
    for name, cmd in lines:
        queue_cmd_as_gn3(conn, "GN3::job-queue", f"cmd::{name}", cmd)
        wait = 300 if name == "k-compute" else 120
        deadline_ok = _wait_gn3(conn, f"cmd::{name}", wait)
        assert deadline_ok == "success", (name, cmd, conn.hget(f"cmd::{name}", "stderr"))
        out = "k-gwa-gwa" if name == "k-gwa" else name
        record = json.loads((token / f"{out}-output.json").read_text())
        assert record["type"] == "K" and record["errno"] == 0, (name, record)


def _wait_gn3(conn, cmd_id: str, timeout: float) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = (conn.hget(cmd_id, "status") or b"").decode()
        if status in ("success", "error"):
            return status
        time.sleep(0.1)
    return "timeout"


@pytest.mark.parametrize("args,named", [
    (["--json", "--slurm", "--", "-g", "x", "-gk"], "--slurm"),
    (["--json", "--frobnicate", "--", "-g", "x", "-gk"], "--frobnicate"),
    (["--json", "--loco", "--", "-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO), "-gk",
      "2"], "-gk 2"),
    (["--json", "--loco", "--", "-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO), "-gk",
      "-miss", "0.1"], "-miss"),
    (["--json", "--input", "K.json", "--", "-g", str(GENO), "-p", str(PHENO), "-a",
      str(ANNO), "-lmm", "9"], "K.json"),
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
