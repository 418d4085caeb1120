"""Permutation thresholds: gemma-wrapper's rules, reproducible, equal to direct GEMMA runs."""

from __future__ import annotations

import json
import math
import os

from conftest import BXD, sheepdog
from gemma_reference import loco_scan

from sheepdog.gemma.commands import PERMUTATION_ENV
from sheepdog.gemma.scan.permute import permuted, thresholds

PHENO_VALUES = (BXD / "BXD_pheno.txt").read_text().split()


def test_a_permutation_moves_only_present_values_and_keeps_na_in_place():
    shuffled = permuted(PHENO_VALUES, seed=7, index=3)
    assert [i for i, v in enumerate(shuffled) if v == "NA"] == \
        [i for i, v in enumerate(PHENO_VALUES) if v == "NA"]
    assert sorted(v for v in shuffled if v != "NA") == sorted(v for v in PHENO_VALUES
                                                            if v != "NA")
    assert shuffled != PHENO_VALUES
    assert permuted(PHENO_VALUES, 7, 3) == shuffled  # a function of (seed, index) only
    assert permuted(PHENO_VALUES, 7, 4) != shuffled


def test_thresholds_follow_gemma_wrappers_indices():
    minima = [(i + 1) / 1000 for i in range(1000)][::-1]  # given unsorted on purpose
    t = thresholds(minima)
    # sorted ascending; significant = [floor(n - 0.95 n)], suggestive = [floor(n - 0.67 n)]
    assert t["significant"] == 51 / 1000 and t["suggestive"] == 331 / 1000
    assert t["significant_minus_log10"] == -math.log10(51 / 1000)
    small = thresholds([0.5, 0.1, 0.3, 0.2, 0.4, 0.6, 0.7])
    assert (small["significant"], small["suggestive"]) == (0.1, 0.3)


def test_permutations_run_as_batches_and_match_a_direct_gemma_run(env, tmp_path,
                                                                  gemma_loco_kinships):
    out = tmp_path / "perm"
    r = sheepdog("run", "gemma-permute", "--example", "--permutations", "5", "--seed", "7",
                 "--batch-size", "2", "--out", str(out), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(1, 6):
        assert f"permutation {i}/5: min p" in r.stdout
    result = json.loads((out / "permutations.json").read_text())
    assert [m["index"] for m in result["minima"]] == [0, 1, 2, 3, 4]
    assert result["permutations"] == 5
    assert result == {**result, **thresholds([m["min_p"] for m in result["minima"]])}
    summary = json.loads((out / "result.json").read_text())
    assert summary["permutations"]["seed"] == 7
    assert summary["permutations"]["significant"] == result["significant"]
    assert (out / "manhattan.png").exists() and (out / "assoc.txt").exists()
    # permutation 3 (index 2), done by hand: the permuted file, GEMMA's own LOCO scan
    work, kinships = gemma_loco_kinships
    pheno = tmp_path / "permuted.txt"
    pheno.write_text("\n".join(permuted(PHENO_VALUES, 7, 2)) + "\n")
    # the same GEMMA settings as the batches (GEMMA's last digit depends on threads)
    direct = loco_scan(work, kinships, pheno=pheno, tag="perm",
                       env=dict(os.environ, **PERMUTATION_ENV))
    best = min(direct.values(), key=lambda row: float(row["p_lrt"]))
    recorded = result["minima"][2]
    assert recorded["min_p"] == float(best["p_lrt"])
    assert recorded["rs"] == best["rs"] and recorded["chr"] == best["chr"]


def test_the_same_seed_gives_the_same_thresholds_from_the_cache(env, tmp_path):
    args = ["run", "gemma-permute", "--example", "--permutations", "3", "--seed", "11",
            "--batch-size", "3"]
    a = sheepdog(*args, "--out", str(tmp_path / "a"), env=env, timeout=600)
    b = sheepdog(*args, "--out", str(tmp_path / "b"), env=env, timeout=600)
    assert a.returncode == 0 and b.returncode == 0
    assert "cache hit" in b.stderr
    assert (tmp_path / "a" / "permutations.json").read_text() == \
        (tmp_path / "b" / "permutations.json").read_text()
