"""LOCO kinships from per-chromosome kinships, by GEMMA's own averaging.

GEMMA's centered kinship is a mean over SNPs, so with K_c and p_c the kinship and SNP
count of chromosome c alone, the kinship leaving c out is
    (sum_d p_d K_d - p_c K_c) / (sum_d p_d - p_c).
Per-chromosome kinships replace twenty kinship runs over nearly the whole genome.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GatherError


def read_matrix(path: Path) -> np.ndarray:
    values = np.array(path.read_text().split(), dtype=np.float64)
    n = int(round(len(values) ** 0.5))
    if n * n != len(values):
        raise GatherError(f"{path}: {len(values)} numbers is not a square kinship matrix")
    return values.reshape(n, n)


def write_matrix(path: Path, matrix: np.ndarray) -> None:
    # 10 significant digits, as GEMMA writes its own kinship: GEMMA's `-lmm -loco c`
    # then reads (almost always) the very numbers it would have read from its own file
    np.savetxt(path, matrix, fmt="%.10g", delimiter="\t")


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
