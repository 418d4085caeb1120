"""One chromosome's centered kinship, computed as GEMMA's `-gk 1` computes it.

GEMMA (BimbamKin, after ReadFile_geno's SNP filters) keeps a SNP when at most 5% of
its genotypes are missing, its minor allele frequency is at least 0.01 and it is
polymorphic; it fills missing genotypes with the SNP's mean, centres each SNP, and
averages x xᵀ over the kept SNPs. Kinship is computed over every individual, so it does
not depend on the phenotype. A test compares this with GEMMA's own output per chromosome.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..formats.bimbam import MISSING, geno_fields, lines

MISS_LEVEL = 0.05
MAF_LEVEL = 0.01


BLOCK = 1024  # SNPs at a time: bounded memory (BXD chromosomes fit in one block)


def read_genotypes(path: Path) -> np.ndarray:
    """SNPs x individuals, NaN where the file says NA (the file was validated before):
    the split's .npy matrix (mapped, read block by block), or a BIMBAM text file."""
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            return np.load(path, mmap_mode="r")
    rows = [",".join(geno_fields(text)[3:]) for _, text in lines(path)]
    if not rows:
        return np.zeros((0, 0))
    values = np.array(",".join(rows).replace(MISSING, "nan").split(","), dtype=np.float64)
    return values.reshape(len(rows), -1)


def _centred_block(block: np.ndarray) -> np.ndarray:
    """The SNPs of a block that GEMMA keeps, mean-filled and centred."""
    n = block.shape[1]
    missing = np.isnan(block)
    n_miss = missing.sum(axis=1)
    present = n - n_miss
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(missing, 0.0, block).sum(axis=1) / present
        freq = mean / 2.0
        lo = np.where(missing, np.inf, block).min(axis=1)
        hi = np.where(missing, -np.inf, block).max(axis=1)
    keep = ((n_miss / n) <= MISS_LEVEL) & (freq >= MAF_LEVEL) & (freq <= 1.0 - MAF_LEVEL) \
        & (present > 0) & (lo != hi)
    x = block[keep]
    return np.where(np.isnan(x), mean[keep, None], x) - mean[keep, None]


def centered_kinship(genotypes: np.ndarray) -> tuple[np.ndarray, int]:
    """(K, number of SNPs used) for a SNPs x individuals matrix, BLOCK SNPs at a time."""
    n = genotypes.shape[1]
    total = np.zeros((n, n))
    used = 0
    for start in range(0, genotypes.shape[0], BLOCK):
        x = _centred_block(np.asarray(genotypes[start:start + BLOCK], dtype=np.float64))
        if len(x):
            total += x.T @ x
            used += len(x)
    if used == 0:
        return total, 0
    return total / used, used


def write(out: Path, matrix: np.ndarray, snps: int) -> None:
    np.save(out / "kinship.npy", matrix)
    (out / "kinship.json").write_text(json.dumps({"snps": snps, "individuals": len(matrix)}))


def read(directory: Path) -> tuple[np.ndarray, int]:
    meta = json.loads((directory / "kinship.json").read_text())
    return np.load(directory / "kinship.npy"), int(meta["snps"])
