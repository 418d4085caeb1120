"""LOCO and whole-genome kinships from per-chromosome kinships, by GEMMA's own averaging.

GEMMA's centered kinship is a mean over SNPs, so with K_c and p_c the kinship and SNP
count of chromosome c alone, the kinship leaving c out is
    (sum_d p_d K_d - p_c K_c) / (sum_d p_d - p_c).
Per-chromosome kinships replace twenty kinship runs over nearly the whole genome.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ...errors import GatherError


def read_matrix(path: Path) -> np.ndarray:
    values = np.array(path.read_text().split(), dtype=np.float64)
    n = int(round(len(values) ** 0.5))
    if n * n != len(values):
        raise GatherError(f"{path}: {len(values)} numbers is not a square kinship matrix")
    return values.reshape(n, n)


def write_matrix(path: Path, matrix: np.ndarray) -> None:
    # 10 significant digits, as GEMMA writes its own kinship: GEMMA's `-lmm -loco c`
    # then reads (almost always) the very numbers it would have read from its own file
    row = "\t".join(["%.10g"] * matrix.shape[1]) + "\n"
    with open(path, "w") as f:  # a quarter faster than np.savetxt, still row by row
        f.writelines(row % tuple(r.tolist()) for r in matrix)


Kinships = Iterable[tuple[str, tuple[np.ndarray, int]]]


def _weighted(kinships: Kinships, keep: str | None = None
              ) -> tuple[np.ndarray | None, int, int, tuple[np.ndarray, int] | None]:
    """(sum_d p_d K_d, sum_d p_d, how many, `keep`'s (K, p)), one kinship at a time."""
    weighted: np.ndarray | None = None
    total = count = 0
    kept: tuple[np.ndarray, int] | None = None
    for name, (k, p) in kinships:
        if weighted is not None and k.shape != weighted.shape:
            raise GatherError(f"kinship of chromosome {name} is {k.shape}, others "
                              f"{weighted.shape}")
        weighted = k * p if weighted is None else weighted + k * p
        total += p
        count += 1
        if name == keep:
            kept = (k, p)
    return weighted, total, count, kept


def loco_from(chromosome: str, kinships: Kinships) -> np.ndarray:
    """The LOCO kinship of one chromosome, from (name, (K, p)) pairs given one at a time."""
    weighted, total, count, own = _weighted(kinships, chromosome)
    if count < 2 or weighted is None:
        raise GatherError("LOCO needs at least two chromosomes")
    if own is None:
        raise GatherError(f"no kinship for chromosome {chromosome}")
    if total - own[1] <= 0:
        raise GatherError(f"no SNPs left for the LOCO kinship of chromosome {chromosome}")
    return (weighted - own[1] * own[0]) / (total - own[1])


def full_from(kinships: Kinships) -> np.ndarray:
    """The kinship of all SNPs (GEMMA's -gk 1 over the whole genome), from (name, (K, p))
    pairs given one at a time: sum_d p_d K_d / sum_d p_d."""
    weighted, total, _, _ = _weighted(kinships)
    if weighted is None or total <= 0:
        raise GatherError("no SNPs for the kinship")
    return weighted / total


def loco_kinships(per_chromosome: dict[str, tuple[np.ndarray, int]],
                  only: str | None = None) -> dict[str, np.ndarray]:
    """chromosome -> (K_c, p_c) in; chromosome -> LOCO kinship out (or just `only`'s)."""
    if len(per_chromosome) < 2:
        raise GatherError("LOCO needs at least two chromosomes")
    shapes = {k.shape for k, _ in per_chromosome.values()}
    if len(shapes) != 1:
        raise GatherError(f"per-chromosome kinships differ in shape: {sorted(shapes)}")
    weighted = sum(k * p for k, p in per_chromosome.values())
    total = sum(p for _, p in per_chromosome.values())
    out = {}
    for chrom, (k, p) in per_chromosome.items():
        if only is not None and chrom != only:
            continue
        if total - p <= 0:
            raise GatherError(f"no SNPs left for the LOCO kinship of chromosome {chrom}")
        out[chrom] = (weighted - p * k) / (total - p)
    return out
