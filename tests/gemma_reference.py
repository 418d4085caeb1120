"""GEMMA's own LOCO, run the plain serial way, as the reference sheepdog must equal."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import BXD

GENO, PHENO, ANNO = BXD / "BXD_geno.txt.gz", BXD / "BXD_pheno.txt", BXD / "BXD_snps.txt"
COVARIATES = BXD / "BXD_covariates2.txt"
# its two columns are equal over the analysed individuals: GEMMA stops, singular
SINGULAR_COVARIATES = BXD / "BXD_covariates.txt"


def chromosomes() -> list[str]:
    seen: list[str] = []
    for line in ANNO.read_text().splitlines():
        if line.split()[2] not in seen:
            seen.append(line.split()[2])
    return seen


def gemma(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(["gemma", *argv], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=env)


def loco_kinships(work: Path) -> dict[str, Path]:
    """GEMMA's `-gk 1 -loco c` for every chromosome."""
    out = {}
    for c in chromosomes():
        gemma(["-g", str(GENO), "-p", str(PHENO), "-a", str(ANNO), "-gk", "1", "-loco", c,
               "-o", f"k{c}"], work)
        out[c] = work / "output" / f"k{c}.cXX.txt"
    return out


def read_assoc(path: Path) -> dict[str, dict[str, str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return {row.split("\t")[1]: dict(zip(header, row.split("\t"), strict=True))
            for row in lines[1:]}


def loco_scan(work: Path, kinships: dict[str, Path], pheno: Path = PHENO,
              covariates: Path | None = None, tag: str = "l",
              env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """GEMMA's `-lmm 9 -maf 0.1 -loco c` for every chromosome, merged by SNP."""
    merged: dict[str, dict[str, str]] = {}
    for c, k in kinships.items():
        argv = ["-g", str(GENO), "-p", str(pheno), "-a", str(ANNO), "-k", str(k), "-lmm", "9",
                "-maf", "0.1", "-loco", c, "-o", f"{tag}{c}"]
        if covariates:
            argv += ["-c", str(covariates)]
        gemma(argv, work, env)
        merged.update(read_assoc(work / "output" / f"{tag}{c}.assoc.txt"))
    return merged


def full_scan(work: Path, pheno: Path = PHENO, covariates: Path | None = None,
              tag: str = "f") -> dict[str, dict[str, str]]:
    """GEMMA without LOCO, serially: `-gk 1` over all SNPs, then `-lmm 9` against it."""
    gemma(["-g", str(GENO), "-p", str(pheno), "-a", str(ANNO), "-gk", "1", "-o", f"{tag}k"],
          work)
    argv = ["-g", str(GENO), "-p", str(pheno), "-a", str(ANNO), "-k",
            str(work / "output" / f"{tag}k.cXX.txt"), "-lmm", "9", "-o", f"{tag}gwa"]
    if covariates:
        argv += ["-c", str(covariates)]
    gemma(argv, work)
    return read_assoc(work / "output" / f"{tag}gwa.assoc.txt")
