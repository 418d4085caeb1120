"""Permutation tests: shuffled phenotypes, per-permutation genome-wide minima, thresholds.

Shuffling moves only the non-missing values; NA positions stay where they are, so the
analysed individuals, and hence every kinship, are the same in every permutation. That
lets the pieces run GEMMA on files cut down to the analysed individuals, and test each
distinct genotype pattern once: SNPs with the same genotypes get the same statistics
(GEMMA tests SNPs independently), so the genome-wide minimum is unchanged, and the
first SNP of a pattern is kept, as GEMMA's own first minimum would be. On BXD that is
2,786 patterns for 7,320 SNPs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import SheepdogError
from ...process import capture
from ..commands import PERMUTATION_ENV, lmm_argv
from ..formats.bimbam import MISSING, geno_fields, lines
from .loco import write_matrix
from .merge import read_min_p


def permuted(values: list[str], seed: int, index: int) -> list[str]:
    """Permutation `index` of a phenotype column: non-missing values shuffled, NA fixed.

    Depends only on (seed, index), so any batch can make any permutation.
    """
    present = [i for i, v in enumerate(values) if v != MISSING]
    order = np.random.default_rng([seed, index]).permutation(len(present))
    out = list(values)
    for slot, source in zip(present, order, strict=True):
        out[slot] = values[present[source]]
    return out


def thresholds(minima: list[float]) -> dict[str, Any]:
    """gemma-wrapper's rule: sort the n minima; significant = element floor(n - 0.95 n),
    suggestive = element floor(n - 0.67 n) (0-based), reported as p and -log10 p."""
    ps = sorted(minima)
    n = len(ps)
    if n == 0:
        raise SheepdogError("no permutations to compute thresholds from")
    significant = ps[math.floor(n - n * 0.95)]
    suggestive = ps[math.floor(n - n * 0.67)]
    return {
        "permutations": n,
        "significant": significant, "suggestive": suggestive,
        "significant_minus_log10": -math.log10(significant) if significant > 0 else math.inf,
        "suggestive_minus_log10": -math.log10(suggestive) if suggestive > 0 else math.inf,
    }


def analysed(pheno: list[str]) -> list[int]:
    """Individuals whose phenotype is present: the ones permutations shuffle among.

    (GEMMA itself still drops any of them whose covariates are missing.)
    """
    return [i for i, v in enumerate(pheno) if v != MISSING]


def prepare(pheno: list[str], covariates: list[list[str]] | None,
            chromosomes: dict[str, tuple[Path, Path, np.ndarray]], out: Path) -> None:
    """Cut every chromosome's geno file and LOCO kinship down to the analysed individuals.

    chromosomes: name -> (geno, anno, LOCO kinship matrix). Writes geno.C, anno.C, kin.C,
    pheno.txt (values of the kept individuals), covariates.txt, meta.json into out.
    """
    keep = analysed(pheno)
    snps = patterns = 0
    for chrom, (geno, anno, kinship) in chromosomes.items():
        seen: set[str] = set()
        with open(out / f"geno.{chrom}.txt", "w") as f:
            for _, text in lines(geno):
                parts = geno_fields(text)
                genotypes = ", ".join(parts[3 + i] for i in keep)
                snps += 1
                if genotypes in seen:
                    continue
                seen.add(genotypes)
                patterns += 1
                f.write(", ".join(parts[:3]) + ", " + genotypes + "\n")
        shutil.copyfile(anno, out / f"anno.{chrom}.txt")
        write_matrix(out / f"kin.{chrom}.txt", kinship[np.ix_(keep, keep)])
    (out / "pheno.txt").write_text("".join(pheno[i] + "\n" for i in keep))
    if covariates:
        (out / "covariates.txt").write_text(
            "".join("\t".join(covariates[i]) + "\n" for i in keep))
    meta = {"analysed": keep, "chromosomes": list(chromosomes),
            "covariates": bool(covariates), "snps": snps, "patterns": patterns}
    (out / "meta.json").write_text(json.dumps(meta))


MIN_RULES = ("sheepdog", "gemma-wrapper")


def run_permutation(prepared: Path, values: list[str], lmm: int, work: Path,
                    min_rule: str = "sheepdog", extra: list[str] | None = None,
                    stop: threading.Event | None = None) -> dict[str, Any]:
    """GEMMA on every chromosome for one permuted phenotype; its genome-wide minimum."""
    meta = json.loads((prepared / "meta.json").read_text())
    pheno = work / "pheno.txt"
    pheno.write_text("".join(v + "\n" for v in values))
    cov = prepared / "covariates.txt" if meta["covariates"] else None
    best: tuple[float, str, str] = (math.inf, "", "")
    env = dict(os.environ, **PERMUTATION_ENV)
    for chrom in meta["chromosomes"]:
        argv = lmm_argv(str(prepared / f"geno.{chrom}.txt"), str(pheno),
                        str(prepared / f"anno.{chrom}.txt"), str(prepared / f"kin.{chrom}.txt"),
                        lmm, [], covariates=str(cov) if cov else None, extra=extra)
        code, _, err = capture(argv, work, env, stop=stop)
        if code == -1:
            raise SheepdogError("cancelled")
        if code != 0:
            raise SheepdogError(f"GEMMA failed on chromosome {chrom} (exit {code}): "
                                f"{err.strip()[-500:]}")
        found = read_min_p(work / "output" / "lmm.assoc.txt", min_rule)
        if found[0] < best[0]:
            best = found
    return {"min_p": best[0], "chr": best[1], "rs": best[2]}


def run_batch(prepared: Path, seed: int, first: int, count: int, total: int, lmm: int,
              out: Path, emit: Callable[[str], None] = print,
              stop: threading.Event | None = None, min_rule: str = "sheepdog",
              extra: list[str] | None = None) -> None:
    """Permutations first..first+count-1; says progress i/N; writes batch.json."""
    values = (prepared / "pheno.txt").read_text().split()
    results = []
    with tempfile.TemporaryDirectory(dir=out.resolve()) as tmp:
        for index in range(first, first + count):
            if stop is not None and stop.is_set():
                raise SheepdogError("cancelled")
            found = run_permutation(prepared, permuted(values, seed, index), lmm,
                                    Path(tmp), min_rule, extra, stop)
            found["index"] = index
            results.append(found)
            emit(f"permutation {index + 1}/{total}: min p {found['min_p']:.4g} "
                 f"(chr {found['chr']}, {found['rs']})")
    (out / "batch.json").write_text(json.dumps({"seed": seed, "first": first,
                                                "permutations": results}))
